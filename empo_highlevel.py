"""Stage 3 of EMPO: high-level IQL over the clusters, the ID(s) filter, the final policy pi and its evaluation.

Paper   §3.3 (high-level IQL, the classifier, ID(s), pi_H), Table 4 (n_H, N_H, tau, b, n-step), Appendix C.
Input   --dataset (as stages 1 and 2), --cluster cluster.npz (empo/cluster/v1) and --ppo ppo.npz (empo/ppo/v1), made
        from that data set and that cluster file (their sha256 are checked).
Output  --out highlevel.npz (empo/highlevel/v1, keys in docs/schemas.md): Q_H, V_H and copies of the runs' pi_L and
        classifier (the whole final policy pi), eval/*; figures and TensorBoard logs in <out folder>/highlevel.

Equation map (the equations of §3.3 carry no numbers in the paper)
    l_H^(Q) = [Q_H(s, A(s,a); psi_H) - y]^2, y the n-step target    -> n_step_returns, n_step_target, qh_loss
    l_H^(V) = L_2^tau(Q_H(s, A(s,a); psi_bar_H) - V_H(s; phi_H))     -> expectile_loss, vh_loss
    psi_bar_H <- psi_H every n_H steps; N_H steps of both            -> make_train_chunk
    ID(s) = {z : q(z|s; phi) >= max_z' q(z'|s; phi) / b}             -> in_distribution
    pi_H(s; psi_H) = argmax_{z in ID(s)} Q_H(s, z; psi_H)             -> high_level_action
    pi(.|s) = pi_L(.|s, pi_H(s; psi_H); Theta')                      -> choose_cluster, final_action

Interpretations and deviations (item N is discussed under the same number in docs/empo_highlevel.md)
    1. Q_H(s; psi_H) -> R^K (a linear head per cluster), V_H(s; phi_H) -> R; stage 1's layers on the standardised s.
    2. Rewards are divided by c = arch/value_scale of ppo.npz; Q_H and V_H are stored in units of c.
    3. n-step target over m = min(n, rows left) rows, none past a terminal; V_H(s_{t+m}) is the current phi_H.
    4. psi_bar_H starts as psi_H and is replaced by a full copy every n_H steps; only l_H^(V) uses it.
    5. "Simultaneously": both gradients at the parameters before the step; B rows uniform with replacement.
    6. L_2^tau(u) = |tau - 1(u < 0)| u^2.
    7. q(z|s; phi) = softmax of the classifier's logits; b >= 1, so ID(s) is never empty; ties go to the lowest z.
    8. pi executes the mean action of pi_L(.|s, pi_H(s)) (--sample: draws); Q_H values beta_z, pi executes pi_L.
    9. Run i: seed --seed + i, ppo run --first-run + i of ppo.npz (run 0 when it holds one) and its cluster_run.
    10. Evaluation (never used for selection): --eval-episodes rollouts of pi per run, from s_0 on the nav task.

Example
    python empo_highlevel.py --dataset data/nav.npz --cluster runs/nav/cluster.npz --ppo runs/nav/ppo.npz \\
        --out runs/nav/highlevel.npz
"""

import empo_io  # noqa: F401  first: its start-up guard makes Ctrl-C while the libraries load one sentence

# isort: split

import os
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

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
from empo_io import InputError, load_dataset, load_npz, check_arrays, check_arch, check_param_shapes, param_shapes
from empo_io import check_made_from, made_from, flatten_params, unflatten_params
from empo_io import checkpoint_path, run_identity, resume_checkpoint, save_checkpoint, save_output, fetch, place
from empo_io import cli, run, check_flags, check_fits, check_writable, make_writer, Progress, seed_shardings
# isort: on


@dataclass
class Args(gym_eval.EvalEnvFlags):
    """Stage 3 of EMPO: high-level IQL over the clusters, the ID(s) filter and the final policy (§3.3)."""
    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = Table 4's didactic column (the navigation task), 'd4rl' = its D4RL
    column (gamma 0.99, tau 0.7; halfcheetah medium + expert, D4RL v2 files in data/d4rl); flags given on the
    command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz, D4RL .hdf5 files or Minari ids (as stage 1: a path that
    exists is one file even if its name holds commas), the one stages 1 and 2 used"""
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


# --- containers ---
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


# --- losses and the high-level policy (§3.3; one function per equation) ---
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


def stacked_apply(policy, params, obs, z):
    """(mean, log_std) of policy z_b at obs_b for every row: all K heads, then the row's one. [B, act_dim]."""
    mean, log_std = jax.vmap(policy.apply, in_axes=(0, None))(params, obs)  # [K, B, act_dim]
    pick = lambda x: jnp.take_along_axis(x, z[None, :, None], axis=0)[0]
    return pick(mean), pick(log_std)


