"""Stage 1 of EMPO: EM clustering of the behaviour policies (Algorithm 1) and the classifier q(z|s).

Paper: §3.1 (Algorithm 1, heuristics I-III, Eq. 3-9), §3.3 (classifier), Tables 3-5.
Input   a data set (schema empo/dataset/v1): ``--dataset`` an .npz, or comma-separated D4RL .hdf5 files or Minari ids.
Output  ``cluster.npz`` (schema empo/cluster/v1, docs/schemas.md): policy/params [S, K, ...] (beta(a|s; theta_z)),
        classifier/params [S, ...] (q(z|s; phi)), posterior [S, E, K] (Eq. 3), assignments [S, N] (Eq. 9),
        arch/*, rand_index [S] with labels; TensorBoard logs in ``<out folder>/cluster``.

Equation map
    Eq. (3)      Q_Theta(z | tau) proportional to prod_t beta(a_t|s_t, z)   -> e_step_log_posterior
    Eq. (4)/(6)  l_M = -sum_z Q(z|tau) log beta(a|s; theta_z)               -> m_step_loss
    Eq. (5)      Q^(k+1) = mu Q^(k) + (1 - mu) Q_Theta                      -> make_em_epoch
    Eq. (7)      Q^(0) = 1/K, N_p pre-training epochs (heuristic II)        -> main
    Eq. (8)      Q^(-1) = one-hot random split, N_b epochs (heuristic III)  -> main
    Eq. (9)      A(s, a) = argmax_z Q_Theta*(z | tau(s, a))                 -> write_outputs
    §3.3         l_C = KL(Q^(k)(.|tau(s,a)) || q(.|s; phi))                 -> classifier_loss

Interpretations and deviations (item N is discussed as item N of docs/empo_cluster.md)
    1. "4-layer MLP" (Appendix B): three hidden ReLU layers (64 units) and a linear output layer.
    2. beta(a|s; theta_z): diagonal Gaussian, mean action_scale * tanh(.), log-std in [-5, 0]; states standardised.
    3. An epoch is ceil(N / B) minibatch steps drawn with replacement; one Adam optimiser through all phases.
    4. Eq. (5) starts from Q^(0) = 1/K at the first EM epoch (mu = 0: plain EM); the posterior in log space.
    5. The classifier is trained in the N_E EM epochs only, against Q^(k).
    6. The rand index is per transition (sklearn at the end, a trajectory contingency table during training).
    7. Run i uses seed --seed + i; seeds are vmapped and sharded over the visible devices.
    8. Heuristics off: --momentum 0 (I), --pretrain-epochs 0 (II), --bias-epochs 0 (III).
    9. --k auto (select_k): the smallest K of 1..--k-max within --k-se standard errors of the best K's held-out
       log-likelihood (paired per held-out trajectory), every run of every K pooled as EM restarts.

Example: python empo_cluster.py --dataset data/nav.npz --out runs/nav/cluster.npz --num-seeds 2
"""

from __future__ import annotations

import empo_io  # noqa: F401  first: its start-up guard makes Ctrl-C while the libraries load one sentence

# isort: split

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import nav_env

# The plumbing, by purpose: files and data sets, checkpoints, the command line.
# isort: off
from empo_io import InputError, DATASET_SCHEMA, load_dataset, load_npz, observation_stats, save_npz, flatten_params
from empo_io import unflatten_params, folder_lock
from empo_io import checkpoint_path, run_identity, resume_checkpoint, save_checkpoint, save_output, fetch, place
from empo_io import cli, run, check_flags, check_fits, check_writable, make_writer, Progress, seed_shardings
# isort: on


@dataclass
class Args:
    """Stage 1 of EMPO: EM clustering of behaviour policies (Algorithm 1) and the classifier q(z|s)."""

    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = Table 4's didactic column (the navigation task), 'd4rl' = its D4RL
    column (N_E 100, hidden 256; halfcheetah medium + expert, D4RL v2 files in data/d4rl); flags given on the
    command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz (schema empo/dataset/v1), or comma-separated D4RL .hdf5 files or Minari ids (index = label);
    a path that exists is one file even if its name holds commas"""
    out: str = "runs/nav/cluster.npz"
    """output file (schema empo/cluster/v1); TensorBoard logs go to the folder 'cluster' beside it"""
    seed: int = 1
    """random seed of the first run; run i uses seed + i"""
    num_seeds: int = 1
    """independent runs in one vmapped call, sharded over the visible devices"""
    log_every: int = 1
    """log and print every this many epochs"""
    resume: bool = False
    """continue from the checkpoint beside --out (written after every phase and every
    --checkpoint-every epochs) instead of starting afresh"""
    checkpoint_every: int = 10
    """write a checkpoint every this many epochs (0: only at phase ends)"""
    # --- algorithm (Table 4, didactic column) ---
    k: Union[int, Literal["auto"]] = 2
    """K: the number of clusters (behaviour policies), or 'auto': fit K = 1..--k-max on a training split of the
    trajectories and keep the smallest K whose held-out log-likelihood is within --k-se standard errors of the best
    (docs/select_k.md)"""
    k_max: int = 5
    """with --k auto: the largest K tried"""
    k_holdout: float = 0.2
    """with --k auto: the fraction of trajectories held out to score each K (a split by trajectory, drawn with
    --seed)"""
    k_restarts: int = 5
    """with --k auto: EM runs per K at least (the seeds, and more restarts when --num-seeds is smaller), pooled to
    choose K, so that one collapsed run cannot decide"""
    k_se: float = 1.0
    """with --k auto: standard errors (of the paired per-trajectory difference of held-out log-likelihoods) by which
    a smaller K may fall short of the best K and still be chosen"""
    bias_epochs: int = 3
    """N_b: epochs biased to a random split of trajectories (heuristic III, Eq. 8); 0 switches it off"""
    pretrain_epochs: int = 20
    """N_p: pre-training epochs with the uniform posterior (heuristic II, Eq. 7); 0 switches it off"""
    em_epochs: int = 60
    """N_E: EM epochs (Eq. 5-6)"""
    momentum: float = 0.9
    """mu: momentum of the posterior (heuristic I, Eq. 5); 0 switches it off"""
    batch_size: int = 256
    """B: minibatch size of the M-step and the classifier"""
    learning_rate: float = 3e-4
    """alpha: Adam learning rate of the policies and the classifier"""
    hidden_dim: int = 64
    """hidden units per layer (Appendix B: 64 didactic, 256 D4RL)"""
    hidden_layers: int = 3
    """hidden layers; 3 hidden + 1 output = the paper's '4-layer MLP'"""
    # --- memory ---
    estep_chunk: int = 65_536
    """rows per chunk of the E-step's pass over the data set (bounds memory; same result)"""


