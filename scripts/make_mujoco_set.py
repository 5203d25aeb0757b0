"""Write two local Minari data sets of a Gymnasium MuJoCo task, one per behaviour (a D4RL stand-in).

The project checks its MuJoCo / D4RL path offline on data it writes itself. This script records
episodes of a Gymnasium MuJoCo environment under two clearly different behaviours and writes behaviour
b as its own local Minari data set ``{prefix}-b{b}-v0``. Passing both ids, comma-separated, as
``--dataset`` to the stages concatenates them and labels each row by the index of its id, exactly as
D4RL medium-expert is medium + expert.

Two families of behaviours (``--behaviours``); all actions are in units of the action space, -1 and 1
being its low and high bounds, and a_t,j = low_j + (u_t,j + 1) / 2 (high_j - low_j).

controllers (the default, on ``InvertedPendulum-v5``)
    Behaviour b is a noisy linear state-feedback controller, G_b an [act_dim, obs_dim] gain matrix:

        u_t = clip(G_b o_t + c_b + sigma_b eps_t, -1, 1),   eps ~ N(0, 1).

    Both default controllers balance the pole and visit the same region of states (pole upright,
    cart near the centre), but push differently from the same state: behaviour 0 is stiff in the
    pole angle and quiet (sigma 0.1), behaviour 1 softer and noisier (sigma 0.2). With the defaults
    (seed 0, 100 episodes of 1000 steps) behaviour 0 never drops the pole (return 1000) and
    behaviour 1 drops it in some episodes (a termination). This is the kind of data stage 1 must
    separate: at a shared state the two behaviours' actions differ, as medium and expert SAC policies
    do on D4RL. Stage 1 at the D4RL preset (hidden 256) separates them: rand index 0.9928 and
    1.0000 on two seeds (docs/d4rl.md).

gaits (``--behaviours gaits``, on ``HalfCheetah-v5``)
    Behaviour b is an open-loop periodic gait with Gaussian action noise, per joint j:

        u_t,j = clip(A_b sin(2 pi f_b t + phi_b,j + phi_0) + c_b + sigma_b eps_t,j, -1, 1),   eps ~ N(0, 1),

    t the step in the episode, phi_0 ~ U[0, 2 pi) drawn once per episode. The default gaits were found
    by a small search on HalfCheetah-v5. With the defaults (seed 0, 100 episodes of 1000 steps each)
    behaviour 0 runs forward (+1.9 m/s, return 1749 +- 291), behaviour 1 runs backward (-2.8 m/s,
    return -3092 +- 527), the uniform random policy scores -324 +- 125; about one episode in ten flips
    the cheetah onto its back, as real behaviour data does. For an environment with another number of
    joints the phase vectors are repeated or cut to the action dimension (``np.resize``). The two gaits
    visit disjoint states (one runs forward, one backward), so one network fits both and stage 1 has
    nothing to separate them by; the set exercises the loaders, the flags and the evaluation.

What is written, per behaviour
    * episodes recorded in ``gym.make(spec)``, ``spec`` being the registered spec of ``--env-id`` with
      ``max_episode_steps = --episode-steps``; terminations and truncations are kept as the
      environment returns them (Hopper or Walker2d falling is a termination, the step limit a
      truncation); each episode's reset seed is stored as its Minari ``seed``;
    * ``{"behaviour": b}`` in each episode's metadata;
    * ``env_spec`` and ``eval_env_spec`` = ``spec`` (``dataset.recover_environment(eval_env=True)``);
    * ``ref_min_score`` = mean return of the uniform random policy over ``--ref-episodes`` episodes,
      ``ref_max_score`` = mean return of the better behaviour over its recorded episodes; the same two
      numbers in both data sets, so ``minari.get_normalized_score`` means the same in each.

Local store: Minari's own (``MINARI_DATASETS_PATH`` or ~/.minari/datasets). An existing id is
refused unless ``--overwrite``, which deletes it (``minari.delete_dataset``) just before rewriting.
The same ``--seed`` gives identical data.

Example
    python scripts/make_mujoco_set.py --episodes 100
    # then pass  --dataset empo/pendulum/controllers-b0-v0,empo/pendulum/controllers-b1-v0  to the stages
    python scripts/make_mujoco_set.py --behaviours gaits --episodes 100   # empo/halfcheetah/gait-b*-v0
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Union

import gymnasium as gym
import minari
import numpy as np
import tyro
from minari.data_collector.episode_buffer import EpisodeBuffer
from minari.dataset.minari_dataset import parse_dataset_id
from minari.storage import get_dataset_path

DEFAULTS = {  # --behaviours -> (environment, Minari id prefix) when --env-id / --prefix are not given
    "controllers": ("InvertedPendulum-v5", "empo/pendulum/controllers"),
    "gaits": ("HalfCheetah-v5", "empo/halfcheetah/gait"),
}


@dataclass
class Args:
    """Record two behaviours in a Gymnasium MuJoCo task and write them as two local Minari data sets."""

    # --- experiment ---
    behaviours: Literal["controllers", "gaits"] = "controllers"
    """'controllers': two noisy linear state-feedback controllers (default env InvertedPendulum-v5; they
    share states and act differently there, so stage 1 can separate them); 'gaits': two open-loop gaits
    (default env HalfCheetah-v5; disjoint states)"""
    env_id: Optional[str] = None
    """Gymnasium environment id (a MuJoCo task with Box observations and actions); default by --behaviours:
    InvertedPendulum-v5 (controllers), HalfCheetah-v5 (gaits)"""
    prefix: Optional[str] = None
    """Minari id prefix: behaviour b is written as '{prefix}-b{b}-v0' ('namespace/.../name' form); default by
    --behaviours: empo/pendulum/controllers, empo/halfcheetah/gait"""
    seed: int = 0
    """random seed (reset seeds, start phases, action noise, the random reference policy)"""
    overwrite: bool = False
    """replace data sets that already exist under the same ids (deleted with minari.delete_dataset)"""

    # --- data ---
    episodes: int = 100
    """episodes recorded per behaviour"""
    episode_steps: int = 1000
    """step limit of an episode (the env's TimeLimit; 1000 is the standard one); the last step of an
    episode that reaches it is a truncation. Recorded in the data sets' env specs"""
    ref_episodes: int = 10
    """episodes of the uniform random policy averaged for ref_min_score"""

    # --- controllers: u = clip(G o + c + sigma eps, -1, 1) in action-space units ---
    gains_b0: tuple[float, ...] = (0.3, 3.75, 1.4, 0.9)
    """gain matrix G of behaviour 0, act_dim x obs_dim numbers row by row (the default is for
    InvertedPendulum-v5's [cart position, pole angle, cart velocity, pole angular velocity])"""
    gains_b1: tuple[float, ...] = (0.6, 2.15, 0.6, 0.9)
    """gain matrix G of behaviour 1, act_dim x obs_dim numbers row by row"""

    # --- gaits: u = clip(A sin(2 pi f t + phi_j + phi_0) + sigma eps, -1, 1) in action-space units ---
    amplitude: tuple[float, float] = (0.8, 1.0)
    """gait amplitude A of behaviour 0 and behaviour 1 (fraction of the half-range of each joint)"""
    frequency: tuple[float, float] = (0.15, 0.25)
    """gait frequency f of behaviour 0 and behaviour 1, in cycles per environment step"""
    phases_b0: tuple[float, ...] = (0.0, 1.79, 4.42, 1.2, 2.6, 2.63)
    """per-joint phases phi_j (radians) of behaviour 0 (runs forward on HalfCheetah)"""
    phases_b1: tuple[float, ...] = (0.0, 5.17, 1.29, 4.46, 6.18, 1.37)
    """per-joint phases phi_j (radians) of behaviour 1 (runs backward on HalfCheetah)"""

    # --- both families ---
    action_offset: tuple[float, float] = (0.0, 0.0)
    """constant c added to every action dimension of behaviour 0 and behaviour 1 (action-space units)"""
    action_noise: Optional[tuple[float, float]] = None
    """standard deviation sigma of the Gaussian action noise of behaviour 0 and behaviour 1 (action-space
    units, before clipping); default by --behaviours: (0.1, 0.2) controllers, (0.1, 0.1) gaits"""


class InputError(ValueError):
    """Bad arguments or an existing data set: the message is one sentence that says what and which."""


@dataclass(frozen=True)
class Gait:
    amplitude: float
    frequency: float  # cycles per step
    phases: np.ndarray  # [act_dim] radians
    noise: float
    offset: float = 0.0


@dataclass(frozen=True)
class Controller:
    gains: np.ndarray  # [act_dim, obs_dim]
    noise: float
    offset: float = 0.0


NOISE = {"controllers": (0.1, 0.2), "gaits": (0.1, 0.1)}  # --action-noise by --behaviours


def dataset_ids(prefix: str) -> list[str]:
    """The two ids written, '{prefix}-b0-v0' and '{prefix}-b1-v0'; checked against Minari's id format."""
    ids = [f"{prefix}-b{b}-v0" for b in range(2)]
    for dataset_id in ids:
        try:
            parse_dataset_id(dataset_id)
        except ValueError:
            raise InputError(f"prefix '{prefix}' gives the id '{dataset_id}', which Minari does not accept "
                             "(ids are '(namespace/)name-v<version>' in letters, digits, '-' and '_'; "
                             "a namespace needs at least two characters)") from None
    return ids


def make_spec(env_id: str, episode_steps: int) -> tuple[gym.envs.registration.EnvSpec, int, int]:
    """The registered spec of ``env_id`` with ``max_episode_steps = episode_steps``, obs and action dimensions."""
    try:
        spec = dataclasses.replace(gym.spec(env_id), max_episode_steps=episode_steps)
        env = gym.make(spec)
    except Exception as e:  # unknown id, missing dependency, ...
        raise InputError(f"environment '{env_id}' cannot be made ({type(e).__name__}: {e})") from None
    spaces = (env.observation_space, env.action_space)
    env.close()
    if not all(isinstance(s, gym.spaces.Box) for s in spaces):
        raise InputError(f"environment '{env_id}' must have Box observation and action spaces, it has {spaces}")
    if not np.all(np.isfinite(spaces[1].low) & np.isfinite(spaces[1].high)):
        raise InputError(f"environment '{env_id}' has an unbounded action space {spaces[1]}")
    return spec, int(np.prod(spaces[0].shape)), int(np.prod(spaces[1].shape))


Behaviour = Union[Gait, Controller]


def check_args(args: Args) -> tuple[gym.envs.registration.EnvSpec, list[str], list[Behaviour]]:
    """Validate everything before any work: (spec, ids, behaviours), or an InputError."""
    for name in ("episodes", "episode_steps", "ref_episodes"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    noise = NOISE[args.behaviours] if args.action_noise is None else args.action_noise
    if not all(np.isfinite(x) and x >= 0 for x in noise):
        raise InputError(f"--action-noise must be a finite number >= 0, got {noise}")
    for name in ("amplitude", "frequency", "phases_b0", "phases_b1", "gains_b0", "gains_b1", "action_offset"):
        values = np.asarray(getattr(args, name), float)
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise InputError(f"--{name.replace('_', '-')} must be finite numbers, got {getattr(args, name)}")
    env_id, prefix = DEFAULTS[args.behaviours]
    env_id, prefix = args.env_id or env_id, args.prefix or prefix
    ids = dataset_ids(prefix)
    spec, obs_dim, act_dim = make_spec(env_id, args.episode_steps)
    if args.behaviours == "controllers":
        for name in ("gains_b0", "gains_b1"):
            if len(getattr(args, name)) != act_dim * obs_dim:
                raise InputError(f"--{name.replace('_', '-')} needs act_dim x obs_dim = {act_dim} x {obs_dim} = "
                                 f"{act_dim * obs_dim} numbers for {env_id}, got {len(getattr(args, name))}")
        behaviours = [Controller(np.asarray(gains, float).reshape(act_dim, obs_dim), noise[b], args.action_offset[b])
                      for b, gains in enumerate((args.gains_b0, args.gains_b1))]
    else:
        behaviours = [Gait(args.amplitude[b], args.frequency[b], np.resize(np.asarray(phases, float), act_dim),
                           noise[b], args.action_offset[b])
                      for b, phases in enumerate((args.phases_b0, args.phases_b1))]
    for dataset_id in ids:
        if os.path.exists(get_dataset_path(dataset_id)) and not args.overwrite:
            raise InputError(f"Minari data set '{dataset_id}' already exists in {get_dataset_path()}; "
                             "pass --overwrite to replace it")
    return spec, ids, behaviours


def gait_action(gait: Gait, t: int, phase0: float, eps: np.ndarray) -> np.ndarray:
    """u_t = clip(A sin(2 pi f t + phi + phi_0) + c + sigma eps, -1, 1), in action-space units."""
    return np.clip(gait.offset + gait.amplitude * np.sin(2 * np.pi * gait.frequency * t + gait.phases + phase0)
                   + gait.noise * eps, -1.0, 1.0)  # [act_dim]


def controller_action(controller: Controller, obs: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """u_t = clip(G o_t + c + sigma eps, -1, 1), in action-space units."""
    return np.clip(controller.gains @ obs.reshape(-1) + controller.offset + controller.noise * eps, -1.0, 1.0)


def record(spec, num_episodes: int, rng: np.random.Generator,
           behaviour: Optional[Behaviour] = None) -> list[EpisodeBuffer]:
    """Episodes of ``behaviour`` (the uniform random policy if None) in ``gym.make(spec)``, as Minari buffers."""
    env = gym.make(spec)
    space = env.action_space
    low, high = space.low.astype(float), space.high.astype(float)
    episodes = []
    for i in range(num_episodes):
        seed = int(rng.integers(2**31 - 1))
        obs, _ = env.reset(seed=seed)
        phase0 = rng.uniform(0.0, 2 * np.pi)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        t, done = 0, False
        while not done:
            if behaviour is None:
                u = rng.uniform(-1.0, 1.0, low.shape)
            elif isinstance(behaviour, Controller):
                u = controller_action(behaviour, obs, rng.standard_normal(low.shape)).reshape(low.shape)
            else:
                u = gait_action(behaviour, t, phase0, rng.standard_normal(low.shape))
            action = (low + (u + 1.0) / 2.0 * (high - low)).astype(space.dtype)  # [act_dim]
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            terminations.append(bool(terminated))
            truncations.append(bool(truncated))
            t, done = t + 1, terminated or truncated
        episodes.append(EpisodeBuffer(id=i, seed=seed, observations=np.stack(observations),
                                      actions=np.stack(actions), rewards=rewards, terminations=terminations,
                                      truncations=truncations, infos={}))
    env.close()
    return episodes


def returns_of(episodes: list[EpisodeBuffer]) -> np.ndarray:
    return np.array([np.sum(ep.rewards) for ep in episodes])  # [E]


def describe(behaviour: Behaviour, label: int) -> tuple[str, str]:
    """(algorithm name, formula with its parameters) of a behaviour, for the data set's metadata."""
    if isinstance(behaviour, Controller):
        return (f"linear state-feedback controller {label} + Gaussian noise",
                f"u = clip(G o + c + sigma eps, -1, 1) with G={np.round(behaviour.gains, 4).tolist()}, "
                f"c={behaviour.offset}, sigma={behaviour.noise}")
    return (f"open-loop gait {label} + Gaussian noise",
            f"u = clip(A sin(2 pi f t + phi + phi0) + c + sigma eps, -1, 1) with A={behaviour.amplitude}, "
            f"f={behaviour.frequency} cycles/step, phi={np.round(behaviour.phases, 3).tolist()}, c={behaviour.offset}, "
            f"sigma={behaviour.noise}, phi0 ~ U[0, 2 pi) per episode")


def write(dataset_id: str, episodes: list[EpisodeBuffer], spec, label: int, ref_min: float, ref_max: float,
          args: Args, behaviour: Behaviour):
    """One local Minari data set (HDF5): env and eval env spec, reference scores, behaviour label per episode."""
    import mujoco

    algorithm, formula = describe(behaviour, label)
    description = (
        f"EMPO test data: behaviour {label} of two ({args.behaviours}) in {spec.id} "
        f"(max_episode_steps={spec.max_episode_steps}), in action-space units: {formula}; seed {args.seed}. "
        f"ref_min_score: mean return of the uniform random policy over {args.ref_episodes} episodes; ref_max_score: "
        f"mean return of the better behaviour over its {args.episodes} recorded episodes. Written by "
        "scripts/make_mujoco_set.py.")
    with warnings.catch_warnings():  # Minari's reminders about author e-mail and code link
        warnings.filterwarnings("ignore", category=UserWarning, module="minari")
        dataset = minari.create_dataset_from_buffers(
            dataset_id, episodes, env=spec, eval_env=spec, algorithm_name=algorithm,
            author="EMPO reference implementation", ref_min_score=ref_min, ref_max_score=ref_max,
            num_episodes_average_score=args.ref_episodes, description=description, data_format="hdf5",
            requirements=[f"gymnasium=={gym.__version__}", f"mujoco=={mujoco.__version__}"])
    dataset.storage.update_episode_metadata([{"behaviour": label}] * len(episodes))
    return dataset


def main(args: Args) -> None:
    if os.environ.get("MINARI_DATASETS_PATH"):  # Minari's size count joins a relative store path to itself
        os.environ["MINARI_DATASETS_PATH"] = os.path.abspath(os.environ["MINARI_DATASETS_PATH"])
    spec, ids, behaviours = check_args(args)
    start = time.perf_counter()
    key_b0, key_b1, key_random = np.random.SeedSequence(args.seed).spawn(3)
    recorded = [record(spec, args.episodes, np.random.default_rng(key), behaviour)
                for key, behaviour in zip((key_b0, key_b1), behaviours)]
    random_returns = returns_of(record(spec, args.ref_episodes, np.random.default_rng(key_random)))
    ref_min = float(random_returns.mean())
    ref_max = float(max(returns_of(episodes).mean() for episodes in recorded))
    if ref_max <= ref_min:
        print(f"warning: the better behaviour's mean return {ref_max:.1f} is not above the random policy's "
              f"{ref_min:.1f}; normalised scores of these data sets are not meaningful")
    print(f"{spec.id}, {args.episode_steps} steps per episode at most, seed {args.seed}: "
          f"random policy {ref_min:.1f} +- {random_returns.std():.1f} over {args.ref_episodes} episodes")
    for b, (dataset_id, episodes, behaviour) in enumerate(zip(ids, recorded, behaviours)):
        if args.overwrite and os.path.exists(get_dataset_path(dataset_id)):
            minari.delete_dataset(dataset_id)
        dataset = write(dataset_id, episodes, spec, b, ref_min, ref_max, args, behaviour)
        returns = returns_of(episodes)
        score = minari.get_normalized_score(dataset, returns)
        print(f"behaviour {b} -> {dataset_id}: {len(episodes)} episodes, {dataset.total_steps} transitions, "
              f"{sum(ep.terminations[-1] for ep in episodes)} terminated, return {returns.mean():.1f} +- "
              f"{returns.std():.1f}, normalised {score.mean():.3f}")
    print(f"ref_min_score {ref_min:.1f}, ref_max_score {ref_max:.1f}; written to {get_dataset_path()} "
          f"in {time.perf_counter() - start:.1f} s")
    print(f"stages: --dataset {','.join(ids)}")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        sys.exit(f"error: {e}")
