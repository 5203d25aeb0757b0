"""The table of chosen K against ground truth from the outputs of scripts/reproduce_select_k.sh.

Reads ``{run}/{name}/cluster.npz`` (stage 1 with ``--k auto``) for every data set ``name`` and writes a
markdown file with, per data set: the number of behaviours it was generated with, its transitions and
trajectories, K_max, how many seeds chose each K, the K written, the K a vote of the seeds' own choices would give
(the smaller on a tie; an analysis, not what ``--k auto`` does), the rand index of the
written run (mean, min and max over seeds, every transition against the behaviour labels) beside that of stage 1
run with the true K on all rows (``{run}/{name}/fixed_k/cluster.npz``), the held-out score of every K (mean
over seeds, nats per transition), the mean number of empty clusters of every K, the time of every K's run (0 for
a K that --resume reused), and
the cost of ``--k auto``: its command's wall time over that of the true-K command (``{run}/times.txt``, lines
``NAME auto|fixed SECONDS`` written by the script).

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
BEHAVIOURS = {"paper": 2, "one": 1, "three": 3, "four": 4, "controllers": 2}


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


def row(name: str, folder: str, times: dict) -> tuple[str, str]:
    """One line of the main table and one of the scores table for the runs in ``folder``."""
    truth = BEHAVIOURS.get(name, "?")
    path, fixed_path = os.path.join(folder, "cluster.npz"), os.path.join(folder, "fixed_k", "cluster.npz")
    if not os.path.isfile(path):
        return f"| `{name}` | {truth} | | | | not run | | | | | |", f"| `{name}` | not run | | |"
    z = np.load(path, allow_pickle=False)
    seeds, trajectories = z["posterior"].shape[:2]
    transitions = z["assignments"].shape[1]
    chosen, per_seed = int(z["select_k/chosen"]), z["select_k/chosen_per_seed"]
    ks = z["select_k/k"]
    mark = "" if chosen == truth else " (wrong)"
    rand = z["rand_index"] if "rand_index" in z else np.full(seeds, np.nan)
    seconds = z["select_k/seconds"]
    fixed = "not run"
    if os.path.isfile(fixed_path):
        f = np.load(fixed_path, allow_pickle=False)["rand_index"]
        fixed = f"{f.mean():.4f} ({f.min():.4f}-{f.max():.4f})"
    auto_s, fixed_s = times.get((name, "auto")), times.get((name, "fixed"))
    cost = f"{auto_s:.0f} s / {fixed_s:.0f} s = {auto_s / fixed_s:.1f}×" if auto_s and fixed_s else "–"
    vote = int(np.bincount(per_seed).argmax())  # the K most seeds chose, the smaller on a tie
    main = (f"| `{name}` | {truth} | {transitions:,} | {trajectories} | {int(ks[-1])} | {counts(per_seed)} | "
            f"**{chosen}**{mark} | {vote} | {rand.mean():.4f} ({rand.min():.4f}-{rand.max():.4f}) | {fixed} "
            f"| {cost} |")
    scores = z["select_k/heldout_log_likelihood"].mean(1)
    empty = z["select_k/empty_clusters"].mean(1)
    detail = (f"| `{name}` | " + " / ".join(f"{s:.3f}" for s in scores) + " | "
              + " / ".join(f"{e:.1f}" for e in empty) + " | "
              + (" / ".join(f"{s:.0f}" for s in seconds) + f" (sum {seconds.sum():.0f})" if seconds.any()
                 else "every K reused by --resume") + " |")
    return main, detail


def main(args: Args) -> None:
    if not os.path.isdir(args.run):
        sys.exit(f"error: {args.run} is not a folder; run scripts/reproduce_select_k.sh first")
    times = read_times(os.path.join(args.run, "times.txt"))
    lines = [row(name, os.path.join(args.run, name), times) for name in args.sets]
    text = "\n".join([
        "| data set | behaviours | transitions | trajectories | K_max | seeds choosing each K | written K "
        "| K by a vote of the seeds' own choices "
        "| rand index of the written run, mean (min-max) over seeds | rand index with the true K, all rows "
        "| wall time, --k auto / true K |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[main for main, _ in lines],
        "",
        "| data set | held-out score per K = 1.., mean over seeds (nats per transition) | empty clusters per K, "
        "mean over seeds | seconds per K |",
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
