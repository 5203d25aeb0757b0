"""Implicit Q-Learning (Kostrikov, Nair & Levine 2022) as a baseline, on the navigation task and on D4RL/MuJoCo.

Paper: IQL's §4 (expectile regression of V, the Q target through V, advantage-weighted extraction of the policy)
and its Appendix B's locomotion settings, checked against its authors' code (github.com/ikostrikov/
implicit_q_learning: learner.py, actor.py, critic.py, policy.py, train_offline.py), which fixes what the paper leaves
open. The discussion behind each numbered item below is docs/baselines.md, IQL item N.

Input   ``--dataset``: an .npz (schema empo/dataset/v1), D4RL .hdf5 files or Minari ids, as the EMPO stages take.
Output  ``iql.npz`` (schema empo/iql/v1, docs/schemas.md): actor/params/..., critic1/params/..., critic2/params/...,
        value/params/... [S, ...], seeds [S], arch/*, eval/* (and eval/sampled_* on the navigation task) [S, E];
        iql_rollouts.png and iql_action_field.png beside it (navigation task); TensorBoard logs in ``<out>/../iql``.

Equation map (IQL's equations as its paper numbers them; the tags in the code name them)
    L_2^tau(u) = |tau - 1(u < 0)| u^2                                         -> expectile_loss
    L_V(psi) = E_D[L_2^tau(min_{i=1,2} Q_i(s, a; theta_i') - V(s; psi))]      (Eq. 5) -> value_loss
    L_Q(theta) = sum_i E_D[(r + gamma (1 - d) V(s'; psi) - Q_i(s, a; theta_i))^2] (Eq. 6) -> q_target, critic_loss
    L_pi(phi) = -E_D[min(exp(beta (min_i Q_i(s, a; theta_i') - V(s))), 100) log pi(a|s; phi)] (Eq. 7)
                                                                               -> awr_weights, actor_loss
    theta_i' <- alpha theta_i + (1 - alpha) theta_i' after every step                   -> polyak
    one step: V, then pi (with the new V), then Q (with the new V), then the targets (the authors' order)
                                                                               -> make_train_chunk

Interpretations and deviations
    1. Networks: V, Q1, Q2 and the actor are MLPs of --hidden-layers ReLU layers of --hidden-dim and a linear output
       (d4rl preset: 2 x 256, IQL's; nav preset: Appendix B's 3 x 64); Flax's initialisation, not the authors'
       orthogonal one. The critics take [s, a] (the authors' input), V takes s.
    2. The actor is a Gaussian with mean a_max tanh(MLP(s)) and a state-independent log-std (a parameter, init 0,
       clipped to [-5, 2]), the authors' locomotion actor (no tanh squashing of the distribution, no dropout);
       a_max is the data set's largest |a| per dimension (1 for D4RL, as the authors' tanh).
    3. States standardised, (s - mu) / (sigma + 1e-3), as the other baselines (the authors feed raw states).
    4. --reward-scale returns (d4rl preset): r <- 1000 r / (max_tau R(tau) - min_tau R(tau)) over the data set's
       trajectories (its episode_ids), the authors' normalisation of locomotion rewards; 'none' (nav) keeps them.
    5. d = terminals (a timeout bootstraps); gamma = 0.99 (IQL; nav preset 0.999, Table 4).
    6. Adam lr 3e-4 for V and Q; the actor's lr decays from 3e-4 to 0 by a cosine over --steps (the authors' code).
    7. --steps 1,000,000 of B = 256 rows drawn uniformly with replacement, in jitted chunks of --steps-per-call, a
       checkpoint after each; --resume is exact.
    8. Run i uses seed --seed + i; the runs are vmapped in one call and sharded over the visible devices.
    9. Evaluation with the mean action (IQL's): rollouts from s_0 on the navigation task (eval/*; eval/sampled_* with
       actions drawn from pi as well), episodes in the Gymnasium environment and D4RL's normalised score otherwise.

Example
    python baselines/iql.py --preset d4rl --num-seeds 10
    python baselines/iql.py --dataset data/nav.npz --out runs/nav/iql.npz --num-seeds 10
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # empo_io, gym_eval and nav_env live in the repository root

import empo_io  # noqa: F401  first: its start-up guard makes Ctrl-C while the libraries load one sentence

# isort: split

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
from empo_io import InputError, load_dataset, observation_stats, flatten_params
from empo_io import checkpoint_path, run_identity, resume_checkpoint, save_checkpoint, save_output, fetch, place
from empo_io import cli, run, check_flags, check_fits, check_writable, make_writer, Progress, seed_shardings
# isort: on


@dataclass
class Args(gym_eval.EvalEnvFlags):
    """Implicit Q-Learning (Kostrikov, Nair & Levine 2022): expectile V, Q through V, advantage-weighted policy."""

    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = the navigation task, 'd4rl' = IQL's locomotion settings on
    halfcheetah medium + expert (D4RL v2 files in data/d4rl); flags given on the command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz (schema empo/dataset/v1), or comma-separated D4RL .hdf5 files or Minari ids, as the EMPO
    stages take (a path that exists is one file even if its name holds commas)"""
    out: str = "runs/nav/iql.npz"
    """output file (schema empo/iql/v1); figures go beside it, TensorBoard logs to the folder 'iql' beside it"""
    seed: int = 1
    """random seed of the first run; run i uses seed + i"""
    num_seeds: int = 1
    """independent runs in one vmapped call, sharded over the visible devices"""
    resume: bool = False
    """continue from the checkpoint beside --out (written after every chunk of steps)"""
    eval_episodes: int = 10
    """rollouts (navigation task) or episodes (Gymnasium) of each run's actor with its mean action; 0 skips them"""
    # --- algorithm (IQL's locomotion settings; gamma and the network from Table 4 and Appendix B on nav) ---
    steps: int = 1_000_000
    """gradient steps, each of V, pi and Q once (IQL's max_steps)"""
    gamma: float = 0.999
    """gamma: discount factor (Table 4, didactic; IQL and the d4rl preset: 0.99)"""
    expectile: float = 0.7
    """tau: the expectile of min_i Q_i(s, a) that V(s) regresses to (IQL's locomotion value)"""
    temperature: float = 3.0
    """beta: inverse temperature of the advantage weights exp(beta (Q - V)) (IQL's locomotion value)"""
    max_weight: float = 100.0
    """the advantage weights are clipped at this value (IQL's code: 100)"""
    tau: float = 0.005
    """alpha: Polyak rate of the target critics, theta' <- alpha theta + (1 - alpha) theta' (IQL's code: tau)"""
    reward_scale: Literal["none", "returns"] = "none"
    """'returns': r <- 1000 r / (max return - min return) over the trajectories (IQL's locomotion normalisation,
    the d4rl preset); 'none' keeps the data set's rewards"""
    batch_size: int = 256
    """B: minibatch size, rows drawn uniformly with replacement"""
    learning_rate: float = 3e-4
    """Adam learning rate of V, Q and (at step 0, decaying by a cosine to 0 at --steps) of the actor"""
    hidden_dim: int = 64
    """hidden units per layer of every network (Appendix B: 64 didactic; IQL: 256)"""
    hidden_layers: int = 3
    """hidden ReLU layers before the linear output (Appendix B's 4-layer MLP: 3; IQL: 2)"""
    # --- speed ---
    steps_per_call: int = 5_000
    """gradient steps per jitted call: one log line, TensorBoard scalars and one checkpoint each"""


