"""TD3+BC (Fujimoto & Gu 2021) on the navigation task and on D4RL/MuJoCo: the "TD3+BC" rows of Tables 1 and 2.

Paper: §4.1 and Table 1 (TD3+BC [11]), Appendix B (network), Appendix C (10 seeds x 10 rollouts), Table 4 (gamma);
§4.2 and Table 2 (D4RL medium-expert); TD3+BC's own paper and its author's code (github.com/sfujim/TD3_BC: main.py,
TD3_BC.py, utils.py), which fixes what that paper leaves open and gives the d4rl preset. The discussion behind each
numbered item below is docs/baselines.md, TD3+BC item N.

Input   ``--dataset``: an .npz (schema empo/dataset/v1), D4RL .hdf5 files or Minari ids, as the EMPO stages take.
Output  ``td3_bc.npz`` (schema empo/td3_bc/v1, docs/schemas.md): actor/params/..., critic1/params/...,
        critic2/params/... [S, ...], seeds [S], arch/*, eval/* [S, E] (and eval/sampled_* on the navigation task);
        td3_bc_rollouts.png and td3_bc_action_field.png beside it (navigation task); TensorBoard logs in
        ``<out folder>/td3_bc``.

Equation map (TD3+BC's equations as its paper writes them; the tags in the code name them)
    s <- (s - mu) / (sigma + eps), eps = 1e-3 (state normalisation)            -> prepare_inputs
    a~ = clip(pi(s'; phi') + clip(e, -c, c), -a_max, a_max), e ~ N(0, sigma^2) -> smoothed_target_action
    y = r + gamma (1 - d) min_{i=1,2} Q_i(s', a~; theta_i')  (clipped double Q) -> critic_target
    L(theta) = sum_{i=1,2} mean_B (Q_i(s, a; theta_i) - y)^2                   -> critic_loss
    lambda = alpha / mean_B |Q1(s, pi(s))|                                      -> actor_loss
    L(phi) = -lambda mean_B Q1(s, pi(s; phi)) + mean_B (pi(s; phi) - a)^2      -> actor_loss
    theta_i' <- tau theta_i + (1 - tau) theta_i', phi' likewise, every d steps -> polyak, make_train_chunk

Interpretations and deviations
    1. Networks: --hidden-layers ReLU layers of --hidden-dim and a linear output for the actor and the critics (nav
       preset: Appendix B's 3 x 64; d4rl preset: the original's 2 x 256); Flax's initialisation.
       pi(s) = a_max tanh(MLP(s)), s standardised.
    2. The critics take [s, a / a_max] (the original's raw a is the same where a_max = 1); Q1, Q2 stacked, one Adam.
    3. a_max is the data set's largest |a| per dimension; target noise sigma = 0.2 a_max, clipped to c = 0.5 a_max.
    4. The BC term (pi(s) - a)^2 is in raw action units (the original's); --action-units normalised: units of a_max.
    5. lambda's denominator is mean_B |Q1(s, pi(s))| (the original's code), held constant.
    6. d = terminals (a timeout bootstraps); rewards raw; gamma = 0.999 (nav preset, Table 4), 0.99 (d4rl preset,
       the original's).
    7. Delayed updates: the critics every step, the actor and the targets every d = 2 critic steps (a lax.cond).
    8. --steps 1,000,000 in jitted chunks of --steps-per-call, a checkpoint after each; --resume is exact.
    9. Run i uses seed --seed + i; the runs are vmapped in one call and sharded over the visible devices.
    10. Evaluation of the final deterministic actor (TD3+BC's): rollouts from s_0 on the navigation task (eval/*;
        eval/sampled_* with TD3's exploration noise added), episodes in the Gymnasium environment and D4RL's
        normalised score otherwise.

Example
    python baselines/td3_bc.py --preset d4rl --num-seeds 10
    python baselines/td3_bc.py --dataset data/nav.npz --out runs/nav/td3_bc.npz --num-seeds 10
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
    """TD3+BC (Fujimoto & Gu 2021): TD3 with a behaviour-cloning term in the actor loss (Tables 1 and 2, TD3+BC)."""

    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = the navigation task, 'd4rl' = the TD3+BC author's settings on
    halfcheetah medium + expert (D4RL v2 files in data/d4rl); flags given on the command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz (schema empo/dataset/v1), or comma-separated D4RL .hdf5 files or Minari ids, as the EMPO
    stages take (a path that exists is one file even if its name holds commas)"""
    out: str = "runs/nav/td3_bc.npz"
    """output file (schema empo/td3_bc/v1); figures (navigation task) go beside it, TensorBoard logs to the folder
    'td3_bc' beside it"""
    seed: int = 1
    """random seed of the first run; run i uses seed + i"""
    num_seeds: int = 1
    """independent runs in one vmapped call, sharded over the visible devices"""
    resume: bool = False
    """continue from the checkpoint beside --out (written after every chunk of steps)"""
    eval_episodes: int = 10
    """rollouts (navigation task) or episodes (Gymnasium) of each run's deterministic actor; 0 skips them"""
    # --- algorithm (TD3+BC's defaults; gamma and the network from Table 4 and Appendix B on nav) ---
    steps: int = 1_000_000
    """critic steps (the original's max_timesteps; the actor takes one step every d of them)"""
    gamma: float = 0.999
    """gamma: discount factor (Table 4, didactic; the original TD3+BC and the d4rl preset: 0.99)"""
    alpha: float = 2.5
    """alpha: weight of the Q term against the BC term, lambda = alpha / mean |Q1(s, pi(s))|"""
    policy_freq: int = 2
    """d: the actor and the target networks are updated every d critic steps (delayed updates)"""
    tau: float = 0.005
    """tau: Polyak rate of the target networks, theta' <- tau theta + (1 - tau) theta'"""
    action_units: Literal["raw", "normalised"] = "raw"
    """units of the BC term (pi(s) - a)^2: 'raw' = the environment's action units (the original code's, a_max = 0.2
    here), 'normalised' = units of a_max, (pi(s) / a_max - a / a_max)^2, 1 / a_max^2 = 25 times larger here (the
    usual choice of JAX offline-RL code whose actor outputs a / a_max); see interpretation 4"""
    policy_noise: float = 0.2
    """sigma / a_max: std of the target policy smoothing noise, in units of a_max"""
    noise_clip: float = 0.5
    """c / a_max: the smoothing noise is clipped to +-c, in units of a_max"""
    batch_size: int = 256
    """B: minibatch size, rows drawn uniformly with replacement"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor and of the critics"""
    hidden_dim: int = 64
    """hidden units per layer of the actor and the critics (Appendix B: 64 didactic; TD3+BC and the d4rl preset:
    256)"""
    hidden_layers: int = 3
    """hidden ReLU layers before the linear output (Appendix B's 4-layer MLP: 3; TD3+BC and the d4rl preset: 2)"""
    # --- speed ---
    steps_per_call: int = 5_000
    """critic steps per jitted call: one log line, TensorBoard scalars and one checkpoint each"""