def final_action(nets: dict, run: RunParams, obs, key, b: float, sample: bool):
    """§3.3: a ~ pi(.|s) = pi_L(.|s, pi_H(s; psi_H); Theta') at standardised obs [B, obs_dim].

    Returns (actions [B, act_dim], the clusters pi_H chose [B]); the mean action of pi_L unless ``sample``.
    """
    z = choose_cluster(nets, run, obs, b)  # [B]
    mean, log_std = stacked_apply(nets["policy"], run.pi, obs, z)  # [B, act_dim]
    if sample:
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape), z
    return mean, z  # §3.3 pi


# --- training factories (lax.scan inside jit) ---
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


# --- evaluation (never used for selection) ---
def make_evaluate(nets: dict, obs_mean, obs_std, b: float, episodes: int, sample: bool):
    """Rollouts of the final policy pi from s_0 (nav_env.rollout), vmapped over runs, with the cluster pi_H chose at
    every step (-1 after the episode's end)."""
    def evaluate(run: RunParams, key):
        act = lambda key_t, pos: final_action(nets, run, (pos - obs_mean) / obs_std, key_t, b, sample)[0]
        out = nav_env.rollout(key, act, episodes)
        z = jax.lax.map(lambda pos: choose_cluster(nets, run, (pos - obs_mean) / obs_std, b),
                        out["positions"][:, :-1])  # [E, T], one episode at a time (bounds the memory)
        chosen = jnp.where(out["alive"], z, -1)  # [E, T]
        return {name: out[name] for name in ("return", "goal", "penalty_steps", "optimal_route", "positions",
                                             "length")} | {"chosen": chosen}

    return jax.jit(jax.vmap(evaluate))


def evaluate_final_policy(args: Args, nets, obs_mean, obs_std, run: RunParams, key_eval, writer, seeds):
    """Rollouts of pi per run on the navigation task, a table and TensorBoard scalars; returns (eval/* arrays,
    summary, the rollouts the figures show)."""
    k = nets["qh"].out_dim

    def cluster_share(out) -> tuple:  # the share of steps per cluster: the table's last column, eval/*cluster_steps
        cluster_steps = np.stack([(out["chosen"] == z).sum(-1) for z in range(k)], -1)  # [S, E, K]

        def share(runs) -> tuple[dict, str]:
            steps_per_z = cluster_steps[runs].reshape(-1, k).sum(0)  # [K]
            fractions = (steps_per_z / max(steps_per_z.sum(), 1)).tolist()
            return {"cluster_share": fractions}, "z: " + " ".join(f"{x:.2f}" for x in fractions)
        return share, {"cluster_steps": cluster_steps}

    # Both protocols of Appendix C from the same start states: eval/* with the mean action of pi_L, eval/sampled_*
    # with actions drawn from pi_L(.|s, pi_H(s)) (the paper's); --sample only picks the rollouts the figures show.
    make_eval = lambda sample: make_evaluate(nets, jnp.asarray(obs_mean), jnp.asarray(obs_std), args.b,
                                             args.eval_episodes, sample)
    headers = {sample: f"[highlevel] final policy pi ({'sampled' if sample else 'mean'} actions), "
                       f"{args.eval_episodes} rollouts per run (last column: share of steps per cluster):"
               for sample in (False, True)}
    outs, arrays, summary = nav_env.evaluate_protocols(make_eval, run, key_eval, seeds, headers, writer, args.steps,
                                                       cluster_share)
    return arrays, summary, outs[args.sample]