PRESETS = {
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 out="runs/halfcheetah-medium-expert/iql.npz", gamma=0.99, reward_scale="returns", hidden_dim=256,
                 hidden_layers=2),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood
# for by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ('out', 'resume', 'preset', 'eval_episodes', 'eval_env', 'ref_min_score', 'ref_max_score', 'dataset')
CHECKPOINT_SCHEMA = "empo/iql-checkpoint/v1"


# --- containers ---

@struct.dataclass
class TrainState:
    actor: Any  # pi(a|s; phi)
    actor_opt: Any
    critic: Any  # (Q1, Q2), parameters stacked on a leading axis [2, ...]
    critic_target: Any  # (theta_1', theta_2')
    critic_opt: Any
    value: Any  # V(s; psi)
    value_opt: Any


@struct.dataclass
class Data:
    """The data set on the device (shared by all runs)."""

    obs: jax.Array  # [N, obs_dim], standardised
    actions: jax.Array  # [N, act_dim]
    rewards: jax.Array  # [N], scaled (interpretation 4)
    next_obs: jax.Array  # [N, obs_dim], standardised
    not_done: jax.Array  # [N] float, 0 after a terminal, 1 otherwise (a timeout bootstraps)


# --- networks ---

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the authors' log_std_min for IQL and their policy's LOG_STD_MAX


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


