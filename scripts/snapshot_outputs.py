"""Snapshot every script's outputs on tiny sizes, and compare two snapshots array by array.

A refactor must leave behaviour unchanged: a tiny run of every script before and after the change gives identical
arrays in every output file. ``run`` runs a tiny invocation of each script that writes outputs (the navigation data
set, stage 1 with a fixed K and with --k auto, stage 2 plain and with the Figure 4 sweep, stage 3, BC, TD3+BC and
IQL, then the MuJoCo path: small D4RL-format HDF5 files through the three stages and the baselines, evaluated in
Gymnasium's Hopper-v4, and a small local Minari set through the three stages, evaluated in InvertedPendulum-v5),
each in its own process with cwd = the checkout, every output under one folder. ``compare`` loads every .npz
(allow_pickle=False) and .hdf5 file of two such folders and compares every array bit for bit, except the metadata
that records paths and command lines (IGNORED_KEYS).

    python scripts/snapshot_outputs.py run --root /work/before --out /tmp/snap_before
    python scripts/snapshot_outputs.py run --root . --out /tmp/snap_after
    python scripts/snapshot_outputs.py compare /tmp/snap_before /tmp/snap_after

The commands run with JAX_PLATFORMS=cpu and without XLA_FLAGS (each stage then sets its own host device count),
MINARI_DATASETS_PATH=<out>/minari and PYTHONDONTWRITEBYTECODE=1 (nothing is written into the checkout). A command
that fails is reported (name, exit code, the end of its log) and the others go on, except those that read its
outputs. Each command's output goes to <out>/logs/<name>.log, the summary to <out>/logs/summary.json; compare
leaves logs/ out. Only the standard library and numpy are needed (h5py, when present, for the .hdf5 files).

One key is not deterministic: select_k/seconds of --k auto's cluster.npz (nav_kauto/), the wall time of each K's
fit. Two runs of the same checkout differ there and nowhere else; compare it away explicitly with
--ignore select_k/seconds (the output lists every ignored key).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

# Metadata, not results: args (the command line, with the output paths), inputs (sha256 of the inputs, and their
# paths for HDF5 sources), producer (the script's name) and a checkpoint's identity (its absolute output path).
IGNORED_KEYS = ("args", "inputs", "producer", "identity")
SEEDS = "2"
NAV_CLUSTER = ["--bias-epochs", "1", "--pretrain-epochs", "2", "--em-epochs", "3", "--hidden-dim", "32",
               "--log-every", "100"]  # scripts/device_check.py PIPELINE["tiny"]
NAV_PPO = ["--q-steps", "400", "--steps-per-call", "200", "--v-epochs", "1", "--pi-epochs", "2", "--eval-episodes", "3"]
NAV_HIGHLEVEL = ["--steps", "400", "--steps-per-call", "200", "--eval-episodes", "3"]
NAV_BASELINE = ["--steps", "400", "--steps-per-call", "200", "--hidden-dim", "32", "--eval-episodes", "3"]
# The MuJoCo path at the D4RL preset (hidden 256, gamma 0.99, ...) with tests/test_d4rl.py's tiny schedules.
MUJOCO_CLUSTER = ["--preset", "d4rl", "--bias-epochs", "1", "--pretrain-epochs", "1", "--em-epochs", "2",
                  "--hidden-dim", "16", "--log-every", "100"]
MUJOCO_PPO = ["--preset", "d4rl", "--q-steps", "20", "--steps-per-call", "20", "--v-epochs", "1", "--pi-epochs", "1",
              "--eval-episodes", "2", "--chunk", "512"]
MUJOCO_HIGHLEVEL = ["--preset", "d4rl", "--steps", "20", "--steps-per-call", "20", "--eval-episodes", "2"]
MUJOCO_BASELINE = ["--preset", "d4rl", "--steps", "20", "--steps-per-call", "20", "--hidden-dim", "16",
                   "--eval-episodes", "2"]


def commands(out: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, argv after the interpreter, names of the commands whose outputs it reads), in running order."""
    d = lambda *parts: os.path.join(out, *parts)
    nav = d("nav", "nav.npz")
    seeds = ["--seed", "1", "--num-seeds", SEEDS]
    hopper = f"{d('d4rl', 'hopper_medium-v2.hdf5')},{d('d4rl', 'hopper_expert-v2.hdf5')}"
    minari = "empo/pendulum/snap-b0-v0,empo/pendulum/snap-b1-v0"
    cmds = [
        ("nav_data", ["nav_env.py", "--out", nav, "--transitions-per-behaviour", "3000", "--figure",
                      d("nav", "dataset.png")], []),
        ("nav_cluster", ["empo_cluster.py", "--dataset", nav, "--out", d("nav", "cluster.npz"), *seeds, *NAV_CLUSTER],
         ["nav_data"]),
        ("nav_cluster_kauto", ["empo_cluster.py", "--dataset", nav, "--out", d("nav_kauto", "cluster.npz"), *seeds,
                               "--k", "auto", "--k-max", "2", *NAV_CLUSTER], ["nav_data"]),
        ("nav_ppo", ["empo_ppo.py", "--dataset", nav, "--cluster", d("nav", "cluster.npz"), "--out",
                     d("nav", "ppo.npz"), *seeds, *NAV_PPO], ["nav_cluster"]),
        ("nav_ppo_sweep", ["empo_ppo.py", "--dataset", nav, "--cluster", d("nav", "cluster.npz"), "--out",
                           d("nav_figure4", "ppo.npz"), *seeds, *NAV_PPO, "--eval-at", "0,1,2"], ["nav_cluster"]),
        ("nav_highlevel", ["empo_highlevel.py", "--dataset", nav, "--cluster", d("nav", "cluster.npz"), "--ppo",
                           d("nav", "ppo.npz"), "--out", d("nav", "highlevel.npz"), *seeds, *NAV_HIGHLEVEL],
         ["nav_ppo"]),
        ("nav_bc", ["baselines/bc.py", "--dataset", nav, "--out", d("nav", "bc.npz"), *seeds, *NAV_BASELINE],
         ["nav_data"]),
        ("nav_td3_bc", ["baselines/td3_bc.py", "--dataset", nav, "--out", d("nav", "td3_bc.npz"), *seeds,
                        *NAV_BASELINE], ["nav_data"]),
        ("nav_iql", ["baselines/iql.py", "--dataset", nav, "--out", d("nav", "iql.npz"), *seeds, *NAV_BASELINE],
         ["nav_data"]),
        # D4RL-format files (scripts/make_d4rl_files.py, as tests/test_d4rl.py): Hopper-v4, 600 rows per behaviour.
        ("d4rl_files", ["scripts/make_d4rl_files.py", "--out", d("d4rl"), "--tasks", "hopper", "--rows", "600",
                        "--episode-steps", "15"], []),
        ("d4rl_cluster", ["empo_cluster.py", "--dataset", hopper, "--out", d("hopper", "cluster.npz"), *seeds,
                          *MUJOCO_CLUSTER], ["d4rl_files"]),
        ("d4rl_ppo", ["empo_ppo.py", "--dataset", hopper, "--cluster", d("hopper", "cluster.npz"), "--out",
                      d("hopper", "ppo.npz"), *seeds, *MUJOCO_PPO], ["d4rl_cluster"]),
        ("d4rl_highlevel", ["empo_highlevel.py", "--dataset", hopper, "--cluster", d("hopper", "cluster.npz"), "--ppo",
                            d("hopper", "ppo.npz"), "--out", d("hopper", "highlevel.npz"), *seeds, *MUJOCO_HIGHLEVEL],
         ["d4rl_ppo"]),
        ("d4rl_bc", ["baselines/bc.py", "--dataset", hopper, "--out", d("hopper", "bc.npz"), *seeds,
                     *MUJOCO_BASELINE], ["d4rl_files"]),
        ("d4rl_td3_bc", ["baselines/td3_bc.py", "--dataset", hopper, "--out", d("hopper", "td3_bc.npz"), *seeds,
                         *MUJOCO_BASELINE], ["d4rl_files"]),
        ("d4rl_iql", ["baselines/iql.py", "--dataset", hopper, "--out", d("hopper", "iql.npz"), *seeds,
                      *MUJOCO_BASELINE], ["d4rl_files"]),
        # A local Minari set (scripts/make_mujoco_set.py, as tests/test_mujoco_pipeline.py): InvertedPendulum-v5.
        ("minari_set", ["scripts/make_mujoco_set.py", "--prefix", "empo/pendulum/snap", "--episodes", "3",
                        "--episode-steps", "100", "--ref-episodes", "2", "--overwrite"], []),
        ("minari_cluster", ["empo_cluster.py", "--dataset", minari, "--out", d("pendulum", "cluster.npz"), *seeds,
                            *MUJOCO_CLUSTER], ["minari_set"]),
        ("minari_ppo", ["empo_ppo.py", "--dataset", minari, "--cluster", d("pendulum", "cluster.npz"), "--out",
                        d("pendulum", "ppo.npz"), *seeds, *MUJOCO_PPO], ["minari_cluster"]),
        ("minari_highlevel", ["empo_highlevel.py", "--dataset", minari, "--cluster", d("pendulum", "cluster.npz"),
                              "--ppo", d("pendulum", "ppo.npz"), "--out", d("pendulum", "highlevel.npz"), *seeds,
                              *MUJOCO_HIGHLEVEL], ["minari_ppo"]),
    ]
    return cmds


