"""Stage 2 of EMPO: SARSA Q, Monte-Carlo V and full-batch PPO improve every cluster (empo/cluster/v1 -> empo/ppo/v1).

Example: python empo_ppo.py --dataset data/nav.npz --cluster runs/nav/cluster.npz --out runs/nav/ppo.npz
Equation map (paper §3.2, Algorithm 2; full batch against minibatches: §4.3.2, Figure 4; defaults: Table 4)
    Eq. (10)  R(s_i) = r_i + gamma R(s_{i+1}) (item 8)                      -> mc_returns
    Eq. (11)  l_Q = [Q(s,a)_A(s,a) - (r + gamma Q_bar(s',a')_A(s',a'))]^2   -> sarsa_target, q_loss
    Eq. (12)  l_V = [V(s)_A(s,a) - R(s)]^2                                   -> v_loss
    Eq. (13)  psi_bar <- (1 - tau_Q) psi_bar + tau_Q psi, every n_Q          -> make_q_chunk
    Eq. (14)  l_pi = min(rho A, clip(rho, 1-eps, 1+eps) A), maximised        -> ppo_surrogate

Interpretations and deviations (each at length under its number in docs/empo_ppo.md)
    1. Networks: stage 1's; Q on [standardised s, a / action scale]; Q, V with K linear heads; pi_L starts at beta.
    2. Q and V learn in units of c = std of R(s) (arch/value_scale); logged values are in reward units.
    3. SARSA target: r alone after a terminal; after a timeout a' is drawn once from beta(.|s', A(s,a)).
    4. PPO: a' ~ beta(.|s, A(s,a)) anew per row and epoch, Q at the clipped a', raw advantage, eps_c 0.2, full batch.
    5. Q: N_Q minibatch steps with replacement; V: N_V epochs of ceil(N / B) such steps; one Adam per network.
    6. Run i: seed --seed + i, clustering run --first-run + i; the runs are vmapped and sharded over the devices.
    7. Evaluation, never for selection: beta_z and pi_L alone; --eval-at adds pi_L at chosen epochs (Figure 4).
    8. Eq. (10) read as the return from s_i (R_i = r_i + gamma R_{i+1}), not the rewards from the trajectory start.
"""

import empo_io  # noqa: F401  first: its start-up guard makes Ctrl-C while the libraries load one sentence

# isort: split

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import gym_eval
import nav_env

# The plumbing, by purpose: files and data sets, checkpoints, the command line.
# isort: off
from empo_io import InputError, load_dataset, load_cluster, flatten_params, unflatten_params
from empo_io import checkpoint_path, run_identity, resume_checkpoint, save_checkpoint, save_output, fetch, place
from empo_io import cli, run, check_flags, check_fits, check_writable, make_writer, Progress, seed_shardings
# isort: on


@dataclass
class Args(gym_eval.EvalEnvFlags):
    """Stage 2 of EMPO: SARSA Q, Monte-Carlo V and full-batch PPO for every cluster (Algorithm 2)."""
    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = Table 4's didactic column (the navigation task), 'd4rl' = its D4RL
    column (gamma 0.99, N_Q 1.5M, N_V 40, N_pi 100; halfcheetah medium + expert, D4RL v2 files in data/d4rl);
    flags given on the command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz, D4RL .hdf5 files or Minari ids (as stage 1: a path that exists
    is one file even if its name holds commas), the one stage 1 used"""
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
    eval_at: str = ""
    """PPO epochs at which to evaluate pi_L as well (comma-separated, e.g. 1,2,5,10,20,50,100; 0 = the stage-1
    policies): both protocols, stored in eval/sweep_* (Figure 4 from one run; navigation task only)"""
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


# --- containers ---
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
    """The data set on the device (shared by all runs)."""
    obs: jax.Array  # [N, obs_dim], standardised
    actions: jax.Array  # [N, act_dim]
    rewards: jax.Array  # [N], divided by the value scale
    next_obs: jax.Array  # [N, obs_dim], standardised
    next_actions: jax.Array  # [N, act_dim], a' of the same trajectory (0 after its last row)
    bootstrap: jax.Array  # [N] float, 0 after a terminal, 1 otherwise
    timeout_end: jax.Array  # [N] bool, the last row of a trajectory cut by a timeout
    returns: jax.Array  # [N] R(s) (Eq. 10), divided by the value scale


@struct.dataclass
class RunInputs:
    """What differs between runs: the stage-1 policies, the assignments and the SARSA next actions."""
    beta: Any  # Theta_hat*, stacked [K, ...]
    assign: jax.Array  # [N] int32, A(s, a)
    next_actions: jax.Array  # [N, act_dim], a' with the timeout rows filled from beta
    groups: Any = None  # (rows [M, C] int32, cluster [M] int32, live [M, C] f32): cluster_chunks, for one head per row


# --- networks ---
LOG_STD_MIN, LOG_STD_MAX = -5.0, 0.0


class MLP(nn.Module):
    """hidden_layers x (Dense(hidden_dim) + ReLU), then a linear Dense(out_dim) (linear: rewards can be negative)."""
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


# --- losses (one function per equation) ---
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


def gaussian_log_prob(mean, log_std, action):
    """log N(action; mean, exp(log_std)^2), summed over the last (action) axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z * z - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