PRESETS = {  # Table 4: the didactic column and the D4RL column (Appendix B: hidden 64 / 256)
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 out="runs/halfcheetah-medium-expert/cluster.npz", em_epochs=100, hidden_dim=256),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood
# for by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ('out', 'resume', 'log_every', 'checkpoint_every', 'preset', 'dataset')


# --- containers ---
@struct.dataclass
class TrainState:
    policy: Any  # parameters of the K policies, stacked on a leading axis [K, ...]
    policy_opt: Any
    classifier: Any
    classifier_opt: Any


@struct.dataclass
class Data:
    """The data set on the device, padded to a whole number of E-step chunks."""

    obs: jax.Array  # [N_pad, obs_dim], standardised
    actions: jax.Array  # [N_pad, act_dim]
    episode_ids: jax.Array  # [N_pad] int32; padding rows carry the id E (a dropped segment)


# --- networks ---
LOG_STD_MIN, LOG_STD_MAX = -5.0, 0.0


class MLP(nn.Module):
    """hidden_layers x (Dense(hidden_dim) + ReLU), then a linear Dense(out_dim) (linear heads:
    rewards can be negative)."""

    hidden_dim: int
    hidden_layers: int
    out_dim: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.hidden_layers):
            x = nn.relu(nn.Dense(self.hidden_dim)(x))
        return nn.Dense(self.out_dim)(x)


class GaussianPolicy(nn.Module):
    """beta(a|s; theta): mean = action_scale * tanh(.), log-std squashed into [LOG_STD_MIN, LOG_STD_MAX]."""

    act_dim: int
    action_scale: tuple
    hidden_dim: int
    hidden_layers: int

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden_dim, self.hidden_layers, 2 * self.act_dim)(obs)
        mean, log_std = jnp.split(out, 2, axis=-1)
        mean = jnp.asarray(self.action_scale, jnp.float32) * jnp.tanh(mean)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (jnp.tanh(log_std) + 1.0)
        return mean, log_std


