"""Table 2 and Table 3 of the paper from the runs of scripts/reproduce_table2.sh, each number beside the paper's.

Reads, per task and run folder (``<run>/<task>/``):
    cluster.npz     stage 1: ``rand_index`` [S] (present when every row of the data carries a behaviour label)
    ppo.npz         stage 2: its schedule (``args``)
    highlevel.npz   EMPO's final policy: ``eval/normalized_score`` and ``eval/return`` [S, episodes] after the last
                    training step, ``args`` (the data set, the schedule)
    bc.npz, td3_bc.npz, iql.npz   the baselines, the same keys; a baseline is tabulated when every run folder has it
and the data files the runs name (their complete episodes give the behaviour returns), and writes

    table2.md    per task: the data and whose it is, the budget every algorithm had, then the normalised score of
                 EMPO, BC, TD3+BC and IQL (mean +- std over seeds of each seed's mean over its episodes; std with
                 ddof 0), each beside the paper's Table 2 value; stage 1's rand index x 100 beside Table 3 (with
                 Table 5's std); the returns; the behaviour returns of each data file; the paper's whole Table 2;
    table2.png   the normalised scores and the rand index as bar charts, the paper's values as markers.

Several run folders (``--runs a,b``, e.g. seeds 1-5 and 6-10 run one after the other) are joined along the seed
axis. The data are labelled by what their files record (metadata/algorithm): this project's SAC data
(behaviour/make_data.py), this project's linear controllers (scripts/make_d4rl_files.py), or D4RL's own files.

Example
    python scripts/table2.py --runs runs/table2 --out runs/table2/table2
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import h5py
import numpy as np
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # empo_io (the figure writer), gym_eval (D4RL's reference returns)

import empo_io  # noqa: E402
import gym_eval  # noqa: E402

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
# name in the table: (output file in a task's folder, the paper's Table 2 column)
ALGORITHMS = {"EMPO": ("highlevel.npz", "Ours"), "BC": ("bc.npz", "BC"), "TD3+BC": ("td3_bc.npz", "TD3+BC"),
              "IQL": ("iql.npz", "IQL")}


@dataclass
class Args:
    runs: str = "runs/table2"
    """run folders of scripts/reproduce_table2.sh, comma-separated (joined along the seed axis)"""
    tasks: tuple[str, ...] = TASKS
    """tasks to tabulate (each needs cluster.npz, ppo.npz and highlevel.npz in every run folder)"""
    out: str = "runs/table2/table2"
    """output prefix: writes <out>.md and <out>.png"""


def paper(task: str, column: str) -> float:
    return PAPER_TABLE2[task][PAPER_TABLE2_COLUMNS.index(column)]


def mean_std(x, scale: float = 1.0, digits: int = 1) -> str:
    x = scale * np.asarray(x, np.float64)
    return f"{x.mean():.{digits}f} ± {x.std():.{digits}f}"


def task_files(runs: str, task: str, name: str, required: bool = True):
    """The file ``name`` of one task in every run folder; None when none has it and it is not required."""
    paths = [os.path.join(run, task, name) for run in runs.split(",") if run]
    present = [os.path.isfile(p) for p in paths]
    if not any(present) and not required:
        return None
    if not all(present):
        missing = paths[present.index(False)]
        sys.exit(f"error: {missing} does not exist; has scripts/reproduce_table2.sh finished this task?")
    return paths


def load_output(runs: str, task: str, name: str, required: bool):
    """Seeds, normalised scores [S, E], returns [S, E] and args of one algorithm's output joined over the run
    folders; None when no run folder has it and it is not required."""
    paths = task_files(runs, task, name, required)
    if paths is None:
        return None
    seeds, scores, returns, args = [], [], [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as f:
            if "eval/normalized_score" not in f:
                sys.exit(f"error: {path} has no 'eval/normalized_score' (run with --eval-episodes 0, or in an "
                         f"environment without reference scores?)")
            seeds += f["seeds"].tolist()
            scores.append(f["eval/normalized_score"])
            returns.append(f["eval/return"])
            args.append(json.loads(str(f["args"])))
    if len({s.shape[1] for s in scores}) > 1:
        sys.exit(f"error: the runs of {task} hold different numbers of episodes per seed in {name}")
    if len(set(seeds)) != len(seeds):
        sys.exit(f"error: the runs of {task} repeat seeds {sorted(seeds)}")
    return {"seeds": seeds, "score": np.concatenate(scores), "return": np.concatenate(returns), "args": args}


def load_args(runs: str, task: str, name: str) -> list:
    """The ``args`` of one stage's output in every run folder."""
    out = []
    for path in task_files(runs, task, name):
        with np.load(path, allow_pickle=False) as f:
            out.append(dict(json.loads(str(f["args"])), rand_index=f["rand_index"] if "rand_index" in f else None))
    return out


