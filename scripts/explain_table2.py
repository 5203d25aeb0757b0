"""Why EMPO scores what it does on one Table 2 task: a per-seed report from the three stages' outputs and the data.

Reads ``<run>/cluster.npz``, ``<run>/ppo.npz`` and ``<run>/highlevel.npz`` (a task folder of
scripts/reproduce_table2.sh, e.g. runs/table2/hopper) and the data set they were made from (the "dataset" entry of
their args; its sha256 is checked against theirs), and writes ``<out>.md`` (and prints it): one summary line per seed,
then for each seed (run i of highlevel.npz, with the ppo and clustering runs it used, ``ppo_run`` / ``cluster_run``):

1. Clusters found. For each cluster z: its rows (transitions with A(s, a) = z, stage 1's ``assignments``), the
   fraction of those rows from the medium file and from the expert file (the data's ``behaviour`` labels: 0 and 1;
   "–" where the rows carry no label), the data trajectories it holds and their mean (undiscounted) return. A
   trajectory belongs to the cluster that holds the majority of its rows (ties to the lowest z); Eq. (9) assigns
   whole trajectories, so this is every row's cluster. Then the seed's rand index (stage 1, per transition) and
   the objective EM maximises, the mixture log-likelihood of the data under the run's policies, per row:
   sum_tau log sum_z p(z) prod_t beta(a_t|s_t, z) / N, p(z) the mean posterior (empo_cluster's
   trajectory_log_likelihoods and mixture_log_likelihoods). Seeds that end with different partitions can be
   compared by it: the higher one is the better fit of the same objective, whatever its rand index.
2. What stage 2 did to each cluster's return: the normalised score (D4RL's, or the return where the task has no
   reference scores) of beta_z and of the improved pi_z = pi_L(.|s, z), each alone in the Gymnasium environment,
   mean +- std (ddof 0) over stage 2's evaluation episodes, and the change of the means.
3. Which cluster pi_H picks: the share of steps on which pi_H chose each cluster, summed over the final policy's
   evaluation episodes (``eval/cluster_steps``), and the final normalised score, mean +- std over those episodes.
4. How far SARSA's Q has propagated: on the data rows (all of them, or ``--max-rows`` drawn without replacement with
   ``--seed``), Q(s, a)[A(s, a)] x c (Q applied as stage 2 does: on [(s - obs_mean) / obs_std, a / action_scale],
   c = arch/value_scale, so reward units) against the Monte-Carlo discounted return of the row's own trajectory,
   G_t = r_t + gamma G_{t+1}, G = r on a trajectory's last row (gamma = arch/gamma; empo_ppo.mc_returns, Eq. (10),
   the targets of stage 2's V). A trajectory cut by a timeout is not bootstrapped: G stops at the cut, while SARSA
   bootstraps through a timeout (empo_ppo item 3), so on rows within about 1 / (1 - gamma) steps of such a cut a
   converged Q lies above G. Reported over all rows and split by behaviour (medium / expert): rows, mean Q, mean G,
   their ratio mean Q / mean G, and the Pearson correlation of Q and G over the rows. A ratio far below 1 means Q has
   not yet propagated the returns (SARSA moves a reward about one step back per sweep of target updates).

Example
    python scripts/explain_table2.py --run runs/table2/hopper      # writes runs/table2/hopper/explain.md
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import jax
import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import empo_cluster  # noqa: E402
import empo_io  # noqa: E402
import empo_ppo  # noqa: E402
from empo_io import InputError  # noqa: E402

FILES = {"cluster.npz": "empo/cluster/v1", "ppo.npz": "empo/ppo/v1", "highlevel.npz": "empo/highlevel/v1"}
BEHAVIOURS = {"medium": 0, "expert": 1}  # the data's behaviour labels: the index of the file in the dataset string


@dataclass
class Args:
    """Explain one Table 2 task's EMPO result: clusters, stage 2's change per cluster, pi_H's choices, Q against G."""
    run: str = "runs/table2/hopper"
    """task folder of scripts/reproduce_table2.sh, holding cluster.npz, ppo.npz and highlevel.npz"""
    out: str = ""
    """output prefix: writes <out>.md; empty: <run>/explain"""
    dataset: str = ""
    """the data set, when it has moved since the run; empty: the one named in the files' args"""
    max_rows: int = 20_000
    """data rows on which Q is compared with the Monte-Carlo return (a random subset when the data has more)"""
    seed: int = 0
    """random seed of that subset"""


