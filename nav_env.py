"""The navigation task of the EMPO paper (Appendix A): environment, offline data set, route classes, maps.

Paper: Appendix A (the task, Algorithm 3, Eq. 15), Appendix C and Table 1 (the evaluation from s_0), Figure 1a.
Input   none: ``--subgoals`` names the behaviours' routes (the paper's two by default).
Output  ``--out`` (schema empo/dataset/v1, docs/schemas.md): observations, actions, rewards, next_observations,
        terminals, timeouts, episode_ids, behaviour (the label of the subgoal list); with ``--minari-id`` the same
        data as a local Minari data set, with ``--figure`` the map of Figure 1a.
The stages import from here the JAX environment (``NavParams``, ``reset``, ``step``, ``rollout``: many episodes in
one scan), the route classes of Table 1 (``route_classes``), the evaluation table (``report_rollouts``) and the maps
(``plot_map``, ``plot_runs``); ``NavEnv`` is the same task as a gymnasium.Env, registered as ``EMPONav-v0``.

Paper map
    Appendix A   S, A, S_p, g, s' = clip(s + a; 0, 30), r(s, a, s')                 -> NavParams, step
    Eq. (15)     pi(s; g_s) = clip(clip(g_s - s; -0.2, 0.2) + 0.1 eps; -0.2, 0.2)  -> subgoal_action
    Algorithm 3  a data set from a list of subgoals, once per behaviour                -> generate_behaviour
    Table 1      "the optimal route" of a rollout                                      -> route_classes

Interpretations and deviations (item N is discussed as item N of docs/nav_env.md)
    1. Reaching g is ``terminated``; the 1000th step without reaching it is ``truncated`` (not "terminates").
    2. A generated episode that has not reached g after 1000 steps ends there, flagged ``timeouts``.
    3. Consecutive subgoals are more than 0.4 apart, so the subgoal index advances at most once per step.
    4. "Until D has 1,000,000 elements": whole episodes, so a behaviour holds slightly more rows.
    5. The goal test is ||s' - g||^2 < 0.1^2 (the same set, bit-equal in NumPy and JAX); S_p is closed.
    6. ``rewards`` are r(s, a, s'): a step that ends inside S_p costs -2, the goal step 0.
    7. Table 1's "optimal route" is the route class ``fast``: g reached without S_p, low past S_p, in <= 450 steps.

Example: python nav_env.py --out data/nav.npz --figure docs/dataset.png
"""

from __future__ import annotations

import empo_io  # noqa: F401  first: its start-up guard makes Ctrl-C while the libraries load one sentence

# isort: split

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import struct

# isort: off
from empo_io import DATASET_SCHEMA, InputError, check_minari_id, check_writable, save_npz, save_figure
from empo_io import fetch, run, validate_dataset
# isort: on


@dataclass
class Args:
    """Generate the offline navigation data set of Appendix A (Algorithm 3, once per behaviour)."""

    out: str = "data/nav.npz"
    """where to write the data set (.npz, schema empo/dataset/v1); written atomically"""
    seed: int = 0
    """random seed of the generator (start states and the Eq. 15 noise)"""
    transitions_per_behaviour: int = 1_000_000
    """Algorithm 3's "1 000 000 elements": whole episodes are added until a behaviour has this many rows"""
    subgoals: str = "paper"
    """the behaviours' subgoal lists (one behaviour each): a name from SUBGOAL_SETS ('paper': the paper's two, 'one':
    its behaviour 0 alone, 'three' and 'four': the paper's behaviour 0 and two or three routes of the same length
    or longer that meet it and each other going opposite ways; 'start3', 'segment', 'five': sets that stress --k auto,
    see SUBGOAL_SETS), or a JSON list of
    lists of [x, y] subgoals, e.g. '[[[0, 30]], [[30, 0]]]'"""
    shares: tuple[float, ...] = ()
    """the behaviours' shares of the data set's transitions, one per behaviour (e.g. '0.9 0.1'; empty: equal):
    behaviour i gets about share_i x (number of behaviours) x --transitions-per-behaviour rows (whole episodes)"""
    minari_id: Optional[str] = None
    """also write the data set as a local Minari data set with this id (HDF5; the behaviour label
    is stored in each episode's metadata), e.g. 'empo/nav/mixed-v0'"""
    figure: Optional[str] = None
    """also draw a few trajectories of each behaviour on the map (the paper's Figure 1a) to this PNG"""


# ----------------------------------------------------------------------------------------------
# The environment (Appendix A)
# ----------------------------------------------------------------------------------------------

@struct.dataclass
class NavParams:
    """Every constant of the navigation task; defaults are Appendix A."""

    state_low: float = 0.0  # S = [0, 30]^2
    state_high: float = 30.0
    max_action: float = 0.2  # A = [-0.2, 0.2]^2
    start_high: float = 0.1  # s_0 ~ U([0, 0.1]^2)
    goal: tuple = (30.0, 30.0)  # g
    goal_radius: float = 0.1  # terminated when ||s' - g|| < 0.1
    penalty_low: tuple = (15.0, 0.0)  # S_p = [15, 30] x [0, 10], closed
    penalty_high: tuple = (30.0, 10.0)
    reward_step: float = -1.0
    reward_penalty: float = -2.0
    reward_goal: float = 0.0
    max_steps: int = struct.field(pytree_node=False, default=1000)  # truncated after this many


@struct.dataclass
class NavState:
    pos: jax.Array  # [2] float32
    t: jax.Array  # [] int32, steps taken so far


