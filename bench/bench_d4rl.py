"""Wall time of every stage at the D4RL preset (Table 4, D4RL column), extrapolated from measured speed.

A full D4RL-sized run (2M transitions, hidden 256, N_E = 100, N_Q = 1.5M, N_V = 40, N_pi = 100,
N_H = 1M) takes hours on a CPU, so this script measures each kind of unit on a data set of that size
with short schedules, in fresh processes, and multiplies:
    stage 1: one M epoch (bias / pre-training) and one EM epoch        x (N_b + N_p) and x N_E
    stage 2: one call of SARSA steps, one V epoch, one full-batch PPO epoch  x N_Q, x N_V, x N_pi
    stage 3: one call of IQL steps                                     x N_H
    evaluation: episodes in HalfCheetah-v5 with a hidden-256 policy (gym vector env + jitted policy)
It also reads each process's peak resident memory (the E-step and the PPO pass run in chunks).
The data set is synthetic (two Gaussian behaviours in a 17-dim state, 6-dim action space, 1000-step
episodes): the speed of these stages depends on the sizes only. Example:
    python bench/bench_d4rl.py --rows 2000000
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import empo_io  # noqa: E402
import gym_eval  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rows", type=int, default=2_000_000, help="transitions (D4RL medium-expert: 2M)")
parser.add_argument("--episode-steps", type=int, default=1000)
parser.add_argument("--eval-episodes", type=int, default=10, help="episodes of the evaluation timing")
parser.add_argument("--workdir", default=None, help="where the synthetic data set goes (default: a temp dir)")
args = parser.parse_args()


def synthetic(path: str, rows: int, steps: int, obs_dim: int = 17, act_dim: int = 6, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    episodes = rows // steps
    ids = np.repeat(np.arange(episodes, dtype=np.int32), steps)
    behaviour = (ids >= episodes // 2).astype(np.int32)
    obs = rng.standard_normal((rows + 1, obs_dim), dtype=np.float32)
    w = rng.standard_normal((2, obs_dim, act_dim)).astype(np.float32) / np.sqrt(obs_dim)
    actions = np.tanh(np.einsum("ni,nij->nj", obs[:-1], w[behaviour]) + 0.1 * rng.standard_normal(
        (rows, act_dim), dtype=np.float32))
    last = np.r_[np.diff(ids) != 0, True]
    data = dict(observations=obs[:-1], actions=actions.astype(np.float32),
                rewards=rng.standard_normal(rows).astype(np.float32), next_observations=obs[1:],
                terminals=np.zeros(rows, bool), timeouts=last, episode_ids=ids, behaviour=behaviour)
    empo_io.save_npz(path, data, empo_io.DATASET_SCHEMA, {"synthetic": True})


def run(cmd: list) -> tuple[str, float, float]:
    """(stdout, wall seconds, peak RSS GiB) of one stage process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable] + cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        out = log.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(out[-3000:])
    return out, time.perf_counter() - t0, usage.ru_maxrss / 2 ** 20


def took(out: str, part: str) -> list:
    return [float(x) for x in re.findall(rf"part={part} .*?took=([0-9.]+)", out)]


work = tempfile.TemporaryDirectory() if args.workdir is None else None
wd = args.workdir or work.name
os.makedirs(wd, exist_ok=True)
data = os.path.join(wd, "synthetic.npz")
if not os.path.exists(data):
    t0 = time.perf_counter()
    synthetic(data, args.rows, args.episode_steps)
    print(f"synthetic data set: {args.rows} rows in {time.perf_counter() - t0:.0f}s", flush=True)
common = ["--preset", "d4rl", "--dataset", data]
rows = []

# Stage 1: 2 M epochs (bias, pre-training) and 2 EM epochs; per-epoch times from the progress lines.
out, wall, gib = run(["empo_cluster.py", *common, "--out", f"{wd}/cluster.npz", "--bias-epochs", "1",
                      "--pretrain-epochs", "1", "--em-epochs", "2"])
