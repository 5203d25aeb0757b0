"""Write small D4RL-format HDF5 files of halfcheetah, hopper and walker2d, recorded in Gymnasium's -v4 environments.

The project checks its D4RL path offline on files it writes itself, laid out as D4RL's v2 files are, so
that ``scripts/reproduce_table2.sh`` and the stages read them exactly as they read the real ones. Per task,
``{task}_medium-v2.hdf5`` and ``{task}_expert-v2.hdf5`` hold two behaviours, and
``{task}_medium_expert-v2.hdf5`` their concatenation made the way D4RL made its medium-expert files
(``scripts/generation/mujoco/stitch_dataset.py`` in the D4RL repository: the first file up to the end of its
last complete trajectory, then the second file, the whole cut at ``--maxlen`` rows). The names are D4RL's;
the behaviours are not D4RL's policies (those are SAC agents), and their returns are far from D4RL's
reference scores.

Behaviour b (0 in the 'medium' file, 1 in the 'expert' file) is a noisy linear state-feedback controller in
action-space units (the three tasks' actions are in [-1, 1]):

    a_t = clip(G_b o_t + c_b + sigma_b eps_t, -1, 1),   eps ~ N(0, 1),

G_b an [act_dim, obs_dim] matrix of N(0, --gain^2) entries drawn once from --seed, c_b = --offset[b] on every
action dimension, sigma_b = --noise[b]. The two behaviours push differently from the same state, so stage 1
has something to separate.

What each file holds (D4RL v2's layout; see D4RL's ``scripts/generation/mujoco/collect_data.py``):
    observations, next_observations  [N, obs_dim] float32   o_t and o_{t+1}
    actions                          [N, act_dim] float32
    rewards                          [N] float32
    terminals                        [N] bool   the environment terminated (Hopper or Walker2d fell)
    timeouts                         [N] bool   step --episode-steps of an episode that did not terminate
    infos/qpos, infos/qvel           [N, .] float32   the simulator state before the step
    infos/action_log_probs           [N] float32      log N(a_t; G_b o_t + c_b, sigma_b^2) before clipping
    metadata/algorithm               a string
Episodes are recorded until --rows rows and the file is cut there, as D4RL cut its files at a row count, so
the last trajectory of a file usually ends with neither flag (the loader reads it as a timeout). A step that
both terminates and reaches the step limit is a terminal (Gymnasium's precedence; D4RL's generator would
have written a timeout), so no row has both flags. The same --seed gives identical files.

Example
    python scripts/make_d4rl_files.py --out data/d4rl_local
    D4RL_DIR=data/d4rl_local bash scripts/reproduce_table2.sh
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import gymnasium as gym
import h5py
import numpy as np
import tyro

ENVS = {"halfcheetah": "HalfCheetah-v4", "hopper": "Hopper-v4", "walker2d": "Walker2d-v4"}  # gym_eval.D4RL_TASKS
KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts", "infos/qpos",
        "infos/qvel", "infos/action_log_probs")


@dataclass
class Args:
    """Write D4RL-format medium, expert and medium_expert HDF5 files of small recorded behaviours."""

    out: str = "data/d4rl_local"
    """folder the files are written to (replaced if they exist)"""
    tasks: tuple[str, ...] = ("halfcheetah", "hopper", "walker2d")
    """D4RL tasks, each recorded in its Gymnasium -v4 environment"""
    seed: int = 0
    """random seed (gain matrices, reset seeds, action noise)"""
    rows: int = 5000
    """rows of each behaviour's file (D4RL: 1,000,000); recording stops there, mid-episode"""
    episode_steps: int = 1000
    """step limit of an episode (D4RL: 1000); its last step is a timeout"""
    maxlen: int = 0
    """rows of the medium_expert file at most (D4RL: 2,000,000); 0: 2 x --rows"""
    gain: float = 0.3
    """standard deviation of the entries of G_b"""
    offset: tuple[float, float] = (-0.3, 0.3)
    """c_b of behaviour 0 (medium) and behaviour 1 (expert), on every action dimension"""
    noise: tuple[float, float] = (0.3, 0.1)
    """sigma_b of behaviour 0 (medium) and behaviour 1 (expert)"""