def own_head_apply(policy, params, obs, z):
    """(mean, log_std) of policy z_b at obs_b for rows of one cluster (z [B] all equal): that head alone."""
    return policy.apply(jax.tree.map(lambda p: p[z[0]], params), obs)


def stacked_apply(policy, params, obs, z):
    """(mean, log_std) of policy z_b at obs_b for every row: all K heads, then the row's one. [B, act_dim]."""
    mean, log_std = jax.vmap(policy.apply, in_axes=(0, None))(params, obs)  # [K, B, act_dim]
    pick = lambda x: jnp.take_along_axis(x, z[None, :, None], axis=0)[0]
    return pick(mean), pick(log_std)


def ppo_surrogate(log_pi, log_beta, advantage, clip: float):
    """Eq. (14): min(rho A, clip(rho, 1 - eps_c, 1 + eps_c) A) per row, rho = pi_L(a'|s,z) / beta(a'|s,z)."""
    ratio = jnp.exp(log_pi - log_beta)
    return jnp.minimum(ratio * advantage, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * advantage)  # Eq. (14)


def gaussian_kl(mean_p, log_std_p, mean_q, log_std_q):
    """KL(N_p || N_q) of diagonal Gaussians, summed over the last axis."""
    var_p, var_q = jnp.exp(2 * log_std_p), jnp.exp(2 * log_std_q)
    return jnp.sum(log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5, axis=-1)