PRESETS = {  # d4rl: github.com/sfujim/TD3_BC main.py and TD3_BC.py (every other flag's default is theirs too)
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 out="runs/halfcheetah-medium-expert/td3_bc.npz", gamma=0.99, hidden_dim=256, hidden_layers=2),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood
# for by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ('out', 'resume', 'preset', 'eval_episodes', 'eval_env', 'ref_min_score', 'ref_max_score', 'dataset')
CHECKPOINT_SCHEMA = "empo/td3_bc-checkpoint/v2"


# --- containers ---

@struct.dataclass
class TrainState:
    actor: Any  # pi(s; phi)
    actor_target: Any  # phi'
    actor_opt: Any
    critic: Any  # (Q1, Q2), parameters stacked on a leading axis [2, ...]
    critic_target: Any  # (theta_1', theta_2')
    critic_opt: Any


@struct.dataclass
class Data:
    """The data set on the device (shared by all runs)."""

    obs: jax.Array  # [N, obs_dim], standardised
    actions: jax.Array  # [N, act_dim]
    rewards: jax.Array  # [N]
    next_obs: jax.Array  # [N, obs_dim], standardised
    not_done: jax.Array  # [N] float, 0 after a terminal, 1 otherwise (a timeout bootstraps)


# --- networks ---

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


class Actor(nn.Module):
    """pi(s; phi) = a_max * tanh(MLP(s)): the deterministic policy of TD3."""

    act_dim: int
    action_scale: tuple
    hidden_dim: int
    hidden_layers: int

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden_dim, self.hidden_layers, self.act_dim)(obs)
        return jnp.asarray(self.action_scale, jnp.float32) * jnp.tanh(out)


