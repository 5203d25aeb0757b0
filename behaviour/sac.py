"""Soft actor-critic (Haarnoja et al. 2018) in a Gymnasium MuJoCo task: the behaviour policies of D4RL-style data.

D4RL made its Gym-MuJoCo data with SAC policies (rlkit's SAC, the version of "Soft Actor-Critic Algorithms and
Applications", arXiv:1812.05905): "expert" = a policy trained to completion, "medium" = a policy of the same run
stopped early at about a third of the expert's return (Fu et al. 2020, D4RL; its data sets record the sampled
actions of each). This script trains one such run and keeps what both choices need: the final actor and a
snapshot of the actor, with its evaluated return, every --eval-every environment steps. The discussion behind each
numbered item below is docs/sac.md, item N.

Input   ``--env-id``: a registered Gymnasium environment with Box observations and actions and a time limit
        (HalfCheetah-v4, Hopper-v4, Walker2d-v4 for D4RL's tasks). No file.
Output  ``sac.npz`` (schema empo/sac/v1, docs/schemas.md): actor/params/... (the final actor: the expert),
        snapshots/actor/params/... [T, ...] with snapshots/step [T] and snapshots/return [T, E], medium/index (the
        snapshot closest to --medium-fraction of the final return), arch/*, env/*; TensorBoard logs in
        ``<out folder>/sac``.

Equation map (SAC v2's objectives; the tags in the code name them)
    a = tanh(u), u = mu(s) + sigma(s) e, e ~ N(0, I)                     -> Actor, sample_action
    log pi(a|s) = log N(u; mu, sigma^2) - sum_j log(1 - tanh(u_j)^2)      -> tanh_gaussian_log_prob (App. C)
    y = r + gamma (1 - d) (min_i Q_i(s', a'; theta_i') - alpha log pi(a'|s')),  a' ~ pi(.|s')
                                                                          -> soft_critic_target (J_Q)
    J_Q = sum_{i=1,2} mean_B (Q_i(s, a; theta_i) - y)^2                   -> critic_loss (J_Q)
    J_pi = mean_B (alpha log pi(a~|s) - min_i Q_i(s, a~)), a~ = tanh(mu + sigma e) (reparameterised)
                                                                          -> actor_loss (J_pi)
    J(alpha) = -mean_B log(alpha) (log pi(a~|s) + H_bar), H_bar = -act_dim -> temperature_loss (J(alpha))
    theta_i' <- tau theta_i + (1 - tau) theta_i'                          -> polyak

Interpretations and deviations
    1. The hyperparameters of rlkit's SAC example, which D4RL ran: 2 x 256 ReLU for the actor and the twin critics,
       Adam 3e-4 for all three objectives, batch 256, gamma 0.99, tau 0.005 every step, alpha = exp(log alpha)
       from log alpha = 0, a 1M-transition replay buffer, log sigma clipped to [-20, 2], no observation or
       reward scaling.
    2. The schedule is rlkit's too: --steps-per-call environment steps with the current policy (1000, one rlkit
       "train loop"), then as many gradient steps (update-to-data ratio 1), here in one jitted lax.scan.
    3. The first --learning-starts (5,000) steps take uniform random actions (CleanRL; rlkit ran its untrained
       policy for 1,000 steps); updates start after the call that reaches them.
    4. One update computes the three objectives at the same parameters, then steps each (rlkit's order): the
       target uses the current actor and alpha, the actor's loss the current critics; then the targets move.
    5. Actions are learnt in [-1, 1] (rlkit's NormalizedBoxEnv) and executed as bias + scale * a, clipped to the
       action space; the buffer stores the [-1, 1] action. d = terminated; a time limit bootstraps.
    6. --total-steps 1,000,000 (rlkit's example runs 3,000 epochs of 1,000 steps; see docs/sac.md for why 1M).
    7. Evaluation: --eval-episodes episodes of the deterministic policy tanh(mu(s)) (rlkit's), with the same
       reset seeds at every evaluation; the actor is kept with its mean return. medium/index is the snapshot
       whose mean return is closest to --medium-fraction times the final actor's.
    8. One seed per process (the environment loop is sequential); checkpoints every --checkpoint-every steps hold
       the replay buffer, and --resume replays the current episode's actions from its reset seed, so a resumed
       run is the uninterrupted one exactly.

Example
    python behaviour/sac.py --env-id Hopper-v4 --out runs/behaviour/hopper/sac.npz
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # empo_io and gym_eval live in the repository root

import empo_io  # noqa: F401  first: its start-up guard makes Ctrl-C while the libraries load one sentence

# isort: split

import time
from dataclasses import dataclass
from typing import Any, Literal

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import gym_eval

# The plumbing, by purpose: files, checkpoints, the command line.
# isort: off
from empo_io import InputError, flatten_params
from empo_io import checkpoint_path, run_identity, resume_checkpoint, save_checkpoint, save_output
from empo_io import cli, run, check_flags, check_fits, check_writable, make_writer, Progress
# isort: on


@dataclass
class Args:
    """Soft actor-critic with automatic temperature (SAC v2) in a Gymnasium task: D4RL's expert and medium policies."""

    # --- experiment ---
    preset: Literal["d4rl", "pendulum"] = "d4rl"
    """the defaults of every other flag: 'd4rl' = rlkit's SAC as D4RL ran it, 'pendulum' = a small, fast run on
    InvertedPendulum-v5 (a check); flags given on the command line override it"""
    env_id: str = "Hopper-v4"
    """Gymnasium environment (Box observations and actions, a time limit): HalfCheetah-v4, Hopper-v4, Walker2d-v4"""
    out: str = "runs/behaviour/hopper/sac.npz"
    """output file (schema empo/sac/v1); TensorBoard logs go to the folder 'sac' beside it"""
    seed: int = 1
    """random seed of the networks, the actions and the training episodes' resets"""
    resume: bool = False
    """continue from the checkpoint beside --out (written every --checkpoint-every steps)"""
    # --- schedule ---
    total_steps: int = 1_000_000
    """environment steps (one gradient step each once training starts)"""
    learning_starts: int = 5_000
    """environment steps with uniform random actions before the policy acts and training starts"""
    eval_every: int = 10_000
    """environment steps between evaluations; each keeps a snapshot of the actor (a multiple of --steps-per-call)"""
    eval_episodes: int = 10
    """episodes of the deterministic policy tanh(mu(s)) per evaluation"""
    checkpoint_every: int = 50_000
    """environment steps between checkpoints, each with the replay buffer (a multiple of --steps-per-call)"""
    medium_fraction: float = 1 / 3
    """medium/index is the snapshot whose mean return is closest to this fraction of the final actor's (D4RL: 1/3)"""
    # --- algorithm (SAC v2; rlkit's defaults, which D4RL used) ---
    gamma: float = 0.99
    """gamma: discount factor"""
    tau: float = 0.005
    """tau: Polyak rate of the target critics, theta' <- tau theta + (1 - tau) theta', every gradient step"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor, the critics and log alpha"""
    batch_size: int = 256
    """B: minibatch size, rows drawn uniformly with replacement from the replay buffer"""
    buffer_size: int = 1_000_000
    """replay buffer capacity in transitions (the oldest are overwritten); at least the task's time limit"""
    hidden_dim: int = 256
    """hidden units per layer of the actor and the critics"""
    hidden_layers: int = 2
    """hidden ReLU layers before the linear output(s)"""
    # --- speed ---
    steps_per_call: int = 1_000
    """environment steps collected with one policy, then as many gradient steps in one jitted call"""