def gaussian_log_prob(mean, log_std, action):
    """log N(action; mean, exp(log_std)^2), summed over the last (action) axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z * z - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


# --- losses (one function per equation) ---
def e_step_log_posterior(log_probs, episode_ids, num_episodes: int):
    """Eq. (3): log Q_Theta(z|tau) = sum_t log beta(a_t|s_t, z) - logsumexp_z(same), uniform prior.

    log_probs [N, K] per-step log-likelihoods; episode_ids [N] (ids >= num_episodes are dropped).
    Returns (log posterior [E, K], per-trajectory log-likelihood sums [E, K]).
    """
    loglik = jax.ops.segment_sum(log_probs, episode_ids, num_segments=num_episodes + 1)[:-1]  # [E, K]
    return loglik - jax.nn.logsumexp(loglik, axis=1, keepdims=True), loglik  # Eq. (3)


def m_step_loss(log_probs, weights):
    """Eq. (4)/(6): l_M = -sum_z Q(z | tau(s,a)) log beta(a | s; theta_z), averaged over the batch.

    Eq. (4) with the posterior Q_Theta_k as weights, Eq. (6) with its moving average Q^(k) (what Algorithm 1
    runs; Q^(-1) and Q^(0) of Eq. 7-8 in the first phases).
    """
    return -jnp.mean(jnp.sum(weights * log_probs, axis=1))  # Eq. (4), Eq. (6)


def classifier_loss(logits, weights):
    """§3.3: l_C = KL(Q^(k)(.|tau(s,a)) || q(.|s; phi)), averaged over the batch (0 log 0 = 0)."""
    log_q = jax.nn.log_softmax(logits, axis=1)  # [B, K]
    entropy_term = jnp.sum(jnp.where(weights > 0, weights * jnp.log(jnp.where(weights > 0, weights, 1.0)), 0.0), 1)
    return jnp.mean(entropy_term - jnp.sum(weights * log_q, axis=1))  # KL(Q || q)


def policy_log_probs(policy: GaussianPolicy, params, obs, actions):
    """log beta(a | s; theta_z) for every z: [B, K] from stacked params [K, ...]."""
    mean, log_std = jax.vmap(policy.apply, in_axes=(0, None))(params, obs)  # [K, B, act_dim]
    return gaussian_log_prob(mean, log_std, actions[None]).T  # [B, K]


# --- training functions (lax.scan over the minibatch steps of an epoch) ---
def make_networks(args: Args, act_dim: int, action_scale: tuple):
    policy = GaussianPolicy(act_dim, action_scale, args.hidden_dim, args.hidden_layers)
    classifier = MLP(args.hidden_dim, args.hidden_layers, args.k)
    return policy, classifier


def make_init(args: Args, policy, classifier, obs_dim: int):
    tx = optax.adam(args.learning_rate)

    def init(key) -> TrainState:
        key_policy, key_classifier = jax.random.split(key)
        dummy = jnp.zeros((1, obs_dim), jnp.float32)
        policy_params = jax.vmap(policy.init, in_axes=(0, None))(jax.random.split(key_policy, args.k), dummy)
        classifier_params = classifier.init(key_classifier, dummy)
        return TrainState(policy_params, tx.init(policy_params), classifier_params, tx.init(classifier_params))

    return init, tx


def make_m_epoch(args: Args, policy, classifier, tx, num_rows: int, train_classifier: bool):
    """One epoch of minibatch M-steps (Eq. 6) against fixed weights Q [E, K], as a lax.scan.

    With ``train_classifier`` the classifier takes a step against the same Q (§3.3) each step.
    Returns epoch(state, q [E, K], key, data) -> (state, metrics of the epoch's means).
    """
    steps = math.ceil(num_rows / args.batch_size)

    def update(state: TrainState, key, q, data: Data):
        idx = jax.random.randint(key, (args.batch_size,), 0, num_rows)
        obs, actions = data.obs[idx], data.actions[idx]  # [B, obs_dim], [B, act_dim]
        weights = q[data.episode_ids[idx]]  # [B, K]

        def policy_loss(params):
            return m_step_loss(policy_log_probs(policy, params, obs, actions), weights)

        loss, grads = jax.value_and_grad(policy_loss)(state.policy)
        updates, policy_opt = tx.update(grads, state.policy_opt, state.policy)
        state = state.replace(policy=optax.apply_updates(state.policy, updates), policy_opt=policy_opt)
        metrics = {"losses/m_step": loss}
        if train_classifier:
            c_loss, c_grads = jax.value_and_grad(
                lambda p: classifier_loss(classifier.apply(p, obs), weights))(state.classifier)
            updates, classifier_opt = tx.update(c_grads, state.classifier_opt, state.classifier)
            state = state.replace(classifier=optax.apply_updates(state.classifier, updates),
                                  classifier_opt=classifier_opt)
            metrics["losses/classifier"] = c_loss
        return state, metrics

    def epoch(state: TrainState, q, key, data: Data):
        keys = jax.random.split(key, steps)
        state, metrics = jax.lax.scan(lambda s, k: update(s, k, q, data), state, keys)
        return state, jax.tree.map(jnp.mean, metrics)

    return epoch


def make_e_step(args: Args, policy, num_episodes: int):
    """Q_Theta over the whole data set in one call: chunked forward pass + segment sums (Eq. 3)."""

    def e_step(policy_params, data: Data):
        chunks = data.obs.shape[0] // args.estep_chunk
        shape = lambda x: x.reshape((chunks, args.estep_chunk) + x.shape[1:])
        log_probs = jax.lax.map(lambda c: policy_log_probs(policy, policy_params, c[0], c[1]),
                                (shape(data.obs), shape(data.actions)))  # [chunks, chunk, K]
        log_probs = log_probs.reshape(-1, args.k)  # [N_pad, K]
        return e_step_log_posterior(log_probs, data.episode_ids, num_episodes)

    return e_step


def make_em_epoch(args: Args, e_step, m_epoch):
    """Algorithm 1, lines 13-18: Q^(k) = mu Q^(k-1) + (1-mu) Q_Theta_(k-1) (Eq. 5), then one M epoch."""

    def em_epoch(state: TrainState, q_prev, key, data: Data):
        log_post, loglik = e_step(state.policy, data)  # [E, K]
        q = args.momentum * q_prev + (1.0 - args.momentum) * jnp.exp(log_post)  # Eq. (5)
        state, metrics = m_epoch(state, q, key, data)
        return state, q, log_post, loglik, metrics

    return em_epoch


def compile_epochs(args: Args, policy, classifier, tx, inp: Inputs, state: TrainState, q, key, data: Data):
    """The epochs of Algorithm 1 as jitted functions vmapped over seeds, compiled ahead of time so that the compile
    time is measured and reported on its own: "m" (Eq. 6 against a fixed Q: the N_b and N_p epochs), "em" (Eq. 5,
    Eq. 6 and the classifier: the N_E epochs) and "e" (Eq. 3 over the data set). Returns (functions, seconds)."""
    t0 = time.perf_counter()
    m_epoch_plain = jax.jit(jax.vmap(make_m_epoch(args, policy, classifier, tx, inp.n, False),
                                     in_axes=(0, 0, 0, None)))
    e_step = make_e_step(args, policy, inp.num_episodes)
    m_epoch_with_classifier = make_m_epoch(args, policy, classifier, tx, inp.n, True)
    em_epoch = jax.jit(jax.vmap(make_em_epoch(args, e_step, m_epoch_with_classifier), in_axes=(0, 0, 0, None)))
    final_e_step = jax.jit(jax.vmap(e_step, in_axes=(0, None)))
    compiled = {}
    if args.bias_epochs + args.pretrain_epochs:
        compiled["m"] = m_epoch_plain.lower(state, q, key, data).compile()
    if args.em_epochs:
        compiled["em"] = em_epoch.lower(state, q, key, data).compile()
    compiled["e"] = final_e_step.lower(state.policy, data).compile()
    return compiled, time.perf_counter() - t0


# --- evaluation ---
def rand_indices(labels_per_episode, lengths, assignment_per_episode) -> tuple[float, float]:
    """(rand index, adjusted rand index) over transitions, from the trajectory contingency table.

    Every transition of a trajectory shares its label and its assignment, so the pair counts
    follow from the table weighted by trajectory lengths; equal to sklearn's rand_score and
    adjusted_rand_score on the per-transition labels (tested).
    """
    _, lab = np.unique(labels_per_episode, return_inverse=True)
    _, asg = np.unique(assignment_per_episode, return_inverse=True)
    table = np.zeros((lab.max() + 1, asg.max() + 1))
    np.add.at(table, (lab, asg), lengths)
    pairs = lambda x: np.sum(x * (x - 1) / 2)
    n = table.sum()
    total, same_both = n * (n - 1) / 2, pairs(table)
    same_label, same_cluster = pairs(table.sum(1)), pairs(table.sum(0))
    rand = (total + 2 * same_both - same_label - same_cluster) / total if total > 0 else 1.0
    expected = same_label * same_cluster / total if total > 0 else 0.0
    max_index = 0.5 * (same_label + same_cluster)
    ari = 1.0 if max_index == expected else (same_both - expected) / (max_index - expected)
    return float(rand), float(ari)


def entropy(log_p):
    return float(-np.mean(np.sum(np.exp(log_p) * log_p, axis=-1)))


def rand_scores(labels, assignments) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's rand index and adjusted rand index [S] of each seed's assignments [S, N] against the labels [N]."""
    from sklearn.metrics import adjusted_rand_score, rand_score

    return (np.array([rand_score(labels, a) for a in assignments]),
            np.array([adjusted_rand_score(labels, a) for a in assignments]))


def draw_figures(inp: Inputs, state: TrainState, classifier, assignments, seeds, k: int, writer, step: int,
                 run_dir: str) -> None:
    """The navigation task's clusters (first seed, clusters.png) and classifier q(z = 0 | s) (classifier.png)."""
    trajs, traj_labels = nav_env.episodes_of(inp.data_np, max_per_label=10, labels=assignments[0])
    image = nav_env.plot_map(trajs, traj_labels, title=f"Clusters (seed {seeds[0]})",
                             label_names=[f"cluster {z}" for z in range(k)],
                             path=os.path.join(run_dir, "clusters.png"))
    writer.add_image("eval/clusters", image, step, dataformats="HWC")
    grid = nav_env.grid_states(61)
    classifier_params = jax.tree.map(lambda x: x[0], state.classifier)
    q_grid = jax.nn.softmax(classifier.apply(classifier_params, (grid - inp.obs_mean) / inp.obs_std), -1)
    image = nav_env.plot_map(field=np.asarray(q_grid[:, 0]).reshape(61, 61), field_label="q(z=0 | s)",
                             title="Classifier q(z=0 | s)", path=os.path.join(run_dir, "classifier.png"))
    writer.add_image("eval/classifier", image, step, dataformats="HWC")


# --- choosing K (--k auto) ---
def split_trajectories(num_episodes: int, holdout: float, seed: int) -> np.ndarray:
    """The held-out trajectory ids, sorted: round(holdout * E) of them (at least 1, at most E - 1), drawn with
    ``seed``. The split is by trajectory, never by row: the held-out score asks whether a mixture of K
    trajectory-level policies explains whole trajectories it has not seen."""
    count = int(np.clip(round(holdout * num_episodes), 1, num_episodes - 1))
    return np.sort(np.random.default_rng(seed).choice(num_episodes, count, replace=False))


def subset_trajectories(data: dict, episodes: np.ndarray) -> dict:
    """The rows of the given trajectories, their episode ids renumbered 0, 1, ... in order."""
    keep = np.isin(data["episode_ids"], episodes)
    out = {key: value[keep] for key, value in data.items()}
    out["episode_ids"] = np.searchsorted(episodes, out["episode_ids"]).astype(np.int32)
    return out


def trajectory_log_likelihoods(run: dict, data: dict, chunk: int = 65_536) -> np.ndarray:
    """sum_t log beta(a_t | s_t; theta_z) per seed, trajectory and cluster [S, E, K], with the policies of a
    cluster.npz (its arch/* rebuild them; states standardised with its own statistics)."""
    policy = GaussianPolicy(int(run["arch/act_dim"]), tuple(float(x) for x in run["arch/action_scale"]),
                            int(run["arch/hidden_dim"]), int(run["arch/hidden_layers"]))
    params = {"params": unflatten_params("policy/params", run)}  # [S, K, ...]
    log_probs = jax.jit(jax.vmap(lambda p, o, a: policy_log_probs(policy, p, o, a), in_axes=(0, None, None)))
    obs = (data["observations"] - run["arch/obs_mean"]) / run["arch/obs_std"]
    num_episodes = int(data["episode_ids"][-1]) + 1
    total = np.zeros((len(run["seeds"]), num_episodes, int(run["arch/k"])))
    for start in range(0, len(obs), chunk):
        rows = slice(start, start + chunk)
        lp = np.asarray(log_probs(params, jnp.asarray(obs[rows]), jnp.asarray(data["actions"][rows])), np.float64)
        np.add.at(total, (slice(None), data["episode_ids"][rows]), lp)  # [S, chunk, K] summed per trajectory
    return total


def mixture_log_likelihoods(loglik: np.ndarray, train_posterior: np.ndarray) -> np.ndarray:
    """log sum_z p(z) prod_t beta(a_t|s_t, z) per run and trajectory [S, E], with p(z) the mean posterior over the
    training trajectories (the cluster weights the training run found). loglik [S, E, K]."""
    log_weights = np.log(np.maximum(train_posterior.mean(1), 1e-12))  # [S, K]
    mixture = log_weights[:, None, :] + loglik  # [S, E, K]
    peak = mixture.max(-1, keepdims=True)
    return peak[..., 0] + np.log(np.exp(mixture - peak).sum(-1))


def heldout_score(loglik: np.ndarray, train_posterior: np.ndarray, num_rows: int) -> np.ndarray:
    """Held-out log-likelihood of the trajectory mixture per transition, per run [S]:
    sum_tau log sum_z p(z) prod_t beta(a_t|s_t, z) / (rows held out). loglik [S, E_heldout, K]."""
    return mixture_log_likelihoods(loglik, train_posterior).sum(1) / num_rows


def best_fits(per_trajectory: np.ndarray, empty: np.ndarray, pool: np.ndarray) -> dict:
    """{k: (K index, run)} of the run in ``pool`` [N] with the best total held-out log-likelihood among those that use
    k clusters (K - empty [K_max, N]: a run with empty clusters counts as a fit with fewer), per_trajectory
    [K_max, N, E_heldout]."""
    used = np.arange(1, len(empty) + 1)[:, None] - empty  # [K_max, N]
    totals = per_trajectory.sum(-1)
    fits = {}
    for k in range(1, len(empty) + 1):
        candidates = (used == k) & pool[None]
        if candidates.any():
            fits[k] = np.unravel_index(np.argmax(np.where(candidates, totals, -np.inf)), totals.shape)
    return fits


def one_standard_error_k(per_trajectory: np.ndarray, empty: np.ndarray, pool: np.ndarray,
                         standard_errors: float) -> tuple[int, np.ndarray, np.ndarray]:
    """(chosen K, gap [K_max], its standard error [K_max]; NaN where no run uses k) from the runs in ``pool``: the
    smallest k whose best fit (best_fits) falls short of the best k's by at most ``standard_errors`` standard
    errors. The gap of k: the mean over held-out trajectories of L_best(tau) - L_k(tau), nats per trajectory; its
    standard error: their standard deviation / sqrt(trajectories). Paired: every k scores the same trajectories,
    so what varies between trajectories (length, noise) cancels, and the scale of "worse" comes from the data."""
    scores = {k: per_trajectory[index] for k, index in best_fits(per_trajectory, empty, pool).items()}  # [E] each
    best = max(scores, key=lambda k: scores[k].sum())
    gap, error = np.full(len(empty), np.nan), np.full(len(empty), np.nan)
    for k, score in scores.items():
        diff = scores[best] - score
        gap[k - 1], error[k - 1] = diff.mean(), diff.std(ddof=1) / np.sqrt(len(diff))
    return min(k for k in scores if gap[k - 1] <= standard_errors * error[k - 1]), gap, error


def choose_k(per_trajectory: np.ndarray, empty: np.ndarray, owners: np.ndarray,
             standard_errors: float = 1.0) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(the data set's K, each seed's own choice [S], gap [K_max], its standard error [K_max]) from the held-out
    log-likelihood of every run per trajectory [K_max, N, E_heldout], the clusters each run left empty [K_max, N]
    and the seed that owns each run [N]: the one-standard-error rule of cross-validation (Breiman et al. 1984;
    Hastie et al., ESL §7.10) on the paired per-trajectory differences (one_standard_error_k). The data set's K
    pools every run, the seeds, their restarts and the K's, as EM restarts of one mixture: a fit of k clusters
    that one restart missed (it collapsed) is no evidence against k, one that another found is evidence for it.
    Why this rule, and what it was measured against: docs/select_k.md."""
    chosen, gap, error = one_standard_error_k(per_trajectory, empty, np.ones(len(owners), bool), standard_errors)
    per_seed = np.array([one_standard_error_k(per_trajectory, empty, owners == seed, standard_errors)[0]
                         for seed in range(owners.max() + 1)])
    return chosen, per_seed, gap, error


def chosen_runs(folder: str, chosen: int, per_trajectory: np.ndarray, empty: np.ndarray, owners: np.ndarray,
                seeds: np.ndarray) -> dict:
    """The written run with ``chosen`` clusters, seed by seed: the best-scoring of the seed's runs (its restarts at
    every K) that uses exactly ``chosen`` clusters, its empty clusters dropped (policy heads, classifier logits); a
    seed with no such run keeps its first run with K = ``chosen`` as it is. Returns the arrays of cluster.npz less
    posterior and assignments, with select_k/source_k and select_k/source_seed [S]: the K and the run seed each
    seed's clusters come from."""
    runs, parts = {}, []
    for owner, seed in enumerate(seeds):
        fit = best_fits(per_trajectory, empty, owners == owner).get(chosen)
        k, j = (int(fit[0]) + 1, int(fit[1])) if fit else (chosen, owner)
        run = runs.setdefault(k, load_npz(os.path.join(folder, f"k{k}", "cluster.npz"), "empo/cluster/v1"))
        keep = np.unique(run["posterior"][j].argmax(-1)) if fit else np.arange(k)
        last = f"classifier/params/Dense_{int(run['arch/hidden_layers'])}/"
        part = {"select_k/source_k": np.int64(k), "select_k/source_seed": run["seeds"][j], "seeds": np.int64(seed)}
        for key, value in run.items():
            if key.startswith("policy/params/") or key == last + "bias":
                part[key] = value[j][keep]
            elif key == last + "kernel":
                part[key] = value[j][:, keep]
            elif key.startswith("classifier/params/"):
                part[key] = value[j]
        parts.append(part)
    arrays = {key: np.stack([part[key] for part in parts]) for key in parts[0]}
    first = runs[int(arrays["select_k/source_k"][0])]
    arrays.update({key: value for key, value in first.items() if key.startswith("arch/")})
    arrays["arch/k"] = np.int64(chosen)
    return arrays


