"""Stage 3 of EMPO: a high-level policy over the clusters by implicit Q-learning, the ID(s) filter, evaluation.

Paper: §3.3 (high-level IQL, the classifier, ID(s), pi_H), Table 4 (n_H, N_H, tau, b, n-step), Appendix C.

Input   a data set (``--dataset``, as stages 1 and 2), ``--cluster cluster.npz`` (schema empo/cluster/v1:
        the classifier q(z|s; phi) and the assignments A(s, a)) and ``--ppo ppo.npz`` (schema empo/ppo/v1:
        the improved policies pi_L(.|s, z; Theta')), made from that data set and that cluster file
        (their sha256 are checked).
Output  ``highlevel.npz`` (schema empo/highlevel/v1), figures and TensorBoard logs in ``<out folder>/highlevel``:
        qh/params/... [S, ...] Q_H(s; psi_H) -> R^K, vh/params/... [S, ...] V_H(s; phi_H) -> R (both in
        units of arch/value_scale), copies of the run's pi/params/... [S, K, ...] and classifier/params/...
        [S, ...], so that the file holds the whole final policy pi, seeds, ppo_run and cluster_run [S],
        arch/*, eval/* (rollouts of pi on the navigation task), plus args, producer and inputs.

Equation map (the equations of §3.3 carry no numbers in the paper)
    l_H^(Q) = [Q_H(s, A(s,a); psi_H) - y]^2, y the n-step target    -> n_step_returns, n_step_target, qh_loss
    l_H^(V) = L_2^tau(Q_H(s, A(s,a); psi_bar_H) - V_H(s; phi_H))     -> expectile_loss, vh_loss
    psi_bar_H <- psi_H every n_H steps; N_H steps of both            -> make_train_chunk
    ID(s) = {z : q(z|s; phi) >= max_z' q(z'|s; phi) / b}             -> in_distribution
    pi_H(s; psi_H) = argmax_{z in ID(s)} Q_H(s, z; psi_H)             -> high_level_action
    pi(.|s) = pi_L(.|s, pi_H(s; psi_H); Theta')                      -> choose_cluster, final_action

Interpretations and deviations
    1. Networks: the stage-1 architecture (hidden layers and width from cluster.npz) on the standardised
       state. The high-level action z is discrete, so Q_H(s; psi_H) -> R^K has one linear head per
       cluster and Q_H(s, z) = Q_H(s)^T e_z. The paper writes V_H(s, z; phi_H) once in the text but
       V_H(s') and V_H(s) in both losses; IQL's value is a function of the state alone (an expectile of
       Q over the data's actions at s), so V_H(s; phi_H) -> R is a scalar.
    2. Value scale: rewards are divided by c = arch/value_scale of ppo.npz (stage 2's std of the
       Monte-Carlo returns over the data set), so that targets are O(1) for Adam; Q_H and V_H are
       stored in these units and every logged value is multiplied back into reward units (the losses
       are logged as trained, in units of c^2).
    3. The n-step target (n = 3, "n-step return", Table 4): y = sum_{j<m} gamma^j r_{t+j} +
       gamma^m V_H(s_{t+m}) with m = min(n, rows left in the trajectory from t). The bootstrap term is
       dropped when the trajectory ends in a terminal within those m rows; after a timeout it uses V_H
       at the last row's next_observation. The sums, discounts and bootstrap states are computed once
       per row before training (NumPy, vectorised). A(s, a) is constant along a trajectory, so the m
       rows all belong to the cluster z the target is credited to. V_H in the target is the current
       phi_H, held fixed (stop_gradient), as in IQL: there is no target network for V_H.
    4. The target network psi_bar_H starts equal to psi_H and is replaced by a full copy of psi_H every
       n_H = 500 steps (the paper gives no rate, only "updated every n_H steps"); it is used only in
       l_H^(V), as IQL does.
    5. "Updated simultaneously": both gradients are taken at the parameters before the step, then both
       Adam steps are applied (IQL's reference code updates V first and Q with the new V). Minibatches of
       B = 256 rows are drawn uniformly with replacement; one Adam optimiser per network, lr 3e-4.
    6. L_2^tau(u) = |tau - 1(u < 0)| u^2 (tau u^2 for u >= 0, (1 - tau) u^2 otherwise), tau = 0.9.
    7. q(z|s; phi) is the softmax of the stage-1 classifier's logits. The paper asks b > 0; b >= 1 is required
       here, so that ID(s) always holds argmax_z q(z|s) and pi_H is always defined (below 1 it can be empty).
       Q_H of the clusters outside ID(s) is masked with -inf; ties go to the lowest z. pi_H is chosen afresh at
       every step.
    8. The final policy executes the mean action of pi_L(.|s, pi_H(s); Theta') (deterministic, as the
       stage-2 evaluation); --sample draws from the Gaussian instead. The environment clips actions.
       Q_H is learned from the data, i.e. it values the clusters' behaviour beta_z for n steps, while pi
       executes the improved pi_L, as the paper does.
    9. Runs: run i uses seed --seed + i, ppo run --first-run + i of ppo.npz (run 0 for all when it holds one) and the
       classifier and assignments of that ppo run's clustering run (its cluster_run). Runs are vmapped
       and sharded over the visible devices.
    10. Evaluation (navigation task only, never used for selection): --eval-episodes rollouts of pi per
        run from s_0 (the paper's Appendix C: 10 seeds x 10 rollouts); "optimal route" is reaching g
        without ever entering S_p.

Example
    python empo_highlevel.py --dataset data/nav.npz --cluster runs/nav/cluster.npz --ppo runs/nav/ppo.npz \\
        --out runs/nav/highlevel.npz
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "XLA_FLAGS" not in os.environ:
    # One XLA host device per core, so that seeds run in parallel on a CPU (set before jax loads).
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"

import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Any, Literal, Optional  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import tyro  # noqa: E402
from flax import struct, traverse_util  # noqa: E402


@dataclass
class Args:
    """Stage 3 of EMPO: high-level IQL over the clusters, the ID(s) filter and the final policy (§3.3)."""

    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = Table 4's didactic column (the navigation task), 'd4rl' = its D4RL
    column (gamma 0.99, tau 0.7; halfcheetah medium + expert, D4RL v2 files in data/d4rl); flags given on the
    command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz, D4RL .hdf5 files or Minari ids (as stage 1), the one stages 1 and 2 used"""
    cluster: str = "runs/nav/cluster.npz"
    """stage-1 output (schema empo/cluster/v1): the classifier q(z|s; phi) and the assignments A(s, a)"""
    ppo: str = "runs/nav/ppo.npz"
    """stage-2 output (schema empo/ppo/v1): the improved policies pi_L(.|s, z; Theta')"""
    out: str = "runs/nav/highlevel.npz"
    """output file (schema empo/highlevel/v1); TensorBoard logs go to the folder 'highlevel' beside it"""
    seed: int = 1
    """random seed of the first run; run i uses seed + i and ppo run first_run + i of --ppo"""
    first_run: int = 0
    """index of the ppo run of --ppo that run 0 uses (to add seeds to an earlier run)"""
    num_seeds: int = 1
    """independent runs in one vmapped call, sharded over the visible devices"""
    resume: bool = False
    """continue from the checkpoint beside --out (written after every chunk of steps)"""
    eval_episodes: int = 10
    """episodes of the final policy pi per run: JAX rollouts from s_0 (navigation task) or episodes in the
    Minari data set's Gymnasium environment (MuJoCo); 0 skips the evaluation"""
    ref_min_score: Optional[float] = None
    """reference return of score 0 for the normalised score (default: D4RL's random return for a D4RL task's
    environment, else the Minari data set's ref_min_score)"""
    ref_max_score: Optional[float] = None
    """reference return of score 100 for the normalised score (default: D4RL's expert return for a D4RL task's
    environment, else the Minari data set's ref_max_score)"""
    eval_env: str = ""
    """Gymnasium environment to evaluate in (default: for D4RL files the task's -v4 environment from the file
    names, e.g. halfcheetah_*.hdf5 -> HalfCheetah-v4; for Minari ids the recorded one; an .npz of a MuJoCo task
    needs it)"""
    sample: bool = False
    """actions drawn from pi_L(.|s, pi_H(s)) instead of its mean action: in Gymnasium environments the evaluation
    itself; on the navigation task, where both protocols are always evaluated and stored, the rollouts the figures
    show"""
    # --- algorithm (Table 4, didactic column) ---
    gamma: float = 0.999
    """gamma: discount factor"""
    steps: int = 1_000_000
    """N_H: IQL steps of Q_H(s, z; psi_H) and V_H(s; phi_H), updated simultaneously"""
    target_every: int = 500
    """n_H: the target network psi_bar_H is replaced by a copy of psi_H every n_H steps"""
    expectile: float = 0.9
    """tau: the expectile of the value loss L_2^tau"""
    b: float = 5.0
    """b >= 1: z is in ID(s) when q(z|s; phi) >= max_z' q(z'|s; phi) / b (b = 1: only the most likely cluster)"""
    n_step: int = 3
    """n: the Q_H target sums up to n rewards before bootstrapping with V_H (n-step return)"""
    batch_size: int = 256
    """B: minibatch size"""
    learning_rate: float = 3e-4
    """alpha: Adam learning rate of Q_H and V_H"""
    # --- speed ---
    steps_per_call: int = 10_000
    """IQL steps per jitted call: one log line and one checkpoint each"""