def behaviour(path: str, task: str) -> dict:
    """A data file's rows, its complete episodes' returns (those that end with a terminal or a timeout), their D4RL
    normalised score and what its metadata says made it."""
    with h5py.File(path, "r") as f:
        rewards = f["rewards"][()].reshape(-1).astype(np.float64)
        ends = np.flatnonzero(f["terminals"][()].reshape(-1).astype(bool) | f["timeouts"][()].reshape(-1).astype(bool))
        made = f["metadata/algorithm"][()] if "metadata/algorithm" in f else b""
    made = made.decode() if isinstance(made, bytes) else str(made)
    returns = np.add.reduceat(rewards[:ends[-1] + 1], np.r_[0, ends[:-1] + 1]) if ends.size else np.zeros(0)
    _, lo, hi = gym_eval.D4RL_TASKS[task]
    return {"name": os.path.splitext(os.path.basename(path))[0], "rows": len(rewards), "episodes": len(returns),
            "return": returns, "score": 100 * (returns - lo) / (hi - lo), "made": made}


def describe_data(sources: list, task: str) -> tuple[str, list]:
    """('hopper_medium-v2 + hopper_expert-v2, this project's SAC data ...', [behaviour of each file])."""
    names, files, whose = [], [], set()
    for source in sources:
        parts = [p.strip() for p in source.split(",") if p.strip()]
        if not all(p.endswith((".hdf5", ".h5")) for p in parts):
            names.append(" + ".join(parts) + " (Minari, not D4RL v2)")
            continue
        names.append(" + ".join(os.path.splitext(os.path.basename(p))[0] for p in parts))
        for p in parts:
            if not os.path.isfile(p):
                whose.add("files no longer on disk")
                continue
            files.append(behaviour(p, task))
            made = files[-1]["made"]
            whose.add("this project's SAC policies (behaviour/make_data.py), not D4RL's data"
                      if "behaviour/make_data.py" in made else
                      "this project's linear controllers (scripts/make_d4rl_files.py): a check of the path, not of EMPO"
                      if "linear controller" in made else "D4RL's v2 files")
    return "; ".join(names) + (f" — {'; '.join(sorted(whose))}" if whose else ""), files


def budget(cluster: dict, ppo: dict, high: dict, baselines: dict, rows: int) -> str:
    """The schedules every algorithm ran, in one line, and where the baselines' steps differ from stage 3's."""
    k = lambda n: f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1000:g}k" if n >= 1000 else str(n)
    line = (f"{rows:,} rows; EMPO stage 1: {cluster['bias_epochs']} + {cluster['pretrain_epochs']} + "
            f"{cluster['em_epochs']} epochs (bias, pretraining, EM), hidden {cluster['hidden_dim']}; stage 2: SARSA "
            f"{k(ppo['q_steps'])} steps, V {ppo['v_epochs']} and π {ppo['pi_epochs']} epochs; stage 3: "
            f"{k(high['steps'])} steps")
    same = [name for name, a in baselines.items() if a["steps"] == high["steps"]]
    other = [f"{name} {k(a['steps'])}" for name, a in baselines.items() if a["steps"] != high["steps"]]
    if same:
        line += f"; {', '.join(same)}: {k(high['steps'])} steps each"
    if other:
        line += f"; **not the same budget:** {', '.join(other)} steps"
    return line + f"; batch {high['batch_size']}"


