"""Stage 2 of EMPO: improve each behaviour cluster with SARSA Q, Monte-Carlo V and full-batch PPO.

Paper: §3.2 (Algorithm 2, Eq. 10-14), §4.3.2 and Figure 4 (full batch against minibatches), Table 4.

Input   a data set (``--dataset``, as stage 1) and ``--cluster cluster.npz`` (schema empo/cluster/v1,
        made from that data set: its sha256 is checked).
Output  ``ppo.npz`` (schema empo/ppo/v1) and TensorBoard logs in ``<out folder>/ppo``:
        pi/params/... [S, K, ...] the improved policies pi_L(.|s, z; Theta'), q/params/... [S, ...]
        Q(s, a; psi) -> R^K, v/params/... [S, ...] V(s; phi) -> R^K, arch/* (what rebuilds them),
        cluster_run [S] (the stage-1 run each run improved), eval/* (rollouts of beta_z and pi_L
        per cluster on the navigation task), plus args, producer and inputs.

Equation map
    Eq. (10)  R(s_i) = sum_t gamma^t r_{i+t} (interpretation 8)     -> mc_returns
    Eq. (11)  l_Q = [Q(s,a)_A(s,a) - (r + gamma Q_bar(s',a')_A(s',a'))]^2 -> sarsa_target, q_loss
    Eq. (12)  l_V = [V(s)_A(s,a) - R(s)]^2                          -> v_loss
    Eq. (13)  psi_bar <- (1 - tau_Q) psi_bar + tau_Q psi, every n_Q -> make_q_chunk
    Eq. (14)  l_pi = min(rho A, clip(rho, 1-eps, 1+eps) A), maximised -> ppo_surrogate

Interpretations and deviations
    1. Networks: the stage-1 architecture (hidden layers and width from cluster.npz). Q takes the
       standardised state and the action divided by the action scale; Q and V have K linear heads.
       pi_L starts from the stage-1 policies Theta_hat* (Algorithm 2, line 2).
    2. Value scale: Q and V are trained in units of c = std of the Monte-Carlo returns R(s) over the
       data set (rewards divided by c), so that targets are O(1) for Adam; c is stored in
       arch/value_scale and every logged value or advantage is multiplied back into reward units.
       The PPO step is unchanged by a constant scale of the advantage, up to Adam's epsilon.
    3. Trajectory ends: after a terminal (goal reached) the SARSA target is r alone. The data set
       holds no next action after a timeout, so there a' is drawn once, before training, from
       beta(.|s', A(s,a); Theta_hat*), the stage-1 policy of the trajectory's cluster, and the target
       bootstraps through it. A(s', a') = A(s, a) inside a trajectory because assignments are per
       trajectory (Eq. 9). Monte-Carlo returns (Eq. 10) stop at every trajectory end.
    4. PPO: a' ~ beta(.|s, A(s,a); Theta_hat*) is drawn afresh every epoch for every transition
       (noise fixed per row and epoch, so chunking never changes the gradient). rho and the
       advantage use the unclipped a' (the density it was drawn from), Q is evaluated at the
       action the environment would execute, clip(a', -max|a|, max|a|). The advantage is
       (Q(s,a') - V(s))_A(s,a) without normalisation (the paper mentions none). eps_c = 0.2
       (PPO's usual value; not in Table 4). One epoch of full-batch PPO is one Adam step on the
       mean over all N transitions, the gradient accumulated over chunks of rows inside jit.
       --ppo-minibatch B instead takes ceil(N / B) Adam steps per epoch over a shuffled pass.
    5. Q is trained with minibatches drawn uniformly with replacement, N_Q steps; V for N_V epochs
       of ceil(N / B) such steps; one Adam optimiser per network.
    6. Seeds: run i uses seed --seed + i and clustering run --first-run + i of cluster.npz (all runs
       share run 0 when cluster.npz holds one). Runs are vmapped and sharded over the visible devices.
       --seed 3 --first-run 2 --num-seeds 8 adds seeds 3..10 to an earlier run of seeds 1 and 2.
    7. Evaluation (navigation task only, never used for selection): beta_z and pi_L(.|s, z) run
       alone from s_0 with their mean action (eval/{beta,pi}_*) and with actions drawn from them
       (eval/{beta,pi}_sampled_*, the paper's protocol), --eval-episodes rollouts each; --eval-at adds pi_L
       at chosen PPO epochs (eval/sweep_*, Figure 4).
    8. Eq. (10) as printed, R(s_i) = sum_{t=0}^{T-i} gamma^t r_t, indexes the rewards from the start of
       the trajectory whatever i is; read as the return from s_i, R(s_i) = sum_{t=0}^{T-i} gamma^t r_{i+t}
       (the sample return of §3.2 that V(s) regresses on, Eq. 12), i.e. R_i = r_i + gamma R_{i+1}.

Example
    python empo_ppo.py --dataset data/nav.npz --cluster runs/nav/cluster.npz --out runs/nav/ppo.npz
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

import gym_eval
from empo_io import (
    InputError,
    Progress,
    check_arrays,
    check_fits,
    check_flags,
    check_writable,
    checkpoint_path,
    cli,
    flatten_params,
    load_dataset,
    load_npz,
    make_writer,
    resume_checkpoint,
    run,
    run_identity,
    save_checkpoint,
    save_npz,
    seed_shardings,
    unflatten_params,
)


@dataclass
class Args:
    """Stage 2 of EMPO: SARSA Q, Monte-Carlo V and full-batch PPO for every cluster (Algorithm 2)."""

    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = Table 4's didactic column (the navigation task), 'd4rl' = its D4RL
    column (gamma 0.99, N_Q 1.5M, N_V 40, N_pi 100; halfcheetah medium + expert, D4RL v2 files in data/d4rl);
    flags given on the command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz, D4RL .hdf5 files or Minari ids (as stage 1), the one stage 1 used"""
    cluster: str = "runs/nav/cluster.npz"
    """stage-1 output (schema empo/cluster/v1): the policies Theta_hat* and the assignments A(s, a)"""
    out: str = "runs/nav/ppo.npz"
    """output file (schema empo/ppo/v1); TensorBoard logs go to the folder 'ppo' beside it"""
    seed: int = 1
    """random seed of the first run; run i uses seed + i and clustering run first_run + i of --cluster"""
    first_run: int = 0
    """index of the clustering run of --cluster that run 0 improves (to add seeds to an earlier run)"""
    num_seeds: int = 1
    """independent runs in one vmapped call, sharded over the visible devices"""
    resume: bool = False
    """continue from the checkpoint beside --out (written after every chunk of steps and epoch)"""
    eval_episodes: int = 100
    """episodes of each beta_z and pi_L(.|s, z): JAX rollouts from s_0 (navigation task) or episodes in the
    Minari data set's Gymnasium environment (MuJoCo); 0 skips the evaluation"""
    ref_min_score: Optional[float] = None
    """reference return of score 0 for the normalised score (default: D4RL's random return for a D4RL task's
    environment, else the Minari data set's ref_min_score)"""
    ref_max_score: Optional[float] = None
    """reference return of score 100 for the normalised score (default: D4RL's expert return for a D4RL task's
    environment, else the Minari data set's ref_max_score)"""
    eval_at: str = ""
    """PPO epochs at which to evaluate pi_L as well (comma-separated, e.g. 1,2,5,10,20,50,100; 0 = the stage-1
    policies): both protocols, stored in eval/sweep_* (Figure 4 from one run; navigation task only)"""
    eval_env: str = ""
    """Gymnasium environment to evaluate in (default: for D4RL files the task's -v4 environment from the file
    names, e.g. halfcheetah_*.hdf5 -> HalfCheetah-v4; for Minari ids the recorded one; an .npz of a MuJoCo task
    needs it)"""
    # --- algorithm (Table 4, didactic column) ---
    gamma: float = 0.999
    """gamma: discount factor"""
    q_steps: int = 200_000
    """N_Q: SARSA steps of the action-value network Q(s, a; psi)"""
    q_target_every: int = 2
    """n_Q: the target network psi_bar is updated every n_Q steps (Eq. 13)"""
    q_target_rate: float = 0.005
    """tau_Q: rate of the target update psi_bar <- (1 - tau_Q) psi_bar + tau_Q psi (Eq. 13)"""
    v_epochs: int = 10
    """N_V: epochs of Monte-Carlo regression of V(s; phi) (Eq. 12)"""
    pi_epochs: int = 10
    """N_pi: PPO epochs (Eq. 14); one full-batch Adam step each unless --ppo-minibatch is set"""
    clip: float = 0.2
    """eps_c: PPO clipping range (Eq. 14; not in Table 4)"""
    batch_size: int = 256
    """B: minibatch size of Q and V"""
    learning_rate: float = 3e-4
    """alpha: Adam learning rate of Q, V and pi_L"""
    ppo_minibatch: int = 0
    """0: full-batch PPO, every transition in every step (the paper); B > 0: minibatches of B rows,
    ceil(N / B) steps per epoch (the comparison of Figure 4)"""
    # --- speed and memory ---
    steps_per_call: int = 5_000
    """SARSA steps per jitted call: one log line and one checkpoint each"""
    chunk: int = 131_072
    """rows per chunk of the full-batch passes (gradient accumulation inside jit; the same gradient)"""