PRESETS = {  # Table 4: the didactic column and the D4RL column
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 cluster="runs/halfcheetah-medium-expert/cluster.npz", ppo="runs/halfcheetah-medium-expert/ppo.npz",
                 out="runs/halfcheetah-medium-expert/highlevel.npz", gamma=0.99, expectile=0.7),
}


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------

@struct.dataclass
class TrainState:
    qh: Any  # Q_H(s; psi_H) -> R^K
    qh_target: Any  # psi_bar_H
    qh_opt: Any
    vh: Any  # V_H(s; phi_H) -> R
    vh_opt: Any
    step: jax.Array  # [] int32, IQL steps taken (the target refresh counts them)


@struct.dataclass
class Data:
    """The data set on the device (shared by all runs): each row's n-step target pieces."""

    obs: jax.Array  # [N, obs_dim], standardised
    reward_sum: jax.Array  # [N] sum_{j<m} gamma^j r_{t+j}, divided by the value scale
    discount: jax.Array  # [N] gamma^m, or 0 when the trajectory terminates within the m rows
    bootstrap_obs: jax.Array  # [N, obs_dim] s_{t+m}, standardised


@struct.dataclass
class RunParams:
    """What the final policy pi of one run needs (a leading seed axis when vmapped)."""

    classifier: Any  # q(z|s; phi), logits
    qh: Any  # Q_H(s; psi_H)
    pi: Any  # pi_L(.|s, z; Theta'), stacked [K, ...]


# --- shared block: networks (keep identical across stages) ---
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


def stacked_apply(policy, params, obs, z):
    """(mean, log_std) of policy z_b at obs_b for every row: all K heads, then the row's one. [B, act_dim]."""
    mean, log_std = jax.vmap(policy.apply, in_axes=(0, None))(params, obs)  # [K, B, act_dim]
    pick = lambda x: jnp.take_along_axis(x, z[None, :, None], axis=0)[0]
    return pick(mean), pick(log_std)


def check_arch(name: str, arrays: dict) -> None:
    """The arch/* entries of a handoff file rebuild a network: sizes at least 1, scales positive."""
    for key in ("arch/k", "arch/hidden_dim", "arch/hidden_layers"):
        if key in arrays and int(arrays[key]) < 1:
            raise InputError(f"{name}: '{key}' must be at least 1, got {int(arrays[key])}")
    for key in ("arch/obs_std", "arch/action_scale", "arch/value_scale"):
        if key in arrays and not np.all(arrays[key] > 0):
            raise InputError(f"{name}: '{key}' must be positive, got {arrays[key]}")


def param_shapes(net, in_dim: int):
    """The parameters of ``net`` on inputs of ``in_dim`` features, as shapes only (nothing is computed)."""
    return jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, in_dim), jnp.float32))["params"]


def check_param_shapes(name: str, arrays: dict, prefix: str, template, lead: int) -> None:
    """The parameters under ``prefix`` have, after ``lead`` leading axes (seeds, clusters), the shapes of
    ``template`` (one network built from the file's arch/* entries)."""
    want = {f"{prefix}/{k}": tuple(v.shape) for k, v in traverse_util.flatten_dict(template, sep="/").items()}
    have = {k: a.shape[lead:] for k, a in arrays.items() if k.startswith(prefix + "/")}
    for key in sorted(set(want) | set(have)):
        if key not in have:
            raise InputError(f"{name} has no key '{key}', which its arch/* entries call for")
        if key not in want or have[key] != want[key]:
            raise InputError(f"{name}: '{key}' has shape {have[key]} per run, but its arch/* entries give "
                             f"{want.get(key, 'no such parameter')}")
# --- end shared block: networks ---


# ----------------------------------------------------------------------------------------------
# Losses and the high-level policy (§3.3)
# ----------------------------------------------------------------------------------------------

def n_step_returns(rewards, next_obs, terminals, episode_ids, gamma: float, n: int):
    """§3.3 n-step return, per row t: (sum_{j<m} gamma^j r_{t+j}, gamma^m or 0, s_{t+m}).

    m = min(n, rows left in the trajectory from t). The discount is 0 when the trajectory ends in a
    terminal within the m rows; s_{t+m} is the next_observation of row t+m-1 (after a timeout, the
    last row's). NumPy arrays: rewards [N], next_obs [N, obs_dim], terminals [N] bool, episode_ids [N].
    Vectorised over rows; the loop runs over the n steps of the horizon.
    """
    num = len(rewards)
    rows = np.arange(num)
    new_traj = np.r_[True, np.diff(episode_ids) != 0]
    end = np.flatnonzero(np.r_[new_traj[1:], True])[np.cumsum(new_traj) - 1]  # [N] last row of each row's trajectory
    m = np.minimum(n, end - rows + 1)  # [N] rows summed
    reward_sum = np.zeros(num, np.float64)
    for j in range(n):
        reward_sum += np.where(j < m, gamma ** j * rewards[np.minimum(rows + j, num - 1)], 0.0)
    last = rows + m - 1  # [N] row t+m-1
    discount = np.where(terminals[last], 0.0, float(gamma) ** m)  # no bootstrap past a terminal
    return reward_sum.astype(np.float32), discount.astype(np.float32), next_obs[last]


def select(values, z):
    """values [B, K], z [B] -> values[b, z_b], i.e. values^T e_z (the cluster's head)."""
    return jnp.take_along_axis(values, z[:, None], axis=1)[:, 0]


def n_step_target(reward_sum, discount, v_next):
    """§3.3 l_H^(Q) target, n-step: y = sum_{j<m} gamma^j r_{t+j} + gamma^m V_H(s_{t+m}; phi_H)."""
    return reward_sum + discount * v_next  # §3.3, n-step return


def qh_loss(q_sa, target):
    """§3.3: l_H^(Q) = mean of [Q_H(s; psi_H)^T e_A(s,a) - y]^2 over the batch (y held fixed)."""
    return jnp.mean((q_sa - jax.lax.stop_gradient(target)) ** 2)  # §3.3 l_H^(Q)


def expectile_loss(u, tau: float):
    """§3.3: L_2^tau(u) = |tau - 1(u < 0)| u^2, i.e. tau u^2 if u >= 0 and (1 - tau) u^2 otherwise."""
    return jnp.abs(tau - (u < 0).astype(u.dtype)) * u * u  # §3.3 L_2^tau


def vh_loss(q_bar_sa, v_s, tau: float):
    """§3.3: l_H^(V) = mean of L_2^tau(Q_H(s; psi_bar_H)^T e_A(s,a) - V_H(s; phi_H)) over the batch."""
    return jnp.mean(expectile_loss(jax.lax.stop_gradient(q_bar_sa) - v_s, tau))  # §3.3 l_H^(V)


def in_distribution(q_probs, b: float):
    """§3.3: ID(s) = {z : q(z|s; phi) >= max_z' q(z'|s; phi) / b}. q_probs [..., K] -> mask [..., K] bool."""
    return q_probs >= jnp.max(q_probs, axis=-1, keepdims=True) / b  # §3.3 ID(s)


def high_level_action(q_h, q_probs, b: float):
    """§3.3: pi_H(s) = argmax_{z in ID(s)} Q_H(s, z; psi_H). q_h, q_probs [..., K] -> z [...] int32."""
    masked = jnp.where(in_distribution(q_probs, b), q_h, -jnp.inf)  # [..., K]
    return jnp.argmax(masked, axis=-1).astype(jnp.int32)  # §3.3 pi_H