def main(args: Args) -> None:
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        sys.exit(f"error: unknown tasks {unknown}; Table 2's are {list(TASKS)}")
    rows = {}
    for task in args.tasks:
        algos = {name: load_output(args.runs, task, file, name == "EMPO") for name, (file, _) in ALGORITHMS.items()}
        algos = {name: a for name, a in algos.items() if a is not None}
        clusters = load_args(args.runs, task, "cluster.npz")
        ppos = load_args(args.runs, task, "ppo.npz")
        rand = [c["rand_index"] for c in clusters]
        sources = sorted({a["dataset"] for a in algos["EMPO"]["args"]})
        label, files = describe_data(sources, task)
        for name, a in algos.items():
            if sorted({x["dataset"] for x in a["args"]}) != sources:
                sys.exit(f"error: {name} of {task} ran on {a['args'][0]['dataset']}, EMPO on {', '.join(sources)}")
        n_rows = sum(f["rows"] for f in files) if files else 0
        rows[task] = {"task": task, "algos": algos, "label": label, "files": files,
                      "rand_index": None if any(r is None for r in rand) else np.concatenate(rand),
                      "budget": budget(clusters[0], ppos[0], algos["EMPO"]["args"][0],
                                       {n: a["args"][0] for n, a in algos.items() if n != "EMPO"}, n_rows)}

    names = [n for n in ALGORITHMS if any(n in r["algos"] for r in rows.values())]
    paper_of = lambda r, n: f"{paper(r['task'], ALGORITHMS[n][1]):.1f}"
    cell = lambda r, n: (f"{mean_std(r['algos'][n]['score'].mean(axis=1))} ({paper_of(r, n)})"
                         if n in r["algos"] else f"not run ({paper_of(r, n)})")
    lines = ["## Table 2: normalised score, mean ± std over seeds (the paper's value in brackets)", "",
             "| task (medium-expert) | seeds × episodes | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for task, r in rows.items():
        s, e = r["algos"]["EMPO"]["score"].shape
        lines.append(f"| {task} | {s} × {e} | " + " | ".join(cell(r, n) for n in names) + " |")
    lines += ["", "## Table 3: stage 1's rand index × 100, mean ± std over seeds", "",
              "| task | this run | paper, Table 3 (Table 5's std) |", "|---|---|---|"]
    for task, r in rows.items():
        ri = "–" if r["rand_index"] is None else mean_std(r["rand_index"], 100, 2)
        lines.append(f"| {task} | {ri} | {PAPER_TABLE3[task][0]:.2f} ± {PAPER_TABLE3[task][1]:.2f} |")
    lines += ["", "## The runs", "", "| task | data | budget (every algorithm) | return: " + " | return: ".join(names) +
              " |", "|---" * (len(names) + 3) + "|"]
    for task, r in rows.items():
        lines.append(f"| {task} | {r['label']} | {r['budget']} | " + " | ".join(
            mean_std(r["algos"][n]["return"].mean(axis=1)) if n in r["algos"] else "–" for n in names) + " |")
    lines += ["", "## The behaviour in the data (complete episodes of each file)", "",
              "| task | file | rows | episodes | return | normalised score | made by |", "|---" * 7 + "|"]
    for task, r in rows.items():
        for f in r["files"]:
            ret = mean_std(f["return"]) if f["episodes"] else "–"
            score = mean_std(f["score"]) if f["episodes"] else "–"
            lines.append(f"| {task} | {f['name']} | {f['rows']:,} | {f['episodes']} | {ret} | {score} | "
                         f"{f['made'] or '–'} |")
    lines += ["", "The paper's Table 2 (normalised score on D4RL *-medium-expert-v2; baselines from Kostrikov et al.):",
              "", "| task | " + " | ".join(PAPER_TABLE2_COLUMNS) + " |", "|---" * (len(PAPER_TABLE2_COLUMNS) + 1) + "|"]
    lines += [f"| {task} | " + " | ".join(f"{x:.1f}" for x in PAPER_TABLE2[task]) + " |" for task in args.tasks]
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    empo_io.write_atomically(args.out + ".md", lambda f: f.write((table + "\n").encode()), "the old table is kept")
    print(table)
    empo_io.save_figure(figure(rows, names), args.out + ".png")
    print(f"wrote {args.out}.md and {args.out}.png")


def figure(rows: dict, names: list):
    """Bars: this run's normalised scores per task and algorithm, and the rand index; markers: the paper's."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    x, width = np.arange(len(rows)), 0.8 / len(names)
    ax = fig.add_subplot(1, 2, 1)
    for i, name in enumerate(names):
        per_seed = [r["algos"][name]["score"].mean(axis=1) if name in r["algos"] else np.array([np.nan])
                    for r in rows.values()]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, [v.mean() for v in per_seed], width, yerr=[v.std() for v in per_seed], capsize=3, label=name)
        ax.scatter(pos, [paper(t, ALGORITHMS[name][1]) for t in rows], marker="_", s=200, color="black",
                   zorder=3, label="paper" if i == 0 else None)
    ax.set_xticks(x, list(rows))
    ax.set_title("normalised score (Table 2), mean ± std over seeds")
    ax.legend(fontsize=7, loc="lower right")
    ax = fig.add_subplot(1, 2, 2)
    rand = [np.array([np.nan]) if r["rand_index"] is None else 100 * r["rand_index"] for r in rows.values()]
    ax.bar(x, [v.mean() for v in rand], 0.5, yerr=[v.std() for v in rand], capsize=4, label="this run")
    ax.scatter(x, [PAPER_TABLE3[t][0] for t in rows], marker="_", s=400, color="black", zorder=3, label="paper")
    ax.set_xticks(x, list(rows))
    ax.set_title("stage 1's rand index × 100 (Table 3)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main(tyro.cli(Args))