def in_penalty(pos: jax.Array, params: NavParams) -> jax.Array:
    """pos in S_p (closed box). Works on [..., 2]."""
    low, high = jnp.asarray(params.penalty_low), jnp.asarray(params.penalty_high)
    return jnp.all((pos >= low) & (pos <= high), axis=-1)


def at_goal(pos: jax.Array, params: NavParams) -> jax.Array:
    """||pos - g|| < radius, written with squared distances. Works on [..., 2]."""
    diff = pos - jnp.asarray(params.goal, dtype=jnp.float32)
    return jnp.sum(diff * diff, axis=-1) < jnp.float32(params.goal_radius) ** 2


def reset(key: jax.Array, params: NavParams) -> tuple[jax.Array, NavState]:
    """s_0 ~ U([0, start_high]^2). Returns (obs, state)."""
    pos = jax.random.uniform(key, (2,), jnp.float32, 0.0, params.start_high)
    return pos, NavState(pos=pos, t=jnp.int32(0))


def step(key: jax.Array, state: NavState, action: jax.Array, params: NavParams):
    """One step of Appendix A. Returns (obs, state, reward, terminated, truncated).

    The dynamics are deterministic; ``key`` is accepted for the gymnax-style signature.
    No automatic reset: callers mask steps after the episode's end (see ``rollout``).
    """
    del key
    action = jnp.clip(action.astype(jnp.float32), -params.max_action, params.max_action)
    pos = jnp.clip(state.pos + action, params.state_low, params.state_high)  # s' = clip(s + a; 0, 30)
    terminated = at_goal(pos, params)
    reward = jnp.where(
        terminated, params.reward_goal,
        jnp.where(in_penalty(pos, params), params.reward_penalty, params.reward_step),
    ).astype(jnp.float32)
    t = state.t + 1
    truncated = (t >= params.max_steps) & ~terminated
    return pos, NavState(pos=pos, t=t), reward, terminated, truncated


def rollout(key: jax.Array, policy: Callable, num_episodes: int, params: NavParams = NavParams()):
    """Run ``num_episodes`` episodes of ``policy(key, obs[E,2]) -> actions[E,2]`` in one scan.

    Jit-friendly (``num_episodes`` and ``params.max_steps`` are static). Returns a dict of
    ``positions [E, T+1, 2]`` (s_0 .. s_T, frozen after the end), ``alive [E, T]`` (step t was
    taken), ``rewards [E, T]`` (0 after the end) and per-episode ``return``, ``length``,
    ``goal`` (reached g), ``penalty_steps`` (steps that ended in S_p) and ``optimal_route``
    (reached g without ever entering S_p: the fast route or a detour, see ``route_classes``).
    """
    key_reset, key_steps = jax.random.split(key)
    obs, state = jax.vmap(reset, in_axes=(0, None))(jax.random.split(key_reset, num_episodes), params)
    step_env = jax.vmap(step, in_axes=(None, 0, 0, None))

    def body(carry, key_t):
        state, done = carry
        actions = policy(key_t, state.pos)  # [E, 2]
        pos, next_state, reward, terminated, truncated = step_env(key_t, state, actions, params)
        alive = ~done
        # Finished episodes keep their last state.
        next_state = jax.tree.map(lambda new, old: jnp.where(done.reshape((-1,) + (1,) * (new.ndim - 1)), old, new),
                                  next_state, state)
        out = dict(pos=next_state.pos, alive=alive, reward=jnp.where(alive, reward, 0.0),
                   penalty=alive & in_penalty(pos, params), goal=alive & terminated)
        return (next_state, done | terminated | truncated), out

    keys = jax.random.split(key_steps, params.max_steps)
    (_, _), out = jax.lax.scan(body, (state, jnp.zeros(num_episodes, bool)), keys)
    out = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), out)  # time-major -> [E, T, ...]
    entered = jnp.any(out["penalty"], axis=1)
    goal = jnp.any(out["goal"], axis=1)
    return dict(
        positions=jnp.concatenate([obs[:, None], out["pos"]], axis=1),
        alive=out["alive"], rewards=out["reward"],
        **{"return": out["reward"].sum(1)}, length=out["alive"].sum(1).astype(jnp.int32),
        goal=goal, penalty_steps=out["penalty"].sum(1).astype(jnp.int32), optimal_route=goal & ~entered,
    )


class NavEnv(gym.Env):
    """Gymnasium adapter with the dynamics of ``step`` (NumPy, float32), its own time limit included.

    The limit is not left to gymnasium's TimeLimit wrapper, which would report ``truncated`` as
    well as ``terminated`` when the goal is reached on the last allowed step.
    """

    metadata = {"render_modes": []}

    def __init__(self, params: NavParams = NavParams()):
        self.params = params
        p = params
        self.observation_space = gym.spaces.Box(p.state_low, p.state_high, (2,), np.float32)
        self.action_space = gym.spaces.Box(-p.max_action, p.max_action, (2,), np.float32)
        self._goal = np.asarray(p.goal, np.float32)
        self._pos = np.zeros(2, np.float32)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(0.0, self.params.start_high, 2).astype(np.float32)
        self._t = 0
        return self._pos.copy(), {}

    def step(self, action):
        p = self.params
        action = np.clip(np.asarray(action, np.float32), -p.max_action, p.max_action)
        self._pos = np.clip(self._pos + action, p.state_low, p.state_high).astype(np.float32)
        diff = self._pos - self._goal
        terminated = bool(np.sum(diff * diff) < np.float32(p.goal_radius) ** 2)
        in_pen = bool(np.all((self._pos >= p.penalty_low) & (self._pos <= p.penalty_high)))
        reward = p.reward_goal if terminated else (p.reward_penalty if in_pen else p.reward_step)
        self._t += 1
        truncated = self._t >= p.max_steps and not terminated
        return self._pos.copy(), float(reward), terminated, truncated, {"in_penalty": in_pen}