# --- training factories (lax.scan inside jit) ---
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

    Full batch: the gradient of the mean surrogate over all N rows, accumulated in a lax.scan over chunks of one
    cluster's rows (``run.groups``: cluster_chunks, at most --chunk rows each), then one Adam step. Minibatch:
    ceil(N / B) Adam steps over a shuffled pass. Returns epoch(state, key, run, data) -> (state, metrics).
    """
    scale = jnp.asarray(action_scale, jnp.float32)

    def rows_loss(pi_params, state: TrainState, run: RunInputs, obs, z, noise, valid, apply=stacked_apply):
        """-(sum of the surrogate over the rows) / N, and the rows' statistics (sums); ``valid`` is 0 on the unused
        places of a part-filled chunk. ``apply`` gives each row's policy: stacked_apply (rows of any clusters), or
        own_head_apply (rows of one cluster)."""
        z = jnp.broadcast_to(z, valid.shape)  # [rows]
        beta_mean, beta_log_std = apply(policy, run.beta, obs, z)
        a_new = beta_mean + jnp.exp(beta_log_std) * noise  # a' ~ beta(.|s, A(s,a); Theta_hat*)
        log_beta = gaussian_log_prob(beta_mean, beta_log_std, a_new)
        a_env = jnp.clip(a_new, -scale, scale)
        adv = select(q_net.apply(state.q, jnp.concatenate([obs, a_env / scale], 1)) - v_net.apply(state.v, obs), z)
        pi_mean, pi_log_std = apply(policy, pi_params, obs, z)
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

    def totals(stats):  # sums over the chunks or minibatches, the ratio's min and max over them
        reduce = {"ratio_min": jnp.min, "ratio_max": jnp.max}
        return {name: reduce.get(name, lambda x: jnp.sum(x, 0))(x) for name, x in stats.items()}

    def full_batch(state: TrainState, key, run: RunInputs, data: Data):
        noise = jax.random.normal(key, data.actions.shape)  # one a' per row and epoch

        def accumulate(grads, group):  # one chunk of rows of one cluster z: only head z is computed
            rows, z, live = group
            g, stats = jax.grad(rows_loss, has_aux=True)(state.pi, state, run, data.obs[rows], z, noise[rows], live,
                                                         own_head_apply)
            return jax.tree.map(jnp.add, grads, g), stats

        zeros = jax.tree.map(jnp.zeros_like, state.pi)
        grads, stats = jax.lax.scan(accumulate, zeros, run.groups)
        updates, pi_opt = tx.update(grads, state.pi_opt, state.pi)
        return state.replace(pi=optax.apply_updates(state.pi, updates), pi_opt=pi_opt), totals(stats)

    def minibatch(state: TrainState, key, run: RunInputs, data: Data):
        key_noise, key_perm = jax.random.split(key)
        noise = jax.random.normal(key_noise, data.actions.shape)
        steps = math.ceil(num_rows / args.ppo_minibatch)
        perm = jax.random.permutation(key_perm, num_rows)
        perm = jnp.concatenate([perm, perm[: steps * args.ppo_minibatch - num_rows]]).reshape(steps, -1)

        def update(state: TrainState, idx):
            g, stats = jax.grad(rows_loss, has_aux=True)(state.pi, state, run, data.obs[idx], run.assign[idx],
                                                         noise[idx], jnp.ones(idx.shape))
            g = jax.tree.map(lambda x: x * num_rows / idx.shape[0], g)  # the minibatch mean
            updates, pi_opt = tx.update(g, state.pi_opt, state.pi)
            return state.replace(pi=optax.apply_updates(state.pi, updates), pi_opt=pi_opt), stats

        state, stats = jax.lax.scan(update, state, perm)
        return state, totals(stats)

    return minibatch if args.ppo_minibatch > 0 else full_batch


def make_next_actions(policy, action_scale, timeout_rows: np.ndarray):
    """Fill a' on the last row of every timeout-cut trajectory (``timeout_rows``, the same in every run) with a draw
    from beta(.|s', A(s,a)); only those rows are computed."""
    scale = jnp.asarray(action_scale, jnp.float32)

    def fill(key, beta, assign, data: Data):
        noise = jax.random.normal(key, data.next_actions.shape)[timeout_rows]  # the draws of those rows
        mean, log_std = stacked_apply(policy, beta, data.next_obs[timeout_rows], assign[timeout_rows])
        drawn = jnp.clip(mean + jnp.exp(log_std) * noise, -scale, scale)
        return data.next_actions.at[timeout_rows].set(drawn)

    return fill


def group_size(chunk: int, n: int, k: int) -> int:
    """Rows per chunk of one cluster: at most --chunk, and at most N / 16K, so that the part-filled last chunk of
    each cluster (K of them) costs about 1/16 of the rows."""
    return min(chunk, -(-n // (16 * k)))


def cluster_chunks(assign: np.ndarray, k: int, chunk: int) -> tuple:
    """The rows of every run grouped by cluster in chunks of ``chunk`` rows, so that a chunk needs one policy head:
    (rows [S, M, C] int32, cluster [S, M] int32, live [S, M, C] float32), M = ceil(N / C) + K - 1 for every run
    (each cluster's last chunk is part-filled; live marks the rows that count). assign [S, N]."""
    real = np.arange(assign.shape[1])
    count = -(-len(real) // chunk) + k - 1
    rows, cluster, live = (np.zeros((len(assign), count, chunk), np.int32), np.zeros((len(assign), count), np.int32),
                           np.zeros((len(assign), count, chunk), np.float32))
    for i, a in enumerate(assign):
        m = 0
        for z in range(k):
            members = real[a[real] == z]
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                rows[i, m, :len(part)], live[i, m, :len(part)], cluster[i, m] = part, 1.0, z
                m += 1
    return rows, cluster, live


# --- evaluation (for insight, never for selection) ---
def evaluate_policies(args: Args, evaluate, beta, pi, key_eval, writer, run_dir, seeds, k):
    """Rollouts of every beta_z and pi_L(.|s, z) from s_0, with the mean action (eval/{beta,pi}_*) and sampled
    (eval/{beta,pi}_sampled_*, the paper's protocol): arrays, TensorBoard scalars, a table and a map each."""
    arrays, summary = {}, {}
    titles = {"beta": "Stage-1 policies beta_z", "pi": "Improved policies pi_L(.|s, z)"}
    for policy_name, params in (("beta", beta), ("pi", pi)):
        for prefix, out in evaluate(params, key_eval).items():  # [S, K, E, ...]
            name = f"{policy_name}_sampled" if prefix else policy_name
            title = f"{titles[policy_name]} (seed {seeds[0]}, {'sampled' if prefix else 'mean'} action)"
            part, part_summary = nav_env.report_cluster_rollouts(out, name, k, writer, args.pi_epochs, title,
                                                                 os.path.join(run_dir, f"ppo_{name}.png"), "[ppo]")
            arrays.update(part)
            summary.update(part_summary)
    return arrays, summary


# --- the command line: presets, inputs, the schedule, outputs ---
PRESETS = {  # Table 4: the didactic column and the D4RL column
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 cluster="runs/halfcheetah-medium-expert/cluster.npz", out="runs/halfcheetah-medium-expert/ppo.npz",
                 eval_episodes=10, gamma=0.99, q_steps=1_500_000, v_epochs=40, pi_epochs=100),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood
# for by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ('out', 'resume', 'preset', 'eval_episodes', 'eval_env', 'ref_min_score', 'ref_max_score',
                 'dataset', 'cluster')

# Figure 4's sweep: {,sampled_}{return,goal,route} [S, K, P, E] of pi_L at the P epochs of --eval-at. The entries
# so far are part of the checkpoint (with --eval-at, and then --eval-episodes, in the run's identity), written
# after each epoch's evaluation, so that a resumed run has every epoch it passed.
SWEEP_FIELDS = {prefix + field: dtype for prefix in ("", "sampled_")
                for field, dtype in (("return", np.float32), ("goal", bool), ("route", np.int32))}


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


def load_inputs(args: Args):
    """The data set, cluster.npz and the evaluation environment, checked before any training: (data set arrays, its
    sha256, cluster.npz arrays, its sha256, the environment or None, K, the clustering run of each run [S])."""
    data_np, data_sha = load_dataset(args.dataset)
    n = len(data_np["rewards"])
    num_episodes = int(data_np["episode_ids"][-1]) + 1
    obs_dim, act_dim = data_np["observations"].shape[1], data_np["actions"].shape[1]
    networks = lambda hidden_dim, hidden_layers, k: {  # rebuilt from arch/*, to check the parameters' shapes
        "policy/params": GaussianPolicy(act_dim, (1.0,) * act_dim, hidden_dim, hidden_layers),
        "classifier/params": MLP(hidden_dim, hidden_layers, k)}
    cluster, sizes, cluster_sha = load_cluster(args.cluster, data_sha,
                                               dict(N=n, E=num_episodes, obs_dim=obs_dim, act_dim=act_dim), networks)
    env = gym_eval.evaluation_env_of(args, obs_dim)  # where the policies are evaluated; checked before training
    k, cluster_seeds = sizes["K"], sizes["S"]
    check_fits(f"--eval-episodes {args.eval_episodes}",  # the rollouts' paths
               2 * args.num_seeds * k * args.eval_episodes * 1001 * 2 * 4)
    if cluster_seeds != 1 and args.first_run + args.num_seeds > cluster_seeds:
        raise InputError(f"--first-run {args.first_run} plus --num-seeds {args.num_seeds} is more than the "
                         f"{cluster_seeds} clustering runs in {args.cluster}")
    cluster_run = args.first_run + np.arange(args.num_seeds) if cluster_seeds > 1 else np.zeros(args.num_seeds, int)
    return data_np, data_sha, cluster, cluster_sha, env, k, cluster_run


def device_data(args: Args, data_np: dict, obs_mean, obs_std) -> tuple[Data, float]:
    """(the data set as Data; the value scale c of item 2)."""
    # Eq. (10) once, in reward units, to fix the value scale c (interpretation 2).
    last = np.r_[np.diff(data_np["episode_ids"]) != 0, True]  # the last row of each trajectory
    returns = np.asarray(mc_returns(jnp.asarray(data_np["rewards"]), jnp.asarray(last), args.gamma))
    value_scale = float(max(returns.std(), 1e-3))
    next_actions = np.where(last[:, None], 0.0, np.roll(data_np["actions"], -1, axis=0)).astype(np.float32)
    norm = lambda x: jnp.asarray((x - obs_mean) / obs_std)
    data = Data(obs=norm(data_np["observations"]), actions=jnp.asarray(data_np["actions"]),
                rewards=jnp.asarray(data_np["rewards"] / value_scale), next_obs=norm(data_np["next_observations"]),
                next_actions=jnp.asarray(next_actions), bootstrap=jnp.asarray(~data_np["terminals"], jnp.float32),
                timeout_end=jnp.asarray(data_np["timeouts"] & ~data_np["terminals"]),
                returns=jnp.asarray(returns / value_scale, jnp.float32))
    return data, value_scale


def make_schedule(args: Args) -> list:
    """The units between checkpoints, each (part, SARSA steps, the step it is logged at): the SARSA calls
    (Algorithm 2, lines 3-9), the V epochs (lines 11-14), the PPO epochs (lines 15-17)."""
    starts = range(0, args.q_steps, args.steps_per_call)
    q_calls = [min(args.steps_per_call, args.q_steps - i) for i in starts]
    return ([("q", s, i + s) for i, s in zip(starts, q_calls)] + [("v", 0, e + 1) for e in range(args.v_epochs)]
            + [("pi", 0, e + 1) for e in range(args.pi_epochs)])


def make_units(args: Args, schedule: list, policy, q_net, v_net, tx, n: int, k: int, action_scale) -> dict:
    """{(part, steps): unit(state, key, run, data) -> (state, metrics)}, jitted and vmapped over the runs."""
    vmapped = lambda f: jax.jit(jax.vmap(f, in_axes=(0, 0, 0, None)))
    q_chunk = make_q_chunk(args, q_net, tx, n, action_scale)
    units = {("q", s): vmapped(lambda st, key, r, d, s=s: q_chunk(st, key, r, d, s))
             for s in {s for part, s, _ in schedule if part == "q"}}
    units["v", 0] = vmapped(make_v_epoch(args, v_net, tx, n))
    units["pi", 0] = vmapped(make_ppo_epoch(args, policy, q_net, v_net, tx, n, k, action_scale))
    return units


def log_unit(writer, part: str, metrics: dict, step: int, n: int, value_scale: float) -> dict:
    """TensorBoard scalars of one unit (chunk means; PPO's sums over rows -> means); returns the status-line fields."""
    if part == "q":
        writer.add_scalar("losses/q", float(np.mean(metrics["losses/q"])), step)
        writer.add_scalar("charts/q_target_mean", float(np.mean(metrics["charts/q_target_mean"])) * value_scale, step)
        return {"q_loss": float(np.mean(metrics["losses/q"]))}
    if part == "v":
        writer.add_scalar("losses/v", float(np.mean(metrics["losses/v"])), step)
        return {"v_loss": float(np.mean(metrics["losses/v"]))}
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


def new_sweep(num_seeds: int, k: int, epochs: list, episodes: int) -> dict:
    """Figure 4's sweep before any epoch: zeros [S, K, P, E] per field."""
    return {key: np.zeros((num_seeds, k, len(epochs), episodes), dtype) for key, dtype in SWEEP_FIELDS.items()}


def add_to_sweep(sweep: dict, p: int, outs: dict) -> dict:
    """The sweep with entry p filled from the rollouts of nav_env.make_cluster_evaluate ([S, K, E] per field)."""
    sweep = {key: np.array(x) for key, x in sweep.items()}
    for key in SWEEP_FIELDS:
        prefix, field = ("sampled_", key[8:]) if key.startswith("sampled_") else ("", key)
        sweep[key][:, :, p] = outs[prefix][field]
    return sweep


def sweep_arrays(sweep: dict, epochs: list) -> tuple[dict, dict]:
    """eval/sweep_* [S, K, P, E] over the P epochs of --eval-at, and their mean returns for the summary."""
    arrays = {"eval/sweep_epochs": np.asarray(epochs, np.int64),
              **{f"eval/sweep_{key}": sweep[key].astype(np.float32) for key in SWEEP_FIELDS}}
    summary = {int(e): {key: float(np.mean(sweep[key][:, :, p])) for key in ("return", "sampled_return")}
               for p, e in enumerate(epochs)}
    return arrays, summary


def init_runs(args: Args, cluster: dict, cluster_run, seeds, data: Data, policy, init, action_scale, sharding):
    """Algorithm 2, lines 1-2, for every run: beta = Theta_hat* of its clustering run, A(s, a), SARSA's a' (drawn
    from beta after a timeout), the state with pi_L = beta. Returns (beta, run inputs, state, key_train, key_eval)."""
    beta = {"params": place(jax.tree.map(lambda x: jnp.asarray(x[cluster_run]),
                                                  unflatten_params("policy/params", cluster)), sharding)}
    assign = jnp.asarray(cluster["assignments"][cluster_run])
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    key_init, key_next, key_train, key_eval = (
        place(x, sharding) for x in jax.vmap(lambda s: jax.random.split(s, 4), out_axes=1)(seed_keys))
    timeout_rows = np.flatnonzero(np.asarray(data.timeout_end))
    fill = jax.jit(jax.vmap(make_next_actions(policy, action_scale, timeout_rows), in_axes=(0, 0, 0, None)))
    k = int(cluster["arch/k"])
    groups = cluster_chunks(np.asarray(assign), k, group_size(args.chunk, assign.shape[1], k))
    runs = RunInputs(beta=beta, assign=place(assign, sharding),
                     next_actions=fill(key_next, beta, place(assign, sharding), data),
                     groups=tuple(place(jnp.asarray(x), sharding) for x in groups))
    state = jax.jit(jax.vmap(init), out_shardings=sharding)(key_init, beta)
    return beta, runs, state, key_train, key_eval


def write_outputs(args: Args, state: TrainState, arrays_eval: dict, seeds, cluster_run, cluster: dict, k: int,
                  value_scale: float, inputs: dict) -> None:
    """ppo.npz (schema empo/ppo/v1): the three networks of every run, the evaluation, the runs' seeds and clustering
    runs, and arch/*: stage 1's architecture, the value scale c (item 2) and gamma; then the checkpoint goes."""
    state = fetch(state)
    obs_dim, act_dim = len(cluster["arch/obs_mean"]), len(cluster["arch/action_scale"])
    arrays = {
        **flatten_params("pi/params", state.pi["params"]), **flatten_params("q/params", state.q["params"]),
        **flatten_params("v/params", state.v["params"]), **arrays_eval,
        "seeds": seeds.astype(np.int64), "cluster_run": cluster_run.astype(np.int64),
        "arch/k": np.int64(k), "arch/obs_dim": np.int64(obs_dim), "arch/act_dim": np.int64(act_dim),
        "arch/hidden_dim": np.int64(int(cluster["arch/hidden_dim"])),
        "arch/hidden_layers": np.int64(int(cluster["arch/hidden_layers"])),
        "arch/obs_mean": cluster["arch/obs_mean"], "arch/obs_std": cluster["arch/obs_std"],
        "arch/action_scale": np.asarray(tuple(float(x) for x in cluster["arch/action_scale"]), np.float32),
        "arch/value_scale": np.float32(value_scale), "arch/gamma": np.float32(args.gamma),
    }
    save_output(args, arrays, "empo/ppo/v1", inputs)


def main(args: Args) -> dict:
    validate_args(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset, args.cluster])
    data_np, data_sha, cluster, cluster_sha, env, k, cluster_run = load_inputs(args)
    n, obs_dim, act_dim = len(data_np["rewards"]), data_np["observations"].shape[1], data_np["actions"].shape[1]
    obs_mean, obs_std = cluster["arch/obs_mean"], cluster["arch/obs_std"]
    action_scale = tuple(float(x) for x in cluster["arch/action_scale"])
    data, value_scale = device_data(args, data_np, obs_mean, obs_std)

    # Algorithm 2, lines 1-2: Q, V and pi_L = beta of every run, sharded over the devices by run.
    policy, q_net, v_net = make_networks(int(cluster["arch/hidden_dim"]), int(cluster["arch/hidden_layers"]), k,
                                         act_dim, action_scale)
    init, tx = make_init(args, q_net, v_net, obs_dim, act_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = place(data, replicated)
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    beta, runs, state, key_train, key_eval = init_runs(args, cluster, cluster_run, seeds, data, policy, init,
                                                       action_scale, seed_sharding)

    # The schedule: SARSA calls, V epochs, PPO epochs; a checkpoint after each unit.
    schedule = make_schedule(args)
    nav = env is not None and env["kind"] == "nav"
    evaluate = nav_env.make_cluster_evaluate(policy, obs_mean, obs_std, args.eval_episodes) if nav else None
    epochs = sweep_epochs(args) if nav else []  # Figure 4's sweep: pi_L at the --eval-at epochs
    neutral = NEUTRAL_FLAGS if not epochs else tuple(f for f in NEUTRAL_FLAGS if f != "eval_episodes")
    identity = run_identity(args, neutral, {"dataset": data_sha, "cluster": cluster_sha})
    sweep = new_sweep(args.num_seeds, k, epochs, args.eval_episodes)
    ckpt_path, (state, sweep), first = resume_checkpoint(args, (state, sweep), "empo/ppo-checkpoint/v3", identity,
                                                         len(schedule))
    state = place(state, seed_sharding)
    run_dir = os.path.dirname(os.path.abspath(args.out))
    writer = make_writer(os.path.join(run_dir, "ppo"), args)
    units = make_units(args, schedule, policy, q_net, v_net, tx, n, k, action_scale)
    unit_key = lambda unit: place(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, unit),
                                           seed_sharding)
    print(f"[ppo] N={n} K={k} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); "
          f"value scale c={value_scale:.1f}; {len(schedule)} units", flush=True)

    progress = Progress(len(schedule), "ppo", kinds=[part for part, _, _ in schedule], first=first)
    timings = {"q": 0.0, "v": 0.0, "pi": 0.0}
    # Gradient steps per unit (charts/SPS, against the steps done so far): a SARSA call, a V epoch of minibatches,
    # a PPO epoch (one full-batch Adam step, or ceil(N / B) minibatch steps).
    epoch_steps = {"v": math.ceil(n / args.batch_size),
                   "pi": math.ceil(n / args.ppo_minibatch) if args.ppo_minibatch else 1}
    steps_done = sum(epoch_steps.get(part, s) for part, s, _ in schedule[:first])
    for unit in range(first, len(schedule)):
        part, steps, log_step = schedule[unit]
        t0 = time.perf_counter()
        state, metrics = units[part, steps](state, unit_key(unit), runs, data)
        metrics = fetch(metrics)
        timings[part] += time.perf_counter() - t0
        steps_done += epoch_steps.get(part, steps)
        writer.add_scalar("charts/SPS", epoch_steps.get(part, steps) / (time.perf_counter() - t0), steps_done)
        fields = {"part": part, "took": time.perf_counter() - t0,
                  **log_unit(writer, part, metrics, log_step, n, value_scale)}
        if part == "pi" and log_step in epochs:  # evaluated before the checkpoint, which then holds it
            p = epochs.index(log_step)
            sweep = add_to_sweep(sweep, p, evaluate(state.pi, key_eval))
            fields["sweep_return"] = float(sweep["sampled_return"][:, :, p].mean())
            for key in ("return", "sampled_return"):
                writer.add_scalar(f"eval/sweep_{key}", float(sweep[key][:, :, p].mean()), log_step)
        save_checkpoint(ckpt_path, (state, sweep), unit + 1, "empo/ppo-checkpoint/v3", identity)
        progress(unit + 1, **fields)
    if 0 in epochs:  # pi_L starts from the stage-1 policies (Algorithm 2, line 2)
        sweep = add_to_sweep(sweep, 0, evaluate(beta, key_eval))

    # Evaluation for insight: beta_z and pi_L(.|s, z) alone, from s_0 (navigation) or in the Gymnasium env.
    arrays_eval, summary_eval = {}, {}
    if nav:
        arrays_eval, summary_eval = evaluate_policies(args, evaluate, beta, state.pi, key_eval, writer, run_dir, seeds,
                                                      k)
    elif env is not None:
        arrays_eval, summary_eval = gym_eval.evaluate_clusters(
            env, policy, obs_mean, obs_std, {"beta": beta, "pi": state.pi}, (len(seeds), k, args.eval_episodes),
            args.seed, writer, args.pi_epochs, "[ppo]")
    if epochs:
        arrays_sweep, summary_eval["sweep"] = sweep_arrays(sweep, epochs)
        arrays_eval.update(arrays_sweep)
    write_outputs(args, state, arrays_eval, seeds, cluster_run, cluster, k, value_scale,
                  {"dataset": data_sha, "cluster": cluster_sha})
    writer.close()
    print(f"[ppo] wrote {args.out}: SARSA {timings['q']:.1f}s, V {timings['v']:.1f}s, PPO {timings['pi']:.1f}s")
    return {"timings": timings, "value_scale": value_scale, **summary_eval}


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