def evaluate_final_policy_gym(args: Args, nets, obs_mean, obs_std, run: RunParams, env: dict, key_eval, writer,
                              seeds):
    """Episodes of pi per run in the data set's Gymnasium environment, all S x E at once in one vector env:
    returns, normalised scores, the share of steps per cluster, TensorBoard scalars and a table."""
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

    out = gym_eval.gym_evaluate(env, policy, shape, args.seed)
    chosen = np.stack(chosen)  # [T, S*E]
    alive = np.arange(len(chosen))[:, None] < out["length"].reshape(-1)[None]  # [T, S*E]
    steps = np.stack([((chosen == z) & alive).sum(0) for z in range(k)], -1)  # [S*E, K]
    out["cluster_steps"] = steps.reshape(shape + (k,))
    share = (steps.sum(0) / max(steps.sum(), 1)).tolist()
    header = (f"[highlevel] final policy pi ({'sampled' if args.sample else 'mean'} actions) in {env['env_id']}, "
              f"{args.eval_episodes} episodes per run:")
    arrays, summary = gym_eval.report_runs(out, header, seeds, writer, args.steps)
    print("  share of steps per cluster: " + " ".join(f"z={z} {x:.2f}" for z, x in enumerate(share)))
    return arrays, {**summary, "cluster_share": share}


# --- the command line: presets, inputs, outputs, figures, the schedule ---
PRESETS = {  # Table 4: the didactic column and the D4RL column
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 cluster="runs/halfcheetah-medium-expert/cluster.npz", ppo="runs/halfcheetah-medium-expert/ppo.npz",
                 out="runs/halfcheetah-medium-expert/highlevel.npz", gamma=0.99, expectile=0.7),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood
# for by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ('out', 'resume', 'preset', 'eval_episodes', 'eval_env', 'sample', 'ref_min_score',
                 'ref_max_score', 'dataset', 'cluster', 'ppo')
CHECKPOINT_SCHEMA = "empo/highlevel-checkpoint/v2"


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


@dataclass
class Inputs:
    """What main takes from the three inputs (load_inputs), all read and cross-checked before any training."""
    data: Data  # every row's n-step target pieces (interpretation 3), standardised
    run: RunParams  # [S, ...] each run's classifier and pi_L; qh is None until Q_H is trained
    assign: np.ndarray  # [S, N] int32, A(s, a) of each run's clustering run
    entries: dict  # the entries of highlevel.npz known before training: ppo_run, cluster_run [S], arch/*
    shas: dict  # sha256 of the data set, cluster.npz and ppo.npz as read
    env: Optional[dict]  # where pi is evaluated (gym_eval.evaluation_env), None for nowhere


def load_inputs(args: Args) -> Inputs:
    """Check that --out can be written; read and cross-check the data set, cluster.npz and ppo.npz; decide where pi is
    evaluated (before training, not after it); pick each run's ppo and clustering runs (interpretation 9); compute
    the n-step target pieces once for all runs (interpretation 3)."""
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset, args.cluster, args.ppo])
    data_np, data_sha = load_dataset(args.dataset)
    n = len(data_np["rewards"])
    obs_dim, act_dim = data_np["observations"].shape[1], data_np["actions"].shape[1]
    cluster, cluster_sizes, cluster_sha = load_cluster(args.cluster, data_sha, dict(N=n, obs_dim=obs_dim,
                                                                                    act_dim=act_dim))
    ppo, ppo_sizes, ppo_sha = load_ppo(args.ppo, data_sha, args.cluster, cluster_sha, cluster_sizes, cluster)
    env = gym_eval.evaluation_env_of(args, obs_dim)
    k, ppo_seeds = ppo_sizes["K"], ppo_sizes["S"]
    check_fits(f"--eval-episodes {args.eval_episodes}", 2 * args.num_seeds * args.eval_episodes * 1001 * 2 * 4)  # paths
    if ppo_seeds != 1 and args.first_run + args.num_seeds > ppo_seeds:
        raise InputError(f"--first-run {args.first_run} plus --num-seeds {args.num_seeds} is more than the "
                         f"{ppo_seeds} runs in {args.ppo}")
    ppo_run = args.first_run + np.arange(args.num_seeds) if ppo_seeds > 1 else np.zeros(args.num_seeds, int)
    cluster_run = ppo["cluster_run"][ppo_run]
    obs_mean, obs_std = cluster["arch/obs_mean"], cluster["arch/obs_std"]
    value_scale = float(ppo["arch/value_scale"])  # c (interpretation 2)
    reward_sum, discount, bootstrap_obs = n_step_returns(
        data_np["rewards"], data_np["next_observations"], data_np["terminals"], data_np["episode_ids"], args.gamma,
        args.n_step)
    norm = lambda x: jnp.asarray((x - obs_mean) / obs_std)
    data = Data(obs=norm(data_np["observations"]), reward_sum=jnp.asarray(reward_sum / value_scale),
                discount=jnp.asarray(discount), bootstrap_obs=norm(bootstrap_obs))
    pick = lambda prefix, arrays, runs: jax.tree.map(lambda x: jnp.asarray(x[runs]), unflatten_params(prefix, arrays))
    run = RunParams(classifier={"params": pick("classifier/params", cluster, cluster_run)}, qh=None,
                    pi={"params": pick("pi/params", ppo, ppo_run)})
    entries = {
        "ppo_run": ppo_run.astype(np.int64), "cluster_run": cluster_run.astype(np.int64),
        "arch/k": np.int64(k), "arch/obs_dim": np.int64(obs_dim), "arch/act_dim": np.int64(act_dim),
        "arch/hidden_dim": np.int64(cluster["arch/hidden_dim"]),
        "arch/hidden_layers": np.int64(cluster["arch/hidden_layers"]),
        "arch/obs_mean": obs_mean, "arch/obs_std": obs_std, "arch/action_scale": ppo["arch/action_scale"],
        "arch/value_scale": np.float32(value_scale), "arch/gamma": np.float32(args.gamma), "arch/b": np.float32(args.b),
    }
    return Inputs(data=data, run=run, assign=cluster["assignments"][cluster_run], entries=entries,
                  shas={"dataset": data_sha, "cluster": cluster_sha, "ppo": ppo_sha}, env=env)


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
    check_made_from(path, arrays, data_sha)
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
    check_made_from(path, arrays, data_sha)
    if made_from(arrays, "cluster") != cluster_sha:
        raise InputError(f"{path} was made from another cluster file than {cluster_path} (its inputs.cluster "
                         f"sha256 differs)")
    if arrays["cluster_run"].min() < 0 or arrays["cluster_run"].max() >= cluster_sizes["S"]:
        raise InputError(f"{path}: 'cluster_run' names runs outside the {cluster_sizes['S']} of {cluster_path}")
    return arrays, sizes, digest