if "EMPONav-v0" not in gym.registry:
    # A string entry point (not the class) so that Minari can store the spec as JSON.
    gym.register(id="EMPONav-v0", entry_point="nav_env:NavEnv")


# ----------------------------------------------------------------------------------------------
# The offline data set (Eq. 15, Algorithm 3)
# ----------------------------------------------------------------------------------------------

GOAL = (30.0, 30.0)
SUBGOALS = (
    ((0.0, 30.0), (10.0, 30.0), (10.0, 0.0), (20.0, 0.0), (20.0, 30.0)),  # behaviour 0
    ((10.0, 0.0), (10.0, 15.0), (20.0, 15.0), (20.0, 0.0), (30.0, 0.0)),  # behaviour 1
)
NOISE_SCALE = 0.1  # the 0.1 in front of epsilon in Eq. (15)
# Extra routes for --subgoals. A state-conditioned policy can only tell two behaviours apart where they visit the
# same states and act differently there, so each route runs the lines x = 10 and x = 20 in a direction of its
# own (up or down, the whole way): every two routes meet on at least one of them going opposite ways.
ROUTE_UD = ((10.0, 0.0), (10.0, 30.0), (20.0, 30.0), (20.0, 0.0), (30.0, 0.0))  # x = 10 up, x = 20 down
ROUTE_UU = ((10.0, 0.0), (10.0, 30.0), (15.0, 30.0), (15.0, 0.0), (20.0, 0.0), (20.0, 30.0))  # both up
ROUTE_DD = ((0.0, 30.0), (10.0, 30.0), (10.0, 0.0), (15.0, 0.0), (15.0, 30.0), (20.0, 30.0), (20.0, 0.0),
            (30.0, 0.0))  # both down
SUBGOAL_SETS = {  # named subgoal lists for --subgoals: data sets with a known number of behaviours
    "paper": SUBGOALS,
    "one": SUBGOALS[:1],
    "three": (SUBGOALS[0], ROUTE_UD, ROUTE_UU),  # SUBGOALS[0] runs x = 10 down and x = 20 up
    "four": (SUBGOALS[0], ROUTE_UD, ROUTE_UU, ROUTE_DD),
    # Sets that stress --k auto: behaviours that share only the start (up, right, diagonal first, then states of
    # their own), two that differ in one short segment (a 5 x 5 jog off y = 0 at x = 15..20, otherwise the paper's
    # behaviour 0), and five behaviours (the four above and the paper's behaviour 1).
    "start3": (((0.0, 30.0),), ((30.0, 0.0),), ((15.0, 15.0),)),
    "segment": (SUBGOALS[0], ((0.0, 30.0), (10.0, 30.0), (10.0, 0.0), (15.0, 0.0), (15.0, 5.0), (20.0, 5.0),
                              (20.0, 30.0))),
    "five": (SUBGOALS[0], ROUTE_UD, ROUTE_UU, ROUTE_DD, SUBGOALS[1]),
}


def parse_subgoals(spec: str) -> tuple:
    """--subgoals: a name from SUBGOAL_SETS or a JSON list of subgoal lists; one sentence when it is neither."""
    if spec in SUBGOAL_SETS:
        return SUBGOAL_SETS[spec]
    try:
        lists = json.loads(spec)
        routes = tuple(tuple((float(x), float(y)) for x, y in goals) for goals in lists)
    except (ValueError, TypeError):
        routes = ()
    if not routes:
        raise InputError(f"--subgoals '{spec}' is neither one of {sorted(SUBGOAL_SETS)} nor a JSON list of lists of "
                         f"[x, y] subgoals")
    for goals in routes:
        waypoints = np.asarray(list(goals) + [GOAL], np.float32)
        if np.any(np.linalg.norm(np.diff(waypoints, axis=0), axis=1) <= 0.4):
            raise InputError(f"--subgoals: consecutive subgoals (and the last one and the goal) must be more than "
                             f"0.4 apart, got {list(goals)}")
    return routes


def subgoal_action(key: jax.Array, s: jax.Array, g: jax.Array, max_action: float = 0.2) -> jax.Array:
    """Eq. (15): pi(s; g_s) = clip(clip(g_s - s; -0.2, 0.2) + 0.1 eps; -0.2, 0.2), eps ~ N(0, I)."""
    eps = jax.random.normal(key, s.shape, jnp.float32)
    return jnp.clip(jnp.clip(g - s, -max_action, max_action) + NOISE_SCALE * eps, -max_action, max_action)


def generate_behaviour(key: jax.Array, waypoints: jax.Array, num_episodes: int, params: NavParams):
    """Algorithm 3 for ``num_episodes`` episodes at once; ``waypoints`` [W, 2] = subgoals + [g].

    Returns time-major-free arrays [E, T, ...] with T = params.max_steps and a mask ``valid``.
    Pure and jittable (``num_episodes`` static).
    """
    last = waypoints.shape[0] - 1
    radius2 = jnp.float32(params.goal_radius) ** 2

    def episode(key_ep):
        key_reset, key_steps = jax.random.split(key_ep)
        obs, state = reset(key_reset, params)

        def body(carry, key_t):
            state, idx, done = carry
            # Algorithm 3 line 6: move to the next subgoal once ||s - g_s|| < 0.1 (never past g).
            diff = state.pos - waypoints[idx]
            idx = jnp.where((jnp.sum(diff * diff) < radius2) & (idx < last), idx + 1, idx)
            action = subgoal_action(key_t, state.pos, waypoints[idx], params.max_action)  # Eq. (15)
            pos, next_state, reward, terminated, truncated = step(key_t, state, action, params)
            row = dict(obs=state.pos, action=action, reward=reward, next_obs=pos,
                       terminal=terminated, timeout=truncated, valid=~done)
            return (next_state, idx, done | terminated | truncated), row

        keys = jax.random.split(key_steps, params.max_steps)
        _, rows = jax.lax.scan(body, (state, jnp.int32(0), jnp.bool_(False)), keys)
        return rows

    return jax.vmap(episode)(jax.random.split(key, num_episodes))


