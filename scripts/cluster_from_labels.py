"""Stage 1 started at the behaviour labels: does EM keep the true partition, and does it fit EM's objective better than
the partitions a run found? The test behind docs/table2.md's "a local optimum, not a wrong objective".

Reads a finished stage-1 run (``--cluster``, a cluster.npz of empo_cluster.py on a data set whose rows carry behaviour
labels, such as a Table 2 task's medium and expert files) and reuses its settings (preset, K, N_b, N_p, N_E, mu,
networks, batch, learning rate). For each of ``--num-seeds`` seeds (network initialisation and minibatches):

1. **Fit at the labels.** The K policies take N_b + N_p M-epochs (Eq. 6; ``--fit-epochs``) with Q fixed to the
   labels (each trajectory's one-hot behaviour): the epochs of stage 1's biased and pre-training phases, here
   against the truth.
2. **EM from the labels.** Then N_E EM epochs (Eq. 5 and 6, momentum mu) with Q starting at the labels, where stage
   1's EM starts at the uniform Q^(0) (Eq. 7).

After each, the rand index of the trajectories' assignments (argmax of Eq. 3's posterior, Eq. 9) and the objective EM
maximises, the mixture log-likelihood of the data per row, sum_tau log sum_z p(z) prod_t beta(a_t|s_t, z) / N with
p(z) the mean posterior (empo_cluster.mixture_log_likelihoods). The run's own seeds are scored the same way from
their saved policies (as scripts/explain_table2.py does).

How to read it: if EM from the labels keeps a rand index near 1 and fits better than the run's seeds, the run's
partitions are worse local optima of the same objective; if it leaves the labels, or the labels fit worse than the
run's partition, the objective itself prefers the run's partition at these settings.

Example
    python scripts/cluster_from_labels.py --cluster runs/table2_cpu/halfcheetah/cluster.npz
    # writes runs/table2_cpu/halfcheetah/cluster_from_labels.md and .json
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import empo_cluster  # noqa: E402
import empo_io  # noqa: E402
from empo_io import InputError  # noqa: E402


@dataclass
class Args:
    """Stage 1 fitted to the behaviour labels, then EM from there, against a run's own partitions."""
    cluster: str = "runs/table2/halfcheetah/cluster.npz"
    """a finished stage-1 run (schema empo/cluster/v1) whose settings are reused"""
    dataset: str = ""
    """the data set, when it has moved since the run; empty: the one named in the run's args (its sha256 is checked)"""
    out: str = ""
    """output prefix: writes <out>.md and <out>.json; empty: cluster_from_labels beside --cluster"""
    seed: int = 1
    """random seed of the first run (network initialisation and minibatches); run i uses seed + i"""
    num_seeds: int = 3
    """runs in one vmapped call"""
    fit_epochs: int = -1
    """M-epochs of the fit at the labels; -1: the run's N_b + N_p"""
    em_epochs: int = -1
    """EM epochs from the labels; -1: the run's N_E"""


def run_settings(args: Args, run: dict) -> empo_cluster.Args:
    """The run's stage-1 Args with this script's data set, seeds and N_E."""
    saved = json.loads(str(run["args"]))
    fields = {f.name for f in dataclasses.fields(empo_cluster.Args)}
    settings = empo_cluster.Args(**{k: v for k, v in saved.items() if k in fields})
    em_epochs = settings.em_epochs if args.em_epochs < 0 else args.em_epochs
    return dataclasses.replace(settings, dataset=args.dataset or settings.dataset, seed=args.seed,
                               num_seeds=args.num_seeds, em_epochs=em_epochs)


def scores(inp, posterior, loglik) -> tuple[np.ndarray, np.ndarray]:
    """Per seed, from the posterior and the per-trajectory log-likelihoods [S, E, K]: the rand index of the argmax
    assignments, and the mixture log-likelihood per row."""
    posterior, loglik = np.asarray(posterior, np.float64), np.asarray(loglik, np.float64)
    rand = np.array([empo_cluster.rand_indices(inp.labels_per_episode, inp.lengths, p.argmax(1))[0]
                     for p in posterior])
    fit = empo_cluster.mixture_log_likelihoods(loglik, posterior).sum(1) / inp.n
    return rand, fit


def e_step_scores(inp, log_post, loglik) -> tuple[np.ndarray, np.ndarray]:
    """scores() of the E-step's output (log posterior, log-likelihoods)."""
    return scores(inp, np.exp(np.asarray(log_post, np.float64)), loglik)