class GaussianActor(nn.Module):
    """pi(a|s; phi) = N(a_max tanh(MLP(s)), diag exp(log_std)^2), log_std a state-independent parameter
    clipped to [LOG_STD_MIN, LOG_STD_MAX] (interpretation 2). Returns (mean [B, act_dim], log_std [act_dim])."""

    act_dim: int
    action_scale: tuple
    hidden_dim: int
    hidden_layers: int

    @nn.compact
    def __call__(self, obs):
        mean = jnp.asarray(self.action_scale, jnp.float32) * jnp.tanh(
            MLP(self.hidden_dim, self.hidden_layers, self.act_dim)(obs))
        log_std = self.param("log_std", nn.initializers.zeros, (self.act_dim,))
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(mean, log_std, action):
    """log N(action; mean, exp(log_std)^2), summed over the last (action) axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z * z - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)


# --- losses (IQL) ---

def expectile_loss(diff, expectile: float):
    """mean_B L_2^tau(u), L_2^tau(u) = |tau - 1(u < 0)| u^2, u = diff [B]: above the tau-expectile weighs tau,
    below it 1 - tau."""
    weight = jnp.where(diff > 0, expectile, 1.0 - expectile)  # |tau - 1(u < 0)|
    return jnp.mean(weight * diff ** 2)  # L_2^tau


def value_loss(target_q, v, expectile: float):
    """Eq. (5): mean_B L_2^tau(min_i Q_i(s, a; theta_i') - V(s; psi)), the target held fixed. target_q [2, B], v [B]."""
    q = jnp.minimum(target_q[0], target_q[1])  # [B] min of the twin target critics
    return expectile_loss(jax.lax.stop_gradient(q) - v, expectile)  # Eq. (5)


def q_target(rewards, not_done, next_v, gamma: float):
    """The target of Eq. (6): y = r + gamma (1 - d) V(s'; psi). [B]"""
    return rewards + gamma * not_done * next_v  # Eq. (6) target


def critic_loss(q, target):
    """Eq. (6): sum_{i=1,2} mean_B (Q_i(s, a; theta_i) - y)^2, y held fixed. q [2, B], target [B]."""
    return jnp.sum(jnp.mean((q - jax.lax.stop_gradient(target)[None]) ** 2, axis=-1))  # Eq. (6)


def awr_weights(q, v, temperature: float, max_weight: float):
    """min(exp(beta (Q(s, a) - V(s))), max_weight), held constant. q, v [B] -> [B]."""
    return jax.lax.stop_gradient(jnp.minimum(jnp.exp(temperature * (q - v)), max_weight))  # Eq. (7) weights


def actor_loss(weights, log_prob):
    """Eq. (7): -mean_B w(s, a) log pi(a|s; phi). weights, log_prob [B]."""
    return -jnp.mean(weights * log_prob)  # Eq. (7)


def polyak(target, online, tau: float):
    """theta' <- tau theta + (1 - tau) theta' for every leaf."""
    return jax.tree.map(lambda t, p: tau * p + (1.0 - tau) * t, target, online)  # target update


# --- networks together ---

def make_networks(hidden_dim: int, hidden_layers: int, act_dim: int, action_scale: tuple) -> dict:
    return {"actor": GaussianActor(act_dim, action_scale, hidden_dim, hidden_layers),  # pi(a|s; phi)
            "critic": MLP(hidden_dim, hidden_layers, 1),  # Q_i(s, a; theta_i) on [s, a]
            "value": MLP(hidden_dim, hidden_layers, 1)}  # V(s; psi)


def q_values(nets: dict, critic, obs, actions):
    """Q1 and Q2 at (obs, actions) with the stacked critic parameters -> [2, B]."""
    x = jnp.concatenate([obs, actions], axis=-1)  # [B, obs_dim + act_dim]
    return jax.vmap(lambda params: nets["critic"].apply(params, x)[:, 0])(critic)  # [2, B]


def v_value(nets: dict, value, obs):
    return nets["value"].apply(value, obs)[:, 0]  # [B]


# --- training functions ---

def make_optimisers(args: Args) -> dict:
    """Adam for V and Q; Adam with a cosine decay of the lr to 0 over --steps for the actor (interpretation 6)."""
    return {"value": optax.adam(args.learning_rate), "critic": optax.adam(args.learning_rate),
            "actor": optax.adam(optax.cosine_decay_schedule(args.learning_rate, args.steps))}


def make_init(args: Args, nets: dict, obs_dim: int, act_dim: int):
    txs = make_optimisers(args)

    def init(key) -> TrainState:
        key_actor, key_critic, key_value = jax.random.split(key, 3)
        actor = nets["actor"].init(key_actor, jnp.zeros((1, obs_dim)))
        critic = jax.vmap(lambda k: nets["critic"].init(k, jnp.zeros((1, obs_dim + act_dim))))(
            jax.random.split(key_critic, 2))  # Q1, Q2 stacked
        value = nets["value"].init(key_value, jnp.zeros((1, obs_dim)))
        return TrainState(actor=actor, actor_opt=txs["actor"].init(actor), critic=critic, critic_target=critic,
                          critic_opt=txs["critic"].init(critic), value=value, value_opt=txs["value"].init(value))

    return init, txs


def make_train_chunk(args: Args, nets: dict, txs: dict, num_rows: int):
    """IQL: ``steps`` updates, each V, then pi, then Q, then the targets (the authors' order).

    Returns chunk(state, key, data, steps) -> (state, metrics averaged over the chunk).
    """
    def step(params, opt, tx, grads):
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    def update(state: TrainState, key, data: Data):
        idx = jax.random.randint(key, (args.batch_size,), 0, num_rows)  # [B], uniform with replacement
        obs, actions, next_obs = data.obs[idx], data.actions[idx], data.next_obs[idx]  # [B, ...]
        target_q = q_values(nets, state.critic_target, obs, actions)  # [2, B] Q_i(s, a; theta_i')

        # V: the tau-expectile of min_i Q_i(s, a; theta_i') (Eq. 5).
        loss_v, grads = jax.value_and_grad(lambda p: value_loss(target_q, v_value(nets, p, obs), args.expectile))(
            state.value)
        value, value_opt = step(state.value, state.value_opt, txs["value"], grads)

        # pi: advantage-weighted regression with the new V (Eq. 7).
        weights = awr_weights(jnp.minimum(target_q[0], target_q[1]), v_value(nets, value, obs), args.temperature,
                              args.max_weight)  # [B]

        def actor_objective(p):
            mean, log_std = nets["actor"].apply(p, obs)  # [B, act_dim], [act_dim]
            return actor_loss(weights, gaussian_log_prob(mean, log_std, actions))

        loss_pi, grads = jax.value_and_grad(actor_objective)(state.actor)
        actor, actor_opt = step(state.actor, state.actor_opt, txs["actor"], grads)

        # Q: r + gamma (1 - d) V(s') with the new V (Eq. 6).
        target = q_target(data.rewards[idx], data.not_done[idx], v_value(nets, value, next_obs), args.gamma)  # [B]
        loss_q, grads = jax.value_and_grad(lambda p: critic_loss(q_values(nets, p, obs, actions), target))(
            state.critic)
        critic, critic_opt = step(state.critic, state.critic_opt, txs["critic"], grads)

        state = TrainState(actor=actor, actor_opt=actor_opt, critic=critic, value=value, value_opt=value_opt,
                           critic_opt=critic_opt, critic_target=polyak(state.critic_target, critic, args.tau))
        return state, {"losses/value": loss_v, "losses/critic": loss_q, "losses/actor": loss_pi,
                       "charts/weight_mean": jnp.mean(weights), "charts/weight_clipped": jnp.mean(
                           weights >= args.max_weight), "charts/target_mean": jnp.mean(target)}

    def chunk(state: TrainState, key, data: Data, steps: int):
        state, metrics = jax.lax.scan(lambda s, k: update(s, k, data), state, jax.random.split(key, steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return chunk


# --- evaluation ---

def make_evaluate(actor_net, obs_mean, obs_std, episodes: int, sample: bool):
    """Rollouts of pi from s_0 (nav_env.rollout) with its mean action (or a draw), vmapped over runs."""
    def evaluate(params, key):
        def act(key_t, pos):
            mean, log_std = actor_net.apply(params, (pos - obs_mean) / obs_std)  # [E, act_dim], [act_dim]
            if sample:
                return mean + jnp.exp(log_std) * jax.random.normal(key_t, mean.shape)
            return mean

        return nav_env.rollout(key, act, episodes)  # nav_env.report_rollouts picks the fields it stores

    return jax.jit(jax.vmap(evaluate))


def evaluate_nav(args: Args, nets, inp: Inputs, state: TrainState, key_eval, writer, run_dir, seeds):
    """Rollouts of every run's actor, a table, TensorBoard scalars and figures; returns (eval/* arrays, summary)."""
    obs_mean, obs_std = inp.obs_mean, inp.obs_std
    make_eval = lambda sample: make_evaluate(nets["actor"], jnp.asarray(obs_mean), jnp.asarray(obs_std),
                                             args.eval_episodes, sample)
    headers = {sample: f"[iql] actor pi ({'sampled' if sample else 'mean'} actions), {args.eval_episodes} rollouts "
                       f"per run:" for sample in (False, True)}
    outs, arrays, summary = nav_env.evaluate_protocols(make_eval, state.actor, key_eval, seeds, headers, writer,
                                                       args.steps)
    images = {"rollouts": nav_env.plot_runs(outs[False], seeds, "IQL: mean action, every run",
                                            os.path.join(run_dir, "iql_rollouts.png"))}
    arrow_states, field_states = nav_env.grid_states(16), nav_env.grid_states(61)
    actor0, value0 = jax.tree.map(lambda x: x[0], fetch((state.actor, state.value)))
    norm = lambda states: jnp.asarray((states - obs_mean) / obs_std)
    images["action_field"] = nav_env.plot_map(
        arrows=(arrow_states, np.asarray(nets["actor"].apply(actor0, norm(arrow_states))[0])),
        field=np.asarray(v_value(nets, value0, norm(field_states))).reshape(61, 61), field_label="V(s)",
        title=f"IQL: mean action of pi over V(s) (seed {seeds[0]})",
        path=os.path.join(run_dir, "iql_action_field.png"))
    for name, image in images.items():
        writer.add_image(f"eval/{name}", image, args.steps, dataformats="HWC")
    return arrays, summary


def evaluate_gym(args: Args, nets, inp: Inputs, state: TrainState, env: dict, writer, seeds):
    """Episodes of every run's actor (mean action) in the Gymnasium environment, all S x E at once; returns and
    D4RL's normalised score, a line per run, TensorBoard scalars (gym_eval.evaluate_runs, gym_eval.report_runs)."""
    mean_action = lambda actor, obs, key: nets["actor"].apply(actor, obs)[0]  # [E, act_dim]
    out = gym_eval.evaluate_runs(env, mean_action, state.actor, inp.obs_mean, inp.obs_std,
                                 (len(seeds), args.eval_episodes), args.seed)
    header = f"[iql] actor pi (mean actions) in {env['env_id']}, {args.eval_episodes} episodes per run:"
    return gym_eval.report_runs(out, header, seeds, writer, args.steps)


# --- main: the flags, the inputs, the outputs, the schedule ---

def validate_args(args: Args) -> None:
    """The flags alone, before anything is read: one sentence for the first one out of range."""
    at_least = dict(steps=1, num_seeds=1, batch_size=1, steps_per_call=1, hidden_dim=1, hidden_layers=1,
                    eval_episodes=0)
    check_flags(args, at_least)
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        raise InputError(f"need 0 <= --gamma <= 1 and 0 < --tau <= 1, got {args.gamma} and {args.tau}")
    if not 0.0 < args.expectile < 1.0:
        raise InputError(f"need 0 < --expectile < 1, got {args.expectile}")
    if not args.temperature >= 0 or not args.max_weight > 0 or not args.learning_rate > 0:
        raise InputError(f"--temperature cannot be negative and --max-weight and --learning-rate must be positive, "
                         f"got {args.temperature}, {args.max_weight} and {args.learning_rate}")
    check_fits(f"--hidden-dim {args.hidden_dim} with --hidden-layers {args.hidden_layers}",  # 5 nets: params, Adam
               16.0 * 5 * args.num_seeds * args.hidden_layers * args.hidden_dim ** 2)
    check_fits(f"--eval-episodes {args.eval_episodes}", 2 * args.num_seeds * args.eval_episodes * 1001 * 2 * 4)


@dataclass
class Inputs:
    """The data set as main uses it (prepare_inputs): the device copy and what is derived from it."""

    sha: str  # the data set's digest
    data: Data
    n: int  # transitions
    obs_dim: int
    act_dim: int
    obs_mean: np.ndarray  # [obs_dim] float32
    obs_std: np.ndarray  # [obs_dim] float32, std + 1e-3
    action_scale: tuple  # a_max: the largest |action| per dimension (interpretation 2)
    reward_scale: float  # the factor on every reward (interpretation 4)
    env: Optional[dict]  # where pi is evaluated (gym_eval.evaluation_env), None for nowhere


def reward_factor(rewards, episode_ids, how: str) -> float:
    """1000 / (max_tau R(tau) - min_tau R(tau)) over the trajectories for 'returns' (interpretation 4), else 1."""
    if how == "none":
        return 1.0
    returns = np.bincount(episode_ids, weights=rewards.astype(np.float64))  # [episodes] undiscounted returns
    spread = float(returns.max() - returns.min())
    if not spread > 0:
        raise InputError(f"--reward-scale returns needs trajectories of different returns; all {len(returns)} of "
                         f"this data set return {returns[0]:.6g}")
    return 1000.0 / spread


def prepare_inputs(args: Args) -> Inputs:
    """The data set (load_dataset validates it), its states standardised (interpretation 3), a_max, the rewards
    scaled (interpretation 4), and where pi is evaluated, decided before training."""
    data_np, data_sha = load_dataset(args.dataset)
    obs_dim, act_dim = data_np["observations"].shape[1], data_np["actions"].shape[1]
    env = gym_eval.evaluation_env_of(args, obs_dim)
    obs_mean, obs_std = observation_stats(args.dataset, data_np["observations"])
    action_scale = tuple(float(x) for x in np.maximum(np.abs(data_np["actions"]).max(0), 1e-3))
    scale = reward_factor(data_np["rewards"], data_np["episode_ids"], args.reward_scale)
    norm = lambda x: jnp.asarray((x - obs_mean) / obs_std)
    data = Data(obs=norm(data_np["observations"]), actions=jnp.asarray(data_np["actions"]),
                rewards=jnp.asarray(data_np["rewards"] * np.float32(scale)),
                next_obs=norm(data_np["next_observations"]),
                not_done=jnp.asarray(1.0 - data_np["terminals"].astype(np.float32)))
    return Inputs(sha=data_sha, data=data, n=len(data_np["rewards"]), obs_dim=obs_dim, act_dim=act_dim,
                  obs_mean=obs_mean, obs_std=obs_std, action_scale=action_scale, reward_scale=scale, env=env)


def output_arrays(args: Args, state: TrainState, inp: Inputs, seeds) -> dict:
    """actor/params/..., critic1/params/..., critic2/params/..., value/params/... [S, ...], seeds [S] and arch/*."""
    critic_i = lambda i: jax.tree.map(lambda x: x[:, i], state.critic["params"])  # [S, 2, ...] -> [S, ...]
    return {
        **flatten_params("actor/params", state.actor["params"]), **flatten_params("critic1/params", critic_i(0)),
        **flatten_params("critic2/params", critic_i(1)), **flatten_params("value/params", state.value["params"]),
        "seeds": seeds.astype(np.int64), "arch/obs_dim": np.int64(inp.obs_dim), "arch/act_dim": np.int64(inp.act_dim),
        "arch/hidden_dim": np.int64(args.hidden_dim), "arch/hidden_layers": np.int64(args.hidden_layers),
        "arch/obs_mean": inp.obs_mean, "arch/obs_std": inp.obs_std,
        "arch/action_scale": np.asarray(inp.action_scale, np.float32), "arch/gamma": np.float32(args.gamma),
        "arch/reward_scale": np.float32(inp.reward_scale),
    }


def main(args: Args) -> dict:
    validate_args(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset])
    inp = prepare_inputs(args)
    nets = make_networks(args.hidden_dim, args.hidden_layers, inp.act_dim, inp.action_scale)
    init, txs = make_init(args, nets, inp.obs_dim, inp.act_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = place(inp.data, replicated)
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    split = jax.jit(jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3), out_axes=1))
    key_init, key_train, key_eval = (place(x, seed_sharding) for x in split(jnp.asarray(seeds)))
    state = jax.jit(jax.vmap(init), out_shardings=seed_sharding)(key_init)

    # The schedule: chunks of steps, a checkpoint after each (interpretation 7).
    calls = [min(args.steps_per_call, args.steps - i) for i in range(0, args.steps, args.steps_per_call)]
    run_dir = os.path.dirname(os.path.abspath(args.out))
    identity = run_identity(args, NEUTRAL_FLAGS, {"dataset": inp.sha})
    ckpt_path, state, first = resume_checkpoint(args, state, CHECKPOINT_SCHEMA, identity, len(calls))
    state = place(state, seed_sharding)
    writer = make_writer(os.path.join(run_dir, "iql"), args)

    train_chunk = make_train_chunk(args, nets, txs, inp.n)
    calls_jit = {s: jax.jit(jax.vmap(lambda st, key, d, s=s: train_chunk(st, key, d, s), in_axes=(0, 0, None)))
                 for s in set(calls)}
    fold_in = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
    chunk_key = lambda unit: place(fold_in(key_train, unit), seed_sharding)
    print(f"[iql] N={inp.n} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); "
          f"reward x {inp.reward_scale:.4g}; {args.steps} steps in {len(calls)} chunks", flush=True)

    progress = Progress(len(calls), "iql", first=first)
    t_train = time.perf_counter()
    done, timed = sum(calls[:first]), []
    for unit in range(first, len(calls)):
        t0 = time.perf_counter()
        state, metrics = calls_jit[calls[unit]](state, chunk_key(unit), data)
        metrics = {name: float(np.mean(x)) for name, x in fetch(metrics).items()}  # mean over runs
        took = time.perf_counter() - t0
        timed.append((calls[unit], took))
        done += calls[unit]
        save_checkpoint(ckpt_path, state, unit + 1, CHECKPOINT_SCHEMA, identity)
        for name, value in metrics.items():
            writer.add_scalar(name, value, done)
        writer.add_scalar("charts/SPS", calls[unit] / took, done)
        progress(unit + 1, took=took, value_loss=metrics["losses/value"], critic_loss=metrics["losses/critic"],
                 actor_loss=metrics["losses/actor"], weight=metrics["charts/weight_mean"])
    train_s = time.perf_counter() - t_train
    # Steps per second of every run (they run in parallel), leaving out the first call (compilation).
    steady = timed[1:] or timed
    steps_per_s = sum(s for s, _ in steady) / max(sum(t for _, t in steady), 1e-9) if steady else float("nan")

    state = fetch(state)
    arrays = output_arrays(args, state, inp, seeds)
    summary = {"train_s": train_s, "steps_per_s": steps_per_s, "seeds": seeds.tolist()}
    # Evaluation (interpretation 9): from s_0 on the navigation task, else in the Gymnasium environment.
    eval_arrays, eval_summary = gym_eval.evaluate_where(
        inp.env, lambda: evaluate_nav(args, nets, inp, place(state, seed_sharding), key_eval, writer, run_dir, seeds),
        lambda env: evaluate_gym(args, nets, inp, state, env, writer, seeds))
    arrays.update(eval_arrays)
    summary.update(eval_summary)
    save_output(args, arrays, "empo/iql/v1", {"dataset": inp.sha})
    writer.close()
    print(f"[iql] wrote {args.out}: training {train_s:.1f}s, {steps_per_s:.0f} steps/s per run")
    return summary


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