_generate_batch = jax.jit(generate_behaviour, static_argnames=("num_episodes", "params"))


def generate_dataset(seed: int = 0, transitions_per_behaviour: int = 1_000_000,
                     subgoal_lists=SUBGOALS, params: NavParams = NavParams(),
                     log: Callable[[str], None] = print, shares: tuple = ()) -> dict:
    """Run Algorithm 3 once per subgoal list and concatenate; returns the data set arrays (NumPy). ``shares``
    (one per list, summing to 1) divides len(subgoal_lists) * transitions_per_behaviour rows among the behaviours;
    empty: each gets transitions_per_behaviour."""
    if transitions_per_behaviour < 1:
        raise InputError(f"--transitions-per-behaviour must be at least 1, got {transitions_per_behaviour}")
    targets = [transitions_per_behaviour] * len(subgoal_lists)
    if shares:
        targets = [max(1, round(s * len(subgoal_lists) * transitions_per_behaviour)) for s in shares]
    key = jax.random.key(seed)
    parts, first_episode = [], 0
    for label, (subgoals, transitions_per_behaviour) in enumerate(zip(subgoal_lists, targets)):
        waypoints = np.asarray(list(subgoals) + [params.goal], np.float32)
        gaps = np.linalg.norm(np.diff(waypoints, axis=0), axis=1)
        assert np.all(gaps > 0.4), "consecutive subgoals must be more than 0.4 apart (interpretation 3)"
        # Episodes per jitted batch: enough for the target in one or two batches, bounded in memory.
        batch = int(np.clip(np.ceil(transitions_per_behaviour / 400), 8, 2048))
        episodes, count = [], 0
        while count < transitions_per_behaviour:
            key, key_batch = jax.random.split(key)
            rows = jax.device_get(_generate_batch(key_batch, jnp.asarray(waypoints), batch, params))
            lengths = rows["valid"].sum(1)
            for e in range(batch):  # whole episodes, in order, until the target is reached
                if count >= transitions_per_behaviour:
                    break
                n = int(lengths[e])
                episodes.append({k: v[e, :n] for k, v in rows.items() if k != "valid"})
                count += n
        ids = np.concatenate([np.full(len(ep["reward"]), first_episode + i, np.int32)
                              for i, ep in enumerate(episodes)])
        cat = {k: np.concatenate([ep[k] for ep in episodes]) for k in episodes[0]}
        first_episode += len(episodes)
        parts.append(dict(
            observations=cat["obs"], actions=cat["action"], rewards=cat["reward"],
            next_observations=cat["next_obs"], terminals=cat["terminal"], timeouts=cat["timeout"],
            episode_ids=ids, behaviour=np.full(len(ids), label, np.int32),
        ))
        stats = behaviour_stats(parts[-1], params)
        log(f"behaviour {label}: {stats['episodes']} episodes, {count} transitions, "
            f"mean length {stats['mean_length']:.1f}, mean return {stats['mean_return']:.1f}, "
            f"mean penalty steps {stats['mean_penalty_steps']:.1f}, timeouts {stats['timeouts']}")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def behaviour_stats(data: dict, params: NavParams = NavParams()) -> dict:
    """Episodes, mean length, mean return, mean penalty steps and timeouts of a data set (NumPy)."""
    ids = data["episode_ids"] - data["episode_ids"].min()
    lengths = np.bincount(ids)
    returns = np.bincount(ids, weights=data["rewards"])
    pen = np.asarray(in_penalty(jnp.asarray(data["next_observations"]), params))
    penalty = np.bincount(ids, weights=pen)
    lengths, returns, penalty = (x[lengths > 0] for x in (lengths, returns, penalty))
    return dict(episodes=int(len(lengths)), mean_length=float(lengths.mean()),
                mean_return=float(returns.mean()), mean_penalty_steps=float(penalty.mean()),
                timeouts=int(data["timeouts"].sum()))