def load_run(args: Args) -> tuple[dict, dict, dict, dict]:
    """(cluster, ppo, highlevel arrays, data set), each file checked to be made from that data set."""
    paths = {name: os.path.join(args.run, name) for name in FILES}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if len(missing) == len(FILES):
        raise InputError(f"{args.run} holds none of cluster.npz, ppo.npz and highlevel.npz; give a task folder of "
                         f"scripts/reproduce_table2.sh such as runs/table2/hopper")
    if missing:
        raise InputError(f"{paths[missing[0]]} does not exist; has scripts/reproduce_table2.sh finished this task?")
    arrays = {name: empo_io.load_npz(path, FILES[name]) for name, path in paths.items()}
    data, data_sha = empo_io.load_dataset(args.dataset or json.loads(str(arrays["highlevel.npz"]["args"]))["dataset"])
    for name, path in paths.items():
        empo_io.check_made_from(path, arrays[name], data_sha)
    return arrays["cluster.npz"], arrays["ppo.npz"], arrays["highlevel.npz"], data


def mean_std(x) -> str:
    return f"{np.mean(x):.1f} ± {np.std(x):.1f}"


def evaluated(arrays: dict, prefix: str):
    """(name, values) of the normalised score under ``prefix`` (the return without reference scores), or None."""
    for key, name in (("normalized_score", "normalised score"), ("return", "return")):
        if f"{prefix}{key}" in arrays:
            return name, arrays[f"{prefix}{key}"]
    return None


def episode_split(fell: np.ndarray, values: np.ndarray, name: str) -> str:
    """One sentence: how many of the final policy's episodes ended in a terminal state (a fall) and their mean, and
    the mean of those that ran to the time limit (a bimodal score reads as a mean with a large std otherwise)."""
    parts = []
    if fell.any():
        parts.append(f"{int(fell.sum())} of {fell.size} episodes ended in a terminal state, {name} "
                     f"{mean_std(values[fell])}")
    if not fell.all():
        parts.append(f"{int((~fell).sum())} of {fell.size} ran to the time limit, {mean_std(values[~fell])}")
    return "; ".join(parts) + "."


def cluster_rows(data: dict, assign: np.ndarray, k: int) -> list:
    """Per cluster: rows, medium and expert fractions (None without labels), trajectories, mean trajectory return."""
    episodes = data["episode_ids"]
    counts = np.zeros((episodes[-1] + 1, k), np.int64)
    np.add.at(counts, (episodes, assign), 1)
    trajectory_z = counts.argmax(1)  # [E]: the cluster of the majority of its rows
    trajectory_return = np.bincount(episodes, weights=data["rewards"].astype(np.float64))  # [E]
    table = []
    for z in range(k):
        labels = data["behaviour"][assign == z]
        returns = trajectory_return[trajectory_z == z]
        fractions = {b: float(np.mean(labels == label)) if len(labels) and (labels >= 0).all() else None
                     for b, label in BEHAVIOURS.items()}
        table.append({"rows": len(labels), **fractions, "trajectories": len(returns),
                      "mean_return": float(returns.mean()) if len(returns) else None})
    return table