PRESETS = {
    "d4rl": Args(),
    "pendulum": Args(preset="pendulum", env_id="InvertedPendulum-v5", out="runs/behaviour/pendulum/sac.npz",
                     total_steps=30_000, learning_starts=1_000, eval_every=2_000, eval_episodes=5,
                     checkpoint_every=10_000, buffer_size=30_000, hidden_dim=64, steps_per_call=500),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them.
NEUTRAL_FLAGS = ("out", "resume", "preset", "checkpoint_every", "medium_fraction")
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0  # rlkit's clip of log sigma
CHECKPOINT_SCHEMA = "empo/sac-checkpoint/v1"


# --- containers ---

@struct.dataclass
class TrainState:
    actor: Any  # pi(a|s; phi)
    actor_opt: Any
    critic: Any  # (Q1, Q2), parameters stacked on a leading axis [2, ...]
    critic_target: Any  # (theta_1', theta_2')
    critic_opt: Any
    log_alpha: jax.Array  # () log of the temperature alpha
    alpha_opt: Any


@struct.dataclass
class Buffer:
    """The replay buffer, preallocated to --buffer-size rows; row i holds environment step i mod capacity."""

    obs: jax.Array  # [C, obs_dim]
    actions: jax.Array  # [C, act_dim] in [-1, 1]
    rewards: jax.Array  # [C]
    next_obs: jax.Array  # [C, obs_dim]
    not_done: jax.Array  # [C] float, 0 after a termination, 1 otherwise (a time limit bootstraps)


@struct.dataclass
class Snapshots:
    """The actor at every evaluation and its episodes' returns, preallocated to the schedule's T evaluations."""

    actor: Any  # [T, ...]
    returns: jax.Array  # [T, E] float64
    lengths: jax.Array  # [T, E] int64


# --- networks ---

class MLP(nn.Module):
    """hidden_layers x (Dense(hidden_dim) + ReLU), then a linear Dense(out_dim)."""

    hidden_dim: int
    hidden_layers: int
    out_dim: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.hidden_layers):
            x = nn.relu(nn.Dense(self.hidden_dim)(x))
        return nn.Dense(self.out_dim)(x)