def select_k(args: Args) -> dict:
    """--k auto: stage 1 for K = 1..--k-max on a training split of the trajectories (seeds and restarts vmapped),
    every run scored on each held-out trajectory; the chosen K's runs, with Eq. (3) and (9) on the whole data set,
    written as cluster.npz with the scores of every K (select_k/*). The runs live in <out>.select_k/, held by one
    run at a time, each K in k<K>/ with its checkpoint (--resume continues the K that was cut)."""
    check_writable(args.out, [args.dataset])
    data_np, data_sha = load_dataset(args.dataset)
    train, heldout = split_for_k(args, data_np)
    folder = os.path.splitext(os.path.abspath(args.out))[0] + ".select_k"
    train_path = os.path.join(folder, "train.npz")
    with folder_lock(folder):
        for path in [train_path] + [os.path.join(folder, f"k{k}", "cluster.npz") for k in range(1, args.k_max + 1)]:
            check_writable(path, [args.dataset])
        train_data, heldout_data = subset_trajectories(data_np, train), subset_trajectories(data_np, heldout)
        save_npz(train_path, train_data, DATASET_SCHEMA, {"split_of": data_sha, "heldout": heldout.tolist()})
        writer = make_writer(folder, args)
        fits = [fit_k(args, k, folder, train_path, train_data, heldout_data, writer) for k in range(1, args.k_max + 1)]
        per_trajectory, scores, train_scores, empty, seconds = (np.array(x) for x in zip(*fits))
        runs = restarts(args)
        owners = np.arange(runs) % args.num_seeds  # run j is a restart of seed j mod S
        chosen, per_seed, gap, error = choose_k(per_trajectory, empty, owners, args.k_se)
        print(f"[select_k] K = {chosen} (every run pooled); gap to the best K per held-out trajectory, nats: "
              + " ".join(f"K={k} {g:.2f}±{e:.2f}" for k, (g, e) in enumerate(zip(gap, error), 1) if np.isfinite(g))
              + f"; each seed's own runs would choose {per_seed.tolist()}", flush=True)

        # The chosen K's clusters: their parameters, with Eq. (3) and Eq. (9) on every trajectory of the data set.
        seeds = np.arange(args.seed, args.seed + args.num_seeds)
        arrays = chosen_runs(folder, chosen, per_trajectory, empty, owners, seeds)
        posterior, assignments = posterior_on_all(arrays, data_np)
        arrays.update({"posterior": posterior, "assignments": assignments,
                       "select_k/k": np.arange(1, args.k_max + 1, dtype=np.int64), "select_k/chosen": np.int64(chosen),
                       "select_k/chosen_per_seed": per_seed.astype(np.int64),
                       "select_k/run_seeds": np.arange(args.seed, args.seed + runs, dtype=np.int64),
                       "select_k/heldout_log_likelihood": scores, "select_k/train_log_likelihood": train_scores,
                       "select_k/heldout_trajectory_log_likelihood": per_trajectory,
                       "select_k/fitted": np.isfinite(gap),  # some run used exactly k clusters
                       "select_k/gap": np.nan_to_num(gap), "select_k/gap_standard_error": np.nan_to_num(error),
                       "select_k/empty_clusters": empty.astype(np.int64),
                       "select_k/seconds": np.asarray(seconds),
                       "select_k/heldout_trajectories": heldout.astype(np.int64),
                       "select_k/standard_errors": np.float64(args.k_se)})
        summary = {"k": chosen, "chosen_per_seed": per_seed.tolist(), "heldout_log_likelihood": scores.tolist(),
                   "gap": gap.tolist(), "gap_standard_error": error.tolist(), "seconds": seconds.tolist(),
                   "seeds": arrays["seeds"].tolist()}
        if np.all(data_np["behaviour"] >= 0):
            arrays["rand_index"], arrays["adjusted_rand_index"] = rand_scores(data_np["behaviour"],
                                                                              arrays["assignments"])
            summary.update(rand_index=arrays["rand_index"].tolist(),
                           adjusted_rand_index=arrays["adjusted_rand_index"].tolist())
            print("[select_k] rand index of the chosen run per seed: "
                  + " ".join(f"{x:.4f}" for x in arrays["rand_index"]), flush=True)
        save_npz(args.out, arrays, "empo/cluster/v1", asdict(args), {"dataset": data_sha})
        writer.add_scalar("select_k/chosen", chosen, args.k_max)
        writer.close()
    print(f"[select_k] wrote {args.out} (K = {chosen}) in {sum(seconds):.0f}s for {args.k_max} K's x {runs} runs",
          flush=True)
    return summary