PRESETS = {  # Table 4: the didactic column and the D4RL column
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 cluster="runs/halfcheetah-medium-expert/cluster.npz", out="runs/halfcheetah-medium-expert/ppo.npz",
                 eval_episodes=10, gamma=0.99, q_steps=1_500_000, v_epochs=40, pi_epochs=100),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood
# for by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ('out', 'resume', 'preset', 'eval_episodes', 'eval_env', 'eval_at', 'ref_min_score',
                 'ref_max_score', 'dataset', 'cluster')


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------

@struct.dataclass
class TrainState:
    q: Any  # Q(s, a; psi) -> R^K
    q_target: Any  # psi_bar
    q_opt: Any
    v: Any  # V(s; phi) -> R^K
    v_opt: Any
    pi: Any  # pi_L(.|s, z; Theta'), stacked on a leading axis [K, ...]
    pi_opt: Any
    q_step: jax.Array  # [] int32, SARSA steps taken (Eq. 13 counts them)


@struct.dataclass
class Data:
    """The data set on the device (shared by all runs), padded to a whole number of chunks."""

    obs: jax.Array  # [N_pad, obs_dim], standardised
    actions: jax.Array  # [N_pad, act_dim]
    rewards: jax.Array  # [N_pad], divided by the value scale
    next_obs: jax.Array  # [N_pad, obs_dim], standardised
    next_actions: jax.Array  # [N_pad, act_dim], a' of the same trajectory (0 after its last row)
    bootstrap: jax.Array  # [N_pad] float, 0 after a terminal, 1 otherwise
    timeout_end: jax.Array  # [N_pad] bool, the last row of a trajectory cut by a timeout
    returns: jax.Array  # [N_pad] R(s) (Eq. 10), divided by the value scale
    valid: jax.Array  # [N_pad] float, 0 on padding rows


@struct.dataclass
class RunInputs:
    """What differs between runs: the stage-1 policies, the assignments and the SARSA next actions."""

    beta: Any  # Theta_hat*, stacked [K, ...]
    assign: jax.Array  # [N_pad] int32, A(s, a)
    next_actions: jax.Array  # [N_pad, act_dim], a' with the timeout rows filled from beta


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