def q_against_g(ppo: dict, p: int, data: dict, rows: np.ndarray, z: np.ndarray, g: np.ndarray) -> dict:
    """Q(s, a)[z] x c of ppo run p on ``rows`` against their returns g, over all rows and per behaviour."""
    k, act_dim = int(ppo["arch/k"]), data["actions"].shape[1]
    _, q_net, _ = empo_ppo.make_networks(int(ppo["arch/hidden_dim"]), int(ppo["arch/hidden_layers"]), k, act_dim,
                                         tuple(float(x) for x in ppo["arch/action_scale"]))
    params = jax.tree.map(lambda x: x[p], empo_io.unflatten_params("q/params", ppo))
    obs = (data["observations"][rows] - ppo["arch/obs_mean"]) / ppo["arch/obs_std"]
    inputs = np.concatenate([obs, data["actions"][rows] / ppo["arch/action_scale"]], 1)
    q_all = np.asarray(jax.jit(q_net.apply)({"params": params}, inputs))  # [R, K]
    q = q_all[np.arange(len(rows)), z].astype(np.float64) * float(ppo["arch/value_scale"])  # [R]
    out = {"q": q}
    labels = data["behaviour"][rows]
    for part, keep in (("all", np.ones(len(rows), bool)), *((b, labels == i) for b, i in BEHAVIOURS.items())):
        if keep.any():
            mq, mg = float(q[keep].mean()), float(g[keep].mean())
            corr = float(np.corrcoef(q[keep], g[keep])[0, 1]) if q[keep].std() > 0 and g[keep].std() > 0 else None
            out[part] = {"rows": int(keep.sum()), "mean_q": mq, "mean_g": mg, "ratio": mq / mg if mg else None,
                         "corr": corr}
    return out


def fmt(x, spec: str = ".3f") -> str:
    """x formatted, '–' for None; a value that rounds to zero prints without a minus sign."""
    return "–" if x is None else format(x, spec).replace("-", "", 1) if float(format(x, spec)) == 0 else format(x, spec)


def explain_seed(i: int, cluster: dict, ppo: dict, high: dict, data: dict, rows: np.ndarray,
                 returns: np.ndarray, fit: np.ndarray) -> tuple[str, list, dict]:
    """(summary line, report lines, numbers) of run i of highlevel.npz."""
    seed, p, c = int(high["seeds"][i]), int(high["ppo_run"][i]), int(high["cluster_run"][i])
    k = int(ppo["arch/k"])
    assign = cluster["assignments"][c]
    clusters = cluster_rows(data, assign, k)
    rand = float(cluster["rand_index"][c]) if "rand_index" in cluster else None
    lines = [f"## Seed {seed} (ppo run {p}, clustering run {c})", "", "### 1. Clusters found", "",
             "| z | rows | from medium | from expert | trajectories | mean trajectory return |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {z} | {r['rows']} | {fmt(r['medium'])} | {fmt(r['expert'])} | {r['trajectories']} | "
              f"{fmt(r['mean_return'], '.1f')} |" for z, r in enumerate(clusters)]
    lines += ["", "A trajectory belongs to the cluster holding the majority of its rows. Rand index: "
              f"{fmt(rand, '.4f')}. Mixture log-likelihood of the data under this run's policies: "
              f"{fit[c]:.4f} per row.", "", "### 2. What stage 2 did to each cluster", ""]
    beta, pi = evaluated(ppo, "eval/beta_"), evaluated(ppo, "eval/pi_")
    best = None
    if beta and pi:
        lines += [f"| z | β_z {beta[0]} | π_z {pi[0]} | change |", "|---|---|---|---|"]
        for z in range(k):
            b, q = beta[1][p, z], pi[1][p, z]
            lines.append(f"| {z} | {mean_std(b)} | {mean_std(q)} | {q.mean() - b.mean():+.1f} |")
        best = int(np.argmax(pi[1][p].mean(-1)))
        lines += ["", f"Each policy alone, mean ± std over its evaluation episodes ({beta[1].shape[-1]} each)."]
    else:
        lines.append("Stage 2 evaluated no policy (--eval-episodes 0).")
    lines += ["", "### 3. Which cluster π_H picks", ""]
    final = evaluated(high, "eval/")
    share = None
    if "eval/cluster_steps" in high and final:
        steps = high["eval/cluster_steps"][i].sum(0)  # [K], over the episodes
        share = steps / max(steps.sum(), 1)
        lines += ["| z | steps | share of π_H's steps |", "|---|---|---|"]
        lines += [f"| {z} | {int(steps[z])} | {s:.1%} |" for z, s in enumerate(share)]
        lines += ["", f"Final policy: {final[0]} {mean_std(final[1][i])} ({final[1].shape[-1]} episodes)."]
        if "eval/terminated" in high:
            lines[-1] += " " + episode_split(np.asarray(high["eval/terminated"][i], bool), final[1][i], final[0])
    else:
        lines.append("Stage 3 evaluated no policy (--eval-episodes 0).")
    q = q_against_g(ppo, p, data, rows, assign[rows], returns[rows])
    lines += ["", "### 4. How far SARSA's Q has propagated", "",
              "| rows | n | mean Q | mean G | mean Q / mean G | Pearson r |", "|---|---|---|---|---|---|"]
    lines += [f"| {part} | {q[part]['rows']} | {q[part]['mean_q']:.2f} | {q[part]['mean_g']:.2f} | "
              f"{fmt(q[part]['ratio'])} | {fmt(q[part]['corr'])} |" for part in ("all", *BEHAVIOURS) if part in q]
    summary = (f"seed {seed}: final {mean_std(final[1][i]) if final else '–'}"
               + (f"; best π_z z={best} {pi[1][p, best].mean():.1f} (β_z {beta[1][p, best].mean():.1f})"
                  if best is not None else "")
               + (f"; π_H on z={int(np.argmax(share))} for {share.max():.0%} of steps" if share is not None else "")
               + f"; rand index {fmt(rand, '.4f')} (log-likelihood {fit[c]:.4f} per row)"
               + f"; Q/G {fmt(q['all']['ratio'], '.2f')}"
               + "".join(f", {b} {fmt(q[b]['ratio'], '.2f')}" for b in BEHAVIOURS if b in q))
    return summary, lines, {"seed": seed, "clusters": clusters, "share": share, "q": q, "fit": float(fit[c])}


