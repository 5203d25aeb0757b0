"""Figure 4 of the paper (§4.3.2) on the navigation task: full-batch against minibatch PPO over N_pi.

Reads two ppo.npz files of empo_ppo.py made with --eval-at (e.g. 1,2,5,10,20,50,100) from the same cluster.npz
with the same seeds, one full batch (the paper's EMPO) and one with --ppo-minibatch 256 (the conventional
setting), checks that their Q and V are the same networks (same seed, same data: the two arms differ in the
PPO step alone), and writes

    <out>.md    per arm, protocol and N_pi: the return of pi_L(.|s, z) alone from s_0, averaged over clusters
                and rollouts per seed, as mean +- std over seeds (and the fast-route count);
    <out>.png   that mean +- std against N_pi (log x-axis), sampled and mean-action panels.

Example (scripts/reproduce_figure4.sh runs both arms)
    python scripts/figure4.py --full runs/figure4/full/ppo.npz --minibatch runs/figure4/mb256/ppo.npz \\
        --out docs/figure4
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nav_env  # noqa: E402


@dataclass
class Args:
    full: str
    """ppo.npz of the full-batch arm (empo_ppo.py --eval-at ...)"""
    minibatch: str
    """ppo.npz of the minibatch arm (empo_ppo.py --ppo-minibatch 256 --eval-at ...), same cluster.npz and seeds"""
    out: str = "docs/figure4"
    """output prefix: writes <out>.md and <out>.png"""


def load(path: str) -> dict:
    if not os.path.isfile(path):
        sys.exit(f"error: {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        if "eval/sweep_epochs" not in f:
            sys.exit(f"error: {path} has no eval/sweep_* arrays (run empo_ppo.py with --eval-at)")
        return {key: f[key] for key in f.files if key.startswith(("eval/sweep_", "q/", "v/")) or key in
                ("seeds", "cluster_run", "args", "inputs")}


def seed_means(arm: dict, key: str) -> np.ndarray:
    """[S, P]: the mean over clusters and rollouts of eval/sweep_<key> [S, K, P, E]."""
    return np.nanmean(arm[f"eval/sweep_{key}"], axis=(1, 3))


def main(args: Args) -> None:
    arms = {"full batch": load(args.full), "minibatch 256": load(args.minibatch)}
    full, mini = arms.values()
    if not np.array_equal(full["seeds"], mini["seeds"]) or not np.array_equal(full["cluster_run"],
                                                                              mini["cluster_run"]):
        sys.exit("error: the two arms were run with different seeds or clustering runs")
    if not np.array_equal(full["eval/sweep_epochs"], mini["eval/sweep_epochs"]):
        sys.exit("error: the two arms were evaluated at different epochs (--eval-at)")
    same_qv = all(np.array_equal(full[k], mini.get(k)) for k in full if k.startswith(("q/", "v/")))
    epochs = full["eval/sweep_epochs"]
    lines = [f"Seeds {', '.join(str(int(s)) for s in full['seeds'])}; Q and V identical in both arms: "
             f"{'yes' if same_qv else 'NO'}.", "",
             "| arm | actions | " + " | ".join(f"N_π = {int(e)}" for e in epochs) + " |",
             "|---|---|" + "---|" * len(epochs)]
    for name, arm in arms.items():
        for protocol, infix in (("sampled", "sampled_"), ("mean", "")):
            means = seed_means(arm, infix + "return")
            fast = (arm[f"eval/sweep_{infix}route"] == nav_env.ROUTE_FAST).sum(axis=(0, 1, 3))
            total = arm[f"eval/sweep_{infix}route"][:, :, 0].size
            cells = [f"{m:.1f} ± {s:.1f} ({int(f)}/{total} fast)" for m, s, f in
                     zip(means.mean(0), means.std(0), fast)]
            lines.append(f"| {name} | {protocol} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    print(table)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (protocol, infix) in enumerate((("sampled", "sampled_"), ("mean action", ""))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, arm in arms.items():
            means = seed_means(arm, infix + "return")
            x = np.maximum(epochs, 1e-1)
            ax.plot(x, means.mean(0), marker="o", label=name)
            ax.fill_between(x, means.mean(0) - means.std(0), means.mean(0) + means.std(0), alpha=0.25)
        ax.set_xscale("log")
        ax.set_xlabel("N_π (PPO epochs)")
        ax.set_ylabel("return of π_L(·|s, z), mean over clusters")
        ax.set_title(f"{protocol}, {len(full['seeds'])} seeds (mean ± std)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png")
    print(f"wrote {args.out}.md and {args.out}.png")


if __name__ == "__main__":
    main(tyro.cli(Args))