class Actor(nn.Module):
    """(mu(s), log sigma(s)) of the Gaussian whose samples are squashed by tanh: one trunk, two linear heads (the
    last layer's 2 act_dim outputs), log sigma clipped to [LOG_STD_MIN, LOG_STD_MAX]."""

    act_dim: int
    hidden_dim: int
    hidden_layers: int

    @nn.compact
    def __call__(self, obs):
        out = MLP(self.hidden_dim, self.hidden_layers, 2 * self.act_dim)(obs)  # [B, 2 act_dim]
        mean, log_std = out[..., :self.act_dim], out[..., self.act_dim:]
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


def make_networks(hidden_dim: int, hidden_layers: int, act_dim: int) -> dict:
    return {"actor": Actor(act_dim, hidden_dim, hidden_layers),  # pi(a|s; phi)
            "critic": MLP(hidden_dim, hidden_layers, 1)}  # Q_i(s, a; theta_i) on [s, a]


def q_values(nets: dict, critic, obs, actions):
    """Q1 and Q2 at (obs, actions) with the stacked critic parameters -> [2, B]."""
    x = jnp.concatenate([obs, actions], axis=-1)  # [B, obs_dim + act_dim]
    return jax.vmap(lambda params: nets["critic"].apply(params, x)[:, 0])(critic)  # [2, B]


# --- losses (SAC v2) ---

def tanh_gaussian_log_prob(noise, pre_tanh, log_std):
    """log pi(a|s) of a = tanh(u), u = mu + sigma e: log N(u; mu, sigma^2) - sum_j log(1 - tanh(u_j)^2). [B]

    noise e and pre_tanh u [B, act_dim]; log N is written with e = (u - mu) / sigma itself (exact when sigma is
    tiny), and log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), which stays finite where tanh(u) rounds to 1.
    """
    log_normal = jnp.sum(-0.5 * noise ** 2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi), axis=-1)  # [B]
    log_det = jnp.sum(2.0 * (jnp.log(2.0) - pre_tanh - jax.nn.softplus(-2.0 * pre_tanh)), axis=-1)  # [B]
    return log_normal - log_det  # SAC App. C: change of variables through tanh


def sample_action(mean, log_std, noise):
    """a = tanh(mu + sigma e) and log pi(a|s), reparameterised (gradients reach mu and sigma). [B, act_dim], [B]"""
    pre_tanh = mean + jnp.exp(log_std) * noise  # [B, act_dim]
    return jnp.tanh(pre_tanh), tanh_gaussian_log_prob(noise, pre_tanh, log_std)


def soft_critic_target(rewards, not_done, next_q1, next_q2, next_log_pi, alpha, gamma: float):
    """y = r + gamma (1 - d) (min(Q1'(s', a'), Q2'(s', a')) - alpha log pi(a'|s')), a' ~ pi(.|s'). [B]"""
    return rewards + gamma * not_done * (jnp.minimum(next_q1, next_q2) - alpha * next_log_pi)  # SAC J_Q target


def critic_loss(q, target):
    """J_Q = sum_{i=1,2} mean_B (Q_i(s, a) - y)^2, y held fixed. q [2, B], target [B]."""
    return jnp.sum(jnp.mean((q - jax.lax.stop_gradient(target)[None]) ** 2, axis=-1))  # SAC J_Q


def actor_loss(log_pi, q1_pi, q2_pi, alpha):
    """J_pi = mean_B (alpha log pi(a~|s) - min(Q1(s, a~), Q2(s, a~))), alpha held fixed. All [B]."""
    return jnp.mean(jax.lax.stop_gradient(alpha) * log_pi - jnp.minimum(q1_pi, q2_pi))  # SAC J_pi