def record(env_id: str, rows: int, episode_steps: int, gains: np.ndarray, offset: float, noise: float,
           rng: np.random.Generator) -> dict:
    """Episodes of one behaviour until ``rows`` rows, cut there: D4RL's keys as arrays."""
    spec = dataclasses.replace(gym.spec(env_id), max_episode_steps=episode_steps)
    with warnings.catch_warnings():  # -v4 on purpose: the port of the environments D4RL v2 was recorded in
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        env = gym.make(spec)
    data = {key: [] for key in KEYS}
    while len(data["rewards"]) < rows:
        obs, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
        done = False
        while not done:
            mean = gains @ obs + offset  # [act_dim]
            raw = mean + noise * rng.standard_normal(mean.shape)
            action = np.clip(raw, -1.0, 1.0).astype(np.float32)
            sim = env.unwrapped.data
            data["infos/qpos"].append(sim.qpos.copy())
            data["infos/qvel"].append(sim.qvel.copy())
            data["infos/action_log_probs"].append(
                -0.5 * np.sum(((raw - mean) / noise) ** 2 + np.log(2 * np.pi * noise**2)))
            next_obs, reward, terminated, truncated, _ = env.step(action)
            data["observations"].append(obs)
            data["actions"].append(action)
            data["rewards"].append(reward)
            data["next_observations"].append(next_obs)
            data["terminals"].append(terminated)
            data["timeouts"].append(truncated and not terminated)
            obs, done = next_obs, terminated or truncated
    env.close()
    return {key: np.asarray(v, bool if key in ("terminals", "timeouts") else np.float32)[:rows]
            for key, v in data.items()}


def stitch(first: dict, second: dict, maxlen: int) -> dict:
    """D4RL's stitch_dataset.py: ``first`` up to the end of its last trajectory, then ``second``, cut at maxlen."""
    ends = np.flatnonzero(first["terminals"] | first["timeouts"])
    n = int(ends[-1]) + 1 if ends.size else 0
    return {key: np.concatenate([first[key][:n], second[key]])[:maxlen] for key in KEYS}


def write(path: str, data: dict, metadata: dict) -> None:
    """One HDF5 file, ``data`` and ``metadata`` as metadata/<name>, written to a temporary file in the same folder and
    renamed."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".hdf5")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in data.items():
                f.create_dataset(key, data=value, compression="gzip", track_times=False)
            for name, value in metadata.items():
                f.create_dataset(f"metadata/{name}", data=value, track_times=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def episode_returns(data: dict) -> np.ndarray:
    """The returns of the complete episodes (those that end with a flag), in float64; none: [nan]."""
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])
    rewards = data["rewards"][: ends[-1] + 1].astype(np.float64) if ends.size else np.zeros(0)
    return np.add.reduceat(rewards, np.r_[0, ends[:-1] + 1]) if ends.size else np.array([np.nan])


def describe(data: dict) -> str:
    ends = np.flatnonzero(data["terminals"] | data["timeouts"])  # complete episodes only
    returns = episode_returns(data)
    return (f"{len(data['rewards'])} rows, {ends.size} complete episodes ({int(data['terminals'].sum())} "
            f"terminated), return {np.mean(returns):.1f} +- {np.std(returns):.1f}")


def main(args: Args) -> None:
    unknown = [task for task in args.tasks if task not in ENVS]
    if unknown or min(args.rows, args.episode_steps) < 1 or args.maxlen < 0 or min(args.noise) <= 0:
        sys.exit(f"error: need tasks among {sorted(ENVS)} (got {unknown or list(args.tasks)}), --rows and "
                 f"--episode-steps >= 1, --maxlen >= 0 and --noise > 0")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    for task in args.tasks:
        env_id = ENVS[task]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is out of date.*")
            env = gym.make(env_id)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        env.close()
        parts = []
        for b, name in enumerate(("medium", "expert")):
            gains = args.gain * rng.standard_normal((act_dim, obs_dim))
            data = record(env_id, args.rows, args.episode_steps, gains, args.offset[b], args.noise[b], rng)
            algorithm = (f"linear controller {b}: a = clip(G o + {args.offset[b]} + {args.noise[b]} eps, -1, 1), "
                         f"G ~ N(0, {args.gain}^2) [{act_dim}x{obs_dim}], seed {args.seed}, scripts/make_d4rl_files.py")
            path = os.path.join(args.out, f"{task}_{name}-v2.hdf5")
            write(path, data, {"algorithm": algorithm})
            parts.append(data)
            print(f"{path}: {describe(data)}")
        path = os.path.join(args.out, f"{task}_medium_expert-v2.hdf5")
        both = stitch(*parts, args.maxlen or 2 * args.rows)
        write(path, both, {"algorithm": "medium + expert (D4RL's stitch_dataset.py)"})
        print(f"{path}: {describe(both)}")
    print(f"wrote {3 * len(args.tasks)} files to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(tyro.cli(Args))