def write_minari(dataset_id: str, data: dict, params: NavParams = NavParams()) -> str:
    """Write ``data`` as a local Minari data set (HDF5), the behaviour label in each episode's metadata."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    buffers, labels = [], []
    starts = np.flatnonzero(np.r_[True, np.diff(data["episode_ids"]) != 0])
    ends = np.r_[starts[1:], len(data["episode_ids"])]
    for i, (a, b) in enumerate(zip(starts, ends)):
        obs = np.concatenate([data["observations"][a:b], data["next_observations"][b - 1:b]])
        buffers.append(EpisodeBuffer(
            id=i, observations=obs, actions=data["actions"][a:b], rewards=data["rewards"][a:b].tolist(),
            terminations=data["terminals"][a:b].tolist(), truncations=data["timeouts"][a:b].tolist(),
            infos={}))
        labels.append({"behaviour": int(data["behaviour"][a])})
    env = NavEnv(params)
    with warnings.catch_warnings():  # Minari's reminders about author and code link fields
        warnings.filterwarnings("ignore", category=UserWarning, module="minari")
        dataset = minari.create_dataset_from_buffers(
            dataset_id, buffers, env=gym.spec("EMPONav-v0"), eval_env=gym.spec("EMPONav-v0"),
            observation_space=env.observation_space, action_space=env.action_space,
            algorithm_name="subgoal policies (EMPO paper, Algorithm 3)", data_format="hdf5",
            description="EMPO navigation task: two behaviours generated by Algorithm 3 of the EMPO paper.")
    dataset.storage.update_episode_metadata(labels)
    return str(dataset.spec.data_path)


# ----------------------------------------------------------------------------------------------
# The map
# ----------------------------------------------------------------------------------------------

def plot_map(trajectories=(), labels=None, subgoals=None, title: Optional[str] = None,
             path: Optional[str] = None, label_names=None, params: NavParams = NavParams(),
             arrows=None, field=None, field_label: str = "") -> np.ndarray:
    """Draw S with S_p shaded, the start box, g, optional subgoals, and trajectories coloured by label.

    trajectories: list of [T_i, 2] arrays; labels: one int per trajectory; subgoals: list of
    lists of (x, y), one list per label; arrows: optional (xy [M,2], uv [M,2]) action field;
    field: optional [G, G] values on a regular grid over S (row = y), drawn underneath.
    Writes a PNG when ``path`` is given; always returns the image as uint8 [H, W, 3].
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(5, 5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if field is not None:
        image = ax.imshow(np.asarray(field), origin="lower", cmap="viridis", alpha=0.6,
                          extent=(params.state_low, params.state_high, params.state_low, params.state_high))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=field_label)
    (x0, y0), (x1, y1) = params.penalty_low, params.penalty_high
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color="tab:red", alpha=0.15, label="penalty area"))
    colours = [f"C{i}" for i in range(10)]
    labels = [0] * len(trajectories) if labels is None else [int(x) for x in labels]
    for traj, lab in zip(trajectories, labels):
        traj = np.asarray(traj)
        ax.plot(traj[:, 0], traj[:, 1], color=colours[lab % 10] if lab >= 0 else "grey", lw=0.8, alpha=0.8)
    if arrows is not None:
        xy, uv = (np.asarray(a) for a in arrows)
        ax.quiver(xy[:, 0], xy[:, 1], uv[:, 0], uv[:, 1], color="k", alpha=0.6)
    for lab, goals in enumerate(subgoals or []):
        g = np.asarray(goals)
        ax.plot(g[:, 0], g[:, 1], "x", color=colours[lab % 10], ms=8, mew=2)
    ax.plot([0], [0], "ks", ms=6)
    ax.plot([params.goal[0]], [params.goal[1]], "*", color="gold", mec="k", ms=16)
    handles = [Rectangle((0, 0), 1, 1, color="tab:red", alpha=0.15)]
    names = ["penalty area"]
    for lab in sorted({x for x in labels if x >= 0}):
        handles.append(Line2D([0], [0], color=colours[lab % 10]))
        names.append(label_names[lab] if label_names else f"label {lab}")
    ax.legend(handles, names, loc="center left", fontsize=8, framealpha=0.8)
    ax.set_xlim(params.state_low - 0.5, params.state_high + 0.5)
    ax.set_ylim(params.state_low - 0.5, params.state_high + 0.5)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path:
        save_figure(fig, path)
    return pixels


# ----------------------------------------------------------------------------------------------
# Evaluation reports (the paper's protocol: rollouts from s_0, Appendix C)
# ----------------------------------------------------------------------------------------------

EVAL_FIELDS = ("return", "goal", "penalty_steps", "length", "optimal_route")

# Route classes of a rollout (Table 1 of the paper counts the first one as its "optimal" route).
ROUTES = ("fast", "detour", "through S_p", "no goal")
ROUTE_FAST, ROUTE_DETOUR, ROUTE_PENALTY, ROUTE_NO_GOAL = range(4)
# The fast route passes S_p's column (x in [15, 30]) through the gap between S_p's top (y = 10) and the
# middle of the field: up x ~ 10 to y ~ 15, across to x ~ 20, up to g (300 steps without noise, about 365
# with the data's). A penalty-free route that rises above this height while still left of S_p's column
# (x < 15), e.g. up x = 0 to the top wall first (the paper's Figure 5d), is a detour in space; one that
# follows the fast corridor but takes more than FAST_MAX_STEPS (e.g. creeping where the behaviours
# disagree) is a detour in time. Both are "detour" (penalty-free, not the shortest route).
FAST_MAX_HEIGHT = 22.5  # half-way between the fast corridor (y = 15) and the top wall (y = 30)
FAST_MAX_STEPS = 450  # the fast route's ~365 steps plus a quarter; the detour up x = 0 takes ~550