def temperature_loss(log_alpha, log_pi, target_entropy: float):
    """J(alpha) = -mean_B log(alpha) (log pi(a~|s) + H_bar), log pi held fixed (rlkit's form, in log alpha).

    Its gradient -mean(log pi + H_bar) raises alpha while the entropy -log pi is below H_bar, lowers it above."""
    return -jnp.mean(log_alpha * jax.lax.stop_gradient(log_pi + target_entropy))  # SAC J(alpha)


def polyak(target, online, tau: float):
    """theta' <- tau theta + (1 - tau) theta' for every leaf."""
    return jax.tree.map(lambda t, p: tau * p + (1.0 - tau) * t, target, online)  # SAC target critics


# --- training functions ---

def make_init(args: Args, nets: dict, obs_dim: int, act_dim: int):
    tx = optax.adam(args.learning_rate)

    def init(key) -> TrainState:
        key_actor, key_critic = jax.random.split(key)
        actor = nets["actor"].init(key_actor, jnp.zeros((1, obs_dim)))
        critic = jax.vmap(lambda k: nets["critic"].init(k, jnp.zeros((1, obs_dim + act_dim))))(
            jax.random.split(key_critic, 2))  # Q1, Q2 stacked
        log_alpha = jnp.zeros((), jnp.float32)  # alpha = 1
        return TrainState(actor=actor, actor_opt=tx.init(actor), critic=critic, critic_target=critic,
                          critic_opt=tx.init(critic), log_alpha=log_alpha, alpha_opt=tx.init(log_alpha))

    return init, tx