def choose_cluster(nets: dict, run: RunParams, obs, b: float):
    """pi_H(s) at standardised obs [B, obs_dim] with the run's classifier and Q_H -> z [B]."""
    q_probs = jax.nn.softmax(nets["classifier"].apply(run.classifier, obs), axis=-1)  # [B, K] q(z|s; phi)
    return high_level_action(nets["qh"].apply(run.qh, obs), q_probs, b)  # [B]


def final_action(nets: dict, run: RunParams, obs, key, b: float, sample: bool):
    """§3.3: a ~ pi(.|s) = pi_L(.|s, pi_H(s; psi_H); Theta') at standardised obs [B, obs_dim].

    Returns (actions [B, act_dim], the clusters pi_H chose [B]); the mean action of pi_L unless ``sample``.
    """
    z = choose_cluster(nets, run, obs, b)  # [B]
    mean, log_std = stacked_apply(nets["policy"], run.pi, obs, z)  # [B, act_dim]
    if sample:
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape), z
    return mean, z  # §3.3 pi


# ----------------------------------------------------------------------------------------------
# Training functions
# ----------------------------------------------------------------------------------------------

def make_networks(hidden_dim: int, hidden_layers: int, k: int, act_dim: int, action_scale: tuple) -> dict:
    return {
        "classifier": MLP(hidden_dim, hidden_layers, k),  # q(z|s; phi), logits (stage 1)
        "qh": MLP(hidden_dim, hidden_layers, k),  # Q_H(s; psi_H) -> R^K
        "vh": MLP(hidden_dim, hidden_layers, 1),  # V_H(s; phi_H) -> R
        "policy": GaussianPolicy(act_dim, action_scale, hidden_dim, hidden_layers),  # pi_L(.|s, z; Theta')
    }


def make_init(args: Args, nets: dict, obs_dim: int):
    tx = optax.adam(args.learning_rate)

    def init(key) -> TrainState:
        key_q, key_v = jax.random.split(key)
        qh = nets["qh"].init(key_q, jnp.zeros((1, obs_dim)))
        vh = nets["vh"].init(key_v, jnp.zeros((1, obs_dim)))
        return TrainState(qh=qh, qh_target=qh, qh_opt=tx.init(qh), vh=vh, vh_opt=tx.init(vh), step=jnp.int32(0))

    return init, tx