def route_classes(positions, lengths, goal=None, params: NavParams = NavParams()) -> np.ndarray:
    """The route class (index into ROUTES) of every rollout, from its stored path (NumPy).

    positions [..., T+1, 2] (s_0 .. s_T, any float dtype), lengths [...] (steps taken). ``goal`` [...]:
    whether g was reached (the rollout's own flag); without it, whether the path's last state lies within
    the goal radius. Classes, first match wins:
        no goal      g not reached (stalled or timed out);
        through S_p  some state s_1 .. s_T lies in S_p (the closed box [15, 30] x [0, 10]);
        detour       some state with x < 15 (left of S_p's column) has y > FAST_MAX_HEIGHT, or the rollout
                     took more than FAST_MAX_STEPS steps;
        fast         otherwise: reached g without S_p, passed S_p's column low and in at most FAST_MAX_STEPS.
    """
    pos = np.asarray(positions, np.float64)
    lengths = np.asarray(lengths)
    steps = np.arange(pos.shape[-2])
    taken = (steps >= 1) & (steps <= lengths[..., None])  # s_1 .. s_T: the states the steps ended in
    low, high = np.asarray(params.penalty_low), np.asarray(params.penalty_high)
    in_box = np.all((pos >= low) & (pos <= high), axis=-1)
    entered = np.any(in_box & taken, axis=-1)
    visited = taken | (steps == 0)
    high_left = np.any(visited & (pos[..., 0] < params.penalty_low[0]) & (pos[..., 1] > FAST_MAX_HEIGHT), axis=-1)
    if goal is None:
        last = np.take_along_axis(pos, lengths[..., None, None].astype(np.int64), axis=-2)[..., 0, :]
        goal = np.linalg.norm(last - np.asarray(params.goal), axis=-1) < params.goal_radius
    goal = np.asarray(goal, bool)
    detour = high_left | (lengths > FAST_MAX_STEPS)
    return np.where(~goal, ROUTE_NO_GOAL, np.where(entered, ROUTE_PENALTY, np.where(detour, ROUTE_DETOUR,
                                                                                      ROUTE_FAST))).astype(np.int32)


def route_counts(routes) -> dict:
    """{class name: count} of an array of route classes."""
    routes = np.asarray(routes)
    return {name: int((routes == i).sum()) for i, name in enumerate(ROUTES)}


# Where the two behaviours of Appendix A travel the same line in opposite directions: beta_0 goes down x = 10
# and up x = 20, beta_1 up x = 10 and down x = 20, both between y = 0 and y = 15. A single policy fitted to both
# (BC, EMPO with K = 1) averages opposite actions there: the paper's shaded region of Figure 1b, which it says
# the other algorithms fail to enter. Each corridor is the band |x - x_c| <= CORRIDOR_HALF_WIDTH with y in
# [2, 13], i.e. without the junctions at y = 0 (both behaviours go right) and y = 15 (beta_1 turns).
CONFLICT_CORRIDORS = {"x = 10": 10.0, "x = 20": 20.0}
CORRIDOR_HALF_WIDTH, CORRIDOR_Y = 1.0, (2.0, 13.0)


def corridor_stats(positions, lengths) -> dict:
    """Where rollouts went and how fast they moved in the conflict corridors, from their stored paths (NumPy).

    positions [..., T+1, 2] (s_0 .. s_T), lengths [...] (steps taken). For each corridor name: ``entered``
    (number of rollouts that started a step in it), ``steps`` (steps started in it, summed over rollouts) and
    ``speed`` (mean distance moved per such step; a_max = 0.2 per axis, so 0.2 straight, 0.28 diagonal;
    NaN if none). ``elsewhere``: the mean distance per step started outside both corridors.
    """
    pos = np.asarray(positions, np.float64)
    lengths = np.asarray(lengths)
    started = np.arange(pos.shape[-2] - 1) < lengths[..., None]  # steps t = 0 .. T-1, from s_t to s_t+1
    moved = np.linalg.norm(np.diff(pos, axis=-2), axis=-1)
    x, y = pos[..., :-1, 0], pos[..., :-1, 1]
    band_y = (y >= CORRIDOR_Y[0]) & (y <= CORRIDOR_Y[1])
    stats, anywhere = {}, np.zeros(started.shape, bool)
    for name, x_c in CONFLICT_CORRIDORS.items():
        inside = band_y & (np.abs(x - x_c) <= CORRIDOR_HALF_WIDTH) & started
        anywhere |= inside
        n = int(inside.sum())
        stats[name] = {"entered": int(inside.any(axis=-1).sum()), "steps": n,
                       "speed": float(moved[inside].mean()) if n else float("nan")}
    outside = started & ~anywhere
    stats["elsewhere"] = float(moved[outside].mean()) if outside.any() else float("nan")
    return stats


def report_rollouts(out: dict, seeds, header: str, extra: Optional[Callable] = None,
                    prefix: str = "") -> tuple[dict, dict]:
    """The eval/* arrays and a printed table of ``rollout`` outputs vmapped over runs (``out[...]`` is [S, E, ...]).

    Arrays: ``eval/<prefix><field>`` [S, E] for EVAL_FIELDS, ``eval/<prefix>route`` [S, E] (route_classes)
    and ``eval/<prefix>positions`` [S, E, T+1, 2] float16.
    The table has one row per run and one over all runs: return mean +- std, goal rate, steps,
    penalty steps and the optimal-route fraction. ``extra(runs) -> (fields, text)`` adds summary
    fields and a last column (runs: a run's index, or ``slice(None)`` for all). Returns (arrays,
    summary), the summary being the all-runs statistics plus ``per_run``.
    """
    out = {name: np.asarray(out[name]) for name in EVAL_FIELDS + ("positions",)}
    arrays = {f"eval/{prefix}{name}": out[name] for name in EVAL_FIELDS}
    arrays[f"eval/{prefix}positions"] = out["positions"].astype(np.float16)  # frozen after the end
    routes = route_classes(out["positions"], out["length"], out["goal"])
    arrays[f"eval/{prefix}route"] = routes

    def stats(runs) -> tuple[dict, str]:
        fields, text = extra(runs) if extra else ({}, "")
        return {"return_mean": float(out["return"][runs].mean()), "return_std": float(out["return"][runs].std()),
                "goal_rate": float(out["goal"][runs].mean()), "length": float(out["length"][runs].mean()),
                "penalty_steps": float(out["penalty_steps"][runs].mean()),
                "optimal_route": float(out["optimal_route"][runs].mean()),
                "routes": route_counts(routes[runs]), **fields}, text

    per_run = [stats(i) for i in range(len(seeds))]
    overall = stats(slice(None))
    print(header)
    print(f"{'seed':>6} {'return':>17} {'goal':>6} {'length':>8} {'penalty':>8} {'fast':>5} {'detour':>6} "
          f"{'S_p':>4} {'none':>4}")
    rows = [(str(s), r) for s, r in zip(seeds, per_run)] + ([("all", overall)] if len(seeds) > 1 else [])
    for name, (r, text) in rows:
        print(f"{name:>6} {r['return_mean']:9.1f} +- {r['return_std']:5.1f} {r['goal_rate']:6.2f} "
              f"{r['length']:8.1f} {r['penalty_steps']:8.1f} {r['routes']['fast']:5d} {r['routes']['detour']:6d} "
              f"{r['routes']['through S_p']:4d} {r['routes']['no goal']:4d}  {text}".rstrip())
    return arrays, {**overall[0], "per_run": [r for r, _ in per_run]}


