"""Stage 2 benchmark: wall time and peak memory of the full-batch PPO step, chunked and unchunked.

Runs ``empo_ppo.py`` in fresh processes with only PPO epochs (no SARSA, no V: their speed is in the
stage's own log) and reads each process's peak resident memory. Example:
    python bench/bench_ppo.py --dataset data/nav.npz --cluster runs/nav/cluster.npz --chunks 0 131072 65536
(chunk 0 = the whole data set in one pass, no accumulation).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", default="data/nav.npz")
parser.add_argument("--cluster", default="runs/nav/cluster.npz")
parser.add_argument("--chunks", type=int, nargs="+", default=[0, 131_072, 65_536])
parser.add_argument("--epochs", type=int, default=3, help="PPO epochs per process (the first includes compilation)")
args = parser.parse_args()

rows = []
for chunk in args.chunks:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "empo_ppo.py"), "--dataset", args.dataset, "--cluster", args.cluster,
               "--out", os.path.join(tmp, "ppo.npz"), "--q-steps", "0", "--v-epochs", "0",
               "--pi-epochs", str(args.epochs), "--eval-episodes", "0", "--chunk", str(chunk or 1 << 40)]
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            stdout = log.read()
        wall = time.perf_counter() - t0
        peak_kib = usage.ru_maxrss
        if proc.returncode:
            sys.exit(stdout[-2000:])
        epochs = [float(x) for x in re.findall(r"part=pi .*?took=([0-9.]+)", stdout)]
        rows.append((chunk or "all", wall, epochs, peak_kib / 2 ** 20))
        print(f"chunk {chunk or 'all'}: process {wall:.1f}s, epochs {epochs}, peak RSS {peak_kib / 2 ** 20:.2f} GiB",
              flush=True)

print("\n| chunk rows | PPO epoch (warm) | first epoch (with compile) | whole process | peak process memory |")
print("|---|---|---|---|---|")
for chunk, wall, epochs, gib in rows:
    warm = sum(epochs[1:]) / max(len(epochs) - 1, 1)
    print(f"| {chunk} | {warm:.2f} s | {epochs[0]:.2f} s | {wall:.0f} s | {gib:.2f} GiB |")