# --- losses (TD3 and TD3+BC) ---

def smoothed_target_action(next_pi, noise, action_scale, policy_noise: float, noise_clip: float):
    """Target policy smoothing: a~ = clip(pi(s'; phi') + clip(sigma e, -c, c), -a_max, a_max), e ~ N(0, 1).

    next_pi, noise [B, act_dim]; sigma = policy_noise * a_max and c = noise_clip * a_max per dimension.
    """
    scale = jnp.asarray(action_scale, jnp.float32)  # [act_dim] a_max
    smoothing = jnp.clip(noise * policy_noise * scale, -noise_clip * scale, noise_clip * scale)  # [B, act_dim]
    return jnp.clip(next_pi + smoothing, -scale, scale)  # TD3 target policy smoothing


def critic_target(rewards, not_done, next_q1, next_q2, gamma: float):
    """Clipped double Q-learning target: y = r + gamma (1 - d) min(Q1(s', a~; theta_1'), Q2(s', a~; theta_2')). [B]"""
    return rewards + gamma * not_done * jnp.minimum(next_q1, next_q2)  # TD3 clipped double Q target


def critic_loss(q, target):
    """L(theta) = sum_{i=1,2} mean_B (Q_i(s, a; theta_i) - y)^2, y held fixed. q [2, B], target [B]."""
    return jnp.sum(jnp.mean((q - jax.lax.stop_gradient(target)[None]) ** 2, axis=-1))  # TD3 critic loss


def actor_loss(q_pi, pi, actions, alpha: float):
    """TD3+BC: L(phi) = -lambda mean_B Q1(s, pi(s)) + mean_B (pi(s) - a)^2, lambda = alpha / mean_B |Q1(s, pi(s))|.

    q_pi [B], pi and actions [B, act_dim]; lambda is held constant (no gradient through the denominator),
    the BC term is the mean over the batch and the action dimensions. Returns (loss, (lambda, bc)).
    """
    lam = alpha / jax.lax.stop_gradient(jnp.mean(jnp.abs(q_pi)))  # TD3+BC lambda
    bc = jnp.mean((pi - actions) ** 2)  # TD3+BC behaviour-cloning term
    return -lam * jnp.mean(q_pi) + bc, (lam, bc)  # TD3+BC actor loss


def bc_units(pi, actions, action_scale: tuple, units: str):
    """(pi, a) in the units of the BC term: the environment's ('raw') or divided by a_max ('normalised').

    The actor, the critic's input (a / a_max) and the target noise (in units of a_max) are the same in both
    conventions, so this is the only difference: the normalised BC term is the raw one divided by a_max^2.
    """
    if units == "raw":
        return pi, actions
    scale = jnp.asarray(action_scale, jnp.float32)
    return pi / scale, actions / scale


def polyak(target, online, tau: float):
    """theta' <- tau theta + (1 - tau) theta' for every leaf."""
    return jax.tree.map(lambda t, p: tau * p + (1.0 - tau) * t, target, online)  # TD3 target update


# --- the twin critics, stacked ---

def make_networks(hidden_dim: int, hidden_layers: int, act_dim: int, action_scale: tuple) -> dict:
    return {"actor": Actor(act_dim, action_scale, hidden_dim, hidden_layers),  # pi(s; phi)
            "critic": MLP(hidden_dim, hidden_layers, 1)}  # Q_i(s, a; theta_i) on [s, a / a_max]


def critic_input(obs, actions, action_scale: tuple):
    """[s, a / a_max] (interpretation 2): obs [B, obs_dim], actions [B, act_dim] -> [B, obs_dim + act_dim]."""
    return jnp.concatenate([obs, actions / jnp.asarray(action_scale, jnp.float32)], axis=-1)


def q_values(nets: dict, critic, obs, actions, action_scale: tuple):
    """Q1 and Q2 at (obs, actions) with the stacked critic parameters -> [2, B]."""
    x = critic_input(obs, actions, action_scale)  # [B, obs_dim + act_dim]
    return jax.vmap(lambda params: nets["critic"].apply(params, x)[:, 0])(critic)  # [2, B]


def q1_value(nets: dict, critic, obs, actions, action_scale: tuple):
    """Q1 alone (the actor's critic) at (obs, actions) with the stacked critic parameters -> [B]."""
    theta_1 = jax.tree.map(lambda x: x[0], critic)
    return nets["critic"].apply(theta_1, critic_input(obs, actions, action_scale))[:, 0]  # [B]