def make_train_chunk(args: Args, nets: dict, tx, act_dim: int):
    """SAC: ``steps`` gradient steps on minibatches of the buffer's first ``size`` rows (interpretation 4).

    Returns chunk(state, buffer, key, size, steps) -> (state, metrics averaged over the chunk).
    """
    actor_net, target_entropy = nets["actor"], -float(act_dim)  # H_bar = -dim(A)

    def update(state: TrainState, key, buffer: Buffer, size):
        key_batch, key_next, key_pi = jax.random.split(key, 3)
        idx = jax.random.randint(key_batch, (args.batch_size,), 0, size)  # [B], uniform with replacement
        obs, actions, next_obs = buffer.obs[idx], buffer.actions[idx], buffer.next_obs[idx]  # [B, ...]
        alpha = jnp.exp(state.log_alpha)
        next_action, next_log_pi = sample_action(*actor_net.apply(state.actor, next_obs),
                                                 jax.random.normal(key_next, actions.shape))  # [B, act_dim], [B]
        next_q = q_values(nets, state.critic_target, next_obs, next_action)  # [2, B]
        target = soft_critic_target(buffer.rewards[idx], buffer.not_done[idx], next_q[0], next_q[1], next_log_pi,
                                    alpha, args.gamma)  # [B]

        def critic_objective(critic):
            q = q_values(nets, critic, obs, actions)  # [2, B]
            return critic_loss(q, target), q

        def actor_objective(actor, noise):
            action, log_pi = sample_action(*actor_net.apply(actor, obs), noise)  # [B, act_dim], [B]
            q_pi = q_values(nets, state.critic, obs, action)  # [2, B]
            return actor_loss(log_pi, q_pi[0], q_pi[1], alpha), log_pi

        (loss_q, q), grads_q = jax.value_and_grad(critic_objective, has_aux=True)(state.critic)
        (loss_pi, log_pi), grads_pi = jax.value_and_grad(actor_objective, has_aux=True)(
            state.actor, jax.random.normal(key_pi, actions.shape))
        loss_alpha, grads_alpha = jax.value_and_grad(temperature_loss)(state.log_alpha, log_pi, target_entropy)
        updates, critic_opt = tx.update(grads_q, state.critic_opt, state.critic)
        critic = optax.apply_updates(state.critic, updates)
        updates, actor_opt = tx.update(grads_pi, state.actor_opt, state.actor)
        updates_alpha, alpha_opt = tx.update(grads_alpha, state.alpha_opt, state.log_alpha)
        state = TrainState(actor=optax.apply_updates(state.actor, updates), actor_opt=actor_opt, critic=critic,
                           critic_target=polyak(state.critic_target, critic, args.tau), critic_opt=critic_opt,
                           log_alpha=optax.apply_updates(state.log_alpha, updates_alpha), alpha_opt=alpha_opt)
        return state, {"losses/critic": loss_q, "losses/actor": loss_pi, "losses/temperature": loss_alpha,
                       "charts/alpha": alpha, "charts/entropy": -jnp.mean(log_pi), "charts/q_data_mean": jnp.mean(q),
                       "charts/target_mean": jnp.mean(target)}

    def chunk(state: TrainState, buffer: Buffer, key, size, steps: int):
        state, metrics = jax.lax.scan(lambda s, k: update(s, k, buffer, size), state, jax.random.split(key, steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return chunk


def insert(buffer: Buffer, rows: Buffer, first_row):
    """New transitions written to rows first_row, first_row + 1, ... (mod capacity): the oldest are overwritten."""
    capacity = buffer.rewards.shape[0]
    idx = (first_row + jnp.arange(rows.rewards.shape[0])) % capacity  # [n]
    return jax.tree.map(lambda b, x: b.at[idx].set(x), buffer, rows)


def make_act(actor_net):
    """act(params, obs [obs_dim], e [act_dim]) -> a = tanh(mu(s) + sigma(s) e) in [-1, 1]: the exploring policy."""
    return jax.jit(lambda params, obs, noise: sample_action(*actor_net.apply(params, obs[None]), noise[None])[0][0])


def make_evaluate_act(actor_net, scale, bias):
    """act(params, obs [E, obs_dim]) -> bias + scale tanh(mu(s)): the deterministic policy, in the env's units."""
    return jax.jit(lambda params, obs: bias + scale * jnp.tanh(actor_net.apply(params, obs)[0]))


# --- the environment side (Python): episodes, collection, exact restore ---

def reset_seed(seed: int, episode: int) -> int:
    """The reset seed of training episode ``episode`` (episode -1: the first of the evaluation episodes)."""
    return int(np.random.SeedSequence([seed, episode + 1]).generate_state(1)[0])


class Collector:
    """The training environment and its current episode (index, step, return, observation)."""

    def __init__(self, env_info: dict, seed: int):
        self.env = gym_eval.make_env(gym.envs.registration.EnvSpec.from_json(env_info["env_spec"]))
        space = self.env.action_space
        self.low, self.high = space.low, space.high
        self.scale, self.bias = (space.high - space.low) / 2.0, (space.high + space.low) / 2.0
        self.seed, self.episode, self.step, self.ret = seed, 0, 0, 0.0
        self.obs = self._reset()

    def _reset(self):
        return np.asarray(self.env.reset(seed=reset_seed(self.seed, self.episode))[0], np.float32)

    def _step(self, action):
        """One step with an action in [-1, 1] -> (next_obs, reward, terminated, truncated)."""
        env_action = np.clip(self.bias + self.scale * action, self.low, self.high).astype(self.low.dtype)
        next_obs, reward, terminated, truncated, _ = self.env.step(env_action)
        return np.asarray(next_obs, np.float32), float(reward), bool(terminated), bool(truncated)

    def collect(self, steps: int, choose) -> tuple[dict, list]:
        """``steps`` transitions with actions choose(t, obs) in [-1, 1] -> (rows as NumPy arrays, finished episodes
        as (return, length) pairs)."""
        rows = {k: [] for k in ("obs", "actions", "rewards", "next_obs", "not_done")}
        finished = []
        for t in range(steps):
            action = np.asarray(choose(t, self.obs), np.float32)
            next_obs, reward, terminated, truncated = self._step(action)
            for key, value in zip(rows, (self.obs, action, reward, next_obs, 1.0 - terminated)):
                rows[key].append(value)
            self.step, self.ret, self.obs = self.step + 1, self.ret + reward, next_obs
            if terminated or truncated:
                finished.append((self.ret, self.step))
                self.episode, self.step, self.ret = self.episode + 1, 0, 0.0
                self.obs = self._reset()
        return {k: np.asarray(v, np.float32) for k, v in rows.items()}, finished

    def state(self) -> np.ndarray:
        """What a checkpoint records of the episode: [index, step]."""
        return np.asarray([self.episode, self.step], np.int64)

    def restore(self, episode_state, buffer: Buffer, done: int) -> None:
        """Back to the checkpoint's episode: reset with its seed and replay its actions (the buffer's last ``step``
        rows); MuJoCo is deterministic, so every observation must come out as stored."""
        self.episode, step = (int(x) for x in episode_state)
        self.step, self.ret, self.obs = 0, 0.0, self._reset()
        rows = np.arange(done - step, done) % len(buffer.rewards)
        if step:
            self._check_replay(self.obs, buffer.obs[rows[0]])  # the reset's observation
        for row in rows:
            next_obs, reward, _, _ = self._step(np.asarray(buffer.actions[row]))
            self._check_replay(next_obs, buffer.next_obs[row])
            self.step, self.ret, self.obs = self.step + 1, self.ret + reward, next_obs

    def _check_replay(self, seen, stored) -> None:
        if not np.array_equal(seen, np.asarray(stored)):
            raise InputError(f"the environment did not replay to the checkpoint's state (episode {self.episode}, "
                             f"step {self.step}); delete the checkpoint or drop --resume")


# --- main: the flags, the environment, the outputs, the schedule ---

def validate_args(args: Args) -> None:
    """The flags alone, before anything is made: one sentence for the first one out of range."""
    at_least = dict(total_steps=1, learning_starts=0, eval_every=1, eval_episodes=1, checkpoint_every=1, batch_size=1,
                    buffer_size=1, hidden_dim=1, hidden_layers=1, steps_per_call=1)
    check_flags(args, at_least)
    for name in ("eval_every", "checkpoint_every"):
        if getattr(args, name) % args.steps_per_call:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)} must be a multiple of "
                             f"--steps-per-call {args.steps_per_call}")
    if not 0.0 <= args.gamma <= 1.0 or not 0.0 < args.tau <= 1.0:
        raise InputError(f"need 0 <= --gamma <= 1 and 0 < --tau <= 1, got {args.gamma} and {args.tau}")
    if not args.learning_rate > 0 or not args.medium_fraction > 0:
        raise InputError(f"--learning-rate and --medium-fraction must be positive, got {args.learning_rate} and "
                         f"{args.medium_fraction}")


