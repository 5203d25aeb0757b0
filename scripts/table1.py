"""Table 1 and Figure 3/5 of the paper on the navigation task, from the outputs of every algorithm.

Reads the evaluation arrays that each algorithm's script wrote (rollouts from s_0, the paper's
protocol of Appendix C: 10 seeds x 10 rollouts) and writes

    table1.md    return mean +- std over all seeds x rollouts, goal rate, the fraction of rollouts that
                 entered the penalty area, the fraction that took the optimal route (reached g without
                 entering S_p), and the spread of the per-seed mean returns;
    table1.png   one map per algorithm with every stored rollout (Figure 5 analogue), coloured by seed.

Rows (each optional; several files per row are concatenated along the seed axis, e.g. two runs of
seeds 1-2 and 3-10):
    BC          baselines/bc.py            bc.npz         eval/*        [S, E]
    TD3+BC      baselines/td3_bc.py        td3_bc.npz     eval/*        [S, E]
    EMPO K=1    empo_ppo.py with K = 1     ppo.npz        eval/pi_*     [S, 1, E]  (pi_L(.|s, 0) itself:
                with one cluster ID(s) = {0}, so the final policy of stage 3 is pi_L(.|s, 0))
    EMPO K=2    empo_highlevel.py          highlevel.npz  eval/*        [S, E]

Example
    python scripts/table1.py --bc runs/table1/bc/bc.npz --td3-bc runs/table1/td3_bc/td3_bc.npz \\
        --empo-k1 runs/table1/k1/ppo.npz --empo-k2 runs/table1/k2/highlevel.npz --out runs/table1/table1
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nav_env  # noqa: E402

FIELDS = ("return", "goal", "penalty_steps", "optimal_route", "length")


@dataclass
class Args:
    bc: str = ""
    """bc.npz of baselines/bc.py (comma-separated files are joined along the seed axis; empty skips the row)"""
    td3_bc: str = ""
    """td3_bc.npz of baselines/td3_bc.py"""
    empo_k1: str = ""
    """ppo.npz of empo_ppo.py run on a K = 1 clustering (its pi_L(.|s, 0) is EMPO's final policy for K = 1)"""
    empo_k2: str = ""
    """highlevel.npz of empo_highlevel.py (EMPO's final policy pi)"""
    dataset: str = ""
    """optional data set: adds the behaviour policies' returns in the data (the paper's reference row)"""
    out: str = "runs/table1/table1"
    """output prefix: writes <out>.md and <out>.png"""


def load_row(paths: str, kind: str) -> dict:
    """The evaluation arrays of one algorithm as {field: [S, E]}, positions [S, E', T+1, 2] or None."""
    parts = []
    for path in [p for p in paths.split(",") if p]:
        if not os.path.isfile(path):
            sys.exit(f"error: {path} does not exist")
        with np.load(path, allow_pickle=False) as f:
            prefix, pick = ("eval/pi_", lambda x: x[:, 0]) if kind == "k1" else ("eval/", lambda x: x)
            if kind == "k1" and f"{prefix}return" in f and f[f"{prefix}return"].shape[1] != 1:
                sys.exit(f"error: {path} holds K = {f[prefix + 'return'].shape[1]} clusters; the EMPO K=1 row needs "
                         f"a stage-2 run on a K = 1 clustering")
            missing = [name for name in FIELDS if f"{prefix}{name}" not in f]
            if missing:
                sys.exit(f"error: {path} has no evaluation arrays {missing} (was it run with --eval-episodes 0?)")
            part = {name: pick(f[f"{prefix}{name}"]) for name in FIELDS}
            part["positions"] = pick(f[f"{prefix}positions"]) if f"{prefix}positions" in f else None
            part["seeds"] = f["seeds"]
            parts.append(part)
    episodes = {p["return"].shape[1] for p in parts}
    if len(episodes) > 1:
        sys.exit(f"error: the files of one row hold different numbers of rollouts per seed {sorted(episodes)}")
    row = {name: np.concatenate([p[name] for p in parts]) for name in FIELDS + ("seeds",)}
    row["paths"] = [(s, p["positions"][i], p["length"][i]) for p in parts if p["positions"] is not None
                    for i, s in enumerate(p["seeds"])]
    return row


def summarise(row: dict) -> dict:
    ret = row["return"].astype(np.float64)
    return {"seeds": ret.shape[0], "rollouts": ret.size, "return_mean": ret.mean(), "return_std": ret.std(),
            "seed_std": ret.mean(axis=1).std(), "goal": row["goal"].mean(),
            "penalty": (row["penalty_steps"] > 0).mean(), "optimal": row["optimal_route"].mean(),
            "optimal_count": int(row["optimal_route"].sum()), "length": row["length"].mean()}


def data_rows(path: str) -> list:
    """(name, behaviour_stats) for each behaviour label of the data set."""
    data, _ = nav_env.load_dataset(path)
    rows = []
    for b in np.unique(data["behaviour"]):
        mask = data["behaviour"] == b
        rows.append((f"data set, behaviour {b}", nav_env.behaviour_stats({k: v[mask] for k, v in data.items()})))
    return rows


def main(args: Args) -> None:
    rows = [(name, load_row(paths, kind)) for name, paths, kind in (
        ("BC", args.bc, "plain"), ("TD3+BC", args.td3_bc, "plain"), ("EMPO K=1", args.empo_k1, "k1"),
        ("EMPO K=2", args.empo_k2, "plain")) if paths]
    if not rows:
        sys.exit("error: give at least one of --bc, --td3-bc, --empo-k1, --empo-k2")
    lines = ["| algorithm | seeds × rollouts | return (mean ± std) | std of seed means | goal | entered S_p | "
             "optimal route | mean steps |", "|---|---|---|---|---|---|---|---|"]
    for name, row in rows:
        s = summarise(row)
        lines.append(f"| {name} | {s['seeds']} × {s['rollouts'] // s['seeds']} | {s['return_mean']:.1f} ± "
                     f"{s['return_std']:.1f} | {s['seed_std']:.1f} | {s['goal']:.2f} | {s['penalty']:.2f} | "
                     f"{s['optimal_count']}/{s['rollouts']} | {s['length']:.0f} |")
    if args.dataset:
        for name, s in data_rows(args.dataset):
            lines.append(f"| {name} | {s['episodes']} episodes | {s['mean_return']:.1f} | – | – | – | – | "
                         f"{s['mean_length']:.0f} |")
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    print(table)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(rows), 5), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, row) in enumerate(rows):
        trajs = [pos[e, : length[e] + 1].astype(np.float32) for _, pos, length in row["paths"]
                 for e in range(len(pos))]
        labels = [j for j, (_, pos, _) in enumerate(row["paths"]) for _ in range(len(pos))]
        shown = sorted({int(s) for s, _, _ in row["paths"]})
        title = f"{name}: {len(trajs)} rollouts, seeds {shown[0]}-{shown[-1]}" if shown else f"{name}: no paths stored"
        image = nav_env.plot_map(trajs, labels, title=title, label_names=[f"seed {s}" for s, _, _ in row["paths"]])
        ax = fig.add_subplot(1, len(rows), i + 1)
        ax.imshow(image)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out + ".png")
    print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