# --- training functions ---

def make_init(args: Args, nets: dict, obs_dim: int, act_dim: int):
    tx = optax.adam(args.learning_rate)

    def init(key) -> TrainState:
        key_actor, key_critic = jax.random.split(key)
        actor = nets["actor"].init(key_actor, jnp.zeros((1, obs_dim)))
        critic = jax.vmap(lambda k: nets["critic"].init(k, jnp.zeros((1, obs_dim + act_dim))))(
            jax.random.split(key_critic, 2))  # Q1, Q2 stacked
        return TrainState(actor=actor, actor_target=actor, actor_opt=tx.init(actor), critic=critic,
                          critic_target=critic, critic_opt=tx.init(critic))

    return init, tx


ACTOR_METRICS = ("losses/actor", "losses/bc", "charts/lambda", "charts/q_pi_mean")


def make_train_chunk(args: Args, nets: dict, tx, num_rows: int, action_scale: tuple):
    """TD3+BC: ``steps`` critic steps, the actor and the targets every d of them (interpretation 7).

    Returns chunk(state, key, data, first_step, steps) -> (state, metrics averaged over the chunk), where
    first_step is the number of critic steps taken before the chunk (the same for every run: not vmapped).
    """
    actor_net = nets["actor"]

    def update(state: TrainState, key, step, data: Data):
        key_batch, key_noise = jax.random.split(key)
        idx = jax.random.randint(key_batch, (args.batch_size,), 0, num_rows)  # [B], uniform with replacement
        obs, actions, next_obs = data.obs[idx], data.actions[idx], data.next_obs[idx]  # [B, ...]
        noise = jax.random.normal(key_noise, actions.shape)  # [B, act_dim]
        next_action = smoothed_target_action(actor_net.apply(state.actor_target, next_obs), noise, action_scale,
                                             args.policy_noise, args.noise_clip)  # [B, act_dim]
        next_q = q_values(nets, state.critic_target, next_obs, next_action, action_scale)  # [2, B]
        target = critic_target(data.rewards[idx], data.not_done[idx], next_q[0], next_q[1], args.gamma)  # [B]

        def critic_objective(critic):
            q = q_values(nets, critic, obs, actions, action_scale)  # [2, B]
            return critic_loss(q, target), q

        (loss_critic, q), grads = jax.value_and_grad(critic_objective, has_aux=True)(state.critic)
        updates, critic_opt = tx.update(grads, state.critic_opt, state.critic)
        state = state.replace(critic=optax.apply_updates(state.critic, updates), critic_opt=critic_opt)

        def actor_step(state: TrainState):
            def actor_objective(actor):
                pi = actor_net.apply(actor, obs)  # [B, act_dim]
                q_pi = q1_value(nets, state.critic, obs, pi, action_scale)  # [B] Q1(s, pi(s))
                loss, (lam, bc) = actor_loss(q_pi, *bc_units(pi, actions, action_scale, args.action_units),
                                             args.alpha)
                return loss, (lam, bc, jnp.mean(q_pi))

            (loss, (lam, bc, q_pi_mean)), grads = jax.value_and_grad(actor_objective, has_aux=True)(state.actor)
            updates, actor_opt = tx.update(grads, state.actor_opt, state.actor)
            actor = optax.apply_updates(state.actor, updates)
            state = state.replace(actor=actor, actor_opt=actor_opt,
                                  actor_target=polyak(state.actor_target, actor, args.tau),
                                  critic_target=polyak(state.critic_target, state.critic, args.tau))
            return state, dict(zip(ACTOR_METRICS, (loss, bc, lam, q_pi_mean)))

        skip = lambda state: (state, {name: jnp.float32(0.0) for name in ACTOR_METRICS})
        delayed = (step + 1) % args.policy_freq == 0  # the original's total_it % policy_freq == 0
        state, actor_metrics = jax.lax.cond(delayed, actor_step, skip, state)
        return state, {"losses/critic": loss_critic, "charts/q_data_mean": jnp.mean(q[0]),
                       "charts/target_mean": jnp.mean(target), "actor_updates": delayed.astype(jnp.float32),
                       **actor_metrics}

    def chunk(state: TrainState, key, data: Data, first_step, steps: int):
        xs = (jax.random.split(key, steps), first_step + jnp.arange(steps, dtype=jnp.int32))
        state, metrics = jax.lax.scan(lambda s, x: update(s, x[0], x[1], data), state, xs)
        count = jnp.sum(metrics["actor_updates"])
        means = {name: jnp.mean(x) for name, x in metrics.items() if name not in ACTOR_METRICS}
        means.update({name: jnp.sum(metrics[name]) / jnp.maximum(count, 1.0) for name in ACTOR_METRICS})
        return state, dict(means, actor_updates=count)

    return chunk