def tail(path: str, lines: int = 15) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run(args) -> int:
    root, out = os.path.abspath(args.root), os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        if not args.clean:
            sys.exit(f"error: {out} is not empty (give --clean to delete it first)")
        shutil.rmtree(out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs)
    env = dict(os.environ, JAX_PLATFORMS="cpu", MINARI_DATASETS_PATH=os.path.join(out, "minari"),
               PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    cmds = commands(out)
    only = set(args.only.split(",")) if args.only else None
    status: dict[str, str] = {}
    summary = []
    start = time.perf_counter()
    for name, argv, deps in cmds:
        if only is not None and name not in only:
            continue
        for flag, value in zip(argv, argv[1:]):
            if flag == "--out" and value.endswith(".npz"):
                os.makedirs(os.path.dirname(value), exist_ok=True)
        failed = [dep for dep in deps if status.get(dep, "ok") != "ok"]
        if failed:
            status[name] = f"skipped ({', '.join(failed)} did not succeed)"
            print(f"=== {name}: {status[name]}", flush=True)
            summary.append(dict(name=name, status=status[name], seconds=0.0, argv=argv))
            continue
        log = os.path.join(logs, f"{name}.log")
        print(f"=== {name}: python {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            try:
                rc = subprocess.run([sys.executable, *argv], cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.perf_counter() - t0
        status[name] = "ok" if rc == 0 else (f"failed (exit {rc})" if rc is not None else
                                             f"stopped after {args.timeout:.0f} s")
        print(f"=== {name}: {status[name]} in {seconds:.1f} s", flush=True)
        if status[name] != "ok":
            print(f"--- the end of {log}:\n{tail(log)}", flush=True)
        summary.append(dict(name=name, status=status[name], seconds=round(seconds, 1), argv=argv))
    total = time.perf_counter() - start
    with open(os.path.join(logs, "summary.json"), "w") as f:
        json.dump(dict(root=root, out=out, python=sys.executable, total_seconds=round(total, 1), commands=summary),
                  f, indent=1)
    print(f"\n{'command':<20} {'status':<40} {'wall s':>8}")
    for row in summary:
        print(f"{row['name']:<20} {row['status']:<40} {row['seconds']:>8.1f}")
    bad = [row["name"] for row in summary if row["status"] != "ok"]
    print(f"total {total:.0f} s; {len(summary) - len(bad)} of {len(summary)} commands succeeded"
          + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------------

EVENTS = re.compile(r"^(events\.out\.tfevents)\..*$")


def list_files(folder: str) -> dict[str, list[str]]:
    """Relative path -> files under folder, logs/ left out. TensorBoard event files carry the time, host and pid in
    their names, so they are keyed as '<dir>/events.out.tfevents.*' (the list holds every match)."""
    files: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = os.path.relpath(dirpath, folder)
        if rel_dir == "logs":
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, EVENTS.sub(r"\1.*", name)))
            files.setdefault(rel, []).append(os.path.join(dirpath, name))
    return files


def load_npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def load_hdf5(path: str) -> dict[str, np.ndarray]:
    import h5py

    arrays: dict[str, np.ndarray] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            arrays[name] = np.asarray(obj[()])

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return arrays


def difference(a: np.ndarray, b: np.ndarray) -> str | None:
    """None when a and b are bit-identical arrays (NaN equal to NaN), else what differs."""
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    if a.dtype.kind in "fc":
        if np.array_equal(a, b, equal_nan=True):
            if np.array_equal(np.signbit(a.real), np.signbit(b.real)):
                return None
            return "same values, different signs of zero"
        both = np.isfinite(a) & np.isfinite(b)
        diff = np.abs(a[both].astype(np.float64) - b[both].astype(np.float64))
        n = int(np.sum(~((a == b) | (np.isnan(a) & np.isnan(b)))))
        return f"{n} of {a.size} values differ, max abs diff {diff.max() if diff.size else float('nan'):.3g}"
    if a.dtype.kind == "O":  # h5py strings as objects
        same = all(x == y for x, y in zip(a.ravel().tolist(), b.ravel().tolist()))
        return None if same else "values differ"
    if np.array_equal(a, b):
        return None
    if a.dtype.kind in "biu":
        n = int(np.sum(a != b))
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        return f"{n} of {a.size} values differ, max abs diff {diff.max():.3g}"
    return "values differ"


def compare_arrays(x: dict, y: dict, ignore: set[str]) -> list[str]:
    problems = []
    for key in sorted(set(x) | set(y)):
        if key in ignore:
            continue
        if key not in y:
            problems.append(f"{key}: only in A")
        elif key not in x:
            problems.append(f"{key}: only in B")
        else:
            why = difference(x[key], y[key])
            if why:
                problems.append(f"{key}: {why}")
    return problems


def compare(args) -> int:
    a_files, b_files = list_files(args.a), list_files(args.b)
    ignore = set(IGNORED_KEYS) | set(args.ignore)
    print(f"A = {os.path.abspath(args.a)}\nB = {os.path.abspath(args.b)}")
    print(f"ignored keys: {', '.join(sorted(ignore))}" + (f" (of which given by --ignore: {', '.join(args.ignore)})"
                                                          if args.ignore else ""))
    bad = counted = 0
    others = []
    for rel in sorted(set(a_files) | set(b_files)):
        in_a, in_b = rel in a_files, rel in b_files
        loader = load_npz if rel.endswith(".npz") else load_hdf5 if rel.endswith((".hdf5", ".h5")) else None
        if loader is None:
            counts = f" ({len(a_files.get(rel, []))} in A, {len(b_files.get(rel, []))} in B)" if "*" in rel else ""
            where = "present in both" if in_a and in_b else "only in A" if in_a else "only in B"
            if not (in_a and in_b) or len(a_files[rel]) != len(b_files[rel]):
                bad += 1
                where += " (a difference)"
            others.append(f"  {rel}: {where}{counts}")
            continue
        counted += 1
        if not (in_a and in_b):
            print(f"{rel}: only in {'A' if in_a else 'B'}")
            bad += 1
            continue
        try:
            x, y = loader(a_files[rel][0]), loader(b_files[rel][0])
        except Exception as e:  # an unreadable file is a difference, and the comparison goes on
            print(f"{rel}: could not be read: {type(e).__name__}: {e}")
            bad += 1
            continue
        problems = compare_arrays(x, y, ignore)
        compared = len([k for k in set(x) | set(y) if k not in ignore])
        if problems:
            bad += 1
            print(f"{rel}: differs ({len(problems)} of {compared} keys)")
            for line in problems:
                print(f"    {line}")
        else:
            print(f"{rel}: identical ({compared} keys)")
    print("other outputs (by presence only):")
    print("\n".join(others) if others else "  none")
    print(f"{counted} array files compared; " + ("everything identical" if not bad else f"{bad} differences"))
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run every script tiny, outputs under --out")
    p.add_argument("--root", required=True, help="the checkout whose scripts run (their working directory)")
    p.add_argument("--out", required=True, help="folder of the outputs (must be empty or absent)")
    p.add_argument("--clean", action="store_true", help="delete --out first if it is not empty")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per command (default 900)")
    p.add_argument("--only", default="", help="comma-separated command names to run (default: all)")
    p = sub.add_parser("compare", help="compare the array files of two run folders")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--ignore", action="append", default=[],
                   help="a further key to leave out (repeatable; listed in the output)")
    args = parser.parse_args()
    sys.exit(run(args) if args.command == "run" else compare(args))


if __name__ == "__main__":
    main()