def restarts(args: Args) -> int:
    """Runs per K with --k auto: the seeds, and more restarts when there are fewer seeds than --k-restarts."""
    return max(args.num_seeds, args.k_restarts)


def split_for_k(args: Args, data_np: dict) -> tuple[np.ndarray, np.ndarray]:
    """The training and the held-out trajectory ids of --k auto (split_trajectories), once the data set is known to
    leave at least two trajectories held out (a standard error needs two) and --k-max training ones."""
    num_episodes = int(data_np["episode_ids"][-1]) + 1
    if args.k_max + 2 > num_episodes:  # two trajectories held out, and every K needs K training ones
        raise InputError(f"--k-max {args.k_max} is larger than the {num_episodes} trajectories of {args.dataset} "
                         f"less the two or more held out")
    heldout = split_trajectories(num_episodes, args.k_holdout, args.seed)
    train = np.setdiff1d(np.arange(num_episodes), heldout)
    if len(heldout) < 2:
        raise InputError(f"--k-holdout {args.k_holdout} holds out {len(heldout)} of the {num_episodes} trajectories "
                         f"of {args.dataset}; the choice of K needs at least 2 (raise --k-holdout)")
    if args.k_max > len(train):
        raise InputError(f"--k-max {args.k_max} is larger than the {len(train)} training trajectories of "
                         f"{args.dataset} ({num_episodes} trajectories, {len(heldout)} held out by --k-holdout)")
    return train, heldout