# --- evaluation ---

EXPL_NOISE = 0.1  # the original's expl_noise: std of its exploration noise, in units of a_max


def make_evaluate(actor_net, obs_mean, obs_std, episodes: int, sample: bool = False, action_scale=(1.0,)):
    """Rollouts of the deterministic actor from s_0 (nav_env.rollout), vmapped over runs.

    ``sample``: the actor has no distribution to sample from; its sampled protocol adds the original TD3's
    exploration noise, a = clip(pi(s) + N(0, (EXPL_NOISE a_max)^2), -a_max, a_max), the only stochastic version
    of this policy its authors define (TD3+BC itself evaluates the deterministic actor).
    """
    scale = jnp.asarray(action_scale, jnp.float32)

    def evaluate(params, key):
        def act(key_t, pos):
            action = actor_net.apply(params, (pos - obs_mean) / obs_std)
            if sample:
                noise = EXPL_NOISE * scale * jax.random.normal(key_t, action.shape)
                return jnp.clip(action + noise, -scale, scale)
            return action

        return nav_env.rollout(key, act, episodes)  # nav_env.report_rollouts picks the fields it stores

    return jax.jit(jax.vmap(evaluate))


def evaluate_nav(args: Args, nets, inp: Inputs, state: TrainState, key_eval, writer, run_dir, seeds):
    """Rollouts of every run's actor, a table, TensorBoard scalars and figures; returns (eval/* arrays, summary)."""
    obs_mean, obs_std, action_scale = inp.obs_mean, inp.obs_std, inp.action_scale
    # Both protocols: eval/* with the deterministic actor (TD3+BC's own evaluation), eval/sampled_* with the original
    # TD3's exploration noise added (make_evaluate).
    make_eval = lambda sample: make_evaluate(nets["actor"], jnp.asarray(obs_mean), jnp.asarray(obs_std),
                                             args.eval_episodes, sample, action_scale)
    what = {False: "deterministic actor pi(s)", True: f"actor pi(s) + N(0, ({EXPL_NOISE} a_max)^2)"}
    headers = {sample: f"[td3_bc] {what[sample]}, {args.eval_episodes} rollouts per run:" for sample in what}
    outs, arrays, summary = nav_env.evaluate_protocols(make_eval, state.actor, key_eval, seeds, headers, writer,
                                                       args.steps)
    out = outs[False]

    # Figures: every run's rollouts, and run 0's action field over V-like Q1(s, pi(s)).
    images = {"rollouts": nav_env.plot_runs(out, seeds, "TD3+BC: deterministic actor, every run",
                                            os.path.join(run_dir, "td3_bc_rollouts.png"))}
    arrow_states, field_states = nav_env.grid_states(16), nav_env.grid_states(61)

    @jax.jit
    def maps(actor, critic):  # run 0's pi(s) at the arrows and Q1(s, pi(s)) on the field's grid
        arrow_obs, field_obs = ((jnp.asarray(x) - obs_mean) / obs_std for x in (arrow_states, field_states))
        field_pi = nets["actor"].apply(actor, field_obs)  # [61*61, act_dim]
        return nets["actor"].apply(actor, arrow_obs), q1_value(nets, critic, field_obs, field_pi, action_scale)

    arrow_actions, q1_pi = fetch(maps(*jax.tree.map(lambda x: x[0], (state.actor, state.critic))))
    images["action_field"] = nav_env.plot_map(
        arrows=(arrow_states, arrow_actions), field=q1_pi.reshape(61, 61),
        field_label="Q1(s, pi(s))", title=f"TD3+BC: actor pi(s) over Q1(s, pi(s)) (seed {seeds[0]})",
        path=os.path.join(run_dir, "td3_bc_action_field.png"))
    for name, image in images.items():
        writer.add_image(f"eval/{name}", image, args.steps, dataformats="HWC")
    return arrays, summary