def write_outputs(args: Args, state: TrainState, run: RunParams, seeds, inp: Inputs, arrays_eval: dict) -> None:
    """highlevel.npz (schema empo/highlevel/v1): Q_H, V_H, copies of pi_L and the classifier (the whole final policy
    pi of every run), seeds, the runs used, arch/* and the evaluation; then the checkpoint goes."""
    arrays = {
        **flatten_params("qh/params", state.qh["params"]), **flatten_params("vh/params", state.vh["params"]),
        **flatten_params("pi/params", run.pi["params"]),
        **flatten_params("classifier/params", run.classifier["params"]),
        "seeds": seeds.astype(np.int64), **inp.entries, **arrays_eval,
    }
    save_output(args, arrays, "empo/highlevel/v1", inp.shas)


def draw_figures(args: Args, nets, entries: dict, run: RunParams, vh, out: dict, writer, run_dir: str,
                 seeds) -> None:
    """The rollouts of run 0 cut by the cluster pi_H ran, every run's rollouts, and maps of pi_H, |ID(s)| and V_H
    over S (navigation task): PNG files beside --out and TensorBoard images."""
    k, value_scale = nets["qh"].out_dim, float(entries["arch/value_scale"])
    names = [f"z = {z}" for z in range(k)]
    trajs, labels = cluster_segments(out["positions"][0], out["chosen"][0], out["length"][0])
    images = {"rollouts": nav_env.plot_map(trajs, labels, label_names=names,
                                           title=f"Final policy pi (seed {seeds[0]}), coloured by pi_H(s)",
                                           path=os.path.join(run_dir, "highlevel_rollouts.png"))}
    if len(seeds) > 1:
        images["rollouts_runs"] = nav_env.plot_runs(out, seeds, "Final policy pi, every run",
                                                    os.path.join(run_dir, "highlevel_rollouts_runs.png"))
    grid = jnp.asarray((nav_env.grid_states(61) - entries["arch/obs_mean"]) / entries["arch/obs_std"])
    run0 = jax.tree.map(lambda x: x[0], fetch(run))
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