def prepare_env(args: Args) -> dict:
    """The environment's spec, D4RL's reference scores (gym_eval.gym_env_info) and sizes, checked once."""
    info = gym_eval.gym_env_info(args.env_id)
    try:
        env = gym_eval.make_env(gym.envs.registration.EnvSpec.from_json(info["env_spec"]))
    except Exception as e:  # a missing simulator, a broken spec
        raise InputError(f"environment {args.env_id} cannot be made ({type(e).__name__}: {e})") from None
    obs_space, act_space, limit = env.observation_space, env.action_space, env.spec.max_episode_steps
    env.close()
    boxes = isinstance(act_space, gym.spaces.Box) and isinstance(obs_space, gym.spaces.Box)
    if not (boxes and len(obs_space.shape) == len(act_space.shape) == 1 and np.all(np.isfinite(act_space.low))
            and np.all(np.isfinite(act_space.high))):
        raise InputError(f"environment {args.env_id} needs Box observations and bounded Box actions, both vectors, "
                         f"it has {obs_space} and {act_space}")
    if limit is None or limit > args.buffer_size:
        raise InputError(f"environment {args.env_id} needs a time limit of at most --buffer-size "
                         f"{args.buffer_size} steps (a resumed episode is replayed from the buffer), it has {limit}")
    obs_dim, act_dim = obs_space.shape[0], act_space.shape[0]
    # The buffer, held twice while a checkpoint is written.
    check_fits(f"--buffer-size {args.buffer_size}", 2 * 4.0 * args.buffer_size * (2 * obs_dim + act_dim + 2))
    scale = ((act_space.high - act_space.low) / 2.0).astype(np.float32)
    bias = ((act_space.high + act_space.low) / 2.0).astype(np.float32)
    return dict(info, obs_dim=obs_dim, act_dim=act_dim, scale=scale, bias=bias)


def schedule(args: Args) -> tuple[list, list]:
    """(environment steps of each call, the calls after which an evaluation runs): every --eval-every steps and
    after the last call, whose actor is the final one."""
    calls = [min(args.steps_per_call, args.total_steps - i) for i in range(0, args.total_steps, args.steps_per_call)]
    ends = np.cumsum(calls)
    evals = [u for u, end in enumerate(ends) if end % args.eval_every == 0 or u == len(calls) - 1]
    return calls, evals


def empty_carry(state: TrainState, env: dict, args: Args, num_evals: int) -> dict:
    """What a checkpoint holds, at the start: the train state, the empty buffer, the empty snapshots, the episode."""
    zeros = lambda *shape: np.zeros(shape, np.float32)
    c = args.buffer_size
    buffer = Buffer(obs=zeros(c, env["obs_dim"]), actions=zeros(c, env["act_dim"]), rewards=zeros(c),
                    next_obs=zeros(c, env["obs_dim"]), not_done=zeros(c))
    snapshots = Snapshots(actor=jax.tree.map(lambda x: np.zeros((num_evals,) + x.shape, x.dtype), state.actor),
                          returns=np.zeros((num_evals, args.eval_episodes)),
                          lengths=np.zeros((num_evals, args.eval_episodes), np.int64))
    return {"train": state, "buffer": buffer, "snapshots": snapshots, "episode": np.zeros(2, np.int64)}