def make_train_chunk(args: Args, nets: dict, tx, num_rows: int):
    """§3.3: ``steps`` simultaneous IQL updates of psi_H and phi_H, psi_bar_H <- psi_H every n_H steps.

    Returns chunk(state, key, assign [N], data, steps) -> (state, metrics averaged over the steps).
    """
    qh_net, vh_net = nets["qh"], nets["vh"]

    def update(state: TrainState, key, assign, data: Data):
        idx = jax.random.randint(key, (args.batch_size,), 0, num_rows)  # [B], uniform with replacement
        z = assign[idx]  # [B] A(s, a)
        obs = data.obs[idx]  # [B, obs_dim]
        v_next = vh_net.apply(state.vh, data.bootstrap_obs[idx])[:, 0]  # [B] the current V_H(s_{t+m})
        target = n_step_target(data.reward_sum[idx], data.discount[idx], v_next)  # [B]
        q_bar = select(qh_net.apply(state.qh_target, obs), z)  # [B] Q_H(s, A(s,a); psi_bar_H)

        def q_objective(params):
            q_sa = select(qh_net.apply(params, obs), z)  # [B]
            return qh_loss(q_sa, target), q_sa

        def v_objective(params):
            v_s = vh_net.apply(params, obs)[:, 0]  # [B]
            return vh_loss(q_bar, v_s, args.expectile), v_s

        (loss_q, q_sa), grads_q = jax.value_and_grad(q_objective, has_aux=True)(state.qh)
        (loss_v, v_s), grads_v = jax.value_and_grad(v_objective, has_aux=True)(state.vh)
        updates, qh_opt = tx.update(grads_q, state.qh_opt, state.qh)
        qh = optax.apply_updates(state.qh, updates)
        updates, vh_opt = tx.update(grads_v, state.vh_opt, state.vh)
        vh = optax.apply_updates(state.vh, updates)
        step = state.step + 1
        refresh = (step % args.target_every) == 0  # psi_bar_H <- psi_H every n_H steps
        qh_target = jax.tree.map(lambda t, p: jnp.where(refresh, p, t), state.qh_target, qh)
        state = TrainState(qh=qh, qh_target=qh_target, qh_opt=qh_opt, vh=vh, vh_opt=vh_opt, step=step)
        return state, {"losses/q_h": loss_q, "losses/v_h": loss_v, "charts/q_h_mean": jnp.mean(q_sa),
                       "charts/v_h_mean": jnp.mean(v_s)}

    def chunk(state: TrainState, key, assign, data: Data, steps: int):
        state, metrics = jax.lax.scan(lambda s, k: update(s, k, assign, data), state, jax.random.split(key, steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return chunk


# ----------------------------------------------------------------------------------------------
# Inputs, evaluation and checkpoints
# ----------------------------------------------------------------------------------------------

def made_from(arrays: dict, name: str):
    """The sha256 recorded under ``name`` in a file's inputs JSON (None when absent or unreadable)."""
    try:
        return json.loads(str(arrays["inputs"])).get(name)
    except (KeyError, ValueError, AttributeError):
        return None


def load_cluster(path: str, data_sha: str, data_sizes: dict) -> tuple[dict, dict, str]:
    """Read and validate cluster.npz against the data set (sizes N, obs_dim, act_dim); returns (arrays, sizes with S
    and K, sha256 of the file as read)."""
    arrays, digest = load_npz(path, "empo/cluster/v1", digest=True)
    spec = {"assignments": ("int32", ("S", "N")), "arch/k": ("int64", ()), "arch/hidden_dim": ("int64", ()),
            "arch/hidden_layers": ("int64", ()), "arch/obs_mean": ("float32", ("obs_dim",)),
            "arch/obs_std": ("float32", ("obs_dim",))}
    if not any(key.startswith("classifier/params/") for key in arrays):
        raise InputError(f"{path} has no key 'classifier/params/...'")
    sizes = check_arrays(path, arrays, spec, data_sizes)
    check_arch(path, arrays)
    sizes["K"] = int(arrays["arch/k"])
    classifier = MLP(int(arrays["arch/hidden_dim"]), int(arrays["arch/hidden_layers"]), sizes["K"])
    check_param_shapes(path, arrays, "classifier/params", param_shapes(classifier, sizes["obs_dim"]), 1)
    check_arrays(path, arrays, {key: ("float32", ("S",) + a.shape[1:]) for key, a in arrays.items()
                                if key.startswith("classifier/params/")}, sizes)
    if arrays["assignments"].min() < 0 or arrays["assignments"].max() >= sizes["K"]:
        raise InputError(f"{path}: 'assignments' holds cluster numbers outside 0..{sizes['K'] - 1} (arch/k)")
    if made_from(arrays, "dataset") != data_sha:
        raise InputError(f"{path} was made from another data set (sha256 {str(made_from(arrays, 'dataset'))[:12]}"
                         f"..., this one is {data_sha[:12]}...)")
    return arrays, sizes, digest


def load_ppo(path: str, data_sha: str, cluster_path: str, cluster_sha: str, cluster_sizes: dict,
             cluster: dict) -> tuple[dict, dict, str]:
    """Read and validate ppo.npz against the data set and cluster.npz (as read: its sha256 and arrays); returns
    (arrays, sizes with S and K, sha256 of the file as read)."""
    arrays, digest = load_npz(path, "empo/ppo/v1", digest=True)
    if not any(key.startswith("pi/params/") for key in arrays):
        raise InputError(f"{path} has no key 'pi/params/...'")
    spec = {"cluster_run": ("int64", ("S",)), "arch/k": ("int64", ()),
            "arch/action_scale": ("float32", ("act_dim",)), "arch/value_scale": ("float32", ())}
    spec.update({key: ("float32", ("S", "K") + a.shape[2:]) for key, a in arrays.items()
                 if key.startswith("pi/params/")})
    sizes = check_arrays(path, arrays, spec, {"act_dim": cluster_sizes["act_dim"]})
    check_arch(path, arrays)
    if int(arrays["arch/k"]) != sizes["K"]:
        raise InputError(f"{path}: 'arch/k' is {int(arrays['arch/k'])} but its arrays hold K={sizes['K']} clusters")
    if sizes["K"] != cluster_sizes["K"]:
        raise InputError(f"{path} has K={sizes['K']} clusters but {cluster_path} has K={cluster_sizes['K']}")
    hidden = int(cluster["arch/hidden_dim"]), int(cluster["arch/hidden_layers"])
    policy = GaussianPolicy(sizes["act_dim"], (1.0,) * sizes["act_dim"], *hidden)
    check_param_shapes(path, arrays, "pi/params", param_shapes(policy, cluster_sizes["obs_dim"]), 2)
    if made_from(arrays, "dataset") != data_sha:
        raise InputError(f"{path} was made from another data set (sha256 {str(made_from(arrays, 'dataset'))[:12]}"
                         f"..., this one is {data_sha[:12]}...)")
    if made_from(arrays, "cluster") != cluster_sha:
        raise InputError(f"{path} was made from another cluster file than {cluster_path} (its inputs.cluster "
                         f"sha256 differs)")
    if arrays["cluster_run"].min() < 0 or arrays["cluster_run"].max() >= cluster_sizes["S"]:
        raise InputError(f"{path}: 'cluster_run' names runs outside the {cluster_sizes['S']} of {cluster_path}")
    return arrays, sizes, digest


def make_evaluate(nets: dict, obs_mean, obs_std, b: float, episodes: int, sample: bool):
    """Rollouts of the final policy pi from s_0 (nav_env.rollout), vmapped over runs.

    Also returns the cluster pi_H chose at every step (-1 after the episode's end).
    """
    import nav_env

    def evaluate(run: RunParams, key):
        act = lambda key_t, pos: final_action(nets, run, (pos - obs_mean) / obs_std, key_t, b, sample)[0]
        out = nav_env.rollout(key, act, episodes)
        z = jax.lax.map(lambda pos: choose_cluster(nets, run, (pos - obs_mean) / obs_std, b),
                        out["positions"][:, :-1])  # [E, T], one episode at a time (bounds the memory)
        chosen = jnp.where(out["alive"], z, -1)  # [E, T]
        return {name: out[name] for name in ("return", "goal", "penalty_steps", "optimal_route", "positions",
                                             "length")} | {"chosen": chosen}

    return jax.jit(jax.vmap(evaluate))


def cluster_segments(positions, chosen, lengths) -> tuple[list, list]:
    """Cut every rollout into pieces of constant pi_H(s), for plot_map: ([T_i, 2] arrays, cluster labels)."""
    trajs, labels = [], []
    for pos, z, length in zip(positions, chosen, lengths):
        z = z[:length]
        cuts = np.flatnonzero(np.diff(z)) + 1
        for start, stop in zip(np.r_[0, cuts], np.r_[cuts, length]):
            trajs.append(pos[start: stop + 1])
            labels.append(int(z[start]))
    return trajs, labels


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def validate_args(args: Args) -> None:
    """The flags alone, before anything is read: one sentence for the first one out of range."""
    at_least = dict(num_seeds=1, batch_size=1, steps_per_call=1, target_every=1, n_step=1, steps=0, eval_episodes=0,
                    first_run=0)
    check_flags(args, at_least)
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 < args.expectile < 1.0:
        raise InputError("need 0 <= --gamma <= 1 and 0 < --expectile < 1")
    if not args.b >= 1:  # below 1, ID(s) would not hold argmax_z q(z|s), and could be empty
        raise InputError(f"--b must be at least 1 (ID(s) keeps z with q(z|s) >= max q / b), got {args.b}")
    if not args.learning_rate > 0:
        raise InputError(f"--learning-rate must be positive, got {args.learning_rate}")


def main(args: Args) -> dict:
    validate_args(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset, args.cluster, args.ppo])
    data_np, data_sha = load_dataset(args.dataset)
    n = len(data_np["rewards"])
    obs_dim, act_dim = data_np["observations"].shape[1], data_np["actions"].shape[1]
    cluster, cluster_sizes, cluster_sha = load_cluster(args.cluster, data_sha, dict(N=n, obs_dim=obs_dim,
                                                                                    act_dim=act_dim))
    ppo, ppo_sizes, ppo_sha = load_ppo(args.ppo, data_sha, args.cluster, cluster_sha, cluster_sizes, cluster)
    env = None  # where the final policy is evaluated; checked before training, not after it
    if args.eval_episodes > 0:
        import nav_env

        try:
            env = nav_env.evaluation_env(args.dataset, obs_dim, args.ref_min_score, args.ref_max_score,
                                         args.eval_env)
        except nav_env.InputError as e:  # nav_env's own class: this script reports only its own in one sentence
            raise InputError(str(e)) from None
    k, ppo_seeds = ppo_sizes["K"], ppo_sizes["S"]
    check_fits(f"--eval-episodes {args.eval_episodes}", 2 * args.num_seeds * args.eval_episodes * 1001 * 2 * 4)  # paths
    if ppo_seeds != 1 and args.first_run + args.num_seeds > ppo_seeds:
        raise InputError(f"--first-run {args.first_run} plus --num-seeds {args.num_seeds} is more than the "
                         f"{ppo_seeds} runs in {args.ppo}")
    ppo_run = args.first_run + np.arange(args.num_seeds) if ppo_seeds > 1 else np.zeros(args.num_seeds, int)
    cluster_run = ppo["cluster_run"][ppo_run]
    hidden_dim, hidden_layers = int(cluster["arch/hidden_dim"]), int(cluster["arch/hidden_layers"])
    obs_mean, obs_std = cluster["arch/obs_mean"], cluster["arch/obs_std"]
    action_scale = tuple(float(x) for x in ppo["arch/action_scale"])
    value_scale = float(ppo["arch/value_scale"])  # c (interpretation 2)

    # The n-step target's pieces, once for all runs (interpretation 3).
    reward_sum, discount, bootstrap_obs = n_step_returns(
        data_np["rewards"], data_np["next_observations"], data_np["terminals"], data_np["episode_ids"], args.gamma,
        args.n_step)
    norm = lambda x: jnp.asarray((x - obs_mean) / obs_std)
    data = Data(obs=norm(data_np["observations"]), reward_sum=jnp.asarray(reward_sum / value_scale),
                discount=jnp.asarray(discount), bootstrap_obs=norm(bootstrap_obs))

    nets = make_networks(hidden_dim, hidden_layers, k, act_dim, action_scale)
    init, tx = make_init(args, nets, obs_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = jax.device_put(data, replicated)
    assign = jax.device_put(jnp.asarray(cluster["assignments"][cluster_run]), seed_sharding)  # [S, N]
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    key_init, key_train, key_eval = (
        jax.device_put(x, seed_sharding) for x in jax.vmap(lambda s: jax.random.split(s, 3), out_axes=1)(seed_keys))
    state = jax.jit(jax.vmap(init), out_shardings=seed_sharding)(key_init)

    # The schedule: chunks of IQL steps, a checkpoint after each.
    calls = [min(args.steps_per_call, args.steps - i) for i in range(0, args.steps, args.steps_per_call)]
    run_dir = os.path.dirname(os.path.abspath(args.out))
    identity = run_identity(args, {"dataset": data_sha, "cluster": cluster_sha, "ppo": ppo_sha})
    ckpt_path, state, first = resume_checkpoint(args, state, "empo/highlevel-checkpoint/v2", identity, len(calls))
    state = jax.device_put(state, seed_sharding)
    writer = make_writer(os.path.join(run_dir, "highlevel"), args)

    train_chunk = make_train_chunk(args, nets, tx, n)
    calls_jit = {s: jax.jit(jax.vmap(lambda st, key, a, d, s=s: train_chunk(st, key, a, d, s), in_axes=(0, 0, 0, None)))
                 for s in set(calls)}
    chunk_key = lambda unit: jax.device_put(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, unit),
                                            seed_sharding)
    print(f"[highlevel] N={n} K={k} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); "
          f"value scale c={value_scale:.1f}; {args.steps} steps in {len(calls)} chunks", flush=True)

    progress = Progress(len(calls), "highlevel", first=first)
    t_train = time.perf_counter()
    done = sum(calls[:first])
    for unit in range(first, len(calls)):
        t0 = time.perf_counter()
        state, metrics = calls_jit[calls[unit]](state, chunk_key(unit), assign, data)
        metrics = {name: float(np.mean(x)) for name, x in jax.device_get(metrics).items()}
        done += calls[unit]
        writer.add_scalar("charts/SPS", calls[unit] / (time.perf_counter() - t0), done)
        save_checkpoint(ckpt_path, state, unit + 1, "empo/highlevel-checkpoint/v2", identity)
        writer.add_scalar("losses/q_h", metrics["losses/q_h"], done)
        writer.add_scalar("losses/v_h", metrics["losses/v_h"], done)
        writer.add_scalar("charts/q_h_mean", metrics["charts/q_h_mean"] * value_scale, done)
        writer.add_scalar("charts/v_h_mean", metrics["charts/v_h_mean"] * value_scale, done)
        progress(unit + 1, took=time.perf_counter() - t0, q_h_loss=metrics["losses/q_h"],
                 v_h_loss=metrics["losses/v_h"], v_h=metrics["charts/v_h_mean"] * value_scale)
    train_s = time.perf_counter() - t_train

    state = jax.device_get(state)
    pick = lambda prefix, arrays, runs: jax.tree.map(lambda x: jnp.asarray(x[runs]), unflatten_params(prefix, arrays))
    run = RunParams(classifier={"params": pick("classifier/params", cluster, cluster_run)}, qh=state.qh,
                    pi={"params": pick("pi/params", ppo, ppo_run)})
    arrays = {
        **flatten_params("qh/params", state.qh["params"]), **flatten_params("vh/params", state.vh["params"]),
        **flatten_params("pi/params", run.pi["params"]),
        **flatten_params("classifier/params", run.classifier["params"]),
        "seeds": seeds.astype(np.int64), "ppo_run": ppo_run.astype(np.int64),
        "cluster_run": cluster_run.astype(np.int64),
        "arch/k": np.int64(k), "arch/obs_dim": np.int64(obs_dim), "arch/act_dim": np.int64(act_dim),
        "arch/hidden_dim": np.int64(hidden_dim), "arch/hidden_layers": np.int64(hidden_layers),
        "arch/obs_mean": obs_mean, "arch/obs_std": obs_std, "arch/action_scale": np.asarray(action_scale, np.float32),
        "arch/value_scale": np.float32(value_scale), "arch/gamma": np.float32(args.gamma), "arch/b": np.float32(args.b),
    }

    # Evaluation: the final policy pi from s_0 with maps of pi_H and ID(s) (navigation), or in the Gymnasium env.
    summary = {"train_s": train_s, "value_scale": value_scale, "seeds": seeds.tolist()}
    if env is not None:
        run = jax.device_put(run, seed_sharding)
        if env["kind"] == "nav":
            eval_arrays, eval_summary = evaluate_final_policy(args, nets, obs_mean, obs_std, value_scale, run,
                                                              state.vh, key_eval, writer, run_dir, seeds)
        else:
            eval_arrays, eval_summary = evaluate_final_policy_gym(args, nets, obs_mean, obs_std, run, env, key_eval,
                                                                  writer, seeds)
        arrays.update(eval_arrays)
        summary.update(eval_summary)
    save_npz(args.out, arrays, "empo/highlevel/v1", asdict(args),
             {"dataset": data_sha, "cluster": cluster_sha, "ppo": ppo_sha})
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    writer.close()
    print(f"[highlevel] wrote {args.out}: IQL {train_s:.1f}s")
    return summary


def evaluate_final_policy(args: Args, nets, obs_mean, obs_std, value_scale, run: RunParams, vh, key_eval, writer,
                          run_dir, seeds):
    """Rollouts of pi per run, a table, TensorBoard scalars and figures; returns (eval/* arrays, summary)."""
    import nav_env

    k = nets["qh"].out_dim
    # Both protocols of Appendix C, from the same start states: eval/* with the mean action of pi_L, eval/sampled_*
    # with actions drawn from pi_L(.|s, pi_H(s)) (the paper's "sampled 10 trajectories"); --sample only picks the
    # rollouts the figures show.
    outs, arrays, summaries = {}, {}, {}
    for sample in (False, True):
        evaluate = make_evaluate(nets, jnp.asarray(obs_mean), jnp.asarray(obs_std), args.b, args.eval_episodes,
                                 sample)
        out = {name: np.asarray(x) for name, x in jax.device_get(evaluate(run, key_eval)).items()}  # [S, E, ...]
        cluster_steps = np.stack([(out["chosen"] == z).sum(-1) for z in range(k)], -1)  # [S, E, K]

        def share(runs, cluster_steps=cluster_steps) -> tuple[dict, str]:  # the share of steps per cluster
            steps_per_z = cluster_steps[runs].reshape(-1, k).sum(0)  # [K]
            fractions = (steps_per_z / max(steps_per_z.sum(), 1)).tolist()
            return {"cluster_share": fractions}, "z: " + " ".join(f"{x:.2f}" for x in fractions)

        prefix = "sampled_" if sample else ""
        part, part_summary = nav_env.report_rollouts(
            out, seeds, f"[highlevel] final policy pi ({'sampled' if sample else 'mean'} actions), "
                        f"{args.eval_episodes} rollouts per run (last column: share of steps per cluster):", share,
            prefix=prefix)
        part[f"eval/{prefix}cluster_steps"] = cluster_steps
        arrays.update(part)
        outs[sample] = out
        summaries[sample] = part_summary
    summary = {**summaries[False], "sampled": summaries[True]}
    out = outs[args.sample]
    cluster_steps = arrays[f"eval/{'sampled_' if args.sample else ''}cluster_steps"]
    for name in ("return_mean", "goal_rate", "length", "penalty_steps", "optimal_route"):
        writer.add_scalar(f"eval/{name}", summary[name], args.steps)
        writer.add_scalar(f"eval/sampled_{name}", summary["sampled"][name], args.steps)

    # Figures: the rollouts of run 0 cut by the cluster pi_H ran, every run's rollouts, and maps over S.
    names = [f"z = {z}" for z in range(k)]
    trajs, labels = cluster_segments(out["positions"][0], out["chosen"][0], out["length"][0])
    images = {"rollouts": nav_env.plot_map(trajs, labels, label_names=names,
                                           title=f"Final policy pi (seed {seeds[0]}), coloured by pi_H(s)",
                                           path=os.path.join(run_dir, "highlevel_rollouts.png"))}
    if len(seeds) > 1:
        images["rollouts_runs"] = nav_env.plot_runs(out, seeds, "Final policy pi, every run",
                                                    os.path.join(run_dir, "highlevel_rollouts_runs.png"))
    grid = jnp.asarray((nav_env.grid_states(61) - obs_mean) / obs_std)
    run0 = jax.tree.map(lambda x: x[0], jax.device_get(run))
    q_probs = jax.nn.softmax(nets["classifier"].apply(run0.classifier, grid), -1)  # [G*G, K]
    fields = {
        "pi_h": (choose_cluster(nets, run0, grid, args.b), "pi_H(s): the chosen cluster"),
        "id": (in_distribution(q_probs, args.b).sum(-1), f"|ID(s)|: clusters in distribution (b = {args.b:g})"),
        "v_h": (nets["vh"].apply(jax.tree.map(lambda x: x[0], vh), grid)[:, 0] * value_scale, "V_H(s)"),
    }
    for name, (field, label) in fields.items():
        images[name] = nav_env.plot_map(field=np.asarray(field, np.float32).reshape(61, 61), field_label=label,
                                        title=f"{label} (seed {seeds[0]})",
                                        path=os.path.join(run_dir, f"highlevel_{name}.png"))
    for name, image in images.items():
        writer.add_image(f"eval/{name}", image, args.steps, dataformats="HWC")
    return arrays, summary


def evaluate_final_policy_gym(args: Args, nets, obs_mean, obs_std, run: RunParams, env: dict, key_eval, writer,
                              seeds):
    """Episodes of pi per run in the data set's Gymnasium environment, all S x E at once in one vector env:
    returns, normalised scores, the share of steps per cluster, TensorBoard scalars and a table."""
    import nav_env

    shape, k = (len(seeds), args.eval_episodes), nets["qh"].out_dim

    @jax.jit
    def act(obs, t):  # obs [S*E, obs_dim] at step t -> (actions [S*E, act_dim], pi_H's clusters [S*E])
        obs = ((obs - obs_mean) / obs_std).reshape(shape + obs.shape[-1:])  # [S, E, obs_dim]
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_eval, t)  # [S]
        actions, chosen = jax.vmap(lambda r, o, key: final_action(nets, r, o, key, args.b, args.sample))(
            run, obs, keys)  # [S, E, act_dim], [S, E]
        return actions.reshape(-1, actions.shape[-1]), chosen.reshape(-1)

    chosen = []  # pi_H(s_t) of every episode at every step, masked by the episode lengths below

    def policy(obs):
        actions, z = act(obs, len(chosen))
        chosen.append(np.asarray(z))
        return actions

    out = nav_env.gym_evaluate(env, policy, shape, args.seed)
    chosen = np.stack(chosen)  # [T, S*E]
    alive = np.arange(len(chosen))[:, None] < out["length"].reshape(-1)[None]  # [T, S*E]
    steps = np.stack([((chosen == z) & alive).sum(0) for z in range(k)], -1)  # [S*E, K]
    out["cluster_steps"] = steps.reshape(shape + (k,))
    share = (steps.sum(0) / max(steps.sum(), 1)).tolist()
    summary = {"return_mean": float(out["return"].mean()), "return_std": float(out["return"].std()),
               "cluster_share": share}
    lines = [f"[highlevel] final policy pi ({'sampled' if args.sample else 'mean'} actions) in {env['env_id']}, "
             f"{args.eval_episodes} episodes per run:"]
    for i, seed in enumerate(seeds):
        lines.append(f"  seed {seed}: {nav_env.describe_episodes(out, i)}")
    writer.add_scalar("eval/return_mean", summary["return_mean"], args.steps)
    if "normalized_score" in out:
        summary["normalized_score_mean"] = float(out["normalized_score"].mean())
        summary["normalized_score_std"] = float(out["normalized_score"].std())
        writer.add_scalar("eval/normalized_score", summary["normalized_score_mean"], args.steps)
        lines.append(f"  all: normalised score {summary['normalized_score_mean']:.1f} +- "
                     f"{summary['normalized_score_std']:.1f} (std of seed means "
                     f"{out['normalized_score'].mean(1).std():.1f})")
    lines.append("  share of steps per cluster: " + " ".join(f"z={z} {x:.2f}" for z, x in enumerate(share)))
    print("\n".join(lines))
    return {f"eval/{name}": x for name, x in out.items()}, summary


