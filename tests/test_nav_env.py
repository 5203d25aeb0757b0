"""nav_env.py against Appendix A: the environment (JAX, gymnasium), Algorithm 3, the Minari writer, the CLI.

The references are written here in plain NumPy, independently of nav_env: ``ref_step`` is Appendix A
(float32 state arithmetic, the goal test as the paper's Euclidean norm) and ``ref_algorithm3_episode``
is Algorithm 3 with the Eq. (15) policy, written as the paper's nested loops with its own RNG.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import empo_io
import nav_env

ROOT = Path(__file__).resolve().parents[1]
F = np.float32
SCHEMA = empo_io.DATASET_SCHEMA
PAPER_SUBGOALS = (  # Appendix A, verbatim
    [(0, 30), (10, 30), (10, 0), (20, 0), (20, 30)],
    [(10, 0), (10, 15), (20, 15), (20, 0), (30, 0)],
)


# ----------------------------------------------------------------------------------------------
# Plain-NumPy references
# ----------------------------------------------------------------------------------------------

def ref_step(pos, action, t, max_steps=1000):
    """Appendix A on [..., 2]: returns (s', r, terminated, truncated); ``t`` = steps taken before this one."""
    pos = np.asarray(pos, F)
    action = np.clip(np.asarray(action, F), F(-0.2), F(0.2))  # A = [-0.2, 0.2]^2
    nxt = np.clip(pos + action, F(0.0), F(30.0))  # s' = clip(s + a; 0, 30)
    terminated = np.linalg.norm(nxt.astype(np.float64) - 30.0, axis=-1) < 0.1  # ||s' - g|| < 0.1
    x, y = nxt[..., 0], nxt[..., 1]
    in_sp = (x >= 15) & (x <= 30) & (y >= 0) & (y <= 10)  # S_p = [15, 30] x [0, 10], closed
    reward = np.where(terminated, 0.0, np.where(in_sp, -2.0, -1.0)).astype(F)
    truncated = (np.asarray(t) + 1 >= max_steps) & ~terminated
    return nxt, reward, terminated, truncated


def ref_algorithm3_episode(rng, subgoals, max_steps=1000):
    """One episode of Algorithm 3 (Eq. 15 policy); returns (length, return, penalty steps, timed out)."""
    s = rng.uniform(0.0, 0.1, 2).astype(F)  # env.reset()
    t, ret, penalty, done, timed_out = 0, 0.0, 0, False, False
    for g_s in [np.asarray(g, F) for g in list(subgoals) + [(30.0, 30.0)]]:  # subgoals, then the goal
        while not done and np.linalg.norm(s - g_s) >= 0.1:
            eps = rng.standard_normal(2).astype(F)
            a = np.clip(np.clip(g_s - s, -0.2, 0.2) + F(0.1) * eps, -0.2, 0.2)  # Eq. (15)
            s, r, terminated, truncated = ref_step(s, a, t, max_steps)
            t, ret, penalty = t + 1, ret + float(r), penalty + int(r == -2.0)
            done, timed_out = bool(terminated or truncated), bool(truncated)
    return t, ret, penalty, timed_out


def episode_bounds(data):
    starts = np.flatnonzero(np.r_[True, np.diff(data["episode_ids"]) != 0])
    return starts, np.r_[starts[1:], len(data["episode_ids"])]


def per_episode(data, behaviour):
    """Lengths and returns of one behaviour's episodes."""
    rows = data["behaviour"] == behaviour
    ids = data["episode_ids"][rows] - data["episode_ids"][rows].min()
    return np.bincount(ids), np.bincount(ids, weights=data["rewards"][rows])


_jax_step = jax.jit(jax.vmap(nav_env.step, in_axes=(None, 0, 0, None)))


def jax_step(pos, action, t, params=nav_env.NavParams()):
    """nav_env.step under jit and vmap on a batch [B, 2]; returns NumPy arrays."""
    pos = np.atleast_2d(np.asarray(pos, F))
    state = nav_env.NavState(pos=jnp.asarray(pos), t=jnp.broadcast_to(jnp.int32(t), (len(pos),)))
    out = _jax_step(jax.random.key(0), state, jnp.asarray(np.atleast_2d(action), jnp.float32), params)
    nxt, new_state, reward, terminated, truncated = jax.device_get(out)
    np.testing.assert_array_equal(new_state.pos, nxt)
    np.testing.assert_array_equal(new_state.t, np.asarray(t) + 1)
    return nxt, reward, terminated, truncated


def make_gym_env(pos=None):
    env = gym.make("EMPONav-v0")
    env.reset(seed=0)
    if pos is not None:
        env.unwrapped._pos = np.asarray(pos, F)
    return env


# ----------------------------------------------------------------------------------------------
# The environment: Appendix A, JAX, gymnasium
# ----------------------------------------------------------------------------------------------

def _after(x, direction):
    return float(np.nextafter(F(x), F(direction)))


# (name, s, a, expected s' (None: float32 s + clip(a)), expected reward, expected terminated)
EDGE_CASES = [
    ("x=15 border of S_p", (15.0, 5.0), (0.0, 0.0), (15.0, 5.0), -2.0, False),
    ("x just below 15", (_after(15, 0), 5.0), (0.0, 0.0), None, -1.0, False),
    ("y=10 border of S_p", (20.0, 10.0), (0.0, 0.0), (20.0, 10.0), -2.0, False),
    ("y just above 10", (20.0, _after(10, 11)), (0.0, 0.0), None, -1.0, False),
    ("y=0 border of S_p", (20.0, 0.0), (0.0, 0.0), (20.0, 0.0), -2.0, False),
    ("x=30 border of S_p", (30.0, 5.0), (0.0, 0.0), (30.0, 5.0), -2.0, False),
    ("corner (15, 10)", (15.0, 10.0), (0.0, 0.0), (15.0, 10.0), -2.0, False),
    ("step onto x=15", (14.875, 5.0), (0.125, 0.0), (15.0, 5.0), -2.0, False),
    ("step onto y=10 from above", (20.0, 10.125), (0.0, -0.125), (20.0, 10.0), -2.0, False),
    ("the reward is for s', not s", (15.0, 10.0), (0.0, 0.125), (15.0, 10.125), -1.0, False),
    ("walls at 0", (0.05, 0.1), (-0.2, -0.2), (0.0, 0.0), -1.0, False),
    ("walls at 30 and 0, inside S_p", (29.9, 0.05), (0.2, -0.2), (30.0, 0.0), -2.0, False),
    ("walls at 0 and 30", (0.1, 29.9), (-0.2, 0.2), (0.0, 30.0), -1.0, False),
    ("oversized action (5, -7)", (10.0, 20.0), (5.0, -7.0), None, -1.0, False),
    ("oversized action into the walls", (29.95, 0.05), (100.0, -100.0), (30.0, 0.0), -2.0, False),
    ("goal just inside 0.1", (30.0, _after(29.9, 30)), (0.0, 0.0), None, 0.0, True),
    ("goal just outside 0.1", (30.0, 29.9), (0.0, 0.0), None, -1.0, False),
    ("goal diagonal inside", (29.93, 29.93), (0.0, 0.0), None, 0.0, True),
    ("goal diagonal outside", (29.929, 29.929), (0.0, 0.0), None, -1.0, False),
    ("goal reached by a clipped step", (29.95, 29.95), (0.3, 0.3), (30.0, 30.0), 0.0, True),
]


@pytest.mark.parametrize("name,s,a,want_pos,want_reward,want_terminated", EDGE_CASES,
                         ids=[c[0] for c in EDGE_CASES])
def test_step_edge_cases(name, s, a, want_pos, want_reward, want_terminated):
    if want_pos is None:
        want_pos = np.asarray(s, F) + np.clip(np.asarray(a, F), F(-0.2), F(0.2))
    want_pos = np.asarray(want_pos, F)
    # The reference reproduces the hand-derived value ...
    ref = ref_step(s, a, 0)
    np.testing.assert_array_equal(ref[0], want_pos)
    assert (float(ref[1]), bool(ref[2]), bool(ref[3])) == (want_reward, want_terminated, False)
    # ... and so do the JAX environment ...
    pos, reward, terminated, truncated = jax_step(s, a, 0)
    np.testing.assert_array_equal(pos[0], want_pos)
    assert (float(reward[0]), bool(terminated[0]), bool(truncated[0])) == (want_reward, want_terminated, False)
    # ... and the gymnasium adapter.
    env = make_gym_env(s)
    obs, reward, terminated, truncated, info = env.step(np.asarray(a, F))
    assert obs.dtype == np.float32
    np.testing.assert_array_equal(obs, want_pos)
    assert (reward, terminated, truncated) == (want_reward, want_terminated, False)
    assert info["in_penalty"] == (want_reward == -2.0)


def test_step_matches_numpy_reference_on_random_batches():
    rng = np.random.default_rng(0)
    n = 4096
    pos = np.concatenate([
        rng.uniform(0, 30, (n, 2)),  # anywhere in S
        30 - rng.uniform(0, 0.4, (n, 2)),  # near the goal
        rng.uniform([14, -0.5], [16, 10.5], (n, 2)).clip(0, 30),  # around the left and lower borders of S_p
        rng.uniform([14, 9.5], [31, 11], (n, 2)).clip(0, 30),  # around the upper border of S_p
    ]).astype(F)
    action = rng.uniform(-0.5, 0.5, pos.shape).astype(F)  # many oversized
    t = rng.choice([0, 1, 500, 998, 999], len(pos))
    ref = ref_step(pos, action, t)
    out = jax_step(pos, action, t)
    np.testing.assert_array_equal(out[0], ref[0])
    for got, want in zip(out[1:], ref[1:]):
        np.testing.assert_array_equal(got, want)
    # the batch exercised every branch
    assert ref[2].sum() > 100 and (ref[1] == -2).sum() > 1000 and (ref[1] == -1).sum() > 1000 and ref[3].sum() > 100
    assert np.any(ref[0] == 0) and np.any(ref[0] == 30)


def test_truncated_on_step_1000_not_999():
    s, a = (5.0, 5.0), (0.0, 0.0)
    for t, want in [(998, False), (999, True)]:  # t = steps taken before: the 999th and the 1000th step
        assert bool(ref_step(s, a, t)[3]) == want
        _, reward, terminated, truncated = jax_step(s, a, t)
        assert (bool(terminated[0]), bool(truncated[0]), float(reward[0])) == (False, want, -1.0)
    env = make_gym_env()
    for k in range(1, 1001):
        _, _, terminated, truncated, _ = env.step(np.zeros(2, F))
        assert not terminated and truncated == (k == 1000), k


def test_goal_on_step_1000_is_terminated_not_truncated():
    s, a = (29.95, 29.95), (0.2, 0.2)
    nxt, reward, terminated, truncated = ref_step(s, a, 999)
    assert (float(reward), bool(terminated), bool(truncated)) == (0.0, True, False)
    nxt, reward, terminated, truncated = jax_step(s, a, 999)
    assert (float(reward[0]), bool(terminated[0]), bool(truncated[0])) == (0.0, True, False)


def test_gym_goal_on_step_1000_is_terminated_not_truncated():
    env = make_gym_env()
    for _ in range(999):
        env.step(np.zeros(2, F))
    env.unwrapped._pos = np.asarray((29.95, 29.95), F)
    _, reward, terminated, truncated, _ = env.step(np.asarray((0.2, 0.2), F))
    assert (reward, terminated, truncated) == (0.0, True, False)


def test_functional_env_matches_gymnasium_step_for_step():
    rng = np.random.default_rng(1)
    # per-episode drift + uniform noise in [-0.35, 0.35]: goal reached, S_p crossed, walls hit, time limit
    drifts = np.array([(0.15, 0.15), (0.15, 0.15), (0.15, 0.02), (0.02, 0.15), (0.0, 0.0), (0.1, -0.05),
                       (-0.05, 0.1), (0.2, 0.2)], F)
    num, horizon = len(drifts), 1000
    actions = (drifts[:, None] + rng.uniform(-0.35, 0.35, (num, horizon, 2))).astype(F)
    env = gym.make("EMPONav-v0")
    assert env.unwrapped.params.max_steps == 1000  # the env enforces its own limit
    starts, gym_rows = [], []
    for e in range(num):
        obs, _ = env.reset(seed=e)
        starts.append(obs)
        rows = []
        for t in range(horizon):
            obs, reward, terminated, truncated, _ = env.step(actions[e, t])
            rows.append((obs, reward, terminated, truncated))
            if terminated or truncated:
                break
        gym_rows.append(rows)
    # The functional env (jit + vmap over the episodes) from the same starts, no reset.
    state = nav_env.NavState(pos=jnp.asarray(np.stack(starts)), t=jnp.zeros(num, jnp.int32))
    key, params, outs = jax.random.key(0), nav_env.NavParams(), []
    for t in range(horizon):
        pos, state, reward, terminated, truncated = _jax_step(key, state, jnp.asarray(actions[:, t]), params)
        outs.append((pos, reward, terminated, truncated))
    pos, reward, terminated, truncated = (np.stack(x) for x in zip(*jax.device_get(outs)))  # [T, E, ...]
    for e, rows in enumerate(gym_rows):
        n = len(rows)
        np.testing.assert_array_equal(pos[:n, e], np.stack([r[0] for r in rows]))
        np.testing.assert_array_equal(reward[:n, e], [r[1] for r in rows])
        np.testing.assert_array_equal(terminated[:n, e], [r[2] for r in rows])
        np.testing.assert_array_equal(truncated[:n, e], [r[3] for r in rows])
    ends = [rows[-1] for rows in gym_rows]
    all_rewards = np.concatenate([[r[1] for r in rows] for rows in gym_rows])
    assert any(r[2] for r in ends) and any(r[3] for r in ends)  # both kinds of ends were compared
    assert (all_rewards == -2).sum() > 10 and np.any(pos == 0) and np.any(pos == 30)


def test_reset_distributions():
    n = 4000
    params = nav_env.NavParams()
    obs, state = jax.vmap(nav_env.reset, in_axes=(0, None))(jax.random.split(jax.random.key(3), n), params)
    obs_jax = np.asarray(obs)
    np.testing.assert_array_equal(np.asarray(state.pos), obs_jax)
    assert obs_jax.dtype == np.float32 and np.all(np.asarray(state.t) == 0)
    env = gym.make("EMPONav-v0")
    first, _ = env.reset(seed=7)
    again, _ = env.reset(seed=7)
    np.testing.assert_array_equal(first, again)
    obs_gym = np.stack([env.reset()[0] for _ in range(n)])
    assert obs_gym.dtype == np.float32
    grid = np.linspace(0, 0.1, 101)
    for sample in (obs_jax, obs_gym):
        assert sample.min() >= 0 and sample.max() <= 0.1
        for coord in sample.T:  # Kolmogorov-Smirnov distance to U[0, 0.1], 0.1% critical value 1.95 / sqrt(n)
            ks = np.max(np.abs(np.searchsorted(np.sort(coord), grid, side="right") / n - grid / 0.1))
            assert ks < 1.95 / np.sqrt(n)
        assert abs(np.corrcoef(sample.T)[0, 1]) < 4 / np.sqrt(n)  # independent coordinates


def test_check_env():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # harmless: check_env cannot try other render modes of an env made without gym.make (it has none)
        warnings.filterwarnings("ignore", message=".*Not able to test alternative render modes.*")
        check_env(nav_env.NavEnv())
        check_env(gym.make("EMPONav-v0").unwrapped)


def _right_then_up_or_diagonal(key, obs):
    """Deterministic: from x >= y go right until x >= 29.9, then up; from x < y go diagonally."""
    del key
    x, y = obs[:, 0:1], obs[:, 1:2]
    right_up = jnp.where(x < 29.9, jnp.asarray([0.2, 0.0]), jnp.asarray([0.0, 0.2]))
    return jnp.where(x >= y, right_up, jnp.asarray([0.3, 0.3]))  # 0.3: the env clips it


def _ref_policy(s):
    if s[0] >= s[1]:
        return np.asarray([0.2, 0.0] if s[0] < F(29.9) else [0.0, 0.2], F)
    return np.asarray([0.3, 0.3], F)


@pytest.mark.parametrize("max_steps", [1000, 160])
def test_rollout_matches_numpy_loop(max_steps):
    params, num = nav_env.NavParams(max_steps=max_steps), 32
    rollout = jax.jit(nav_env.rollout, static_argnums=(1, 2))
    out = jax.device_get(rollout(jax.random.key(5), _right_then_up_or_diagonal, num, params))
    assert out["positions"].shape == (num, max_steps + 1, 2)
    for e in range(num):
        s = out["positions"][e, 0]
        assert np.all((s >= 0) & (s <= 0.1))
        positions, rewards, ended, goal, penalty, length = [s], [], False, False, 0, 0
        for t in range(max_steps):
            if ended:  # frozen after the end
                positions.append(s)
                rewards.append(0.0)
                continue
            s, r, terminated, truncated = ref_step(s, _ref_policy(s), t, max_steps)
            positions.append(s)
            rewards.append(float(r))
            penalty, length = penalty + int(r == -2.0), length + 1
            goal, ended = bool(terminated), bool(terminated or truncated)
        np.testing.assert_array_equal(out["positions"][e], np.stack(positions))
        np.testing.assert_array_equal(out["rewards"][e], rewards)
        assert out["length"][e] == length and out["alive"][e].sum() == length and out["alive"][e, :length].all()
        assert out["return"][e] == sum(rewards)
        assert (bool(out["goal"][e]), int(out["penalty_steps"][e])) == (goal, penalty)
        assert bool(out["optimal_route"][e]) == (goal and penalty == 0)
    # the diagonal route is optimal; the other crosses S_p (1000 steps) or is cut inside S_p (160 steps)
    assert out["optimal_route"].any() and out["penalty_steps"].max() > 50
    if max_steps == 1000:
        assert out["goal"].all() and not out["optimal_route"].all()
    else:
        cut = out["positions"][~out["goal"], -1]
        assert len(cut) and np.all(out["length"][~out["goal"]] == 160)
        assert np.all((cut[:, 0] >= 15) & (cut[:, 1] <= 10))  # s and s' counts of S_p differ here


# ----------------------------------------------------------------------------------------------
# The generator: Eq. (15), Algorithm 3
# ----------------------------------------------------------------------------------------------

def test_subgoal_lists_are_the_papers():
    assert np.array_equal(np.asarray(nav_env.SUBGOALS, float), np.asarray(PAPER_SUBGOALS, float))
    assert tuple(nav_env.GOAL) == (30.0, 30.0) == tuple(nav_env.NavParams().goal)


# Measured over 40 NumPy episodes and the 27 / 36 generated ones: the standard deviation of an
# episode's length is 11-13 steps (behaviour 0) and about 9.5 (behaviour 1), of its return 11-15.
# The standard error of the difference of the two means is then 2.1-3.0 steps and 2.9-3.5 reward;
# we allow 4 standard errors (computed from the two samples: about 12 / 8.5 steps and 14 / 12
# reward; the measured differences are 0.3-1.5 standard errors) and require the standard
# deviations themselves to stay below 25 so that a broken generator cannot pass by widening its
# own tolerance. The seeds are fixed, so the test is deterministic.
NUMPY_EPISODES = 40
EXPECTED = {0: (751.0, -844.0), 1: (565.0, -752.0)}  # mean length, mean return (a 2M-transition run)


@pytest.mark.parametrize("behaviour", [0, 1])
def test_generator_matches_numpy_algorithm3(small_dataset, behaviour):
    rng = np.random.default_rng(100 + behaviour)
    ref = np.array([ref_algorithm3_episode(rng, PAPER_SUBGOALS[behaviour]) for _ in range(NUMPY_EPISODES)])
    lengths, returns = per_episode(small_dataset, behaviour)
    assert not ref[:, 3].any() and not small_dataset["timeouts"].any()  # no timeouts with the paper's subgoals
    for name, mine, theirs, expected in [("length", lengths, ref[:, 0], EXPECTED[behaviour][0]),
                                         ("return", returns, ref[:, 1], EXPECTED[behaviour][1])]:
        assert mine.std(ddof=1) < 25 and theirs.std(ddof=1) < 25, name
        se = np.sqrt(mine.var(ddof=1) / len(mine) + theirs.var(ddof=1) / len(theirs))
        assert abs(mine.mean() - theirs.mean()) < 4 * se, (name, mine.mean(), theirs.mean(), se)
        assert abs(mine.mean() - expected) < 4 * mine.std(ddof=1) / np.sqrt(len(mine)) + 1, (name, mine.mean())
    # Penalty steps (rows whose s' is in S_p) agree too.
    rows = small_dataset["behaviour"] == behaviour
    penalty = np.bincount(small_dataset["episode_ids"][rows] - small_dataset["episode_ids"][rows].min(),
                          weights=small_dataset["rewards"][rows] == -2)
    se = np.sqrt(penalty.var(ddof=1) / len(penalty) + ref[:, 2].var(ddof=1) / len(ref))
    assert abs(penalty.mean() - ref[:, 2].mean()) < 4 * se


def test_generator_rows_are_environment_steps(small_dataset):
    d = small_dataset
    assert all(d[k].dtype == np.dtype(dt) for k, (dt, _) in empo_io.DATASET_SPEC.items())
    assert np.all(np.abs(d["actions"]) <= F(0.2))
    nxt, reward, terminated, _ = ref_step(d["observations"], d["actions"], 0)
    np.testing.assert_array_equal(d["next_observations"], nxt)
    np.testing.assert_array_equal(d["rewards"], reward)
    np.testing.assert_array_equal(d["terminals"], terminated)
    starts, _ = episode_bounds(d)
    first = d["observations"][starts]
    assert np.all((first >= 0) & (first <= 0.1))  # s_0 ~ U([0, 0.1]^2)


def test_generator_actions_follow_eq15_and_the_subgoal_schedule(small_dataset):
    """Rebuild each row's target with Algorithm 3's rule (advance once ||s - g_s|| < 0.1, before acting)
    and recover the noise of Eq. (15) from the unclipped action components: it must look like
    0.1 * N(0, 1) noise around clip(g_s - s; -0.2, 0.2), which fails if a subgoal is skipped,
    reached out of order, or the wrong target is used. The same schedule with every switch moved
    one row earlier or later must explain the actions worse (an off-by-one in the advance rule)."""
    d = small_dataset
    starts, ends = episode_bounds(d)
    eps, sum_sq = [], {-1: 0.0, 0: 0.0, 1: 0.0}
    for a, b in zip(starts, ends):
        obs, act = d["observations"][a:b], d["actions"][a:b]
        waypoints = [np.asarray(g, F) for g in list(PAPER_SUBGOALS[d["behaviour"][a]]) + [(30, 30)]]
        switches = [0]  # row from which each waypoint is the target
        for k, w in enumerate(waypoints[:-1]):
            near = np.flatnonzero(np.linalg.norm(obs[switches[-1]:] - w, axis=1) < 0.1)
            assert len(near), f"episode {d['episode_ids'][a]} never reached subgoal {k}"
            switches.append(switches[-1] + near[0])  # this row already acts toward the next waypoint
        assert d["terminals"][b - 1]
        free = np.abs(act) < F(0.2)  # components not clipped by the outer clip of Eq. (15)
        for shift in sum_sq:
            target = np.empty_like(obs)
            for w, first in zip(waypoints, switches):
                target[first + shift if first else 0:] = w
            implied = (act - np.clip(target - obs, F(-0.2), F(0.2))) / F(0.1)
            sum_sq[shift] += float(np.sum(implied[free] ** 2))
            if shift == 0:
                eps.append(implied[free])
    eps = np.concatenate(eps)
    assert len(eps) > 20_000
    assert np.abs(eps).max() < 6  # P(|N(0,1)| > 6) * 40k ~ 1e-4
    assert np.mean(np.abs(eps) > 3) < 0.01  # 0.27% for N(0, 1)
    assert sum_sq[0] < sum_sq[-1] and sum_sq[0] < sum_sq[1], sum_sq


def test_generator_structure(small_dataset, small_dataset_target):
    d = small_dataset
    n = len(d["rewards"])
    assert all(len(v) == n for v in d.values())
    beh, ids = d["behaviour"], d["episode_ids"]
    assert beh[0] == 0 and beh[-1] == 1 and np.all(np.diff(beh) >= 0)  # behaviour 0 first, then 1
    assert ids[0] == 0 and set(np.unique(np.diff(ids))) == {0, 1}
    starts, ends = episode_bounds(d)
    assert len(starts) == ids[-1] + 1
    assert np.all(beh[starts] == beh[ends - 1])  # one label per trajectory
    last = np.zeros(n, bool)
    last[ends - 1] = True
    flagged = d["terminals"] | d["timeouts"]
    np.testing.assert_array_equal(flagged, last)  # exactly the last row of each trajectory
    assert not np.any(d["terminals"] & d["timeouts"])
    inside = ~last[:-1]
    np.testing.assert_array_equal(d["next_observations"][:-1][inside], d["observations"][1:][inside])
    goal_dist = np.linalg.norm(d["next_observations"].astype(np.float64) - 30, axis=1)
    assert np.all(goal_dist[d["terminals"]] < 0.1) and np.all(goal_dist[~d["terminals"]] >= 0.1)
    for label in (0, 1):
        rows = beh == label
        last_len = np.sum(ids == ids[rows][-1])
        assert rows.sum() >= small_dataset_target > rows.sum() - last_len
    stats = [nav_env.behaviour_stats({k: v[beh == label] for k, v in d.items()}) for label in (0, 1)]
    for label, s in enumerate(stats):
        lengths, returns = per_episode(d, label)
        assert s["episodes"] == len(lengths) and s["timeouts"] == 0
        assert np.isclose(s["mean_length"], lengths.mean()) and np.isclose(s["mean_return"], returns.mean())
    assert stats[0]["mean_penalty_steps"] < stats[1]["mean_penalty_steps"]  # behaviour 1 stays longer in S_p


def test_generator_timeouts_cut_trajectories():
    params = nav_env.NavParams(max_steps=300)  # shorter than any episode: every trajectory times out
    d = nav_env.generate_dataset(0, 3000, params=params, log=lambda _: None)
    empo_io.validate_dataset("timeouts", d)
    starts, ends = episode_bounds(d)
    assert np.all(ends - starts == 300)
    assert not d["terminals"].any()
    np.testing.assert_array_equal(np.flatnonzero(d["timeouts"]), ends - 1)
    for label in (0, 1):
        assert (d["behaviour"] == label).sum() == 3000  # 10 whole episodes of 300 rows
        stats = nav_env.behaviour_stats({k: v[d["behaviour"] == label] for k, v in d.items()}, params)
        assert stats["timeouts"] == stats["episodes"] == 10


def test_generator_determinism(small_dataset):
    again = nav_env.generate_dataset(0, 20_000, log=lambda _: None)
    other = nav_env.generate_dataset(1, 20_000, log=lambda _: None)
    for key in small_dataset:
        np.testing.assert_array_equal(again[key], small_dataset[key])
    assert len(other["observations"]) != len(small_dataset["observations"]) or not np.array_equal(
        other["observations"], small_dataset["observations"])
    n = min(len(other["actions"]), len(small_dataset["actions"]))
    assert not np.allclose(other["actions"][:n], small_dataset["actions"][:n])


def test_generator_rejects_an_empty_target():
    with pytest.raises(empo_io.InputError, match="at least 1"):
        nav_env.generate_dataset(0, 0, log=lambda _: None)


# ----------------------------------------------------------------------------------------------
# Files: Minari round trips, the CLI, the map (reading and writing .npz files: test_empo_io.py)
# ----------------------------------------------------------------------------------------------

def _digest(data):
    digest = hashlib.sha256()
    for key in empo_io.DATASET_SPEC:
        digest.update(np.ascontiguousarray(data[key]).tobytes())
    return digest.hexdigest()


@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    """An empty local Minari store, and no network."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access"))
    return tmp_path / "minari"


MINARI_WARNINGS = pytest.mark.filterwarnings("ignore:.*is set to None:UserWarning")


@MINARI_WARNINGS
def test_write_minari_stores_the_registered_env_spec(small_dataset, subset, minari_store):
    import minari

    nav_env.write_minari("empotest/nav/registered-v0", subset(small_dataset, [0]))
    env = minari.load_dataset("empotest/nav/registered-v0").recover_environment()
    assert isinstance(env.unwrapped, nav_env.NavEnv)


@MINARI_WARNINGS
def test_minari_round_trip(small_dataset, subset, minari_store):
    tiny = subset(small_dataset, [0, 1, 30, 31, 32])  # behaviours 0, 0, 1, 1, 1
    assert list(np.unique(tiny["behaviour"])) == [0, 1]
    nav_env.write_minari("empotest/nav/tiny-v0", tiny)
    data, digest = empo_io.load_dataset("empotest/nav/tiny-v0")
    for key, value in tiny.items():
        assert data[key].dtype == value.dtype
        np.testing.assert_array_equal(data[key], value, err_msg=key)  # behaviour from the episode metadata
    assert digest == _digest(tiny)


@MINARI_WARNINGS
def test_minari_ids_are_concatenated_and_labelled_by_index(small_dataset, subset, minari_store):
    first = subset(small_dataset, [40, 41])  # behaviour 1 in the generator ...
    second = subset(small_dataset, [2, 3, 4])  # ... and behaviour 0
    nav_env.write_minari("empotest/nav/first-v0", first)
    nav_env.write_minari("empotest/nav/second-v0", second)
    data, _ = empo_io.load_dataset("empotest/nav/first-v0, empotest/nav/second-v0")
    n1 = len(first["rewards"])
    for key in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        np.testing.assert_array_equal(data[key], np.concatenate([first[key], second[key]]), err_msg=key)
    np.testing.assert_array_equal(data["behaviour"][:n1], 0)  # the label is the index of the id
    np.testing.assert_array_equal(data["behaviour"][n1:], 1)
    renumbered = np.concatenate([first["episode_ids"], second["episode_ids"] + 2])  # contiguous 0..4
    np.testing.assert_array_equal(data["episode_ids"], renumbered)


@MINARI_WARNINGS
def test_minari_step_both_terminated_and_truncated_is_a_terminal(small_dataset, subset, minari_store):
    """Gymnasium's TimeLimit can report terminated and truncated on the same step; the loader keeps the terminal."""
    tiny = subset(small_dataset, [0, 30])
    end0 = np.flatnonzero(tiny["episode_ids"] == 0)[-1]
    assert tiny["terminals"][end0]
    both = dict(tiny, timeouts=tiny["timeouts"].copy())
    both["timeouts"][end0] = True
    nav_env.write_minari("empotest/nav/both-v0", both)
    data, _ = empo_io.load_dataset("empotest/nav/both-v0")
    np.testing.assert_array_equal(data["terminals"], tiny["terminals"])
    np.testing.assert_array_equal(data["timeouts"], tiny["timeouts"])


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "nav_env.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_a_loadable_file(tmp_path):
    out = tmp_path / "x.npz"
    result = _cli("--out", str(out), "--transitions-per-behaviour", "3000")
    assert result.returncode == 0, result.stderr
    data, _ = empo_io.load_dataset(str(out))
    for label in (0, 1):
        assert (data["behaviour"] == label).sum() >= 3000
    meta = empo_io.load_npz(str(out), SCHEMA)
    assert json.loads(str(meta["args"]))["transitions_per_behaviour"] == 3000
    assert str(meta["producer"]) == "nav_env.py"


def test_cli_unwritable_out(tmp_path):
    out = tmp_path  # a folder
    result = _cli("--out", str(out), "--transitions-per-behaviour", "3000")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_plot_map(small_dataset, tmp_path):
    trajs, labels = nav_env.episodes_of(small_dataset, max_per_label=2)
    assert labels == [0, 0, 1, 1] and all(t.shape[1] == 2 for t in trajs)
    path = tmp_path / "map.png"
    image = nav_env.plot_map(trajs, labels, subgoals=nav_env.SUBGOALS, path=str(path))
    assert image.dtype == np.uint8 and image.shape == (500, 500, 3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = nav_env.plot_map()
    assert np.abs(image.astype(int) - empty.astype(int)).sum() > 0  # the trajectories were drawn
    with pytest.raises(empo_io.InputError):
        nav_env.plot_map(trajs, labels, path=str(tmp_path))
