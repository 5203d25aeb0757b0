"""The table of chosen K against ground truth from the outputs of scripts/reproduce_select_k.sh.

Reads ``{run}/{name}/cluster.npz`` (stage 1 with ``--k auto``) for every data set ``name`` and writes a
markdown file with, per data set: the number of behaviours it was generated with, its transitions and
trajectories (held out), K_max and the runs per K, the K written, each seed's own choice, the rand index of the
written run (mean, min and max over seeds, every transition against the behaviour labels), beside it that of
stage 1 run with the true K on all rows where it was run (``{run}/{name}/fixed_k/cluster.npz``), and the wall time
of the command (``{run}/times.txt``, lines ``NAME auto|fixed SECONDS`` written by the script). A second table
gives, per number of clusters k, the gap to the best k (mean over held-out trajectories of the paired
difference, nats per trajectory) and its standard error, how many runs fitted k clusters, and the seconds of
every K's runs.

Example
    python scripts/select_k_table.py --run runs/select_k --out runs/select_k/select_k.md
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro

# The number of behaviours each data set of scripts/reproduce_select_k.sh is generated with (nav_env.py
# --subgoals NAME; the MuJoCo set is make_mujoco_set.py's two controllers).
BEHAVIOURS = {"paper": 2, "one": 1, "three": 3, "four": 4, "controllers": 2, "start3": 3, "segment": 2,
              "unequal": 2, "five": 5}


@dataclass
class Args:
    run: str = "runs/select_k"
    """run folder of scripts/reproduce_select_k.sh"""
    sets: tuple[str, ...] = tuple(BEHAVIOURS)
    """data sets to tabulate (those without a cluster.npz are listed as not run)"""
    out: str = "runs/select_k/select_k.md"
    """markdown file to write"""


def counts(values: np.ndarray) -> str:
    """'2 x 9, 3 x 1': how many seeds chose each K."""
    ks, n = np.unique(values, return_counts=True)
    return ", ".join(f"{k} × {c}" for k, c in zip(ks, n))


def read_times(path: str) -> dict:
    """{(name, 'auto' | 'fixed'): seconds} from times.txt (the last line of each wins: a resumed command's
    line counts only the part after the resume, so such a time is a lower bound)."""
    times = {}
    if os.path.isfile(path):
        for line in open(path):
            name, kind, seconds = line.split()
            times[name, kind] = float(seconds)
    return times


def fixed_tolerance_k(z, tolerance: float = 0.02) -> int:
    """The K that the rule before the standard errors would choose from the same runs: the smallest number of
    clusters whose best held-out score per transition (over every run) is within ``tolerance`` of the best."""
    scores, used = z["select_k/heldout_log_likelihood"], z["select_k/k"][:, None] - z["select_k/empty_clusters"]
    best = np.array([np.where(used == k, scores, -np.inf).max() for k in z["select_k/k"]])
    return int(np.argmax(best >= best.max() - tolerance)) + 1


def row(name: str, folder: str, times: dict) -> tuple[str, str]:
    """One line of the main table and one of the gaps table for the runs in ``folder``."""
    truth = BEHAVIOURS.get(name, "?")
    path, fixed_path = os.path.join(folder, "cluster.npz"), os.path.join(folder, "fixed_k", "cluster.npz")
    if not os.path.isfile(path):
        return f"| `{name}` | {truth} | | | | | not run | | | | | |", f"| `{name}` | not run | | |"
    z = np.load(path, allow_pickle=False)
    seeds, trajectories = z["posterior"].shape[:2]
    transitions = z["assignments"].shape[1]
    chosen, per_seed = int(z["select_k/chosen"]), z["select_k/chosen_per_seed"]
    ks, runs = z["select_k/k"], len(z["select_k/run_seeds"])
    mark = "" if chosen == truth else " (wrong)"
    rand = z["rand_index"] if "rand_index" in z else np.full(seeds, np.nan)
    seconds = z["select_k/seconds"]
    fixed = "not run"
    if os.path.isfile(fixed_path):
        f = np.load(fixed_path, allow_pickle=False)["rand_index"]
        fixed = f"{f.mean():.4f} ({f.min():.4f}-{f.max():.4f})"
    auto_s = times.get((name, "auto"))
    main = (f"| `{name}` | {truth} | {transitions:,} | {trajectories} ({len(z['select_k/heldout_trajectories'])}) | "
            f"{int(ks[-1])} | {seeds} × {runs // seeds if runs % seeds == 0 else runs / seeds:g} = {runs} | "
            f"**{chosen}**{mark} | {fixed_tolerance_k(z)} | {counts(per_seed)} | "
            f"{rand.mean():.4f} ({rand.min():.4f}-{rand.max():.4f}) | "
            f"{fixed} | {f'{auto_s:.0f} s' if auto_s else '–'} |")
    gap, error, fitted = z["select_k/gap"], z["select_k/gap_standard_error"], z["select_k/fitted"]
    used = ks[:, None] - z["select_k/empty_clusters"]  # [K_max, N] clusters each run uses
    detail = (f"| `{name}` | " + " / ".join(f"{g:.1f} ± {e:.1f}" if ok else "–" for g, e, ok in zip(gap, error, fitted))
              + " | " + " / ".join(str(int((used == k).sum())) for k in ks) + " | "
              + (" / ".join(f"{s:.0f}" for s in seconds) + f" (sum {seconds.sum():.0f})" if seconds.any()
                 else "every K reused by --resume") + " |")
    return main, detail


def main(args: Args) -> None:
    if not os.path.isdir(args.run):
        sys.exit(f"error: {args.run} is not a folder; run scripts/reproduce_select_k.sh first")
    times = read_times(os.path.join(args.run, "times.txt"))
    lines = [row(name, os.path.join(args.run, name), times) for name in args.sets]
    text = "\n".join([
        "| data set | behaviours | transitions | trajectories (held out) | K_max | runs per K (seeds × restarts) "
        "| written K | a fixed 0.02 nats per transition would give | each seed's own choice (K × seeds) "
        "| rand index of the written run, mean (min-max) over seeds "
        "| rand index with the true K, all rows | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[main for main, _ in lines],
        "",
        "| data set | gap to the best k ± its standard error, k = 1, 2, ... (nats per held-out trajectory) "
        "| runs that fitted k clusters | seconds per K |",
        "|---|---|---|---|",
        *[detail for _, detail in lines],
        "",
    ])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(tyro.cli(Args))