def evaluate_gym(args: Args, nets, inp: Inputs, state: TrainState, env: dict, writer, seeds):
    """Episodes of every run's deterministic actor in the Gymnasium environment, all S x E at once; returns and
    D4RL's normalised score, a line per run, TensorBoard scalars (gym_eval.evaluate_runs, gym_eval.report_runs)."""
    actor_action = lambda actor, obs, key: nets["actor"].apply(actor, obs)  # [E, act_dim]
    out = gym_eval.evaluate_runs(env, actor_action, state.actor, inp.obs_mean, inp.obs_std,
                                 (len(seeds), args.eval_episodes), args.seed)
    header = f"[td3_bc] deterministic actor pi(s) in {env['env_id']}, {args.eval_episodes} episodes per run:"
    return gym_eval.report_runs(out, header, seeds, writer, args.steps)


# --- main: the flags, the inputs, the outputs, the schedule ---

def validate_args(args: Args) -> None:
    """The flags alone, before anything is read: one sentence for the first one out of range."""
    at_least = dict(steps=1, num_seeds=1, batch_size=1, steps_per_call=1, policy_freq=1, hidden_dim=1, hidden_layers=1,
                    eval_episodes=0)
    check_flags(args, at_least)
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        raise InputError(f"need 0 <= --gamma <= 1 and 0 < --tau <= 1, got {args.gamma} and {args.tau}")
    if not args.alpha > 0 or not args.learning_rate > 0:
        raise InputError(f"--alpha and --learning-rate must be positive, got {args.alpha} and {args.learning_rate}")
    if not args.policy_noise >= 0 or not args.noise_clip >= 0:
        raise InputError(f"--policy-noise and --noise-clip cannot be negative, got {args.policy_noise} and "
                         f"{args.noise_clip}")
    check_fits(f"--hidden-dim {args.hidden_dim} with --hidden-layers {args.hidden_layers}",  # 6 nets: params, Adam
               16.0 * 6 * args.num_seeds * args.hidden_layers * args.hidden_dim ** 2)
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
    action_scale: tuple  # a_max: the largest |action| per dimension (interpretation 3)
    env: Optional[dict]  # where pi is evaluated (gym_eval.evaluation_env), None for nowhere


def prepare_inputs(args: Args) -> Inputs:
    """The data set (load_dataset validates it), its states normalised (TD3+BC, eps = 1e-3), a_max
    (interpretation 3), and where pi is evaluated, decided before training."""
    data_np, data_sha = load_dataset(args.dataset)
    obs_dim = data_np["observations"].shape[1]
    env = gym_eval.evaluation_env_of(args, obs_dim)
    obs_mean, obs_std = observation_stats(args.dataset, data_np["observations"])
    action_scale = tuple(float(x) for x in np.maximum(np.abs(data_np["actions"]).max(0), 1e-3))
    norm = lambda x: jnp.asarray((x - obs_mean) / obs_std)
    data = Data(obs=norm(data_np["observations"]), actions=jnp.asarray(data_np["actions"]),
                rewards=jnp.asarray(data_np["rewards"]), next_obs=norm(data_np["next_observations"]),
                not_done=jnp.asarray(1.0 - data_np["terminals"].astype(np.float32)))
    return Inputs(sha=data_sha, data=data, n=len(data_np["rewards"]), obs_dim=obs_dim,
                  act_dim=data_np["actions"].shape[1], obs_mean=obs_mean, obs_std=obs_std, action_scale=action_scale,
                  env=env)


def output_arrays(args: Args, state: TrainState, inp: Inputs, seeds) -> dict:
    """actor/params/..., critic1/params/..., critic2/params/... [S, ...], seeds [S] and arch/*."""
    critic_i = lambda i: jax.tree.map(lambda x: x[:, i], state.critic["params"])  # [S, 2, ...] -> [S, ...]
    return {
        **flatten_params("actor/params", state.actor["params"]), **flatten_params("critic1/params", critic_i(0)),
        **flatten_params("critic2/params", critic_i(1)),
        "seeds": seeds.astype(np.int64), "arch/obs_dim": np.int64(inp.obs_dim), "arch/act_dim": np.int64(inp.act_dim),
        "arch/hidden_dim": np.int64(args.hidden_dim), "arch/hidden_layers": np.int64(args.hidden_layers),
        "arch/obs_mean": inp.obs_mean, "arch/obs_std": inp.obs_std,
        "arch/action_scale": np.asarray(inp.action_scale, np.float32), "arch/gamma": np.float32(args.gamma),
    }


