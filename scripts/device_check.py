"""The Python part of scripts/device_check.sh: measure the project on the machine at hand and write a report.

1. Every stage's training units against their floors (bench/bench_stages.py) at the navigation size (hidden 64)
   and the D4RL size (hidden 256), 2M rows, with 1 and with 10 vmapped seeds; the per-call times give the
   full schedules' wall time by extrapolation (bench_stages prints it).
2. The whole navigation pipeline (scripts/run_nav.sh: data, stages 1-3) with 10 seeds at reduced schedules:
   the wall time of each stage and the run's rand index and return, as a check that it runs end to end.
Each part runs in its own process with a time limit, so one part that fails or overruns still leaves a report of
the others. --tiny runs the same steps with tiny sizes (a CPU smoke test; tests/test_device_check.py).

    python scripts/device_check.py --out runs/device_check            # what device_check.sh runs
    python scripts/device_check.py --out /tmp/check --tiny
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reduced schedules of the pipeline check (the full ones are Table 4's: 3 + 20 + 60 epochs, 1.5M SARSA steps,
# 40 V and 100 PPO epochs, 500k IQL steps); --tiny shrinks the data set and the networks as well.
PIPELINE = {
    "full": dict(SEEDS="10", DATA_ARGS="",
                 CLUSTER_ARGS="--bias-epochs 1 --pretrain-epochs 2 --em-epochs 3",
                 PPO_ARGS="--q-steps 20000 --steps-per-call 10000 --v-epochs 2 --pi-epochs 3 --eval-episodes 10",
                 HIGHLEVEL_ARGS="--steps 20000 --steps-per-call 10000 --eval-episodes 10"),
    # tiny: the CPU smoke test's; tests/test_pipeline.py runs the main command with these too, so that the test
    # session's compilation cache serves both
    "tiny": dict(SEEDS="2", DATA_ARGS="--transitions-per-behaviour 3000",
                 CLUSTER_ARGS="--bias-epochs 1 --pretrain-epochs 2 --em-epochs 3 --hidden-dim 32 --log-every 100",
                 PPO_ARGS="--q-steps 400 --steps-per-call 200 --v-epochs 1 --pi-epochs 2 --eval-episodes 3",
                 HIGHLEVEL_ARGS="--steps 400 --steps-per-call 200 --eval-episodes 3"),
}


def run_part(name: str, cmd: list, timeout: float, env=None, cwd=ROOT) -> tuple[str, float, str]:
    """(status, seconds, output) of one part: 'ok', 'failed (exit N)' or 'stopped after T s'."""
    print(f"=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        status, text = ("ok" if out.returncode == 0 else f"failed (exit {out.returncode})"), out.stdout + out.stderr
    except subprocess.TimeoutExpired as e:
        status = f"stopped after {timeout:.0f} s"
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    seconds = time.perf_counter() - t0
    print(f"=== {name}: {status} in {seconds:.0f} s", flush=True)
    return status, seconds, text


def tables(text: str) -> str:
    """A benchmark's output without its blank lines: one line per unit as it finishes (kept when the part is
    stopped before its tables), the tables and the extrapolated schedules."""
    keep = [line for line in text.splitlines() if line.strip()]
    return "\n".join(keep) if keep else "(no output)"


def machine() -> str:
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {len(devices)} x {', '.join(kinds)} "
            f"({jax.default_backend()}); JAX {jax.__version__}; Python {platform.python_version()}; "
            f"{os.cpu_count()} CPU cores")


def python_on_path(folder: str) -> dict:
    """The environment with this interpreter as `python` (run_nav.sh calls `python`)."""
    shim = os.path.join(folder, "python")  # a script, not a link: a link to a venv's python loses the venv
    with open(shim, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    os.chmod(shim, 0o755)
    return dict(os.environ, PATH=folder + os.pathsep + os.environ.get("PATH", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the report (device_check.md, logs, JSON)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of every step on a CPU")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all parts together: a sixth for each of the four unit benchmarks, a third "
                             "for the pipeline (default 450; with --tiny 3600, where the steps matter, not the time)")
    args = parser.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sys.exit(f"error: --out {args.out} is a file, not a folder")
    os.makedirs(args.out, exist_ok=True)
    size = "tiny" if args.tiny else "full"
    rows = "4096" if args.tiny else "2000000"
    seed_counts = ("2",) if args.tiny else ("1", "10")  # tiny: the vmapped path once (1 and 10 differ in number only)
    args.budget = args.budget or (3600.0 if args.tiny else 450.0)
    where = machine()
    report = [f"# Device check ({size})", "", where, ""]

    # 1. The units against their floors: each size and seed count in its own process and time limit.
    for seeds in seed_counts:
        for bench_size in ("nav",) if args.tiny else ("nav", "d4rl"):  # tiny: d4rl differs by its sizes only
            name = f"bench_stages_{bench_size}_seeds{seeds}"
            cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_stages.py"), "--size", bench_size,
                   "--rows", rows, "--seeds", seeds, "--json", os.path.join(args.out, name + ".json")]
            # Tiny: one unit, one call: the steps run, the figures mean nothing.
            cmd += (["--repeats", "1", "--warmup", "0", "--steps-per-call", "20", "--units", "iql"]
                    if args.tiny else ["--repeats", "2"])
            status, seconds, text = run_part(f"units, {bench_size}, {seeds} seed(s)", cmd, args.budget / 6)
            report += [f"## Units against their floors, {bench_size}, {seeds} seed(s), {rows} rows: {status}, "
                       f"{seconds:.0f} s", "", tables(text), ""]

    # 2. The navigation pipeline, 10 seeds, reduced schedules.
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(python_on_path(tmp), RUN=os.path.join(tmp, "run"), DATA=os.path.join(tmp, "nav.npz"),
                   **PIPELINE[size])
        status, seconds, text = run_part("navigation pipeline", ["bash", os.path.join(ROOT, "scripts", "run_nav.sh")],
                                         args.budget / 3, env=env)
        took = re.findall(r"^=== (\w+) took (\d+) s", text, re.M)
        report += [f"## Navigation pipeline, {PIPELINE[size]['SEEDS']} seeds, reduced schedules: {status}, "
                   f"{seconds:.0f} s", "", "| stage | wall time | flags |", "|---|---|---|"]
        flags = {"data": "DATA_ARGS", "cluster": "CLUSTER_ARGS", "ppo": "PPO_ARGS", "highlevel": "HIGHLEVEL_ARGS"}
        report += [f"| {stage} | {s} s | `{PIPELINE[size][flags.get(stage, 'DATA_ARGS')] or '(defaults)'}` |"
                   for stage, s in took]
        results = [line for line in text.splitlines() if "rand index" in line or "final policy" in line.lower()]
        report += ["", *[f"    {line.strip()}" for line in results[-4:]], ""]
        if status != "ok":
            report += ["The end of its output:", "", *[f"    {line}" for line in text.splitlines()[-30:]], ""]

    path = os.path.join(args.out, "device_check.md")
    with open(path, "w") as f:
        f.write("\n".join(report) + "\n")
    with open(os.path.join(args.out, "device_check.json"), "w") as f:
        json.dump({"size": size, "machine": where}, f)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