def evaluate(env: dict, act, params, episodes: int, seed: int) -> dict:
    """``episodes`` episodes of the deterministic policy, all at once (gym_eval.gym_evaluate), the same reset seeds
    every time (interpretation 7)."""
    return gym_eval.gym_evaluate(env, lambda obs: act(params, obs), (episodes,), reset_seed(seed, -1))


def output_arrays(args: Args, env: dict, carry: dict, steps: np.ndarray) -> dict:
    """actor/params/..., snapshots/*, medium/*, arch/* and env/* (docs/schemas.md, empo/sac/v1)."""
    snaps = carry["snapshots"]
    means = snaps.returns.mean(axis=1)  # [T]
    target = args.medium_fraction * means[-1]
    arrays = {
        **flatten_params("actor/params", carry["train"].actor["params"]),
        **flatten_params("snapshots/actor/params", snaps.actor["params"]),
        "snapshots/step": steps.astype(np.int64), "snapshots/return": snaps.returns,
        "snapshots/length": snaps.lengths,
        "medium/index": np.int64(np.argmin(np.abs(means - target))), "medium/target_return": np.float64(target),
        "arch/obs_dim": np.int64(env["obs_dim"]), "arch/act_dim": np.int64(env["act_dim"]),
        "arch/hidden_dim": np.int64(args.hidden_dim), "arch/hidden_layers": np.int64(args.hidden_layers),
        "arch/action_scale": env["scale"], "arch/action_bias": env["bias"],
        "arch/log_std_range": np.asarray([LOG_STD_MIN, LOG_STD_MAX], np.float32),
        "env/id": np.array(env["env_id"]), "env/spec": np.array(env["env_spec"]),
    }
    if env.get("ref_min_score") is not None:
        arrays["snapshots/normalized_score"] = gym_eval.normalized_score(snaps.returns, env["ref_min_score"],
                                                                         env["ref_max_score"])
    return arrays


def collect_call(args: Args, collector: Collector, act, actor, key_act, unit: int, done: int, steps: int):
    """One call's transitions: uniform random actions before --learning-starts, then the current policy's samples;
    the call's draws come from the key folded with its index, so a resumed run draws the same."""
    key_uniform, key_noise = jax.random.split(jax.random.fold_in(key_act, unit))
    uniform = np.asarray(jax.random.uniform(key_uniform, (steps, collector.scale.size), minval=-1.0, maxval=1.0))
    noise = np.asarray(jax.random.normal(key_noise, (steps, collector.scale.size)))
    choose = lambda t, obs: uniform[t] if done + t < args.learning_starts else act(actor, obs, noise[t])
    return collector.collect(steps, choose)


def log_call(writer, metrics: dict, finished: list, done: int, steps: int, collect_s: float, update_s: float) -> None:
    """TensorBoard: the chunk's mean losses, each finished training episode, the call's speed."""
    for name, value in metrics.items():
        writer.add_scalar(name, value, done)
    for ret, length in finished:
        writer.add_scalar("charts/episodic_return", ret, done)
        writer.add_scalar("charts/episodic_length", length, done)
    writer.add_scalar("charts/SPS", steps / (collect_s + update_s), done)
    writer.add_scalar("charts/collect_s", collect_s, done)
    writer.add_scalar("charts/update_s", update_s, done)


def snapshot(args: Args, env: dict, eval_act, actor, snapshots: Snapshots, index: int, writer, done: int) -> float:
    """Evaluate the actor and keep it with its episodes as snapshot ``index`` (the host arrays are written in place);
    returns the mean return."""
    actor = jax.device_get(actor)
    out = evaluate(env, eval_act, actor, args.eval_episodes, args.seed)
    for name in ("return", "length", "normalized_score"):
        if name in out:
            writer.add_scalar(f"eval/{name}", float(np.mean(out[name])), done)
    for stacked, x in zip(jax.tree.leaves(snapshots.actor), jax.tree.leaves(actor)):
        stacked[index] = x
    snapshots.returns[index], snapshots.lengths[index] = out["return"], out["length"]
    return float(np.mean(out["return"]))