def evaluate_protocols(make_eval, params, key_eval, seeds, headers: dict, writer, step: int, extra=None):
    """Both protocols of Appendix C from the same start states: eval/* (the policy's deterministic action) and
    eval/sampled_* (a stochastic one), a table each (report_rollouts) and their TensorBoard scalars.

    make_eval(sample) -> evaluate(params, key), vmapped over runs; headers[sample] heads each table;
    extra(out) -> (column, arrays) adds report_rollouts' last column and arrays stored as eval/<prefix><name>.
    Returns (rollouts {sample: [S, E, ...]}, eval/* arrays, summary).
    """
    outs, arrays, summaries = {}, {}, {}
    for sample in (False, True):
        prefix = "sampled_" if sample else ""
        outs[sample] = out = fetch(make_eval(sample)(params, key_eval))  # [S, E, ...]
        column, more = extra(out) if extra else (None, {})
        part, summaries[sample] = report_rollouts(out, seeds, headers[sample], column, prefix=prefix)
        arrays.update(part, **{f"eval/{prefix}{name}": a for name, a in more.items()})
    summary = {**summaries[False], "sampled": summaries[True]}
    for name in ("return_mean", "goal_rate", "length", "penalty_steps", "optimal_route"):
        writer.add_scalar(f"eval/{name}", summary[name], step)
        writer.add_scalar(f"eval/sampled_{name}", summary["sampled"][name], step)
    return outs, arrays, summary


def make_policy_rollouts(policy, obs_mean, obs_std, episodes: int, sample: bool = False):
    """Rollouts from s_0 of a Gaussian policy (``policy.apply(params, obs) -> (mean, log_std)``) with its mean action,
    or with actions drawn from it (``sample``); vmapped over runs and clusters of params [S, K, ...] (keys [S])."""

    def evaluate(params, key):
        def act(key_t, pos):
            mean, log_std = policy.apply(params, (pos - obs_mean) / obs_std)
            if sample:
                return mean + jnp.exp(log_std) * jax.random.normal(key_t, mean.shape)
            return mean

        out = rollout(key, act, episodes)
        return {name: out[name] for name in ("return", "goal", "penalty_steps", "optimal_route", "positions",
                                             "length")}

    return jax.jit(jax.vmap(jax.vmap(evaluate, in_axes=(0, None)), in_axes=(0, 0)))


def make_cluster_evaluate(policy, obs_mean, obs_std, episodes: int):
    """evaluate(params, key) -> {"": rollouts with the mean action, "sampled_": with actions drawn (the paper's
    protocol)}, each make_policy_rollouts' fields and the route class [S, K, E, ...] (NumPy), from the same start
    states."""

    fns = {prefix: make_policy_rollouts(policy, jnp.asarray(obs_mean), jnp.asarray(obs_std), episodes, sample)
           for prefix, sample in (("", False), ("sampled_", True))}

    def evaluate(params, key) -> dict:
        outs = {prefix: fetch(fn(params, key)) for prefix, fn in fns.items()}
        for out in outs.values():
            out["route"] = route_classes(out["positions"], out["length"], out["goal"])
        return outs

    return evaluate


def report_cluster_rollouts(out: dict, name: str, k: int, writer, step: int, title: str, path: str,
                            tag: str) -> tuple[dict, dict]:
    """The rollouts of K policies per run (``out[...]`` [S, K, E, ...], make_cluster_evaluate's): eval/<name>_* arrays
    (the paths of the first 10 rollouts per policy as float16), TensorBoard scalars per cluster, a map of run 0's
    rollouts coloured by cluster and a line per cluster. Returns (arrays, summary of per-cluster means)."""
    arrays, summary = {}, {}
    for field in ("return", "goal", "penalty_steps", "optimal_route", "length", "route"):
        arrays[f"eval/{name}_{field}"] = np.asarray(out[field])
    arrays[f"eval/{name}_positions"] = np.asarray(out["positions"][:, :, :10], np.float16)  # [S, K, <=10, T+1, 2]
    for z in range(k):
        for field, label in (("return", "return"), ("goal", "goal_rate"), ("penalty_steps", "penalty_steps")):
            writer.add_scalar(f"eval/{name}_{label}/{z}", float(out[field][:, z].mean()), step)
    for field, label in (("return", "return"), ("goal", "goal_rate"), ("optimal_route", "optimal_route")):
        summary[f"{name}_{label}"] = out[field].mean(axis=(0, 2)).tolist()  # per cluster
    shown = min(10, out["return"].shape[2])
    trajs = [out["positions"][0, z, e, : out["length"][0, z, e] + 1] for z in range(k) for e in range(shown)]
    image = plot_map(trajs, [z for z in range(k) for _ in range(shown)], title=title,
                     label_names=[f"z = {z}" for z in range(k)], path=path)
    writer.add_image(f"eval/{name}_rollouts", image, step, dataformats="HWC")
    for z in range(k):
        print(f"{tag} {name}_{z}: return {out['return'][:, z].mean():.1f} +- {out['return'][:, z].std():.1f}, goal "
              f"{out['goal'][:, z].mean():.2f}, penalty steps {out['penalty_steps'][:, z].mean():.1f}, optimal route "
              f"{out['optimal_route'][:, z].mean():.2f}")
    return arrays, summary

