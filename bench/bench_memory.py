"""Peak memory of every stage at the D4RL preset as a function of rows N and vmapped seeds S, extrapolated.

Each stage runs in a fresh process on ONE XLA device (``--xla_force_host_platform_device_count=1``, as on one
GPU: every seed on the same device, the data set stored once) with a short schedule that still runs every
kind of unit once (stage 1: a bias epoch and an EM epoch with its chunked E-step; stage 2: SARSA steps, a V
epoch and a chunked full-batch PPO epoch; stage 3: IQL steps), and its peak resident memory is read
(``ru_maxrss`` of the child). Measured at two row counts N1 < N2 (both at least two chunks of each chunked
pass, so a chunk's memory is in both) and two seed counts S1 < S2, the four peaks fit

    peak(N, S) = a + b N + S (c + d N)

exactly: a the runtime and compiled code, b N the data set, c the per-seed chunk buffers, networks and
optimiser states, d N the per-seed arrays over the data (assignments, next actions, posteriors). The fit is
evaluated at the D4RL size (2M rows, hidden 256, 17-dim states, 6-dim actions) and S = 10. A peak is read to
about +-0.05 GiB, so where the per-seed term is that small (stage 3) its line in N extrapolates noise: the
per-seed term used is never below the larger of the two measured per-seed slopes. On a CPU the
peak also holds the host copies of the data set and the Python runtime, so for a GPU's memory these figures
are an upper bound on what the device holds (XLA on a GPU fuses and schedules differently; the per-seed
term, c + d N, is the part that matters for choosing seeds per call). Example:
    python bench/bench_memory.py --rows 262144 524288 --seeds 1 3
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import empo_io  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--rows", type=int, nargs=2, default=[262_144, 524_288], help="N1 N2")
parser.add_argument("--seeds", type=int, nargs=2, default=[1, 3], help="S1 S2")
parser.add_argument("--target-rows", type=int, default=2_000_000, help="N of the extrapolation (D4RL: 2M)")
parser.add_argument("--target-seeds", type=int, default=10, help="S of the extrapolation")
parser.add_argument("--workdir", default=None, help="where data and outputs go (default: a temp dir)")
parser.add_argument("--json", default=None, help="also write the measurements and the fit to this file")
parser.add_argument("--peaks", default=None, help="fit the peaks of an earlier --json file instead of measuring")
args = parser.parse_args()


def synthetic(path: str, rows: int, steps: int = 1000, obs_dim: int = 17, act_dim: int = 6, seed: int = 0) -> None:
    """Two Gaussian behaviours in halfcheetah's sizes, 1000-step episodes (memory depends on sizes only)."""
    rng = np.random.default_rng(seed)
    ids = np.arange(rows, dtype=np.int32) // steps
    behaviour = (ids >= ids[-1] // 2).astype(np.int32)
    obs = rng.standard_normal((rows + 1, obs_dim), dtype=np.float32)
    w = rng.standard_normal((2, obs_dim, act_dim)).astype(np.float32) / np.sqrt(obs_dim)
    actions = np.tanh(np.einsum("ni,nij->nj", obs[:-1], w[behaviour]))
    data = dict(observations=obs[:-1], actions=actions.astype(np.float32),
                rewards=rng.standard_normal(rows).astype(np.float32), next_observations=obs[1:],
                terminals=np.zeros(rows, bool), timeouts=np.r_[np.diff(ids) != 0, True], episode_ids=ids,
                behaviour=behaviour)
    empo_io.save_npz(path, data, empo_io.DATASET_SCHEMA, {"synthetic": True})


def peak_gib(cmd: list) -> tuple[float, float]:
    """(peak resident memory in GiB, wall seconds) of one stage process on one XLA device."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable] + cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            sys.exit(log.read()[-3000:])
    return usage.ru_maxrss / 2**20, time.perf_counter() - t0


work = tempfile.TemporaryDirectory() if args.workdir is None else None
wd = args.workdir or work.name
os.makedirs(wd, exist_ok=True)
peaks = {}  # (stage, rows, seeds) -> GiB
if args.peaks:
    with open(args.peaks) as f:
        earlier = json.load(f)
    args.rows, args.seeds = earlier["rows"], earlier["seeds"]
    for stage, fit in earlier["fits"].items():
        for key, gib in fit["peaks"].items():
            rows, seeds = (int(x) for x in key.split(","))
            peaks[(stage, rows, seeds)] = gib
for rows in [] if args.peaks else args.rows:
    data = os.path.join(wd, f"synthetic_{rows}.npz")
    if not os.path.exists(data):
        synthetic(data, rows)
    common = ["--preset", "d4rl", "--dataset", data]
    for seeds in args.seeds:
        out = os.path.join(wd, f"{rows}_{seeds}")
        os.makedirs(out, exist_ok=True)
        s = ["--num-seeds", str(seeds)]
        runs = {
            "stage 1": ["empo_cluster.py", *common, *s, "--out", f"{out}/cluster.npz", "--bias-epochs", "1",
                        "--pretrain-epochs", "0", "--em-epochs", "1"],
            "stage 2": ["empo_ppo.py", *common, *s, "--cluster", f"{out}/cluster.npz", "--out", f"{out}/ppo.npz",
                        "--q-steps", "200", "--steps-per-call", "200", "--v-epochs", "1", "--pi-epochs", "1",
                        "--eval-episodes", "0"],
            "stage 3": ["empo_highlevel.py", *common, *s, "--cluster", f"{out}/cluster.npz", "--ppo",
                        f"{out}/ppo.npz", "--out", f"{out}/highlevel.npz", "--steps", "200", "--steps-per-call",
                        "200", "--eval-episodes", "0"],
        }
        for stage, cmd in runs.items():
            gib, wall = peak_gib(cmd)
            peaks[(stage, rows, seeds)] = gib
            print(f"{stage}: N={rows} S={seeds}: peak {gib:.2f} GiB ({wall:.0f} s)", flush=True)

(n1, n2), (s1, s2) = args.rows, args.seeds
nt, st = args.target_rows, args.target_seeds
print(f"\npeak(N, S) = a + b N + S (c + d N), fitted on N in {{{n1}, {n2}}}, S in {{{s1}, {s2}}}; one XLA device")
print(f"| stage | measured peaks (GiB) | per seed at N = {nt:,} | S = 1 | S = {st} |")
print("|---|---|---|---|---|")
fits = {}
for stage in ("stage 1", "stage 2", "stage 3"):
    p = {(n, s): peaks[(stage, n, s)] for n in (n1, n2) for s in (s1, s2)}
    # per-seed slope at each N, then its line in N; the intercept likewise
    slope = {n: (p[(n, s2)] - p[(n, s1)]) / (s2 - s1) for n in (n1, n2)}
    base = {n: p[(n, s1)] - s1 * slope[n] for n in (n1, n2)}
    d = (slope[n2] - slope[n1]) / (n2 - n1)
    c = slope[n1] - d * n1
    b = (base[n2] - base[n1]) / (n2 - n1)
    a = base[n1] - b * n1
    per_seed = max(c + d * nt, slope[n1], slope[n2])
    at = lambda seeds, base=a + b * nt, per_seed=per_seed: base + seeds * per_seed
    fits[stage] = dict(a=a, b=b, c=c, d=d, peaks={f"{n},{s}": v for (n, s), v in p.items()},
                       per_seed_gib=per_seed, one_seed_gib=at(1), target_gib=at(st))
    measured = ", ".join(f"N={n:,} S={s}: {v:.2f}" for (n, s), v in p.items())
    print(f"| {stage} | {measured} | {per_seed:.2f} GiB | {at(1):.1f} GiB | {at(st):.1f} GiB |")
if args.json:
    with open(args.json, "w") as f:
        json.dump(dict(rows=args.rows, seeds=args.seeds, target_rows=nt, target_seeds=st, fits=fits), f, indent=1)