def main(args: Args) -> dict:
    """Read and cross-check the inputs; N_H IQL steps of every run in jitted chunks, a checkpoint after each; evaluate
    the final policy pi; write highlevel.npz."""
    validate_args(args)
    inp = load_inputs(args)
    entries, n = inp.entries, len(inp.data.obs)
    k, obs_dim, value_scale = int(entries["arch/k"]), int(entries["arch/obs_dim"]), float(entries["arch/value_scale"])
    obs_mean, obs_std = entries["arch/obs_mean"], entries["arch/obs_std"]
    nets = make_networks(int(entries["arch/hidden_dim"]), int(entries["arch/hidden_layers"]), k,
                         int(entries["arch/act_dim"]), tuple(float(x) for x in entries["arch/action_scale"]))
    init, tx = make_init(args, nets, obs_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = place(inp.data, replicated)
    assign = place(jnp.asarray(inp.assign), seed_sharding)  # [S, N]
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    key_init, key_train, key_eval = (
        place(x, seed_sharding) for x in jax.vmap(lambda s: jax.random.split(s, 3), out_axes=1)(seed_keys))
    state = jax.jit(jax.vmap(init), out_shardings=seed_sharding)(key_init)

    # The schedule: chunks of IQL steps, a checkpoint after each.
    calls = [min(args.steps_per_call, args.steps - i) for i in range(0, args.steps, args.steps_per_call)]
    run_dir = os.path.dirname(os.path.abspath(args.out))
    identity = run_identity(args, NEUTRAL_FLAGS, inp.shas)
    ckpt_path, state, first = resume_checkpoint(args, state, CHECKPOINT_SCHEMA, identity, len(calls))
    state = place(state, seed_sharding)
    writer = make_writer(os.path.join(run_dir, "highlevel"), args)
    train_chunk = make_train_chunk(args, nets, tx, n)
    calls_jit = {s: jax.jit(jax.vmap(lambda st, key, a, d, s=s: train_chunk(st, key, a, d, s), in_axes=(0, 0, 0, None)))
                 for s in set(calls)}
    chunk_key = lambda unit: place(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, unit),
                                            seed_sharding)
    print(f"[highlevel] N={n} K={k} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); "
          f"value scale c={value_scale:.1f}; {args.steps} steps in {len(calls)} chunks", flush=True)

    progress = Progress(len(calls), "highlevel", first=first)
    t_train = time.perf_counter()
    done = sum(calls[:first])
    for unit in range(first, len(calls)):
        t0 = time.perf_counter()
        state, metrics = calls_jit[calls[unit]](state, chunk_key(unit), assign, data)
        metrics = {name: float(np.mean(x)) for name, x in fetch(metrics).items()}
        done += calls[unit]
        writer.add_scalar("charts/SPS", calls[unit] / (time.perf_counter() - t0), done)
        save_checkpoint(ckpt_path, state, unit + 1, CHECKPOINT_SCHEMA, identity)
        for name in ("losses/q_h", "losses/v_h"):  # as trained, in units of c^2
            writer.add_scalar(name, metrics[name], done)
        for name in ("charts/q_h_mean", "charts/v_h_mean"):  # in reward units
            writer.add_scalar(name, metrics[name] * value_scale, done)
        progress(unit + 1, took=time.perf_counter() - t0, q_h_loss=metrics["losses/q_h"],
                 v_h_loss=metrics["losses/v_h"], v_h=metrics["charts/v_h_mean"] * value_scale)
    train_s = time.perf_counter() - t_train

    # The final policy pi of every run, evaluated from s_0 with maps of pi_H and ID(s) (navigation task) or in the
    # data set's Gymnasium environment.
    state = fetch(state)
    run = inp.run.replace(qh=state.qh)
    arrays_eval, summary = {}, {"train_s": train_s, "value_scale": value_scale, "seeds": seeds.tolist()}
    if inp.env is not None:
        run_on_devices = place(run, seed_sharding)
        if inp.env["kind"] == "nav":
            arrays_eval, summary_eval, shown = evaluate_final_policy(args, nets, obs_mean, obs_std, run_on_devices,
                                                                     key_eval, writer, seeds)
            draw_figures(args, nets, entries, run_on_devices, state.vh, shown, writer, run_dir, seeds)
        else:
            arrays_eval, summary_eval = evaluate_final_policy_gym(args, nets, obs_mean, obs_std, run_on_devices,
                                                                  inp.env, key_eval, writer, seeds)
        summary.update(summary_eval)
    write_outputs(args, state, run, seeds, inp, arrays_eval)
    writer.close()
    print(f"[highlevel] wrote {args.out}: IQL {train_s:.1f}s")
    return summary


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