def main(args: Args) -> dict:
    out = (args.out or os.path.join(args.run, "explain")) + ".md"
    empo_io.check_writable(out)
    if args.max_rows < 1:
        raise InputError(f"--max-rows must be at least 1, got {args.max_rows}")
    cluster, ppo, high, data = load_run(args)
    n = len(data["rewards"])
    last = np.r_[np.diff(data["episode_ids"]) != 0, True]  # the last row of each trajectory, terminal or timeout
    returns = np.asarray(empo_ppo.mc_returns(data["rewards"], last, float(ppo["arch/gamma"])), np.float64)  # Eq. (10)
    rng = np.random.default_rng(args.seed)
    rows = np.sort(rng.choice(n, args.max_rows, replace=False)) if n > args.max_rows else np.arange(n)
    loglik = empo_cluster.trajectory_log_likelihoods(cluster, data)  # [S, E, K]: sum_t log beta_z per trajectory
    fit = empo_cluster.mixture_log_likelihoods(loglik, cluster["posterior"]).sum(1) / n  # [S] per row
    seeds = [explain_seed(i, cluster, ppo, high, data, rows, returns, fit) for i in range(len(high["seeds"]))]
    dataset = args.dataset or json.loads(str(high["args"]))["dataset"]
    report = [f"# EMPO on {args.run}", "", f"Data: {dataset} ({n} rows). Q against G on {len(rows)} rows, "
              f"γ = {float(ppo['arch/gamma']):.4g}, c = {float(ppo['arch/value_scale']):.4g}.", ""]
    report += [f"- {summary}" for summary, _, _ in seeds] + [""]
    for _, lines, _ in seeds:
        report += lines + [""]
    text = "\n".join(report)
    empo_io.write_atomically(out, lambda f: f.write(text.encode()), "no partial report was left")
    print(text)
    print(f"wrote {out}")
    return {"rows": rows, "returns": returns, "seeds": [numbers for _, _, numbers in seeds]}


if __name__ == "__main__":
    empo_io.run(main, tyro.cli(Args))