def fit_k(args: Args, k: int, folder: str, train_path: str, train_data: dict, heldout_data: dict, writer) -> tuple:
    """Stage 1 with K = k on the training trajectories, restarts(args) runs vmapped, in ``folder``/k<k>/ (with
    --resume, a finished run there is reused), scored on the held-out and on the training trajectories. Returns
    (held-out log-likelihood per run and trajectory [N, E_heldout], held-out score per transition [N], training
    score [N], clusters left empty [N], seconds)."""
    k_args = Args(**{**asdict(args), "k": k, "dataset": train_path, "num_seeds": restarts(args),
                     "out": os.path.join(folder, f"k{k}", "cluster.npz")})
    t0 = time.perf_counter()
    if not (args.resume and finished_run(k_args)):
        try:
            main(k_args)
        except KeyboardInterrupt:  # run() would look for a checkpoint beside --out, where there is none
            raise InputError(f"interrupted at K = {k}: the finished K's and the checkpoint of K = {k} are in "
                             f"{folder}; run the same command with --resume to continue") from None
    seconds = time.perf_counter() - t0
    run = load_npz(k_args.out, "empo/cluster/v1")
    per_trajectory = mixture_log_likelihoods(trajectory_log_likelihoods(run, heldout_data), run["posterior"])
    score = per_trajectory.sum(1) / len(heldout_data["rewards"])
    train_score = heldout_score(trajectory_log_likelihoods(run, train_data), run["posterior"],
                                len(train_data["rewards"]))
    empty = np.array([k - len(np.unique(a)) for a in run["posterior"].argmax(-1)])
    writer.add_scalar("select_k/heldout_log_likelihood", float(score.max()), k)
    writer.add_scalar("select_k/train_log_likelihood", float(train_score.max()), k)
    writer.add_scalar("select_k/empty_clusters", float(empty.mean()), k)
    writer.add_scalar("select_k/seconds", seconds, k)
    for seed, value in zip(run["seeds"], score):
        writer.add_scalar(f"select_k/heldout_log_likelihood_seed/{seed}", float(value), k)
    print(f"[select_k] K={k}: held-out log-likelihood per transition " + " ".join(f"{x:.4f}" for x in score)
          + f", empty clusters {empty.tolist()}, {seconds:.0f}s", flush=True)
    return per_trajectory, score, train_score, empty, seconds