def main(args: Args) -> dict:
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.cluster)), "cluster_from_labels")
    for suffix in (".md", ".json"):
        empo_io.check_writable(out + suffix, [args.cluster])
    empo_io.check_flags(args, {"num_seeds": 1, "fit_epochs": -1, "em_epochs": -1})
    run = empo_io.load_npz(args.cluster, "empo/cluster/v1")
    settings = run_settings(args, run)
    inp = empo_cluster.prepare_inputs(settings)
    settings = dataclasses.replace(settings, estep_chunk=inp.estep_chunk)  # as stage 1 runs it: at most N rows
    empo_io.check_made_from(args.cluster, run, inp.sha)
    if not inp.has_labels:
        raise InputError(f"{settings.dataset} has no behaviour labels, so there is no true partition to start from")
    if int(inp.labels_per_episode.max()) + 1 != settings.k:
        raise InputError(f"{args.cluster} has K = {settings.k}, but {settings.dataset} has "
                         f"{int(inp.labels_per_episode.max()) + 1} behaviours")

    policy, classifier = empo_cluster.make_networks(settings, inp.act_dim, inp.action_scale)
    init, tx = empo_cluster.make_init(settings, policy, classifier, inp.obs_dim)
    m_epoch = empo_cluster.make_m_epoch(settings, policy, classifier, tx, inp.n, False)  # the policies only
    e_step = empo_cluster.make_e_step(settings, policy, inp.num_episodes)
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    key_init, key_train = jax.vmap(lambda s: jax.random.split(jax.random.key(s)), out_axes=1)(jnp.asarray(seeds))
    epoch_keys = jax.jit(lambda epoch: jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, epoch))
    m_step = jax.jit(jax.vmap(m_epoch, in_axes=(0, 0, 0, None)))
    em_step = jax.jit(jax.vmap(empo_cluster.make_em_epoch(settings, e_step, m_epoch), in_axes=(0, 0, 0, None)))
    posterior = jax.jit(jax.vmap(e_step, in_axes=(0, None)))

    state = jax.jit(jax.vmap(init))(key_init)
    labels = jax.nn.one_hot(inp.labels_per_episode, settings.k)  # [E, K]: the true partition as Q
    q = jnp.broadcast_to(labels, (args.num_seeds,) + labels.shape)
    fixed_epochs = settings.bias_epochs + settings.pretrain_epochs if args.fit_epochs < 0 else args.fit_epochs
    t0 = time.perf_counter()
    for epoch in range(fixed_epochs):  # 1. Eq. (6) against Q = the labels
        state, _ = m_step(state, q, epoch_keys(epoch), inp.data)
    at_labels = e_step_scores(inp, *posterior(state.policy, inp.data))
    print(f"[from-labels] fitted at the labels ({fixed_epochs} epochs, {time.perf_counter() - t0:.0f}s): rand index "
          + " ".join(f"{r:.4f}" for r in at_labels[0]) + ", fit " + " ".join(f"{f:.4f}" for f in at_labels[1]),
          flush=True)
    history = []
    for i in range(settings.em_epochs):  # 2. EM (Eq. 5, 6) with Q^(0) = the labels
        state, q, log_post, loglik, _ = em_step(state, q, epoch_keys(fixed_epochs + i), inp.data)
        history.append(e_step_scores(inp, log_post, loglik)[0])  # of the policies before this epoch's M-step
        if (i + 1) % 10 == 0 or i + 1 == settings.em_epochs:
            print(f"[from-labels] EM {i + 1}/{settings.em_epochs} ({time.perf_counter() - t0:.0f}s): rand index "
                  + " ".join(f"{r:.4f}" for r in history[-1]), flush=True)
    after_em = e_step_scores(inp, *posterior(state.policy, inp.data))

    # the run's saved policies, as scripts/explain_table2.py scores them
    run_rand, run_fit = scores(inp, run["posterior"], empo_cluster.trajectory_log_likelihoods(run, inp.data_np))
    result = {"cluster": args.cluster, "dataset": settings.dataset, "seeds": seeds.tolist(),
              "fixed_epochs": fixed_epochs, "em_epochs": settings.em_epochs, "seconds": time.perf_counter() - t0,
              "at_labels": {"rand_index": at_labels[0].tolist(), "fit": at_labels[1].tolist()},
              "after_em": {"rand_index": after_em[0].tolist(), "fit": after_em[1].tolist()},
              "em_rand_index_history": [h.tolist() for h in history],
              "run": {"seeds": np.asarray(run["seeds"]).tolist(), "rand_index": run_rand.tolist(),
                      "fit": run_fit.tolist()}}
    if not all(np.isfinite(v).all() for v in (at_labels[1], after_em[1], run_fit)):
        raise InputError("a log-likelihood is not finite, so no report was written")
    fmt = lambda xs, spec: ", ".join(format(x, spec) for x in xs)
    lines = [f"# Stage 1 from the behaviour labels: {args.cluster}", "",
             f"Data: {settings.dataset} ({inp.n} rows, {inp.num_episodes} trajectories, K = {settings.k}). "
             f"Fit = mixture log-likelihood per row (EM's objective). {result['seconds']:.0f} s.", "",
             "| policies | seeds | rand index | fit |", "|---|---|---|---|",
             f"| the run's own (stage 1 from Q^(0) = 1/K) | {fmt(result['run']['seeds'], 'd')} | "
             f"{fmt(run_rand, '.4f')} | {fmt(run_fit, '.4f')} |",
             f"| fitted at the labels ({fixed_epochs} M-epochs, Eq. 6) | {fmt(seeds, 'd')} | "
             f"{fmt(at_labels[0], '.4f')} | {fmt(at_labels[1], '.4f')} |",
             f"| then {settings.em_epochs} EM epochs from Q = the labels (Eq. 5-6, mu = {settings.momentum:g}) | "
             f"{fmt(seeds, 'd')} | {fmt(after_em[0], '.4f')} | {fmt(after_em[1], '.4f')} |", ""]
    text = "\n".join(lines)
    empo_io.write_atomically(out + ".json", lambda f: f.write(json.dumps(result, indent=1).encode()),
                             "no partial file was left")
    empo_io.write_atomically(out + ".md", lambda f: f.write(text.encode()), "no partial report was left")
    print(text)
    print(f"wrote {out}.md and {out}.json")
    return result


if __name__ == "__main__":
    empo_io.run(main, tyro.cli(Args))