# ==============================================================================================
# Plumbing shared by every stage: identical copies, checked by tests/test_shared_blocks.py. Each file
# carries the shared functions it uses (npz I/O, the data set loader, run utilities, checkpoints);
# a reader auditing the algorithm can stop above this line.
# ==============================================================================================

# --- shared block: npz_io (keep identical across stages) ---
class InputError(ValueError):
    """Bad input or output: the message is one sentence that names the file and the problem."""


def same_file(a: str, b: str) -> bool:
    """True when two paths name one file: equal after resolving links, or hard links to the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(path: str, inputs=()) -> None:
    """Fail before any work if ``path`` cannot be written or is one of ``inputs`` (paths or comma-joined paths):
    an output never replaces an input."""
    if not os.path.basename(path or ""):
        raise InputError(f"the output path '{path}' names no file")
    if os.path.isdir(path):
        raise InputError(f"cannot write {path}: it is a folder")
    for source in inputs:
        for part in {source, *source.split(",")}:
            if part and same_file(path, part):
                raise InputError(f"refusing to write {path}: it is the input {part}, which would be lost")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot write {path}: its folder {folder} cannot be created ({e.strerror or e})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None


def save_npz(path: str, arrays: dict, schema: str, args, inputs: Optional[dict] = None) -> None:
    """Write arrays and metadata (schema, args JSON, producer, inputs' sha256) atomically.

    The file is written beside ``path`` under a temporary name (with the writer's pid, so that one left by a
    killed writer is removed by the next) and renamed over ``path`` only when complete, with the permissions the
    umask gives. Arrays with NaN or infinite values are refused; on any failure an earlier file stays as it was.
    """
    for key, a in arrays.items():
        if np.asarray(a).dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{path} was not written: '{key}' contains NaN or infinite values (did the run "
                             f"diverge?); an earlier file there is left as it was")
    check_writable(path)
    meta = dict(schema=np.array(schema), args=np.array(json.dumps(args, default=str, sort_keys=True)),
                producer=np.array(os.path.basename(sys.argv[0]) or "python"),
                inputs=np.array(json.dumps(inputs or {}, sort_keys=True)))
    folder, name = os.path.split(os.path.abspath(path))
    for old in os.listdir(folder):  # temporaries of this file left by writers that no longer run
        pid = old[len(name) + 2:].split(".")[0]
        if old.startswith(f".{name}.") and old.endswith(".tmp") and pid.isdigit() and not _pid_alive(int(pid)):
            os.remove(os.path.join(folder, old))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **meta)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise InputError(f"cannot write {path}: {e.strerror or e}; an earlier file there is left as "
                             f"it was") from None
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def load_npz(path: str, schema: str, digest: bool = False):
    """Read a handoff file (no pickles) and check its schema: a dict of NumPy arrays, or with ``digest`` the pair
    (arrays, sha256 of the bytes that were read), so that provenance names the file as it was used."""
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not an .npz file")
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError:  # numpy takes what is neither .npz nor .npy for pickled data
        raise InputError(f"{path} is not an .npz file") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"{path} is not a readable .npz file ({e})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InputError(f"{path} holds a single array (.npy), not an .npz file")
    try:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise InputError(f"{path} is not a readable .npz file ({e})") from None
    found = str(arrays.get("schema", "none"))
    if found != schema:
        raise InputError(f"{path} has schema '{found}', expected '{schema}'")
    return (arrays, hashlib.sha256(raw).hexdigest()) if digest else arrays


def check_arrays(name: str, arrays: dict, spec: dict, sizes: Optional[dict] = None) -> dict:
    """Check keys, dtypes and symbolic shapes, e.g. {"actions": ("float32", ("N", "act_dim"))}.

    Symbols are bound on first sight (or taken from ``sizes``) and must agree everywhere; floating
    arrays must be finite. Returns the bound sizes. Raises InputError naming the file and the key.
    """
    sizes = dict(sizes or {})
    for key, (dtype, shape) in spec.items():
        if key not in arrays:
            raise InputError(f"{name} has no key '{key}'")
        a = arrays[key]
        if a.dtype != np.dtype(dtype):
            raise InputError(f"{name}: '{key}' has dtype {a.dtype}, expected {dtype}")
        if a.ndim != len(shape):
            raise InputError(f"{name}: '{key}' has shape {a.shape}, expected {len(shape)} dimensions {shape}")
        for dim, want in zip(a.shape, shape):
            want = sizes.setdefault(want, dim) if isinstance(want, str) else want
            if dim != want:
                raise InputError(f"{name}: '{key}' has shape {a.shape}, expected {shape} with {sizes}")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            raise InputError(f"{name}: '{key}' contains NaN or infinite values")
    return sizes
# --- end shared block: npz_io ---


# --- shared block: dataset (keep identical across stages) ---
DATASET_SCHEMA = "empo/dataset/v1"
DATASET_SPEC = {
    "observations": ("float32", ("N", "obs_dim")),
    "actions": ("float32", ("N", "act_dim")),
    "rewards": ("float32", ("N",)),
    "next_observations": ("float32", ("N", "obs_dim")),
    "terminals": ("bool", ("N",)),
    "timeouts": ("bool", ("N",)),
    "episode_ids": ("int32", ("N",)),
    "behaviour": ("int32", ("N",)),
}


def load_dataset(source: str) -> tuple[dict, str]:
    """Load a data set from an ``.npz`` path, D4RL HDF5 files or Minari ids (both comma-separated); validate it.

    D4RL files (``*.hdf5``, read with h5py) and Minari ids (read from the local store, ``MINARI_DATASETS_PATH``
    or ~/.minari) are never downloaded. Several files or ids are concatenated and labelled by their index, the
    way D4RL medium-expert is medium + expert; a single Minari id takes ``behaviour`` from each episode's
    metadata where present, a single D4RL file has none (-1). Returns (arrays, sha256 of the arrays' bytes).
    """
    parts = [s.strip() for s in source.split(",") if s.strip()]
    hdf5 = [p.endswith((".hdf5", ".h5")) for p in parts]
    if any(hdf5) and not all(hdf5):
        raise InputError(f"--dataset {source} mixes D4RL .hdf5 files with other sources; give one kind")
    if parts and all(hdf5):
        data = _load_d4rl_hdf5(parts)
    elif source.endswith(".npz") or os.path.exists(source):
        arrays = load_npz(source, DATASET_SCHEMA)
        data = {k: arrays[k] for k in DATASET_SPEC if k in arrays}
    elif parts and all(re.fullmatch(r"([\w-]+/)*[\w-]+-v\d+", p) for p in parts):
        data = _load_minari(parts)
    else:  # neither a file nor something shaped like Minari's namespace/name-vN
        raise InputError(f"--dataset {source}: no such file (a Minari id looks like 'namespace/name-v0')")
    validate_dataset(source, data)
    digest = hashlib.sha256()
    for key in DATASET_SPEC:
        digest.update(np.ascontiguousarray(data[key]).tobytes())
    return data, digest.hexdigest()


def validate_dataset(name: str, data: dict) -> dict:
    """Schema, shapes, finiteness and trajectory structure; returns the sizes (N, obs_dim, act_dim)."""
    sizes = check_arrays(name, data, DATASET_SPEC)
    ids = data["episode_ids"]
    if sizes["N"] == 0:
        raise InputError(f"{name} holds no transitions")
    for key, dim in (("observations", "obs_dim"), ("actions", "act_dim")):
        if sizes[dim] == 0:
            raise InputError(f"{name}: '{key}' has no features (shape {data[key].shape})")
    steps = np.diff(ids)
    if ids[0] != 0 or np.any((steps != 0) & (steps != 1)):
        raise InputError(f"{name}: 'episode_ids' must start at 0 and count up by one, trajectories contiguous")
    last = np.r_[steps != 0, True]  # last row of each trajectory
    ends = data["terminals"] | data["timeouts"]
    if np.any(ends & ~last):
        raise InputError(f"{name}: a terminal or timeout flag stands inside a trajectory, not at its end")
    if np.any(last & ~ends):
        raise InputError(f"{name}: a trajectory ends with neither a terminal nor a timeout flag")
    if np.any(data["terminals"] & data["timeouts"]):
        raise InputError(f"{name}: a trajectory ends with both a terminal and a timeout flag (exactly one is allowed)")
    return sizes


def _load_minari(ids: list) -> dict:
    if not ids:
        raise InputError("no Minari data set id was given")
    parts, first_episode = [], 0
    for index, dataset_id in enumerate(ids):
        dataset = _open_minari(dataset_id)
        meta = list(dataset.storage.get_episode_metadata(dataset.episode_indices)) if len(ids) == 1 else None
        for j, ep in enumerate(dataset.iterate_episodes()):
            if isinstance(ep.observations, dict) or isinstance(ep.actions, dict):
                raise InputError(f"Minari data set '{dataset_id}' has dictionary observations or actions")
            n = len(ep.rewards)
            obs = np.asarray(ep.observations, np.float32).reshape(n + 1, -1)
            term = np.asarray(ep.terminations, bool)
            label = index if meta is None else int(meta[j].get("behaviour", -1))
            parts.append(dict(
                observations=obs[:-1], actions=np.asarray(ep.actions, np.float32).reshape(n, -1),
                rewards=np.asarray(ep.rewards, np.float32), next_observations=obs[1:], terminals=term,
                # a trajectory that stops without a terminal is a timeout, whatever the flags say; a terminal never is
                timeouts=(np.asarray(ep.truncations, bool) | (np.arange(n) == n - 1)) & ~term,
                episode_ids=np.full(n, first_episode, np.int32), behaviour=np.full(n, label, np.int32)))
            first_episode += 1
    if not parts:
        raise InputError(f"Minari data sets {ids} hold no episodes")
    return {k: np.concatenate([p[k] for p in parts]) for k in DATASET_SPEC}


def _open_minari(dataset_id: str):
    """``minari.load_dataset(dataset_id, download=False)`` with one-sentence errors."""
    import minari

    try:
        return minari.load_dataset(dataset_id, download=False)
    except FileNotFoundError:
        raise InputError(f"Minari data set '{dataset_id}' is not stored locally; download it with "
                         f"`minari download {dataset_id}` (local store: MINARI_DATASETS_PATH or ~/.minari)") from None
    except Exception as e:  # a damaged local copy: say which
        raise InputError(f"Minari data set '{dataset_id}' could not be read ({e})") from None


D4RL_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def _load_d4rl_hdf5(paths: list) -> dict:
    """D4RL HDF5 files concatenated, each file's index its ``behaviour`` label (-1 when there is one file).

    Each file is cut into trajectories after every row flagged ``terminals`` or ``timeouts``; rows after the
    last flag (D4RL cuts files at a row count) are one more trajectory, ended as a timeout. Other keys
    (``infos/*``, ``metadata/*``) are ignored. Both flags on one row is an error, as are a missing key,
    sizes that disagree, NaN and flags other than 0 / 1: one sentence naming the file, the key and the row.
    """
    parts, first_episode = [], 0
    for index, path in enumerate(paths):
        arrays = _read_d4rl_file(path)
        if parts and arrays["observations"].shape[1:] != parts[0]["observations"].shape[1:]:
            raise InputError(f"{path} has {arrays['observations'].shape[1]}-dim observations, {paths[0]} has "
                             f"{parts[0]['observations'].shape[1]}: files of different tasks")
        if parts and arrays["actions"].shape[1:] != parts[0]["actions"].shape[1:]:
            raise InputError(f"{path} has {arrays['actions'].shape[1]}-dim actions, {paths[0]} has "
                             f"{parts[0]['actions'].shape[1]}: files of different tasks")
        n, term = len(arrays["rewards"]), arrays["terminals"]
        both = np.flatnonzero(term & arrays["timeouts"])
        if both.size:
            raise InputError(f"{path}: row {both[0]} has both 'terminals' and 'timeouts' set; a trajectory ends "
                             f"with one of them")
        arrays["timeouts"][-1] |= ~term[-1]  # the last trajectory stops with the file: a timeout
        ends = term | arrays["timeouts"]
        arrays["episode_ids"] = (first_episode + np.r_[0, np.cumsum(ends[:-1])]).astype(np.int32)
        arrays["behaviour"] = np.full(n, index if len(paths) > 1 else -1, np.int32)
        first_episode = int(arrays["episode_ids"][-1]) + 1
        parts.append(arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in DATASET_SPEC}


def _read_d4rl_file(path: str) -> dict:
    """The six D4RL keys of one HDF5 file as float32 [N, ...] / bool [N] arrays, checked."""
    import h5py

    if not os.path.isfile(path):
        name = os.path.basename(path)
        url = ("; D4RL's copy: http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/" + name
               if name.endswith("-v2.hdf5") and name.split("_")[0] in ("halfcheetah", "hopper", "walker2d", "ant")
               else "")
        raise InputError(f"{path} does not exist{url}")
    arrays = {}
    try:
        with h5py.File(path, "r") as f:
            for key in D4RL_KEYS:
                if not isinstance(f.get(key), h5py.Dataset):
                    raise InputError(f"{path} has no key '{key}' (a D4RL v2 file has {', '.join(D4RL_KEYS)})")
                arrays[key] = np.asarray(f[key][()])
    except OSError as e:
        raise InputError(f"{path} is not a readable HDF5 file ({e})") from None
    n = len(arrays["observations"]) if arrays["observations"].ndim else 0
    if n == 0:
        raise InputError(f"{path} holds no transitions")
    for key, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise InputError(f"{path}: '{key}' has dtype {a.dtype}, expected numbers")
        if key in ("rewards", "terminals", "timeouts") and a.ndim == 2 and a.shape[1] == 1:
            a = arrays[key] = a[:, 0]  # [N, 1] -> [N]
        want = 1 if key in ("rewards", "terminals", "timeouts") else 2
        if a.ndim != want or len(a) != n:
            raise InputError(f"{path}: '{key}' has shape {a.shape}, expected {[n] if want == 1 else [n, 'dim']} "
                             f"('observations' has {n} rows)")
        if key in ("terminals", "timeouts"):
            bad = np.flatnonzero((a != 0) & (a != 1))
            if bad.size:
                raise InputError(f"{path}: '{key}' is {a[bad[0]]} at row {bad[0]}, expected 0 or 1")
            arrays[key] = a.astype(bool)
        else:
            arrays[key] = a = a.astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(a.reshape(n, -1)).all(axis=1))
            if bad.size:
                raise InputError(f"{path}: '{key}' contains NaN or infinite values (row {bad[0]})")
    if arrays["next_observations"].shape != arrays["observations"].shape:
        raise InputError(f"{path}: 'next_observations' has shape {arrays['next_observations'].shape}, "
                         f"'observations' {arrays['observations'].shape}")
    return arrays
# --- end shared block: dataset ---


# --- shared block: run_utils (keep identical across stages) ---
def make_writer(log_dir: str, args):
    """A tensorboardX writer with the hyperparameters logged as a text table."""
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(log_dir)
    rows = "\n".join(f"|{k}|{v}|" for k, v in sorted(asdict(args).items()))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + rows)
    return writer


def seed_shardings(num_seeds: int):
    """(per-seed sharding, replicated sharding) over as many devices as evenly divide num_seeds."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    count = max(d for d in range(1, len(devices) + 1) if num_seeds % d == 0)
    mesh = Mesh(np.array(devices[:count]), ("seeds",))
    return NamedSharding(mesh, PartitionSpec("seeds")), NamedSharding(mesh, PartitionSpec())


class Progress:
    """One status line per call: done/total, elapsed, estimated time left, and extra fields.

    kinds (one label per unit, optional) estimate each kind of unit by the mean time of the finished units
    of that kind (by all finished units until one is seen); first is the number of units finished before
    this process started (a resumed run), which the estimate leaves out. Hand-written because tqdm and rich
    estimate from one mean rate, which misses by hours when a SARSA call takes 1 s and a PPO epoch 80 s.
    """

    def __init__(self, total: int, name: str, kinds=None, first: int = 0):
        self.total, self.name, self.kinds = total, name, list(kinds) if kinds else [""] * total
        self.start = self.last = time.perf_counter()
        self.done, self.times = first, {}

    def __call__(self, done: int, **fields) -> None:
        now = time.perf_counter()
        for kind in self.kinds[self.done: done]:  # the time since the last call, shared by its units
            self.times.setdefault(kind, []).append((now - self.last) / max(done - self.done, 1))
        self.done, self.last = done, now
        every = [t for times in self.times.values() for t in times] or [0.0]
        left = sum(np.mean(self.times.get(kind, every)) for kind in self.kinds[done:])
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        print(f"[{self.name}] {done}/{self.total} ({100 * done / self.total:.0f}%) "
              f"elapsed {now - self.start:.0f}s, left ~{left:.0f}s {extra}", flush=True)


def flatten_params(prefix: str, params) -> dict:
    """{'prefix/Dense_0/kernel': array, ...} (flax.traverse_util, '/' separated)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {f"{prefix}/{k}": np.asarray(v) for k, v in flat.items()}


def unflatten_params(prefix: str, arrays: dict):
    flat = {k[len(prefix) + 1:]: jnp.asarray(v) for k, v in arrays.items() if k.startswith(prefix + "/")}
    return traverse_util.unflatten_dict(flat, sep="/")


def cli(args_class, presets: dict):
    """tyro's command line with the defaults of the ``--preset`` named on it (a column of the paper's Table 4).

    The preset is read first, then every flag is parsed against that preset's defaults, so ``--help`` shows
    them and a flag given on the command line always wins over its preset.
    """
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", choices=sorted(presets), default=next(iter(presets)))
    return tyro.cli(args_class, default=presets[parser.parse_known_args()[0].preset])


def check_flags(args, at_least: Optional[dict] = None) -> None:
    """Every float flag is a finite number (NaN passes every comparison, so range checks alone let it through), every
    integer flag fits the int32 of the jitted code, the seeds fit JAX's 32-bit seeds, and each flag named in
    ``at_least`` is at least its value."""
    for name, value in asdict(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**31:  # int32 inside jit
            raise InputError(f"--{name.replace('_', '-')} must be below 2^31, got {value}")
    if args.seed < 0 or args.seed + args.num_seeds > 2**31:  # JAX seeds are 32-bit integers
        raise InputError(f"--seed {args.seed} and --num-seeds {args.num_seeds} must keep every seed in 0..2^31-1")
    for name, low in (at_least or {}).items():
        if getattr(args, name) < low:
            raise InputError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")


def check_fits(what: str, nbytes: float) -> None:
    """Refuse, before any work, a request whose arrays alone would exceed this machine's memory."""
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > have:
        raise InputError(f"{what} needs about {nbytes / 2**30:.3g} GiB, more than this machine's "
                         f"{have / 2**30:.0f} GiB")


def run(main, args) -> None:
    """``main(args)`` as a command: bad input, a full memory and Ctrl-C end in one sentence, not a traceback."""
    try:
        main(args)
    except InputError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        path = checkpoint_path(args.out)
        if os.path.exists(path):
            sys.exit(f"interrupted: progress is saved in {path}; run the same command with --resume to continue")
        sys.exit("interrupted before the first checkpoint; nothing was saved")
    except Exception as e:  # XLA's allocation failures and NumPy's MemoryError
        if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
            sys.exit(f"error: out of memory ({type(e).__name__}); lower the flags that size the run (--num-seeds, "
                     f"--batch-size, the chunk sizes, the schedule's lengths)")
        raise
# --- end shared block: run_utils ---


# --- shared block: checkpoint (keep identical across stages) ---
# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood for
# by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ("out", "resume", "log_every", "checkpoint_every", "preset", "eval_episodes", "eval_env", "sample",
                 "eval_at", "ref_min_score", "ref_max_score", "dataset", "cluster", "ppo")


def checkpoint_path(out: str) -> str:
    """The checkpoint of the run that writes ``out``: beside it and named after it (x.npz -> x.checkpoint.npz)."""
    return os.path.splitext(os.path.abspath(out))[0] + ".checkpoint.npz"


def run_identity(args, inputs: dict) -> dict:
    """What a checkpoint belongs to: the output path, the inputs' sha256 and every flag that changes the result."""
    flags = {k: v for k, v in asdict(args).items() if k not in NEUTRAL_FLAGS}
    identity = {"out": os.path.abspath(args.out), "inputs": inputs, "flags": flags}
    return json.loads(json.dumps(identity, default=str, sort_keys=True))


def save_checkpoint(path: str, state, unit: int, schema: str, identity: dict) -> None:
    """The leaves of a train state, the number of finished units of the schedule and the run's identity, atomically."""
    leaves = jax.tree.leaves(jax.device_get(state))
    arrays = {f"leaf_{i:04d}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays.update(unit=np.int64(unit), identity=np.array(json.dumps(identity, sort_keys=True)))
    save_npz(path, arrays, schema, {})


def resume_checkpoint(args, state_template, schema: str, identity: dict, total: int):
    """(checkpoint path, state, finished units): with --resume and a checkpoint of this run, its state and progress;
    otherwise (path, state_template, 0). A checkpoint of another run (other output, inputs or flags), of other
    sizes, or past this run's schedule of ``total`` units is refused in one sentence."""
    path = checkpoint_path(args.out)
    if not (args.resume and os.path.exists(path)):
        return path, state_template, 0
    arrays = load_npz(path, schema)
    try:
        stored = json.loads(str(arrays.get("identity", "{}")))
    except ValueError:
        stored = {}
    old, new = _flat(stored), _flat(identity)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            show = lambda v: "(none)" if v is None else (f"{v[:12]}..." if isinstance(v, str) and len(v) > 24 else v)
            raise InputError(f"{path} belongs to another run ({key} is {show(old.get(key))} there, "
                             f"{show(new.get(key))} here); delete it or drop --resume")
    unit = int(arrays.get("unit", -1))
    if not 0 <= unit <= total:
        raise InputError(f"{path} records {unit} finished units, but this run's schedule has {total}; delete it or "
                         f"drop --resume")
    leaves, treedef = jax.tree.flatten(state_template)
    restored = [np.asarray(arrays.get(f"leaf_{i:04d}")) for i in range(len(leaves))]
    if sum(k.startswith("leaf_") for k in arrays) != len(leaves) or any(
            a.shape != np.shape(b) for a, b in zip(restored, leaves)):
        raise InputError(f"{path} was written by a run with other sizes; delete it or drop --resume")
    print(f"resumed from {path} at unit {unit}/{total}")
    return path, jax.tree.unflatten(treedef, restored), unit


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'a.b': leaf} of a nested dict."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out
# --- end shared block: checkpoint ---


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