def plot_runs(out: dict, seeds, title: str, path: Optional[str] = None) -> np.ndarray:
    """Every rollout of every run on the map, coloured by run (``out`` as in ``report_rollouts``)."""
    positions, lengths = np.asarray(out["positions"]), np.asarray(out["length"])
    trajs = [positions[i, e, : lengths[i, e] + 1] for i in range(len(seeds)) for e in range(lengths.shape[1])]
    labels = np.repeat(np.arange(len(seeds)), lengths.shape[1])
    return plot_map(trajs, labels, label_names=[f"seed {s}" for s in seeds], title=title, path=path)


def grid_states(resolution: int = 61, params: NavParams = NavParams()) -> np.ndarray:
    """A regular grid over S as [G*G, 2] states, row-major in y (reshape values to [G, G] for plot_map)."""
    axis = np.linspace(params.state_low, params.state_high, resolution, dtype=np.float32)
    xs, ys = np.meshgrid(axis, axis)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def episodes_of(data: dict, max_per_label: int = 5, labels=None) -> tuple[list, list]:
    """The first few trajectories of each label as ([T+1, 2] position arrays, labels), for plot_map.

    ``labels`` (one int per row) replaces the data set's ``behaviour`` column, e.g. cluster assignments.
    """
    row_labels = data["behaviour"] if labels is None else np.asarray(labels)
    starts = np.flatnonzero(np.r_[True, np.diff(data["episode_ids"]) != 0])
    ends = np.r_[starts[1:], len(data["episode_ids"])]
    trajs, labels, count = [], [], {}
    for a, b in zip(starts, ends):
        lab = int(row_labels[a])
        if count.get(lab, 0) < max_per_label:
            count[lab] = count.get(lab, 0) + 1
            trajs.append(np.concatenate([data["observations"][a:b], data["next_observations"][b - 1:b]]))
            labels.append(lab)
    return trajs, labels


def validate_args(args: Args) -> tuple:
    """Every flag and output path checked before any work; returns the behaviours' subgoal lists."""
    if args.transitions_per_behaviour < 1:  # generate_dataset checks it too, but only after the id
        raise InputError(f"--transitions-per-behaviour must be at least 1, got {args.transitions_per_behaviour}")
    if args.minari_id is not None:
        check_minari_id(args.minari_id)
    routes = parse_subgoals(args.subgoals)
    if args.shares and (len(args.shares) != len(routes) or not all(0 < x <= 1 for x in args.shares)
                        or abs(sum(args.shares) - 1) > 1e-6):
        raise InputError(f"--shares {' '.join(map(str, args.shares))} must be {len(routes)} numbers in (0, 1] that "
                         f"sum to 1, one per behaviour of --subgoals {args.subgoals}")
    row_bytes = 38  # obs, action, next obs: 2 float32 each; reward, episode id, label: 4 bytes; two flags
    need = len(routes) * args.transitions_per_behaviour * row_bytes
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise InputError(f"--transitions-per-behaviour {args.transitions_per_behaviour} needs about {need / 2**30:.0f} "
                         f"GiB for the data set, more than this machine's {have / 2**30:.0f} GiB")
    check_writable(args.out)
    if args.figure:
        check_writable(args.figure, [args.out])
        if os.path.splitext(args.figure)[1].lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise InputError(f"--figure {args.figure} must end in .png, .pdf, .svg or .jpg (the image format)")
    return routes


def write_figure(path: str, data: dict, routes: tuple) -> None:
    """The paper's Figure 1a: five trajectories of each behaviour on the map, with its subgoals."""
    trajs, labels = episodes_of(data, max_per_label=5)
    plot_map(trajs, labels, subgoals=list(routes), path=path,
             label_names=[f"behaviour {i}" for i in range(len(routes))],
             title="Offline data set: 5 trajectories of each behaviour")
    print(f"wrote {path}")


def main(args: Args) -> None:
    routes = validate_args(args)
    start = time.perf_counter()
    data = generate_dataset(args.seed, args.transitions_per_behaviour, routes, shares=args.shares)
    validate_dataset(args.out, data)
    save_npz(args.out, data, DATASET_SCHEMA, asdict(args))
    print(f"wrote {args.out}: {len(data['rewards'])} transitions, {data['episode_ids'][-1] + 1} episodes "
          f"in {time.perf_counter() - start:.1f} s")
    if args.figure:
        write_figure(args.figure, data, routes)
    if args.minari_id:
        print(f"wrote Minari data set {args.minari_id} to {write_minari(args.minari_id, data)}")


if __name__ == "__main__":
    run(main, tyro.cli(Args))