def main(args: Args) -> dict:
    validate_args(args)
    env = prepare_env(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path)
    nets = make_networks(args.hidden_dim, args.hidden_layers, env["act_dim"])
    init, tx = make_init(args, nets, env["obs_dim"], env["act_dim"])
    key_init, key_train, key_act = jax.random.split(jax.random.key(args.seed), 3)
    calls, evals = schedule(args)
    ends = np.cumsum(calls)
    identity = run_identity(args, NEUTRAL_FLAGS, {})
    template = empty_carry(jax.device_get(jax.jit(init)(key_init)), env, args, len(evals))
    ckpt_path, carry, first = resume_checkpoint(args, template, CHECKPOINT_SCHEMA, identity, len(calls))
    done = int(ends[first - 1]) if first else 0
    collector = Collector(env, args.seed)
    if first:
        collector.restore(carry["episode"], carry["buffer"], done)
    state, buffer = jax.device_put(carry["train"]), jax.device_put(carry["buffer"])
    snapshots = jax.tree.map(np.array, carry["snapshots"])  # host copies, written in place by snapshot
    writer = make_writer(os.path.join(os.path.dirname(os.path.abspath(args.out)), "sac"), args)

    chunk = make_train_chunk(args, nets, tx, env["act_dim"])
    train_calls = {s: jax.jit(lambda st, b, k, n, s=s: chunk(st, b, k, n, s), donate_argnums=0) for s in set(calls)}
    insert_jit = jax.jit(insert, donate_argnums=0)
    act, eval_act = make_act(nets["actor"]), make_evaluate_act(nets["actor"], env["scale"], env["bias"])
    print(f"[sac] {args.env_id}: obs_dim={env['obs_dim']} act_dim={env['act_dim']}; {args.total_steps} steps in "
          f"{len(calls)} calls, {len(evals)} evaluations", flush=True)

    kinds = ["train" if end >= args.learning_starts else "random" for end in ends]
    progress = Progress(len(calls), "sac", kinds=kinds, first=first)
    t_train, timed, metrics = time.perf_counter(), [], {}
    for unit in range(first, len(calls)):
        t0 = time.perf_counter()
        rows, finished = collect_call(args, collector, act, state.actor, key_act, unit, done, calls[unit])
        buffer = insert_jit(buffer, Buffer(**rows), np.int32(done % args.buffer_size))
        done += calls[unit]
        t1 = time.perf_counter()
        if done >= args.learning_starts:
            state, metrics = train_calls[calls[unit]](state, buffer, jax.random.fold_in(key_train, unit),
                                                      np.int32(min(done, args.buffer_size)))
            metrics = {name: float(x) for name, x in jax.device_get(metrics).items()}
        t2 = time.perf_counter()
        timed.append((kinds[unit], calls[unit], t1 - t0, t2 - t1))
        log_call(writer, metrics, finished, done, calls[unit], t1 - t0, t2 - t1)
        if unit in evals:
            eval_return = snapshot(args, env, eval_act, state.actor, snapshots, evals.index(unit), writer, done)
        if done % args.checkpoint_every == 0 and unit + 1 < len(calls):
            carry = {"train": state, "buffer": buffer, "snapshots": snapshots, "episode": collector.state()}
            save_checkpoint(ckpt_path, carry, unit + 1, CHECKPOINT_SCHEMA, identity)
        if unit in evals:
            progress(unit + 1, episodes=collector.episode, eval_return=eval_return,
                     alpha=metrics.get("charts/alpha", 1.0), entropy=metrics.get("charts/entropy", float("nan")))
    train_s = time.perf_counter() - t_train
    steady = [(n, c, u) for kind, n, c, u in timed if kind == "train"][1:]  # past the first (compilation)
    rate = lambda i: sum(x[0] for x in steady) / max(sum(x[i] for x in steady), 1e-9) if steady else float("nan")
    steps_per_s, collect_per_s, updates_per_s = 1.0 / (1.0 / rate(1) + 1.0 / rate(2)), rate(1), rate(2)

    carry = jax.device_get({"train": state, "snapshots": snapshots})
    arrays = output_arrays(args, env, carry, ends[evals])
    save_output(args, arrays, "empo/sac/v1", {})
    writer.close()
    collector.env.close()
    medium = int(arrays["medium/index"])
    summary = {"train_s": train_s, "steps_per_s": steps_per_s, "collect_steps_per_s": collect_per_s,
               "updates_per_s": updates_per_s, "final_return": float(arrays["snapshots/return"][-1]
               .mean()), "medium_index": medium, "medium_step": int(arrays["snapshots/step"][medium]),
               "medium_return": float(arrays["snapshots/return"][medium].mean())}
    print(f"[sac] wrote {args.out}: {train_s:.0f}s, {steps_per_s:.0f} env steps/s while training (collection "
          f"{collect_per_s:.0f} steps/s, updates {updates_per_s:.0f}/s); final return {summary['final_return']:.1f}, "
          f"medium = snapshot {medium} at step {summary['medium_step']} (return {summary['medium_return']:.1f})")
    return summary


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