def posterior_on_all(run: dict, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (3) and Eq. (9) on every trajectory of ``data`` with the policies of a run: (posterior [S, E, K] float32,
    assignments [S, N] int32)."""
    loglik = trajectory_log_likelihoods(run, data)  # [S, E, K]
    peak = loglik.max(-1, keepdims=True)
    log_post = loglik - peak - np.log(np.exp(loglik - peak).sum(-1, keepdims=True))  # Eq. (3), uniform prior
    posterior = np.exp(log_post).astype(np.float32)  # [S, E, K]
    per_trajectory = np.argmax(posterior, -1).astype(np.int32)  # [S, E], Eq. (9)
    return posterior, per_trajectory[:, data["episode_ids"]]


def finished_run(args: Args) -> bool:
    """A cluster.npz of this run (the flags that change the result and the training data) is already at args.out."""
    if not os.path.exists(args.out):
        return False
    try:
        done = load_npz(args.out, "empo/cluster/v1")
        flags = lambda d: {k: v for k, v in d.items() if k not in NEUTRAL_FLAGS}
        same = flags(json.loads(str(done["args"]))) == flags(json.loads(json.dumps(asdict(args), default=str)))
        return same and json.loads(str(done["inputs"])).get("dataset") == load_dataset(args.dataset)[1]
    except (OSError, ValueError, KeyError, InputError):
        return False


# --- main: the schedule of Algorithm 1 ---
def validate_args(args: Args) -> None:
    """The flags alone, before anything is read: one sentence for the first one out of range."""
    at_least = dict(k=1, k_max=1, k_restarts=1, num_seeds=1, batch_size=1, estep_chunk=1, hidden_dim=1, hidden_layers=1,
                    log_every=1, bias_epochs=0, pretrain_epochs=0, em_epochs=0, checkpoint_every=0)
    if args.k == "auto":
        del at_least["k"]
        if jax.process_count() > 1:  # its fits are files in one folder, written and read back by the run
            raise InputError("--k auto runs in one process; choose K there, then run the chosen K over several")
    check_flags(args, at_least)
    if not 0.0 <= args.momentum < 1.0:
        raise InputError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not args.learning_rate > 0:
        raise InputError(f"--learning-rate must be positive, got {args.learning_rate}")
    heads = (args.k_max if args.k == "auto" else args.k) + 1  # K policies and the classifier
    runs = restarts(args) if args.k == "auto" else args.num_seeds
    check_fits(f"--hidden-dim {args.hidden_dim} with --hidden-layers {args.hidden_layers}",  # params, grads, Adam
               16.0 * runs * heads * args.hidden_layers * args.hidden_dim ** 2)
    if not 0.0 < args.k_holdout < 1.0:
        raise InputError(f"--k-holdout must be in (0, 1), got {args.k_holdout}")
    if not args.k_se >= 0.0:
        raise InputError(f"--k-se must be at least 0, got {args.k_se}")


@dataclass
class Inputs:
    """The data set as main uses it (prepare_inputs): host arrays, the device copy and what is derived from them."""

    data_np: dict  # the validated arrays (load_dataset)
    sha: str  # the data set's digest
    data: Data  # on the device, standardised and padded
    n: int  # transitions
    num_episodes: int  # trajectories (E)
    obs_dim: int
    act_dim: int
    obs_mean: np.ndarray  # [obs_dim] float32
    obs_std: np.ndarray
    action_scale: tuple  # the largest |action| per dimension (interpretation 2)
    lengths: np.ndarray  # [E] transitions per trajectory
    labels: np.ndarray  # [N] behaviour of origin (-1: unknown)
    labels_per_episode: np.ndarray  # [E]
    has_labels: bool
    estep_chunk: int  # rows per E-step chunk, at most N


def prepare_inputs(args: Args) -> Inputs:
    """Read and check the data set; standardise the states; put the data on the device, padded to whole E-step
    chunks (padding rows belong to no trajectory)."""
    data_np, data_sha = load_dataset(args.dataset)
    n = len(data_np["rewards"])
    num_episodes = int(data_np["episode_ids"][-1]) + 1
    if args.k > num_episodes:
        raise InputError(f"--k {args.k} is larger than the {num_episodes} trajectories of {args.dataset}")
    obs_mean, obs_std = observation_stats(args.dataset, data_np["observations"])
    starts = np.flatnonzero(np.r_[True, np.diff(data_np["episode_ids"]) != 0])
    chunk = min(args.estep_chunk, n)
    pad = (-n) % chunk
    obs = (data_np["observations"] - obs_mean) / obs_std
    data = Data(
        obs=jnp.asarray(np.pad(obs, ((0, pad), (0, 0)))),
        actions=jnp.asarray(np.pad(data_np["actions"], ((0, pad), (0, 0)))),
        episode_ids=jnp.asarray(np.pad(data_np["episode_ids"], (0, pad), constant_values=num_episodes)),
    )
    return Inputs(data_np=data_np, sha=data_sha, data=data, n=n, num_episodes=num_episodes,
                  obs_dim=data_np["observations"].shape[1], act_dim=data_np["actions"].shape[1],
                  obs_mean=obs_mean, obs_std=obs_std,
                  action_scale=tuple(float(x) for x in np.maximum(np.abs(data_np["actions"]).max(0), 1e-3)),
                  lengths=np.diff(np.r_[starts, n]), labels=data_np["behaviour"],
                  labels_per_episode=data_np["behaviour"][starts], has_labels=bool(np.all(data_np["behaviour"] >= 0)),
                  estep_chunk=chunk)


def main(args: Args) -> dict:
    validate_args(args)
    if args.k == "auto":
        return select_k(args)
    check_writable(args.out, [args.dataset])
    check_writable(checkpoint_path(args.out), [args.dataset])
    inp = prepare_inputs(args)
    run_args = Args(**{**asdict(args), "estep_chunk": inp.estep_chunk})
    policy, classifier = make_networks(run_args, inp.act_dim, inp.action_scale)
    init, tx = make_init(run_args, policy, classifier, inp.obs_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = place(inp.data, replicated)
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    key_init, key_split, key_train = (place(k, seed_sharding)
                                      for k in jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(seed_keys))

    def epoch_keys(epoch: int):  # one key per seed and epoch, so a resumed run draws the same batches
        return place(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, epoch), seed_sharding)

    state = jax.jit(jax.vmap(init), out_shardings=seed_sharding)(key_init)
    q_uniform = place(jnp.full((args.num_seeds, inp.num_episodes, args.k), 1.0 / args.k), seed_sharding)
    z_tau = jax.vmap(lambda k: jax.random.randint(k, (inp.num_episodes,), 0, args.k))(key_split)
    q_bias = place(jax.nn.one_hot(z_tau, args.k), seed_sharding)  # Eq. (8): Q^(-1), a random split

    schedule = ["bias"] * args.bias_epochs + ["pretrain"] * args.pretrain_epochs + ["em"] * args.em_epochs
    total, em_start = len(schedule), args.bias_epochs + args.pretrain_epochs
    # The rand index (and adjusted) after each EM epoch, [S, N_E, 2]: checkpointed with the state.
    history = np.zeros((args.num_seeds, args.em_epochs, 2))
    identity = run_identity(args, NEUTRAL_FLAGS, {"dataset": inp.sha})
    ckpt_path, (state, q, history), first = resume_checkpoint(
        args, (state, q_uniform, history), "empo/cluster-checkpoint/v2", identity, total)
    state, q = place(state, seed_sharding), place(jnp.asarray(q), seed_sharding)
    run_dir = os.path.dirname(os.path.abspath(args.out))
    writer = make_writer(os.path.join(run_dir, "cluster"), args)
    compiled, compile_s = compile_epochs(run_args, policy, classifier, tx, inp, state, q_uniform, epoch_keys(0), data)
    print(f"[cluster] N={inp.n} E={inp.num_episodes} K={args.k} seeds={args.num_seeds} on "
          f"{seed_sharding.mesh.devices.size} device(s); compiled in {compile_s:.1f}s", flush=True)

    progress = Progress(total, "cluster", kinds=schedule, first=first)
    steps_per_epoch = -(-inp.n // args.batch_size)  # minibatch steps of the M-step (and the classifier) per epoch
    t_train = time.perf_counter()
    for epoch in range(first, total):
        t_epoch, phase, key, step = time.perf_counter(), schedule[epoch], epoch_keys(epoch), epoch + 1
        if phase != "em":
            q = q_bias if phase == "bias" else q_uniform  # Eq. (8) / Eq. (7)
            state, metrics = compiled["m"](state, q, key, data)
        else:
            if epoch == em_start:
                q = q_uniform  # Q^(0) = 1/K (Eq. 7) is where the momentum of Eq. (5) starts
            state, q, log_post, loglik, metrics = compiled["em"](state, q, key, data)
        fields = log_epoch(writer, phase, metrics, step)
        if phase == "em":
            fields.update(log_em_epoch(writer, inp, log_post, loglik, history[:, epoch - em_start], seeds, step))
        writer.add_scalar("charts/SPS", steps_per_epoch / (time.perf_counter() - t_epoch), step)
        if checkpoint_due(schedule, epoch, args.checkpoint_every):
            save_checkpoint(ckpt_path, (state, q, history), step, "empo/cluster-checkpoint/v2", identity)
        if step % args.log_every == 0 or step == total:
            progress(step, **fields)
    train_s = time.perf_counter() - t_train

    # Algorithm 1, lines 20-22: Q_Theta* (Eq. 3) and the assignments A(s, a) (Eq. 9).
    log_post, _ = fetch(compiled["e"](state.policy, data))
    state = fetch(state)
    summary, assignments = write_outputs(args, inp, state, log_post, history, seeds,
                                         {"compile_s": compile_s, "train_s": train_s, "seeds": seeds.tolist()})
    if inp.obs_dim == 2:  # the navigation task: draw the clusters and the classifier
        draw_figures(inp, state, classifier, assignments, seeds, args.k, writer, total, run_dir)
    writer.close()
    print_summary(args, summary, compile_s, train_s)
    return summary


def checkpoint_due(schedule: list, epoch: int, every: int) -> bool:
    """A checkpoint after the epoch: every ``every`` epochs (0: never by count), at the end of every phase."""
    done = epoch + 1
    return (every > 0 and done % every == 0) or done == len(schedule) or schedule[done] != schedule[epoch]


def log_epoch(writer, phase: str, metrics, step: int) -> dict:
    """TensorBoard after an epoch: its mean losses. Returns the progress line's fields."""
    metrics = fetch(metrics)
    for tag, value in metrics.items():
        writer.add_scalar(tag, float(np.mean(value)), step)
    return {"phase": phase, "m_loss": float(np.mean(metrics["losses/m_step"]))}


def log_em_epoch(writer, inp: Inputs, log_post, loglik, history, seeds, step: int) -> dict:
    """TensorBoard after an EM epoch: the posterior's entropy, the mean log-likelihood, the cluster sizes and, with
    labels, the rand index (also written into ``history`` [S, 2], this epoch's row). Returns the progress line's
    extra fields."""
    log_post, loglik = np.asarray(fetch(log_post)), np.asarray(fetch(loglik))
    assign = log_post.argmax(-1)  # [S, E], Eq. (9) under the current parameters
    writer.add_scalar("charts/posterior_entropy", entropy(log_post), step)
    mean_ll = np.take_along_axis(loglik, assign[..., None], -1)[..., 0].sum(-1) / inp.n  # [S]
    writer.add_scalar("charts/mean_log_likelihood", float(mean_ll.mean()), step)
    for z in range(log_post.shape[-1]):
        writer.add_scalar(f"charts/cluster_fraction/{z}",
                          float(((assign == z) * inp.lengths).sum() / inp.n / len(seeds)), step)
    if not inp.has_labels:
        return {}
    scores = np.array([rand_indices(inp.labels_per_episode, inp.lengths, a) for a in assign])  # [S, 2]
    history[:] = scores
    writer.add_scalar("eval/rand_index", float(scores[:, 0].mean()), step)
    writer.add_scalar("eval/adjusted_rand_index", float(scores[:, 1].mean()), step)
    for i, s in enumerate(scores[:, 0]):
        writer.add_scalar(f"eval/rand_index_seed/{seeds[i]}", float(s), step)
    return {"rand_index": float(scores[:, 0].mean())}


def write_outputs(args: Args, inp: Inputs, state: TrainState, log_post, history, seeds, summary: dict):
    """cluster.npz: the parameters, Q_Theta* (Eq. 3), the assignments (Eq. 9), arch/* and the rand indices; then the
    checkpoint, which the finished run no longer needs, is removed. Returns the summary with the rand indices added,
    and the assignments [S, N]."""
    posterior = np.exp(np.asarray(log_post)).astype(np.float32)  # [S, E, K]
    assignments = posterior.argmax(-1).astype(np.int32)[:, inp.data_np["episode_ids"]]  # [S, N], Eq. (9)
    arrays = {
        **flatten_params("policy/params", state.policy["params"]),
        **flatten_params("classifier/params", state.classifier["params"]),
        "posterior": posterior, "assignments": assignments, "seeds": seeds.astype(np.int64),
        "arch/k": np.int64(args.k), "arch/obs_dim": np.int64(inp.obs_dim), "arch/act_dim": np.int64(inp.act_dim),
        "arch/hidden_dim": np.int64(args.hidden_dim), "arch/hidden_layers": np.int64(args.hidden_layers),
        "arch/obs_mean": inp.obs_mean, "arch/obs_std": inp.obs_std,
        "arch/action_scale": np.asarray(inp.action_scale, np.float32),
        "arch/log_std_range": np.asarray([LOG_STD_MIN, LOG_STD_MAX], np.float32),
    }
    if inp.has_labels:
        ri, ari = rand_scores(inp.labels, assignments)
        arrays.update(rand_index=ri, adjusted_rand_index=ari)
        if args.em_epochs:
            arrays["rand_index_history"] = history[..., 0]  # [S, N_E]
        summary.update(rand_index=ri.tolist(), adjusted_rand_index=ari.tolist())
    save_output(args, arrays, "empo/cluster/v1", {"dataset": inp.sha})
    return summary, assignments


def print_summary(args: Args, summary: dict, compile_s: float, train_s: float) -> None:
    print(f"[cluster] wrote {args.out}: compile {compile_s:.1f}s, training {train_s:.1f}s")
    if "rand_index" in summary:
        print("[cluster] rand index per seed: " + " ".join(f"{x:.4f}" for x in summary["rand_index"]))
        print(f"[cluster] rand index {np.mean(summary['rand_index']):.4f} +- {np.std(summary['rand_index']):.4f}, "
              f"adjusted {np.mean(summary['adjusted_rand_index']):.4f} +- {np.std(summary['adjusted_rand_index']):.4f}")


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
