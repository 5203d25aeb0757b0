"""Table 2 and Table 3 of the paper from the outputs of scripts/reproduce_table2.sh, beside the paper's values.

Reads, per task, every run's ``cluster.npz`` (stage 1: ``rand_index`` [S], present when every row of the data
carries a behaviour label) and ``highlevel.npz`` (stage 3: ``eval/normalized_score`` and ``eval/return``
[S, episodes], the final policy's episodes in the task's Gymnasium environment after the last training step)
and writes

    table2.md    per task: the data, the seeds, the normalised score (mean +- std over seeds of each seed's
                 mean over its episodes; std with ddof 0), the return, the paper's Table 2 value ("Ours"), the
                 rand index of stage 1 (x 100, mean +- std over seeds) and the paper's Table 3 value ("Ours",
                 with Table 5's std); then the paper's whole Table 2 for reference;
    table2.png   the same two comparisons as bar charts.

A run folder holds ``{task}/cluster.npz`` and ``{task}/highlevel.npz``; several run folders (``--runs a,b``,
e.g. seeds 1-5 and 6-10 run one after the other) are joined along the seed axis.

Example
    python scripts/table2.py --runs runs/table2 --out runs/table2/table2
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro

TASKS = ("halfcheetah", "hopper", "walker2d")
# The paper's Table 2 (normalised score, D4RL *-medium-expert-v2; baselines from Kostrikov et al.) and Table 3 /
# Table 5 ("Ours": N_p = 20, N_b = 3, mu = 0.9; rand index x 100, mean +- std over 10 seeds).
PAPER_TABLE2_COLUMNS = ("BC", "DT", "AWAC", "Onestep RL", "TD3+BC", "CQL", "IQL", "Ours")
PAPER_TABLE2 = {
    "halfcheetah": (55.2, 86.8, 42.8, 93.4, 90.7, 91.6, 86.7, 92.6),
    "hopper": (52.5, 107.6, 55.8, 103.3, 98.0, 105.4, 91.5, 110.2),
    "walker2d": (107.5, 108.1, 74.5, 113.0, 110.1, 108.8, 109.6, 108.4),
}
PAPER_TABLE3 = {"halfcheetah": (100.00, 0.00), "hopper": (100.00, 0.00), "walker2d": (99.93, 0.08)}


@dataclass
class Args:
    runs: str = "runs/table2"
    """run folders of scripts/reproduce_table2.sh, comma-separated (joined along the seed axis)"""
    tasks: tuple[str, ...] = TASKS
    """tasks to tabulate (each needs its files in every run folder)"""
    out: str = "runs/table2/table2"
    """output prefix: writes <out>.md and <out>.png"""


def task_files(runs: str, task: str, name: str) -> list:
    """The file ``name`` of one task in every run folder."""
    files = [os.path.join(run, task, name) for run in runs.split(",") if run]
    for path in files:
        if not os.path.isfile(path):
            sys.exit(f"error: {path} does not exist; has scripts/reproduce_table2.sh finished this task?")
    return files


def load_task(runs: str, task: str) -> dict:
    """Seeds, normalised scores [S, E], returns [S, E] and rand indices [S] (or None) of one task, all runs."""
    seeds, scores, returns, rand, sources = [], [], [], [], set()
    for path in task_files(runs, task, "highlevel.npz"):
        with np.load(path, allow_pickle=False) as f:
            if "eval/normalized_score" not in f:
                sys.exit(f"error: {path} has no 'eval/normalized_score' (run with --eval-episodes 0, or in an "
                         f"environment without reference scores?)")
            seeds += f["seeds"].tolist()
            scores.append(f["eval/normalized_score"])
            returns.append(f["eval/return"])
            sources.add(json.loads(str(f["args"]))["dataset"])
    for path in task_files(runs, task, "cluster.npz"):
        with np.load(path, allow_pickle=False) as f:
            rand.append(f["rand_index"] if "rand_index" in f else None)
    if len({s.shape[1] for s in scores}) > 1:
        sys.exit(f"error: the runs of {task} hold different numbers of episodes per seed")
    if len(set(seeds)) != len(seeds):
        sys.exit(f"error: the runs of {task} repeat seeds {sorted(seeds)}")
    return {"seeds": seeds, "score": np.concatenate(scores), "return": np.concatenate(returns),
            "rand_index": None if any(r is None for r in rand) else np.concatenate(rand), "sources": sorted(sources)}


def describe_source(sources: list) -> str:
    """'halfcheetah_medium-v2 + halfcheetah_expert-v2' for D4RL files; Minari ids are flagged as such."""
    names = []
    for source in sources:
        parts = [p.strip() for p in source.split(",") if p.strip()]
        if all(p.endswith((".hdf5", ".h5")) for p in parts):
            names.append(" + ".join(os.path.splitext(os.path.basename(p))[0] for p in parts))
        else:
            names.append(" + ".join(parts) + " (Minari, not D4RL v2)")
    return "; ".join(names)


def main(args: Args) -> None:
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        sys.exit(f"error: unknown tasks {unknown}; Table 2's are {list(TASKS)}")
    rows = {task: load_task(args.runs, task) for task in args.tasks}
    lines = ["| task (medium-expert) | data | seeds × episodes | normalised score | return | paper, Table 2 | "
             "rand index × 100 | paper, Table 3 |", "|---|---|---|---|---|---|---|---|"]
    for task, row in rows.items():
        per_seed = row["score"].mean(axis=1)  # [S]: each seed's mean over its episodes
        ret = row["return"].mean(axis=1)
        ri = "–" if row["rand_index"] is None else (f"{100 * row['rand_index'].mean():.2f} ± "
                                                     f"{100 * row['rand_index'].std():.2f}")
        lines.append(f"| {task} | {describe_source(row['sources'])} | {len(per_seed)} × {row['score'].shape[1]} | "
                     f"{per_seed.mean():.1f} ± {per_seed.std():.1f} | {ret.mean():.1f} ± {ret.std():.1f} | "
                     f"{PAPER_TABLE2[task][-1]:.1f} | {ri} | {PAPER_TABLE3[task][0]:.2f} ± "
                     f"{PAPER_TABLE3[task][1]:.2f} |")
    lines += ["", "The paper's Table 2 (normalised score on D4RL *-medium-expert-v2; baselines from Kostrikov et al.):",
              "", "| task | " + " | ".join(PAPER_TABLE2_COLUMNS) + " |", "|---" * (len(PAPER_TABLE2_COLUMNS) + 1) + "|"]
    lines += [f"| {task} | " + " | ".join(f"{x:.1f}" for x in PAPER_TABLE2[task]) + " |" for task in args.tasks]
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    print(table)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    x = np.arange(len(rows))
    for i, (title, ours, paper) in enumerate((
            ("normalised score (Table 2)", [r["score"].mean(axis=1) for r in rows.values()],
             [PAPER_TABLE2[t][-1] for t in rows]),
            ("rand index × 100 (Table 3)", [None if r["rand_index"] is None else 100 * r["rand_index"]
                                            for r in rows.values()], [PAPER_TABLE3[t][0] for t in rows]))):
        ax = fig.add_subplot(1, 2, i + 1)
        mean = [np.nan if v is None else v.mean() for v in ours]
        std = [np.nan if v is None else v.std() for v in ours]
        ax.bar(x - 0.2, mean, 0.4, yerr=std, capsize=4, label="this implementation (mean ± std over seeds)")
        ax.bar(x + 0.2, paper, 0.4, label="paper")
        ax.set_xticks(x, list(rows))
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out + ".png")
    print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