elapsed = [float(x) for x in re.findall(r"\[cluster\] \d+/\d+ .*?elapsed (\d+)s", out)]
compile_s = float(re.search(r"compiled in ([0-9.]+)s", out).group(1))
m_epoch, em_epoch = elapsed[1] - elapsed[0], elapsed[3] - elapsed[2]
stage1 = compile_s + (3 + 20) * m_epoch + 100 * em_epoch
rows.append(("stage 1", f"M epoch {m_epoch:.0f} s, EM epoch {em_epoch:.0f} s, compile {compile_s:.0f} s",
             "23 M + 100 EM epochs", stage1, gib))
print(rows[-1], flush=True)

# Stage 2: 2 calls of 5,000 SARSA steps, 2 V epochs, 3 PPO epochs (the first of each includes compiling).
out, wall, gib = run(["empo_ppo.py", *common, "--cluster", f"{wd}/cluster.npz", "--out", f"{wd}/ppo.npz",
                      "--q-steps", "10000", "--v-epochs", "2", "--pi-epochs", "3", "--eval-episodes", "0"])
q, v, pi = took(out, "q"), took(out, "v"), took(out, "pi")
q_rate = 5000 / q[-1]
stage2 = 1_500_000 / q_rate + 40 * v[-1] + 100 * pi[-1] + (q[0] - q[-1]) + (v[0] - v[-1]) + (pi[0] - pi[-1])
rows.append(("stage 2", f"SARSA {q_rate:.0f} steps/s, V epoch {v[-1]:.0f} s, PPO epoch {pi[-1]:.1f} s",
             "1.5M SARSA steps + 40 V + 100 PPO epochs", stage2, gib))
print(rows[-1], flush=True)

# Stage 3: 2 calls of 10,000 IQL steps.
out, wall, gib = run(["empo_highlevel.py", *common, "--cluster", f"{wd}/cluster.npz", "--ppo", f"{wd}/ppo.npz",
                      "--out", f"{wd}/highlevel.npz", "--steps", "20000", "--eval-episodes", "0"])
elapsed = [float(x) for x in re.findall(r"\[highlevel\] \d+/\d+ .*?elapsed (\d+)s", out)]
calls = [float(x) for x in re.findall(r"\[highlevel\] \d+/\d+ .*?took=([0-9.]+)", out)]
h_rate = 10_000 / calls[-1]
stage3 = 1_000_000 / h_rate + (calls[0] - calls[-1])
rows.append(("stage 3", f"IQL {h_rate:.0f} steps/s", "1M IQL steps", stage3, gib))
print(rows[-1], flush=True)

# Evaluation: HalfCheetah-v5 episodes with a hidden-256 MLP policy, all at once in one vector env.
try:
    import flax.linen as nn
    import gymnasium as gym
    import jax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(3):
                x = nn.relu(nn.Dense(256)(x))
            return nn.tanh(nn.Dense(6)(x))

    net = MLP()
    params = net.init(jax.random.key(0), np.zeros((1, 17), np.float32))
    act = jax.jit(lambda o: net.apply(params, o))
    spec = gym.spec("HalfCheetah-v5").to_json()
    t0 = time.perf_counter()
    result = gym_eval.gym_rollout(spec, lambda o: np.asarray(act(o)), args.eval_episodes, seed=0)
    eval_s = time.perf_counter() - t0
    steps = int(result["length"].sum())
    rows.append(("evaluation", f"{steps / eval_s:.0f} env steps/s ({args.eval_episodes} HalfCheetah episodes)",
                 f"{args.eval_episodes} episodes per seed", eval_s, float("nan")))
    print(rows[-1], flush=True)
except ImportError as e:
    print(f"evaluation not timed: {e}")

print(f"\nD4RL preset, {args.rows} transitions, hidden 256, one seed, extrapolated from the measured units:")
print("| stage | measured | schedule | extrapolated wall time | peak process memory |")
print("|---|---|---|---|---|")
for name, measured, schedule, seconds, gib in rows:
    memory = "-" if np.isnan(gib) else f"{gib:.2f} GiB"
    print(f"| {name} | {measured} | {schedule} | {seconds / 3600:.2f} h | {memory} |")
print(f"| total | | | {sum(r[3] for r in rows) / 3600:.2f} h | |")