def gaussian_log_prob(mean, log_std, action):
    """log N(action; mean, exp(log_std)^2), summed over the last (action) axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z * z - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


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
# Losses (one function per equation)
# ----------------------------------------------------------------------------------------------

@jax.jit
def mc_returns(rewards, last, gamma: float):
    """Eq. (10): R(s_i) = r_i + gamma R(s_{i+1}) inside a trajectory, R = r on its last row.

    rewards [N], last [N] bool (the last row of a trajectory). A reverse associative scan of the
    linear recurrence R_i = a_i R_{i+1} + r_i with a_i = gamma (1 - last_i): O(log N) depth, one
    compiled call (run op by op, the scan's levels cost a compilation each).
    """
    a = gamma * (1.0 - last.astype(rewards.dtype))

    def combine(right, left):  # compose R -> a_l (a_r R + b_r) + b_l
        a_r, b_r = right
        a_l, b_l = left
        return a_l * a_r, a_l * b_r + b_l

    return jax.lax.associative_scan(combine, (a, rewards), reverse=True)[1]  # Eq. (10)


def select(values, z):
    """values [B, K], z [B] -> values[b, z_b], i.e. values^T e_z (the cluster's head)."""
    return jnp.take_along_axis(values, z[:, None], axis=1)[:, 0]


def sarsa_target(rewards, bootstrap, q_next, z, gamma: float):
    """Eq. (11) target: r + gamma Q(s', a'; psi_bar)^T e_A(s',a'); no bootstrap after a terminal."""
    return rewards + gamma * bootstrap * select(q_next, z)  # Eq. (11)


def q_loss(q_sa, target):
    """Eq. (11): mean of [Q(s, a; psi)^T e_A(s,a) - target]^2 over the batch (target held fixed)."""
    return jnp.mean((q_sa - jax.lax.stop_gradient(target)) ** 2)


def v_loss(v_s, returns):
    """Eq. (12): mean of [V(s; phi)^T e_A(s,a) - R(s)]^2 over the batch."""
    return jnp.mean((v_s - returns) ** 2)  # Eq. (12)


def ppo_surrogate(log_pi, log_beta, advantage, clip: float):
    """Eq. (14): min(rho A, clip(rho, 1 - eps_c, 1 + eps_c) A) per row, rho = pi_L(a'|s,z) / beta(a'|s,z)."""
    ratio = jnp.exp(log_pi - log_beta)
    return jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage)  # Eq. (14)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(N_p || N_q) of diagonal Gaussians, summed over the last axis."""
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    return jnp.sum(log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5, axis=-1)


# ----------------------------------------------------------------------------------------------
# Training functions
# ----------------------------------------------------------------------------------------------

def make_networks(hidden_dim: int, hidden_layers: int, k: int, act_dim: int, action_scale: tuple):
    policy = GaussianPolicy(act_dim, action_scale, hidden_dim, hidden_layers)
    q_net = MLP(hidden_dim, hidden_layers, k)  # Q(s, a) on [s, a / action_scale]
    v_net = MLP(hidden_dim, hidden_layers, k)  # V(s)
    return policy, q_net, v_net


def make_init(args: Args, q_net, v_net, obs_dim: int, act_dim: int):
    tx = optax.adam(args.learning_rate)

    def init(key, beta) -> TrainState:
        key_q, key_v = jax.random.split(key)
        q = q_net.init(key_q, jnp.zeros((1, obs_dim + act_dim)))
        v = v_net.init(key_v, jnp.zeros((1, obs_dim)))
        return TrainState(q=q, q_target=q, q_opt=tx.init(q), v=v, v_opt=tx.init(v), pi=beta,
                          pi_opt=tx.init(beta), q_step=jnp.int32(0))  # Algorithm 2, lines 1-2

    return init, tx


def make_q_chunk(args: Args, q_net, tx, num_rows: int, action_scale):
    """Algorithm 2, lines 3-9: ``steps`` SARSA updates (Eq. 11) with the target update (Eq. 13)."""
    scale = jnp.asarray(action_scale, jnp.float32)

    def update(state: TrainState, key, run: RunInputs, data: Data):
        idx = jax.random.randint(key, (args.batch_size,), 0, num_rows)
        z = run.assign[idx]  # [B]; A(s', a') = A(s, a) inside a trajectory
        q_next = q_net.apply(state.q_target, jnp.concatenate([data.next_obs[idx], run.next_actions[idx] / scale], 1))
        target = sarsa_target(data.rewards[idx], data.bootstrap[idx], q_next, z, args.gamma)  # [B]
        inputs = jnp.concatenate([data.obs[idx], data.actions[idx] / scale], 1)
        loss, grads = jax.value_and_grad(lambda p: q_loss(select(q_net.apply(p, inputs), z), target))(state.q)
        updates, q_opt = tx.update(grads, state.q_opt, state.q)
        q = optax.apply_updates(state.q, updates)
        q_step = state.q_step + 1
        refresh = (q_step % args.q_target_every) == 0  # Eq. (13), every n_Q steps
        q_target = jax.tree.map(lambda t, p: jnp.where(refresh, (1 - args.q_target_rate) * t + args.q_target_rate * p,
                                                       t), state.q_target, q)  # Eq. (13)
        return state.replace(q=q, q_opt=q_opt, q_target=q_target, q_step=q_step), {
            "losses/q": loss, "charts/q_target_mean": jnp.mean(target)}

    def chunk(state: TrainState, key, run: RunInputs, data: Data, steps: int):
        state, metrics = jax.lax.scan(lambda s, k: update(s, k, run, data), state, jax.random.split(key, steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return chunk


def make_v_epoch(args: Args, v_net, tx, num_rows: int):
    """Algorithm 2, lines 11-14: one epoch of ceil(N / B) minibatch steps on Eq. (12)."""
    steps = math.ceil(num_rows / args.batch_size)

    def update(state: TrainState, key, run: RunInputs, data: Data):
        idx = jax.random.randint(key, (args.batch_size,), 0, num_rows)
        loss, grads = jax.value_and_grad(
            lambda p: v_loss(select(v_net.apply(p, data.obs[idx]), run.assign[idx]), data.returns[idx]))(state.v)
        updates, v_opt = tx.update(grads, state.v_opt, state.v)
        return state.replace(v=optax.apply_updates(state.v, updates), v_opt=v_opt), {"losses/v": loss}

    def epoch(state: TrainState, key, run: RunInputs, data: Data):
        state, metrics = jax.lax.scan(lambda s, k: update(s, k, run, data), state, jax.random.split(key, steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return epoch


def make_ppo_epoch(args: Args, policy, q_net, v_net, tx, num_rows: int, k: int, action_scale):
    """Algorithm 2, lines 15-17: one PPO epoch (Eq. 14) over every transition of the data set.

    Full batch: the gradient of the mean surrogate over all N rows, accumulated over chunks of
    ``args.chunk`` rows in a lax.scan, then one Adam step. Minibatch: ceil(N / B) Adam steps over a
    shuffled pass. Returns epoch(state, key, run, data) -> (state, metrics).
    """
    scale = jnp.asarray(action_scale, jnp.float32)

    def rows_loss(pi_params, state: TrainState, run: RunInputs, obs, z, noise, valid):
        """-(sum of the surrogate over the rows) / N, and the rows' statistics (sums)."""
        beta_mean, beta_log_std = stacked_apply(policy, run.beta, obs, z)
        a_new = beta_mean + jnp.exp(beta_log_std) * noise  # a' ~ beta(.|s, A(s,a); Theta_hat*)
        log_beta = gaussian_log_prob(beta_mean, beta_log_std, a_new)
        a_env = jnp.clip(a_new, -scale, scale)
        adv = select(q_net.apply(state.q, jnp.concatenate([obs, a_env / scale], 1)) - v_net.apply(state.v, obs), z)
        pi_mean, pi_log_std = stacked_apply(policy, pi_params, obs, z)
        log_pi = gaussian_log_prob(pi_mean, pi_log_std, a_new)
        surrogate = ppo_surrogate(log_pi, log_beta, adv, args.clip)  # [rows]
        ratio = jnp.exp(log_pi - log_beta)
        one_hot = jax.nn.one_hot(z, k) * valid[:, None]  # [rows, K]
        stats = {
            "surrogate": jnp.sum(valid * surrogate), "ratio": jnp.sum(valid * ratio),
            "ratio_min": jnp.min(jnp.where(valid > 0, ratio, jnp.inf)),
            "ratio_max": jnp.max(jnp.where(valid > 0, ratio, -jnp.inf)),
            "clipped": jnp.sum(valid * (jnp.abs(ratio - 1.0) > args.clip)),
            "count_z": one_hot.sum(0), "adv_z": one_hot.T @ adv, "adv2_z": one_hot.T @ (adv * adv),
            "kl_z": one_hot.T @ gaussian_kl(pi_mean, pi_log_std, beta_mean, beta_log_std),
        }
        return -stats["surrogate"] / num_rows, stats

    def chunked(x):
        return x.reshape((-1, args.chunk) + x.shape[1:])

    def full_batch(state: TrainState, key, run: RunInputs, data: Data):
        noise = jax.random.normal(key, data.actions.shape)  # one a' per row and epoch

        def accumulate(grads, rows):
            obs, z, eps, valid = rows
            g, stats = jax.grad(rows_loss, has_aux=True)(state.pi, state, run, obs, z, eps, valid)
            return jax.tree.map(jnp.add, grads, g), stats

        zeros = jax.tree.map(jnp.zeros_like, state.pi)
        grads, stats = jax.lax.scan(accumulate, zeros, (chunked(data.obs), chunked(run.assign), chunked(noise),
                                                        chunked(data.valid)))
        updates, pi_opt = tx.update(grads, state.pi_opt, state.pi)
        state = state.replace(pi=optax.apply_updates(state.pi, updates), pi_opt=pi_opt)
        reduce = {"ratio_min": jnp.min, "ratio_max": jnp.max}
        return state, {name: reduce.get(name, lambda x: jnp.sum(x, 0))(x) for name, x in stats.items()}

    def minibatch(state: TrainState, key, run: RunInputs, data: Data):
        key_noise, key_perm = jax.random.split(key)
        noise = jax.random.normal(key_noise, data.actions.shape)
        steps = math.ceil(num_rows / args.ppo_minibatch)
        perm = jax.random.permutation(key_perm, num_rows)
        perm = jnp.concatenate([perm, perm[: steps * args.ppo_minibatch - num_rows]]).reshape(steps, -1)

        def update(state: TrainState, idx):
            g, stats = jax.grad(rows_loss, has_aux=True)(state.pi, state, run, data.obs[idx], run.assign[idx],
                                                         noise[idx], data.valid[idx])
            g = jax.tree.map(lambda x: x * num_rows / idx.shape[0], g)  # the minibatch mean
            updates, pi_opt = tx.update(g, state.pi_opt, state.pi)
            return state.replace(pi=optax.apply_updates(state.pi, updates), pi_opt=pi_opt), stats

        state, stats = jax.lax.scan(update, state, perm)
        reduce = {"ratio_min": jnp.min, "ratio_max": jnp.max}
        return state, {name: reduce.get(name, lambda x: jnp.sum(x, 0))(x) for name, x in stats.items()}

    return minibatch if args.ppo_minibatch > 0 else full_batch


def make_next_actions(policy, action_scale, chunk: int):
    """Fill a' on the last row of every timeout-cut trajectory with a draw from beta(.|s', A(s,a)).

    Chunks of ``chunk`` rows (lax.map) bound the memory of the pass over the data set.
    """
    scale = jnp.asarray(action_scale, jnp.float32)

    def fill(key, beta, assign, data: Data):
        chunked = lambda x: x.reshape((-1, chunk) + x.shape[1:])

        def rows(inputs):
            next_obs, z, noise = inputs
            mean, log_std = stacked_apply(policy, beta, next_obs, z)
            return jnp.clip(mean + jnp.exp(log_std) * noise, -scale, scale)

        noise = jax.random.normal(key, data.next_actions.shape)
        drawn = jax.lax.map(rows, (chunked(data.next_obs), chunked(assign), chunked(noise)))
        return jnp.where(data.timeout_end[:, None], drawn.reshape(data.next_actions.shape), data.next_actions)

    return fill


# ----------------------------------------------------------------------------------------------
# Inputs, evaluation and checkpoints
# ----------------------------------------------------------------------------------------------

def load_cluster(path: str, data_sha: str, data_sizes: dict) -> tuple[dict, dict, str]:
    """Read and validate cluster.npz against the data set (sizes N, E, obs_dim, act_dim); returns (arrays, sizes with
    S and K, sha256 of the file as read)."""
    arrays, digest = load_npz(path, "empo/cluster/v1", digest=True)
    spec = {"posterior": ("float32", ("S", "E", "K")), "assignments": ("int32", ("S", "N")),
            "arch/k": ("int64", ()), "arch/hidden_dim": ("int64", ()), "arch/hidden_layers": ("int64", ()),
            "arch/obs_mean": ("float32", ("obs_dim",)), "arch/obs_std": ("float32", ("obs_dim",)),
            "arch/action_scale": ("float32", ("act_dim",))}
    if not any(key.startswith("policy/params/") for key in arrays):
        raise InputError(f"{path} has no key 'policy/params/...'")
    sizes = check_arrays(path, arrays, spec, data_sizes)
    check_arch(path, arrays)
    if int(arrays["arch/k"]) != sizes["K"]:
        raise InputError(f"{path}: 'arch/k' is {int(arrays['arch/k'])} but its arrays hold K={sizes['K']} clusters")
    hidden = int(arrays["arch/hidden_dim"]), int(arrays["arch/hidden_layers"])
    policy = GaussianPolicy(sizes["act_dim"], (1.0,) * sizes["act_dim"], *hidden)
    check_param_shapes(path, arrays, "policy/params", param_shapes(policy, sizes["obs_dim"]), 2)
    if any(key.startswith("classifier/params/") for key in arrays):  # not used here; stage 3 reads it
        check_param_shapes(path, arrays, "classifier/params", param_shapes(MLP(*hidden, sizes["K"]), sizes["obs_dim"]),
                           1)
    check_arrays(path, arrays, {key: ("float32", ("S", "K") + a.shape[2:] if key.startswith("policy/") else ("S",)
                                      + a.shape[1:]) for key, a in arrays.items() if "/params/" in key}, sizes)
    if arrays["assignments"].min() < 0 or arrays["assignments"].max() >= sizes["K"]:
        raise InputError(f"{path}: 'assignments' holds cluster numbers outside 0..{sizes['K'] - 1}")
    try:
        made_from = json.loads(str(arrays["inputs"])).get("dataset")
    except (KeyError, ValueError, AttributeError):
        made_from = None
    if made_from != data_sha:
        raise InputError(f"{path} was made from another data set (sha256 {str(made_from)[:12]}..., "
                         f"this one is {data_sha[:12]}...)")
    return arrays, sizes, digest


def make_evaluate(policy, obs_mean, obs_std, episodes: int, sample: bool = False):
    """Rollouts of one Gaussian policy from s_0 (nav_env.rollout) with its mean action, or with actions drawn from
    it (``sample``); vmap over seeds and K."""
    import nav_env

    def evaluate(params, key):
        def act(key_t, pos):
            mean, log_std = policy.apply(params, (pos - obs_mean) / obs_std)
            if sample:
                return mean + jnp.exp(log_std) * jax.random.normal(key_t, mean.shape)
            return mean

        out = nav_env.rollout(key, act, episodes)
        return {name: out[name] for name in ("return", "goal", "penalty_steps", "optimal_route", "positions",
                                             "length")}

    return jax.jit(jax.vmap(jax.vmap(evaluate, in_axes=(0, None)), in_axes=(0, 0)))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def validate_args(args: Args) -> None:
    """The flags alone, before anything is read: one sentence for the first one out of range."""
    at_least = dict(num_seeds=1, batch_size=1, chunk=1, steps_per_call=1, q_target_every=1, q_steps=0, v_epochs=0,
                    pi_epochs=0, eval_episodes=0, ppo_minibatch=0, first_run=0)
    check_flags(args, at_least)
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 < args.q_target_rate <= 1.0 or not 0.0 < args.clip < 1.0:
        raise InputError("need 0 <= --gamma <= 1, 0 < --q-target-rate <= 1 and 0 < --clip < 1")
    if not args.learning_rate > 0:
        raise InputError(f"--learning-rate must be positive, got {args.learning_rate}")
    sweep_epochs(args)


def sweep_epochs(args: Args) -> list:
    """The sorted PPO epochs of --eval-at (each in 0..N_pi, and only with an evaluation)."""
    if not args.eval_at.strip():
        return []
    try:
        epochs = sorted({int(x) for x in args.eval_at.split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--eval-at must be comma-separated whole numbers of PPO epochs, got '{args.eval_at}'"
                         ) from None
    if not epochs or epochs[0] < 0 or epochs[-1] > args.pi_epochs:
        raise InputError(f"--eval-at epochs must lie in 0..{args.pi_epochs} (--pi-epochs), got '{args.eval_at}'")
    if args.eval_episodes < 1:
        raise InputError("--eval-at needs --eval-episodes of at least 1")
    return epochs


def main(args: Args) -> dict:
    validate_args(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset, args.cluster])
    data_np, data_sha = load_dataset(args.dataset)
    n = len(data_np["rewards"])
    num_episodes = int(data_np["episode_ids"][-1]) + 1
    obs_dim, act_dim = data_np["observations"].shape[1], data_np["actions"].shape[1]
    cluster, sizes, cluster_sha = load_cluster(args.cluster, data_sha,
                                               dict(N=n, E=num_episodes, obs_dim=obs_dim, act_dim=act_dim))
    env = None  # where the policies are evaluated; checked before training, not after it
    if args.eval_episodes > 0:

        try:
            env = gym_eval.evaluation_env(args.dataset, obs_dim, args.ref_min_score, args.ref_max_score,
                                         args.eval_env)
        except InputError as e:  # nav_env's own class: this script reports only its own in one sentence
            raise InputError(str(e)) from None
    k, cluster_seeds = sizes["K"], sizes["S"]
    check_fits(f"--eval-episodes {args.eval_episodes}",  # the rollouts' paths
               2 * args.num_seeds * k * args.eval_episodes * 1001 * 2 * 4)
    if cluster_seeds != 1 and args.first_run + args.num_seeds > cluster_seeds:
        raise InputError(f"--first-run {args.first_run} plus --num-seeds {args.num_seeds} is more than the "
                         f"{cluster_seeds} clustering runs in {args.cluster}")
    cluster_run = args.first_run + np.arange(args.num_seeds) if cluster_seeds > 1 else np.zeros(args.num_seeds, int)
    hidden_dim, hidden_layers = int(cluster["arch/hidden_dim"]), int(cluster["arch/hidden_layers"])
    obs_mean, obs_std = cluster["arch/obs_mean"], cluster["arch/obs_std"]
    action_scale = tuple(float(x) for x in cluster["arch/action_scale"])

    # Eq. (10) once, in reward units, to fix the value scale c (interpretation 2).
    ids = data_np["episode_ids"]
    last = np.r_[np.diff(ids) != 0, True]
    returns = np.asarray(mc_returns(jnp.asarray(data_np["rewards"]), jnp.asarray(last), args.gamma))
    value_scale = float(max(returns.std(), 1e-3))
    next_actions = np.where(last[:, None], 0.0, np.roll(data_np["actions"], -1, axis=0)).astype(np.float32)

    chunk = min(args.chunk, n)
    pad = (-n) % chunk
    run_args = Args(**{**asdict(args), "chunk": chunk})
    padded = lambda x, value=0: jnp.asarray(np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value))
    norm = lambda x: (x - obs_mean) / obs_std
    data = Data(obs=padded(norm(data_np["observations"])), actions=padded(data_np["actions"]),
                rewards=padded(data_np["rewards"] / value_scale), next_obs=padded(norm(data_np["next_observations"])),
                next_actions=padded(next_actions), bootstrap=padded((~data_np["terminals"]).astype(np.float32)),
                timeout_end=padded(data_np["timeouts"] & ~data_np["terminals"]),
                returns=padded((returns / value_scale).astype(np.float32)), valid=padded(np.ones(n, np.float32)))

    policy, q_net, v_net = make_networks(hidden_dim, hidden_layers, k, act_dim, action_scale)
    init, tx = make_init(run_args, q_net, v_net, obs_dim, act_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = jax.device_put(data, replicated)
    beta = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x[cluster_run]),
                                       unflatten_params("policy/params", cluster)), seed_sharding)
    beta = {"params": beta}
    assign = jnp.asarray(np.pad(cluster["assignments"][cluster_run], ((0, 0), (0, pad))))
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    key_init, key_next, key_train, key_eval = (
        jax.device_put(x, seed_sharding) for x in jax.vmap(lambda s: jax.random.split(s, 4), out_axes=1)(seed_keys))
    fill = jax.jit(jax.vmap(make_next_actions(policy, action_scale, chunk), in_axes=(0, 0, 0, None)))
    run = RunInputs(beta=beta, assign=jax.device_put(assign, seed_sharding),
                    next_actions=fill(key_next, beta, jax.device_put(assign, seed_sharding), data))
    state = jax.jit(jax.vmap(init), out_shardings=seed_sharding)(key_init, beta)

    # The schedule: SARSA calls, V epochs, PPO epochs; a checkpoint after each unit.
    q_calls = [min(args.steps_per_call, args.q_steps - i) for i in range(0, args.q_steps, args.steps_per_call)]
    schedule = [("q", s) for s in q_calls] + [("v", 0)] * args.v_epochs + [("pi", 0)] * args.pi_epochs
    run_dir = os.path.dirname(os.path.abspath(args.out))
    identity = run_identity(args, NEUTRAL_FLAGS, {"dataset": data_sha, "cluster": cluster_sha})
    ckpt_path, state, first = resume_checkpoint(args, state, "empo/ppo-checkpoint/v2", identity, len(schedule))
    state = jax.device_put(state, seed_sharding)
    writer = make_writer(os.path.join(run_dir, "ppo"), args)

    vmapped = lambda f: jax.jit(jax.vmap(f, in_axes=(0, 0, 0, None)))
    q_chunk = make_q_chunk(run_args, q_net, tx, n, action_scale)
    q_calls_jit = {s: jax.jit(jax.vmap(lambda st, key, r, d, s=s: q_chunk(st, key, r, d, s), in_axes=(0, 0, 0, None)))
                   for s in set(q_calls)}
    v_epoch = vmapped(make_v_epoch(run_args, v_net, tx, n))
    ppo_epoch = vmapped(make_ppo_epoch(run_args, policy, q_net, v_net, tx, n, k, action_scale))
    unit_key = lambda unit: jax.device_put(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, unit),
                                           seed_sharding)
    print(f"[ppo] N={n} K={k} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); "
          f"value scale c={value_scale:.1f}; {len(schedule)} units", flush=True)

    # Figure 4's sweep: pi_L evaluated at the --eval-at epochs, kept beside the checkpoint so that a resumed run
    # keeps the epochs it passed (a fresh run starts the file anew).
    sweep, sweep_file = {}, os.path.splitext(os.path.abspath(args.out))[0] + ".sweep.npz"
    sweep_at = set(sweep_epochs(args)) if env is not None and env["kind"] == "nav" else set()
    if sweep_at and first > 0 and os.path.exists(sweep_file):
        with np.load(sweep_file) as f:
            sweep = {int(name.split("_")[1]): {key.split("/", 1)[1]: f[key] for key in f.files
                                               if key.startswith(name + "/")}
                     for name in {key.split("/")[0] for key in f.files}}
    evaluate_sweep = (make_sweep_evaluate(policy, obs_mean, obs_std, args.eval_episodes) if sweep_at else None)

    progress = Progress(len(schedule), "ppo", kinds=[part for part, _ in schedule], first=first)
    timings = {"q": 0.0, "v": 0.0, "pi": 0.0}
    q_done = sum(s for part, s in schedule[:first] if part == "q")
    # Gradient steps per unit (charts/SPS, against the steps done so far): a SARSA call, a V epoch of minibatches,
    # a PPO epoch (one full-batch Adam step, or ceil(N / B) minibatch steps).
    epoch_steps = {"v": math.ceil(n / args.batch_size),
                   "pi": math.ceil(n / args.ppo_minibatch) if args.ppo_minibatch else 1}
    steps_done = sum(epoch_steps.get(part, s) for part, s in schedule[:first])
    for unit in range(first, len(schedule)):
        part, steps = schedule[unit]
        t0 = time.perf_counter()
        if part == "q":
            state, metrics = q_calls_jit[steps](state, unit_key(unit), run, data)
            q_done += steps
            log_step = q_done
        elif part == "v":
            state, metrics = v_epoch(state, unit_key(unit), run, data)
            log_step = unit - len(q_calls) + 1
        else:
            state, metrics = ppo_epoch(state, unit_key(unit), run, data)
            log_step = unit - len(q_calls) - args.v_epochs + 1
        metrics = jax.device_get(metrics)
        timings[part] += time.perf_counter() - t0
        unit_steps = epoch_steps.get(part, steps)
        steps_done += unit_steps
        writer.add_scalar("charts/SPS", unit_steps / (time.perf_counter() - t0), steps_done)
        save_checkpoint(ckpt_path, state, unit + 1, "empo/ppo-checkpoint/v2", identity)
        fields = {"part": part, "took": time.perf_counter() - t0}
        if part == "q":
            writer.add_scalar("losses/q", float(np.mean(metrics["losses/q"])), log_step)
            writer.add_scalar("charts/q_target_mean", float(np.mean(metrics["charts/q_target_mean"])) * value_scale,
                              log_step)
            fields["q_loss"] = float(np.mean(metrics["losses/q"]))
        elif part == "v":
            writer.add_scalar("losses/v", float(np.mean(metrics["losses/v"])), log_step)
            fields["v_loss"] = float(np.mean(metrics["losses/v"]))
        else:
            fields.update(log_ppo(writer, metrics, n, value_scale, log_step))
            if log_step in sweep_at:
                sweep[log_step] = evaluate_sweep(state.pi, key_eval)
                np.savez(sweep_file + ".tmp.npz", **{f"epoch_{e}/{key}": x for e, out in sweep.items()
                                                     for key, x in out.items()})
                os.replace(sweep_file + ".tmp.npz", sweep_file)
                fields["sweep_return"] = float(sweep[log_step]["sampled_return"].mean())
                for key in ("return", "sampled_return"):
                    writer.add_scalar(f"eval/sweep_{key}", float(sweep[log_step][key].mean()), log_step)
        progress(unit + 1, **fields)
    if 0 in sweep_at:
        sweep[0] = evaluate_sweep(beta, key_eval)  # pi_L starts from the stage-1 policies (Algorithm 2, line 2)

    # Evaluation for insight: beta_z and pi_L(.|s, z) alone, from s_0 (navigation) or in the Gymnasium env.
    arrays_eval, summary_eval = {}, {}
    if env is not None and env["kind"] == "nav":
        arrays_eval, summary_eval = evaluate_policies(args, policy, obs_mean, obs_std, beta, state.pi, key_eval,
                                                      writer, run_dir, seeds, k)
    elif env is not None:
        arrays_eval, summary_eval = evaluate_policies_gym(args, policy, obs_mean, obs_std, beta, state.pi, env,
                                                          writer, seeds, k)

    if sweep_at:
        missing = sorted(sweep_at - set(sweep))
        if missing:
            print(f"[ppo] --eval-at: epochs {missing} were passed before this run resumed; their entries are NaN")
        epochs = sorted(sweep_at)
        template = next(iter(sweep.values()), None)
        arrays_eval["eval/sweep_epochs"] = np.asarray(epochs, np.int64)
        for key in (template or {}):
            arrays_eval[f"eval/sweep_{key}"] = np.stack(
                [sweep[e][key].astype(np.float32) if e in sweep else np.full_like(template[key], np.nan, np.float32)
                 for e in epochs], axis=2)  # [S, K, P, E]
        summary_eval["sweep"] = {int(e): {key: float(np.nanmean(sweep[e][key])) for key in ("return", "sampled_return")}
                                 for e in epochs if e in sweep}

    state = jax.device_get(state)
    arrays = {
        **flatten_params("pi/params", state.pi["params"]), **flatten_params("q/params", state.q["params"]),
        **flatten_params("v/params", state.v["params"]), **arrays_eval,
        "seeds": seeds.astype(np.int64), "cluster_run": cluster_run.astype(np.int64),
        "arch/k": np.int64(k), "arch/obs_dim": np.int64(obs_dim), "arch/act_dim": np.int64(act_dim),
        "arch/hidden_dim": np.int64(hidden_dim), "arch/hidden_layers": np.int64(hidden_layers),
        "arch/obs_mean": obs_mean, "arch/obs_std": obs_std, "arch/action_scale": np.asarray(action_scale, np.float32),
        "arch/value_scale": np.float32(value_scale), "arch/gamma": np.float32(args.gamma),
    }
    save_npz(args.out, arrays, "empo/ppo/v1", asdict(args),
             {"dataset": data_sha, "cluster": cluster_sha})
    for path in (ckpt_path, sweep_file):
        if os.path.exists(path):
            os.remove(path)
    writer.close()
    print(f"[ppo] wrote {args.out}: SARSA {timings['q']:.1f}s, V {timings['v']:.1f}s, PPO {timings['pi']:.1f}s")
    return {"timings": timings, "value_scale": value_scale, **summary_eval}


def log_ppo(writer, metrics, n: int, value_scale: float, step: int) -> dict:
    """TensorBoard scalars of one PPO epoch (sums over rows -> means); returns the status-line fields."""
    m = {name: np.asarray(x) for name, x in metrics.items()}  # leading axis: seeds
    writer.add_scalar("losses/ppo_surrogate", float(m["surrogate"].mean() / n * value_scale), step)
    writer.add_scalar("charts/ratio_mean", float(m["ratio"].mean() / n), step)
    writer.add_scalar("charts/ratio_min", float(m["ratio_min"].min()), step)
    writer.add_scalar("charts/ratio_max", float(m["ratio_max"].max()), step)
    writer.add_scalar("charts/clip_fraction", float(m["clipped"].mean() / n), step)
    count = np.maximum(m["count_z"].sum(0), 1)  # [K]
    adv_mean = m["adv_z"].sum(0) / count
    adv_std = np.sqrt(np.maximum(m["adv2_z"].sum(0) / count - adv_mean ** 2, 0))
    for z in range(len(count)):
        writer.add_scalar(f"charts/advantage_mean/{z}", float(adv_mean[z] * value_scale), step)
        writer.add_scalar(f"charts/advantage_std/{z}", float(adv_std[z] * value_scale), step)
        writer.add_scalar(f"charts/kl_pi_beta/{z}", float(m["kl_z"].sum(0)[z] / count[z]), step)
    return {"surrogate": float(m["surrogate"].mean() / n * value_scale),
            "clip_frac": float(m["clipped"].mean() / n), "kl": float(m["kl_z"].sum() / count.sum())}


def make_sweep_evaluate(policy, obs_mean, obs_std, episodes: int):
    """evaluate(params, key) -> {return, goal, route, sampled_return, sampled_goal, sampled_route} [S, K, E] (NumPy):
    pi_L(.|s, z) alone, mean action and sampled, as at the end of the run (Figure 4's measured quantity)."""
    import nav_env

    fns = {sample: make_evaluate(policy, jnp.asarray(obs_mean), jnp.asarray(obs_std), episodes, sample)
           for sample in (False, True)}

    def evaluate(params, key) -> dict:
        result = {}
        for sample, fn in fns.items():
            out = jax.device_get(fn(params, key))
            prefix = "sampled_" if sample else ""
            result[prefix + "return"] = np.asarray(out["return"])
            result[prefix + "goal"] = np.asarray(out["goal"])
            result[prefix + "route"] = nav_env.route_classes(out["positions"], out["length"], out["goal"])
        return result

    return evaluate


def evaluate_policies(args: Args, policy, obs_mean, obs_std, beta, pi, key_eval, writer, run_dir, seeds, k):
    """Rollouts of every beta_z and pi_L(.|s, z), with the mean action (eval/{beta,pi}_*) and sampled
    (eval/{beta,pi}_sampled_*, the paper's protocol); TensorBoard scalars, a figure, arrays."""
    import nav_env

    arrays, summary = {}, {}
    for (name, params), sample in ((x, sample) for x in (("beta", beta), ("pi", pi)) for sample in (False, True)):
        evaluate = make_evaluate(policy, jnp.asarray(obs_mean), jnp.asarray(obs_std), args.eval_episodes, sample)
        out = jax.device_get(evaluate(params, key_eval))  # [S, K, E, ...]
        name = f"{name}_sampled" if sample else name
        for field in ("return", "goal", "penalty_steps", "optimal_route", "length"):
            arrays[f"eval/{name}_{field}"] = np.asarray(out[field])
        arrays[f"eval/{name}_route"] = nav_env.route_classes(out["positions"], out["length"], out["goal"])
        # The paths of the first 10 rollouts per policy, for maps drawn later: [S, K, min(E, 10), T+1, 2].
        arrays[f"eval/{name}_positions"] = np.asarray(out["positions"][:, :, :10], np.float16)
        for z in range(k):
            writer.add_scalar(f"eval/{name}_return/{z}", float(out["return"][:, z].mean()), args.pi_epochs)
            writer.add_scalar(f"eval/{name}_goal_rate/{z}", float(out["goal"][:, z].mean()), args.pi_epochs)
            writer.add_scalar(f"eval/{name}_penalty_steps/{z}", float(out["penalty_steps"][:, z].mean()),
                              args.pi_epochs)
        summary[f"{name}_return"] = out["return"].mean(axis=(0, 2)).tolist()  # per cluster
        summary[f"{name}_goal_rate"] = out["goal"].mean(axis=(0, 2)).tolist()
        summary[f"{name}_optimal_route"] = out["optimal_route"].mean(axis=(0, 2)).tolist()
        trajs, labels = [], []
        for z in range(k):
            for e in range(min(10, args.eval_episodes)):
                trajs.append(out["positions"][0, z, e, : out["length"][0, z, e] + 1])
                labels.append(z)
        title = {"beta": "Stage-1 policies beta_z", "pi": "Improved policies pi_L(.|s, z)"}[name.split("_")[0]]
        image = nav_env.plot_map(trajs, labels, title=f"{title} (seed {seeds[0]}, "
                                                       f"{'sampled' if sample else 'mean'} action)",
                                 label_names=[f"z = {z}" for z in range(k)],
                                 path=os.path.join(run_dir, f"ppo_{name}.png"))
        writer.add_image(f"eval/{name}_rollouts", image, args.pi_epochs, dataformats="HWC")
        for z in range(k):
            print(f"[ppo] {name}_{z}: return {out['return'][:, z].mean():.1f} +- {out['return'][:, z].std():.1f}, "
                  f"goal {out['goal'][:, z].mean():.2f}, penalty steps {out['penalty_steps'][:, z].mean():.1f}, "
                  f"optimal route {out['optimal_route'][:, z].mean():.2f}")
    return arrays, summary


def evaluate_policies_gym(args: Args, policy, obs_mean, obs_std, beta, pi, env: dict, writer, seeds, k: int):
    """Episodes of every beta_z and pi_L(.|s, z) (mean actions) in the data set's Gymnasium environment, all
    S x K x E at once in one vector env; returns, normalised scores, TensorBoard scalars and a table."""

    shape = (len(seeds), k, args.eval_episodes)

    @jax.jit
    def act(params, obs):  # obs [S*K*E, obs_dim] -> the mean action of each episode's policy [S*K*E, act_dim]
        obs = ((obs - obs_mean) / obs_std).reshape(shape + obs.shape[-1:])  # [S, K, E, obs_dim]
        mean = jax.vmap(jax.vmap(lambda p, o: policy.apply(p, o)[0]))(params, obs)  # [S, K, E, act_dim]
        return mean.reshape(-1, mean.shape[-1])

    arrays, summary = {}, {}
    for name, params in (("beta", beta), ("pi", pi)):
        out = gym_eval.gym_evaluate(env, lambda obs, params=params: act(params, obs), shape, args.seed)
        arrays.update({f"eval/{name}_{field}": x for field, x in out.items()})
        for field in ("return", "normalized_score"):
            if field in out:
                summary[f"{name}_{field}"] = out[field].mean(axis=(0, 2)).tolist()  # per cluster
                for z in range(k):
                    writer.add_scalar(f"eval/{name}_{field}/{z}", float(out[field][:, z].mean()), args.pi_epochs)
        for z in range(k):
            print(f"[ppo] {name}_{z} in {env['env_id']}: {gym_eval.describe_episodes(out, (slice(None), z))}")
    return arrays, summary


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