def main(args: Args) -> dict:
    validate_args(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset])
    inp = prepare_inputs(args)
    nets = make_networks(args.hidden_dim, args.hidden_layers, inp.act_dim, inp.action_scale)
    init, tx = make_init(args, nets, inp.obs_dim, inp.act_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = place(inp.data, replicated)
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    split = jax.jit(jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3), out_axes=1))
    key_init, key_train, key_eval = (place(x, seed_sharding) for x in split(jnp.asarray(seeds)))
    state = jax.jit(jax.vmap(init), out_shardings=seed_sharding)(key_init)

    # The schedule: chunks of critic steps, a checkpoint after each (interpretation 8).
    calls = [min(args.steps_per_call, args.steps - i) for i in range(0, args.steps, args.steps_per_call)]
    run_dir = os.path.dirname(os.path.abspath(args.out))
    identity = run_identity(args, NEUTRAL_FLAGS, {"dataset": inp.sha})
    ckpt_path, state, first = resume_checkpoint(args, state, CHECKPOINT_SCHEMA, identity, len(calls))
    state = place(state, seed_sharding)
    writer = make_writer(os.path.join(run_dir, "td3_bc"), args)

    train_chunk = make_train_chunk(args, nets, tx, inp.n, inp.action_scale)
    calls_jit = {s: jax.jit(jax.vmap(lambda st, key, d, step0, s=s: train_chunk(st, key, d, step0, s),
                                     in_axes=(0, 0, None, None)))
                 for s in set(calls)}
    fold_in = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
    chunk_key = lambda unit: place(fold_in(key_train, unit), seed_sharding)
    print(f"[td3_bc] N={inp.n} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); "
          f"a_max={[round(a, 4) for a in inp.action_scale]}; {args.steps} steps in {len(calls)} chunks", flush=True)

    progress = Progress(len(calls), "td3_bc", first=first)
    t_train = time.perf_counter()
    done, timed = sum(calls[:first]), []
    for unit in range(first, len(calls)):
        t0 = time.perf_counter()
        state, metrics = calls_jit[calls[unit]](state, chunk_key(unit), data, np.int32(done))
        metrics = {name: float(np.mean(x)) for name, x in fetch(metrics).items()}
        took = time.perf_counter() - t0
        timed.append((calls[unit], took))
        done += calls[unit]
        save_checkpoint(ckpt_path, state, unit + 1, CHECKPOINT_SCHEMA, identity)
        for name, value in metrics.items():
            if name != "actor_updates" and (name not in ACTOR_METRICS or metrics["actor_updates"] > 0):
                writer.add_scalar(name, value, done)
        writer.add_scalar("charts/SPS", calls[unit] / took, done)
        progress(unit + 1, took=took, critic_loss=metrics["losses/critic"], actor_loss=metrics["losses/actor"],
                 lam=metrics["charts/lambda"], q_pi=metrics["charts/q_pi_mean"], bc=metrics["losses/bc"])
    train_s = time.perf_counter() - t_train
    # Steps per second of every run (they run in parallel), leaving out the first call (compilation).
    steady = timed[1:] or timed
    steps_per_s = sum(s for s, _ in steady) / max(sum(t for _, t in steady), 1e-9) if steady else float("nan")

    state = fetch(state)
    arrays = output_arrays(args, state, inp, seeds)
    summary = {"train_s": train_s, "steps_per_s": steps_per_s, "seeds": seeds.tolist()}
    # Evaluation (interpretation 10): from s_0 with figures on the navigation task, else in the Gymnasium environment.
    eval_arrays, eval_summary = gym_eval.evaluate_where(
        inp.env, lambda: evaluate_nav(args, nets, inp, state, key_eval, writer, run_dir, seeds),
        lambda env: evaluate_gym(args, nets, inp, state, env, writer, seeds))
    arrays.update(eval_arrays)
    summary.update(eval_summary)
    save_output(args, arrays, "empo/td3_bc/v1", {"dataset": inp.sha})
    writer.close()
    print(f"[td3_bc] wrote {args.out}: training {train_s:.1f}s, {steps_per_s:.0f} steps/s per run")
    return summary


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
