"""Table 1 and Figure 3/5 of the paper on the navigation task, from the outputs of every algorithm.

Reads the evaluation arrays that each algorithm's script wrote (rollouts from s_0, the paper's
protocol of Appendix C: 10 seeds x 10 rollouts) and writes

    table1.md    per algorithm and evaluation protocol (actions sampled from the policy, the paper's protocol
                 and the default, and the mean action): return mean +- std over all seeds x rollouts, the
                 std of the per-seed mean returns, the count of each route class (nav_env.route_classes,
                 from the stored paths: fast, detour without penalty, through S_p, no goal) and mean steps;
                 then, per row, how many rollouts entered the two conflict corridors (x = 10 and x = 20 below
                 y = 15, where the behaviours go opposite ways: the paper's shaded region of Figure 1b) and how
                 fast they moved there and elsewhere (nav_env.corridor_stats);
    table1.png   one map per algorithm and protocol with every stored rollout (Figure 5), coloured by seed.

Rows (each optional; several files per row are concatenated along the seed axis, e.g. two runs of
seeds 1-2 and 3-10):
    BC          baselines/bc.py            bc.npz         eval/*        [S, E]
    TD3+BC      baselines/td3_bc.py        td3_bc.npz     eval/*        [S, E]  (four rows: raw action units
                and normalised units (--action-units), each with gamma 0.999 (Table 4) and 0.99 (the
                reference code's))
    EMPO K=1    empo_ppo.py with K = 1     ppo.npz        eval/pi_*     [S, 1, E]  (pi_L(.|s, 0) itself:
                with one cluster ID(s) = {0}, so the final policy of stage 3 is pi_L(.|s, 0))
    EMPO K=2    empo_highlevel.py          highlevel.npz  eval/*        [S, E]

Example
    python scripts/table1.py --bc runs/table1/bc/bc.npz --td3-bc runs/table1/td3_bc/td3_bc.npz \\
        --td3-bc-099 runs/table1/td3_bc_099/td3_bc.npz --td3-bc-norm runs/table1/td3_bc_norm/td3_bc.npz \\
        --td3-bc-norm-099 runs/table1/td3_bc_norm_099/td3_bc.npz \\
        --empo-k1 runs/table1/k1/ppo.npz --empo-k2 runs/table1/k2/highlevel.npz --out runs/table1/table1

The sampled protocol of the deterministic TD3+BC actor adds the reference TD3's exploration noise
(N(0, (0.1 a_max)^2), clipped); each script's evaluation stores both protocols from the same start states.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import empo_io  # noqa: E402
import nav_env  # noqa: E402

FIELDS = ("return", "goal", "penalty_steps", "length")
PROTOCOLS = {"sampled": "sampled_", "mean": ""}  # protocol -> the infix of its arrays


@dataclass
class Args:
    bc: str = ""
    """bc.npz of baselines/bc.py (comma-separated files are joined along the seed axis; empty skips the row)"""
    td3_bc: str = ""
    """td3_bc.npz of baselines/td3_bc.py in raw action units, gamma 0.999 (its defaults)"""
    td3_bc_099: str = ""
    """td3_bc.npz of baselines/td3_bc.py --gamma 0.99 (raw action units: the reference code's setting)"""
    td3_bc_norm: str = ""
    """td3_bc.npz of baselines/td3_bc.py --action-units normalised (gamma 0.999)"""
    td3_bc_norm_099: str = ""
    """td3_bc.npz of baselines/td3_bc.py --action-units normalised --gamma 0.99 (the reference code's gamma)"""
    empo_k1: str = ""
    """ppo.npz of empo_ppo.py run on a K = 1 clustering (its pi_L(.|s, 0) is EMPO's final policy for K = 1)"""
    empo_k2: str = ""
    """highlevel.npz of empo_highlevel.py (EMPO's final policy pi)"""
    dataset: str = ""
    """optional data set: adds the behaviour policies' returns in the data (the paper's reference row)"""
    protocol: Literal["both", "sampled", "mean"] = "both"
    """evaluation protocol(s) in the table: actions sampled from the policy (Appendix C) and/or its mean action"""
    out: str = "runs/table1/table1"
    """output prefix: writes <out>.md and <out>.png"""


def load_row(paths: str, kind: str, protocol: str) -> dict:
    """The evaluation arrays of one algorithm and protocol as {field: [S, E]}, route [S, E'] and the paths."""
    parts = []
    for path in [p for p in paths.split(",") if p]:
        if not os.path.isfile(path):
            sys.exit(f"error: {path} does not exist")
        with np.load(path, allow_pickle=False) as f:
            infix = PROTOCOLS[protocol]
            prefix, pick = (f"eval/pi_{infix}", lambda x: x[:, 0]) if kind == "k1" else (f"eval/{infix}", lambda x: x)
            if kind == "k1" and f"{prefix}return" in f and f[f"{prefix}return"].shape[1] != 1:
                sys.exit(f"error: {path} holds K = {f[prefix + 'return'].shape[1]} clusters; the EMPO K=1 row needs "
                         f"a stage-2 run on a K = 1 clustering")
            missing = [name for name in FIELDS + ("positions",) if f"{prefix}{name}" not in f]
            if missing:
                sys.exit(f"error: {path} has no {protocol}-action evaluation arrays {missing} (run with "
                         f"--eval-episodes 0, or by a version without both protocols?)")
            part = {name: pick(f[f"{prefix}{name}"]) for name in FIELDS}
            part["positions"] = pick(f[f"{prefix}positions"])
            part["seeds"] = f["seeds"]
            parts.append(part)
    episodes = {p["return"].shape[1] for p in parts}
    if len(episodes) > 1:
        sys.exit(f"error: the files of one row hold different numbers of rollouts per seed {sorted(episodes)}")
    row = {name: np.concatenate([p[name] for p in parts]) for name in FIELDS + ("seeds",)}
    # Route classes from the stored paths (the first min(E, 10) rollouts of each seed for stage 2's files).
    row["route"] = np.concatenate([nav_env.route_classes(p["positions"], p["length"][:, : p["positions"].shape[1]],
                                                         p["goal"][:, : p["positions"].shape[1]]) for p in parts])
    row["paths"] = [(s, p["positions"][i], p["length"][i]) for p in parts for i, s in enumerate(p["seeds"])]
    return row


def summarise(row: dict) -> dict:
    ret = row["return"].astype(np.float64)
    return {"seeds": ret.shape[0], "rollouts": ret.size, "return_mean": ret.mean(), "return_std": ret.std(),
            "seed_std": ret.mean(axis=1).std(), "routes": nav_env.route_counts(row["route"]),
            "routed": int(row["route"].size), "length": row["length"].mean()}


def data_rows(path: str) -> list:
    """(name, behaviour_stats) for each behaviour label of the data set."""
    data, _ = empo_io.load_dataset(path)
    rows = []
    for b in np.unique(data["behaviour"]):
        mask = data["behaviour"] == b
        rows.append((f"data set, behaviour {b}", nav_env.behaviour_stats({k: v[mask] for k, v in data.items()})))
    return rows


def corridor_table(rows: list) -> str:
    """Where each row's rollouts crossed the conflict corridors (nav_env.corridor_stats), as a markdown block."""
    names = list(nav_env.CONFLICT_CORRIDORS)
    lines = [f"Conflict corridors (nav_env.corridor_stats: where the behaviours travel opposite ways, |x - x_c| <= "
             f"{nav_env.CORRIDOR_HALF_WIDTH:g}, y in [{nav_env.CORRIDOR_Y[0]:g}, {nav_env.CORRIDOR_Y[1]:g}]): "
             "rollouts that entered, steps there per rollout that entered, mean distance per step there and "
             "elsewhere (a_max: 0.2 per axis).", "",
             "| algorithm | actions | " + " | ".join(f"entered {n} | steps there | speed there" for n in names)
             + " | speed elsewhere |", "|---|---|" + "---|---|---|" * len(names) + "---|"]
    for name, protocol, row in rows:
        pos = np.concatenate([p for _, p, _ in row["paths"]])
        stats = nav_env.corridor_stats(pos, np.concatenate([length[: len(p)] for _, p, length in row["paths"]]))
        speed = {n: "–" if np.isnan(stats[n]["speed"]) else f"{stats[n]['speed']:.3f}" for n in names}
        cells = [f"{stats[n]['entered']}/{len(pos)} | {stats[n]['steps'] / max(stats[n]['entered'], 1):.0f} | "
                 f"{speed[n]}" for n in names]
        lines.append(f"| {name} | {protocol} | " + " | ".join(cells) + f" | {stats['elsewhere']:.3f} |")
    return "\n".join(lines)


def main(args: Args) -> None:
    algorithms = [(name, paths, kind) for name, paths, kind in (
        ("BC", args.bc, "plain"), ("TD3+BC (raw units, γ 0.999)", args.td3_bc, "plain"),
        ("TD3+BC (raw units, γ 0.99)", args.td3_bc_099, "plain"),
        ("TD3+BC (a/a_max units, γ 0.999)", args.td3_bc_norm, "plain"),
        ("TD3+BC (a/a_max units, γ 0.99)", args.td3_bc_norm_099, "plain"),
        ("EMPO K=1", args.empo_k1, "k1"), ("EMPO K=2", args.empo_k2, "plain")) if paths]
    if not algorithms:
        sys.exit("error: give at least one of --bc, --td3-bc, --td3-bc-099, --td3-bc-norm, --td3-bc-norm-099, "
                 "--empo-k1, --empo-k2")
    protocols = ["sampled", "mean"] if args.protocol == "both" else [args.protocol]
    rows = [(name, protocol, load_row(paths, kind, protocol)) for protocol in protocols
            for name, paths, kind in algorithms]
    lines = ["| algorithm | actions | seeds × rollouts | return (mean ± std) | std of seed means | fast | "
             "detour | through S_p | no goal | mean steps |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, protocol, row in rows:
        s = summarise(row)
        r = s["routes"]
        lines.append(f"| {name} | {protocol} | {s['seeds']} × {s['rollouts'] // s['seeds']} | {s['return_mean']:.1f} ± "
                     f"{s['return_std']:.1f} | {s['seed_std']:.1f} | {r['fast']} | {r['detour']} | "
                     f"{r['through S_p']} | {r['no goal']} | {s['length']:.0f} |")
    if args.dataset:
        for name, s in data_rows(args.dataset):
            lines.append(f"| {name} | – | {s['episodes']} episodes | {s['mean_return']:.1f} | – | – | – | – | – | "
                         f"{s['mean_length']:.0f} |")
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    corridors = corridor_table(rows)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n\nRoute classes (counts of rollouts, nav_env.route_classes): fast = reached g without "
                "S_p and passed S_p's column below y = 22.5 (the paper's optimal route); detour = reached g without "
                "S_p but rose above y = 22.5 left of x = 15; through S_p = reached g after entering S_p; no goal = "
                "never reached g.\n\n" + corridors + "\n")
    print(table)
    print(corridors)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(algorithms), 5 * len(protocols)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, protocol, row) in enumerate(rows):
        trajs = [pos[e, : length[e] + 1].astype(np.float32) for _, pos, length in row["paths"]
                 for e in range(len(pos))]
        labels = [j for j, (_, pos, _) in enumerate(row["paths"]) for _ in range(len(pos))]
        shown = sorted({int(s) for s, _, _ in row["paths"]})
        title = f"{name}, {protocol}: {len(trajs)} rollouts, seeds {shown[0]}-{shown[-1]}"
        image = nav_env.plot_map(trajs, labels, title=title, label_names=[f"seed {s}" for s, _, _ in row["paths"]])
        ax = fig.add_subplot(len(protocols), len(algorithms), i + 1)
        ax.imshow(image)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out + ".png")
    print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
