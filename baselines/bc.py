"""Behaviour cloning on the navigation task and on D4RL/MuJoCo: the "BC" rows of Tables 1 and 2, Figure 1b.

Paper: §1 and Figure 1b (behaviour cloning fails where the two behaviours conflict), §4.1 and Table 1 ("naive
behaviour cloning"), Appendix B (the didactic network), Appendix C (10 seeds x 10 rollouts), §4.2 and Table 2 (D4RL
medium-expert); the d4rl preset's network and schedule are CORL's BC (github.com/tinkoff-ai/CORL,
algorithms/offline/any_percent_bc.py), whose actor is the TD3+BC author's. The discussion behind each numbered
item below is docs/baselines.md, BC item N.

Input   ``--dataset``: an .npz (schema empo/dataset/v1), D4RL .hdf5 files or Minari ids, as the EMPO stages take.
Output  ``bc.npz`` (schema empo/bc/v1, docs/schemas.md): policy/params/... [S, ...], seeds [S], arch/* (what rebuilds
        the policy), eval/* [S, E] (and eval/sampled_* on the navigation task); bc_rollouts.png and
        bc_action_field.png beside it (navigation task); TensorBoard logs in ``<out folder>/bc``.

Equation map (behaviour cloning carries no equation number in the paper)
    l_BC(theta) = -E_{(s,a)~D} log pi(a|s; theta)                 -> bc_loss
    pi(a|s; theta) = N(a; mu_theta(s), diag sigma_theta(s)^2)      -> GaussianPolicy, gaussian_log_prob
    minibatch Adam steps on l_BC, S runs vmapped                   -> make_train_chunk

Interpretations and deviations
    1. The network is EMPO's stage-1 Gaussian policy with K = 1: mean a_max tanh(.), log-std in [-5, 0], standardised
       states; nav preset: --hidden-layers 3 of --hidden-dim 64 and a linear output = the paper's "4-layer MLP";
       d4rl preset: 2 x 256, CORL's BC network (the TD3+BC author's actor).
    2. Maximum likelihood, log-density summed over action dimensions, on minibatches of B = 256 drawn with replacement
       from both behaviours; Adam, lr 3e-4. Where the behaviours conflict, the mean averages their actions.
    3. --steps 1,000,000 (CORL's BC default; the paper gives none), in jitted chunks of --steps-per-call with a
       checkpoint after each; --resume continues to the identical result.
    4. Run i uses seed --seed + i; the runs are vmapped in one call and sharded over the visible devices.
    5. Evaluation (never used for selection): on the navigation task rollouts from s_0 with the mean action (eval/*)
       and with sampled actions (eval/sampled_*), "optimal route" = g reached without entering S_p; otherwise
       episodes of the mean action (--sample: drawn actions) in the Gymnasium environment, D4RL's normalised score.
    6. Figure 1b: run 0's mean action as arrows over ||mean action||, which shrinks where the behaviours move in
       opposite directions (x = 10 and x = 20 below y = 15).

Example
    python baselines/bc.py --preset d4rl --num-seeds 10
    python baselines/bc.py --dataset data/nav.npz --out runs/nav/bc.npz --num-seeds 10
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
    """Behaviour cloning: a Gaussian policy fitted by maximum likelihood to the whole data set (Tables 1 and 2, BC)."""

    # --- experiment ---
    preset: Literal["nav", "d4rl"] = "nav"
    """the defaults of every other flag: 'nav' = the navigation task, 'd4rl' = CORL's BC network on halfcheetah
    medium + expert (D4RL v2 files in data/d4rl); flags given on the command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz (schema empo/dataset/v1), or comma-separated D4RL .hdf5 files or Minari ids, as the EMPO
    stages take (a path that exists is one file even if its name holds commas)"""
    out: str = "runs/nav/bc.npz"
    """output file (schema empo/bc/v1); figures (navigation task) go beside it, TensorBoard logs to the folder 'bc'
    beside it"""
    seed: int = 1
    """random seed of the first run; run i uses seed + i"""
    num_seeds: int = 1
    """independent runs in one vmapped call, sharded over the visible devices"""
    resume: bool = False
    """continue from the checkpoint beside --out (written after every chunk of steps)"""
    eval_episodes: int = 10
    """rollouts (navigation task) or episodes (Gymnasium) of each run's policy; 0 skips them"""
    sample: bool = False
    """actions drawn from pi(.|s) instead of its mean action: in Gymnasium environments the evaluation itself; on the
    navigation task, where both protocols are always evaluated and stored, the rollouts the figures show"""
    # --- algorithm ---
    steps: int = 1_000_000
    """gradient steps of maximum likelihood (CORL's BC default; the paper gives none)"""
    batch_size: int = 256
    """B: minibatch size, rows drawn uniformly with replacement"""
    learning_rate: float = 3e-4
    """alpha: Adam learning rate"""
    hidden_dim: int = 64
    """hidden units per layer (Appendix B: 64 didactic; CORL's BC and the d4rl preset: 256)"""
    hidden_layers: int = 3
    """hidden layers; 3 hidden + 1 output = the paper's '4-layer MLP' (CORL's BC and the d4rl preset: 2)"""
    # --- speed ---
    steps_per_call: int = 5_000
    """gradient steps per jitted call: one log line and one checkpoint each"""


PRESETS = {  # d4rl: CORL's BC (any_percent_bc.py; its other settings are the defaults here too)
    "nav": Args(),
    "d4rl": Args(preset="d4rl", dataset="data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5",
                 out="runs/halfcheetah-medium-expert/bc.npz", hidden_dim=256, hidden_layers=2),
}

# Flags that leave the trained state unchanged: a checkpoint does not record them (the inputs' paths are stood
# for by their sha256, so that moved files still resume).
NEUTRAL_FLAGS = ('out', 'resume', 'preset', 'eval_episodes', 'sample', 'eval_env', 'ref_min_score', 'ref_max_score',
                 'dataset')
CHECKPOINT_SCHEMA = "empo/bc-checkpoint/v2"


# --- containers ---

@struct.dataclass
class TrainState:
    policy: Any  # pi(a|s; theta)
    policy_opt: Any


@struct.dataclass
class Data:
    """The data set on the device (shared by all runs)."""

    obs: jax.Array  # [N, obs_dim], standardised
    actions: jax.Array  # [N, act_dim]


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


# --- loss ---

def bc_loss(mean, log_std, actions):
    """l_BC = -(1/B) sum_b log N(a_b; mu(s_b), diag exp(log_std(s_b))^2), the log-density summed over
    the action dimensions. mean, log_std, actions [B, act_dim] -> []."""
    return -jnp.mean(gaussian_log_prob(mean, log_std, actions))  # l_BC, maximum likelihood


# --- training function ---

def make_init(args: Args, policy, obs_dim: int):
    tx = optax.adam(args.learning_rate)

    def init(key) -> TrainState:
        params = policy.init(key, jnp.zeros((1, obs_dim)))
        return TrainState(policy=params, policy_opt=tx.init(params))

    return init, tx


def make_train_chunk(args: Args, policy, tx, num_rows: int):
    """``steps`` Adam steps on l_BC, minibatches uniform with replacement (interpretation 2).

    Returns chunk(state, key, data, steps) -> (state, metrics averaged over the steps).
    """

    def update(state: TrainState, key, data: Data):
        idx = jax.random.randint(key, (args.batch_size,), 0, num_rows)  # [B]
        obs, actions = data.obs[idx], data.actions[idx]  # [B, obs_dim], [B, act_dim]

        def objective(params):
            mean, log_std = policy.apply(params, obs)  # [B, act_dim] each
            return bc_loss(mean, log_std, actions), (mean, log_std)

        (loss, (mean, log_std)), grads = jax.value_and_grad(objective, has_aux=True)(state.policy)
        updates, policy_opt = tx.update(grads, state.policy_opt, state.policy)
        state = TrainState(policy=optax.apply_updates(state.policy, updates), policy_opt=policy_opt)
        return state, {"losses/nll": loss, "charts/action_mse": jnp.mean((mean - actions) ** 2),
                       "charts/std_mean": jnp.mean(jnp.exp(log_std))}

    def chunk(state: TrainState, key, data: Data, steps: int):
        state, metrics = jax.lax.scan(lambda s, k: update(s, k, data), state, jax.random.split(key, steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return chunk


# --- evaluation ---

def make_evaluate(policy, obs_mean, obs_std, episodes: int, sample: bool):
    """Rollouts of pi from s_0 (nav_env.rollout) with its mean action (or a draw), vmapped over runs."""
    def evaluate(params, key):
        def act(key_t, pos):
            mean, log_std = policy.apply(params, (pos - obs_mean) / obs_std)  # [E, act_dim]
            if sample:
                return mean + jnp.exp(log_std) * jax.random.normal(key_t, mean.shape)
            return mean

        return nav_env.rollout(key, act, episodes)  # nav_env.report_rollouts picks the fields it stores

    return jax.jit(jax.vmap(evaluate))


def evaluate_nav(args: Args, policy, inp: Inputs, policy_params, key_eval, writer, run_dir, seeds):
    """Rollouts of every run, a table, TensorBoard scalars and figures; returns (eval/* arrays, summary)."""
    obs_mean, obs_std = inp.obs_mean, inp.obs_std
    # Both protocols: eval/* with the mean action, eval/sampled_* with actions drawn from pi (the paper's "sampled 10
    # trajectories"); --sample only picks the one the figures show.
    make_eval = lambda sample: make_evaluate(policy, jnp.asarray(obs_mean), jnp.asarray(obs_std), args.eval_episodes,
                                             sample)
    headers = {sample: f"[bc] policy pi ({'sampled' if sample else 'mean'} actions), {args.eval_episodes} rollouts "
                       f"per run:" for sample in (False, True)}
    outs, arrays, summary = nav_env.evaluate_protocols(make_eval, policy_params, key_eval, seeds, headers, writer,
                                                       args.steps)
    out, actions = outs[args.sample], "sampled" if args.sample else "mean"

    # Figures: every run's rollouts, and Figure 1b (run 0's mean action over the length of the mean action).
    title = f"BC: {args.eval_episodes} rollouts per run ({actions} actions)"
    images = {"rollouts": nav_env.plot_runs(out, seeds, title, os.path.join(run_dir, "bc_rollouts.png"))}
    params0 = jax.tree.map(lambda x: x[0], fetch(policy_params))
    mean_action = lambda states: np.asarray(policy.apply(params0, jnp.asarray((states - obs_mean) / obs_std))[0])
    arrow_states = nav_env.grid_states(16)
    field = np.linalg.norm(mean_action(nav_env.grid_states(61)), axis=-1).reshape(61, 61)
    images["action_field"] = nav_env.plot_map(
        arrows=(arrow_states, mean_action(arrow_states)), field=field, field_label="||mean action||",
        title=f"BC (seed {seeds[0]}): mean action, coloured by its length",
        path=os.path.join(run_dir, "bc_action_field.png"))
    for name, image in images.items():
        writer.add_image(f"eval/{name}", image, args.steps, dataformats="HWC")
    return arrays, summary


def evaluate_gym(args: Args, policy, inp: Inputs, policy_params, env: dict, key_eval, writer, seeds):
    """Episodes of every run's policy in the Gymnasium environment, its mean action (--sample: drawn actions), all
    S x E at once; returns and D4RL's normalised score, a line per run, TensorBoard scalars (gym_eval.evaluate_runs,
    gym_eval.report_runs)."""
    def action(params, obs, key):  # [E, act_dim]
        mean, log_std = policy.apply(params, obs)
        return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape) if args.sample else mean

    out = gym_eval.evaluate_runs(env, action, policy_params, inp.obs_mean, inp.obs_std,
                                 (len(seeds), args.eval_episodes), args.seed, key_eval if args.sample else None)
    header = (f"[bc] policy pi ({'sampled' if args.sample else 'mean'} actions) in {env['env_id']}, "
              f"{args.eval_episodes} episodes per run:")
    return gym_eval.report_runs(out, header, seeds, writer, args.steps)


# --- main: the flags, the inputs, the outputs, the schedule ---

def validate_args(args: Args) -> None:
    """The flags alone, before anything is read: one sentence for the first one out of range."""
    at_least = dict(steps=1, num_seeds=1, batch_size=1, steps_per_call=1, hidden_dim=1, hidden_layers=1,
                    eval_episodes=0)
    check_flags(args, at_least)
    if not args.learning_rate > 0:
        raise InputError(f"--learning-rate must be positive, got {args.learning_rate}")
    check_fits(f"--hidden-dim {args.hidden_dim} with --hidden-layers {args.hidden_layers}",  # params, grads, Adam
               16.0 * args.num_seeds * args.hidden_layers * args.hidden_dim ** 2)
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
    action_scale: tuple  # a_max: the largest |action| per dimension (interpretation 1)
    env: Optional[dict]  # where pi is evaluated (gym_eval.evaluation_env), None for nowhere


def prepare_inputs(args: Args) -> Inputs:
    """The data set (load_dataset validates it), its states standardised, a_max (interpretation 1), and where pi
    is evaluated, decided before training."""
    data_np, data_sha = load_dataset(args.dataset)
    obs_dim = data_np["observations"].shape[1]
    env = gym_eval.evaluation_env_of(args, obs_dim)
    obs_mean, obs_std = observation_stats(args.dataset, data_np["observations"])
    action_scale = tuple(float(x) for x in np.maximum(np.abs(data_np["actions"]).max(0), 1e-3))
    data = Data(obs=jnp.asarray((data_np["observations"] - obs_mean) / obs_std),
                actions=jnp.asarray(data_np["actions"]))
    return Inputs(sha=data_sha, data=data, n=len(data_np["rewards"]), obs_dim=obs_dim,
                  act_dim=data_np["actions"].shape[1], obs_mean=obs_mean, obs_std=obs_std, action_scale=action_scale,
                  env=env)


def output_arrays(args: Args, state: TrainState, inp: Inputs, seeds) -> dict:
    """policy/params/... [S, ...], seeds [S] and arch/* (what rebuilds the policy and standardises its input)."""
    return {
        **flatten_params("policy/params", state.policy["params"]), "seeds": seeds.astype(np.int64),
        "arch/obs_dim": np.int64(inp.obs_dim), "arch/act_dim": np.int64(inp.act_dim),
        "arch/hidden_dim": np.int64(args.hidden_dim), "arch/hidden_layers": np.int64(args.hidden_layers),
        "arch/obs_mean": inp.obs_mean, "arch/obs_std": inp.obs_std,
        "arch/action_scale": np.asarray(inp.action_scale, np.float32),
    }


def main(args: Args) -> dict:
    validate_args(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset])
    inp = prepare_inputs(args)
    policy = GaussianPolicy(inp.act_dim, inp.action_scale, args.hidden_dim, args.hidden_layers)
    init, tx = make_init(args, policy, inp.obs_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = place(inp.data, replicated)
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    key_init, key_train, key_eval = (
        place(x, seed_sharding) for x in jax.vmap(lambda s: jax.random.split(s, 3), out_axes=1)(seed_keys))
    # Not jitted: XLA takes seconds over the initialisers of a fresh closure, while the eager ops are compiled once.
    state = place(jax.vmap(init)(key_init), seed_sharding)

    # The schedule: chunks of gradient steps, a checkpoint after each (interpretation 3).
    calls = [min(args.steps_per_call, args.steps - i) for i in range(0, args.steps, args.steps_per_call)]
    run_dir = os.path.dirname(os.path.abspath(args.out))
    identity = run_identity(args, NEUTRAL_FLAGS, {"dataset": inp.sha})
    ckpt_path, state, first = resume_checkpoint(args, state, CHECKPOINT_SCHEMA, identity, len(calls))
    state = place(state, seed_sharding)
    writer = make_writer(os.path.join(run_dir, "bc"), args)

    # Compile ahead of time, so that the reported speed leaves the compile time out.
    t0 = time.perf_counter()
    train_chunk = make_train_chunk(args, policy, tx, inp.n)
    chunk_key = lambda unit: place(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, unit),
                                            seed_sharding)
    compiled = {s: jax.jit(jax.vmap(lambda st, key, d, s=s: train_chunk(st, key, d, s), in_axes=(0, 0, None)))
                .lower(state, chunk_key(0), data).compile() for s in set(calls[first:])}
    compile_s = time.perf_counter() - t0
    print(f"[bc] N={inp.n} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); {args.steps} steps "
          f"in {len(calls)} chunks; compiled in {compile_s:.1f}s", flush=True)

    progress = Progress(len(calls), "bc", first=first)
    t_train = time.perf_counter()
    done = sum(calls[:first])
    metrics = {}
    for unit in range(first, len(calls)):
        t0 = time.perf_counter()
        state, metrics = compiled[calls[unit]](state, chunk_key(unit), data)
        metrics = {name: float(np.mean(x)) for name, x in fetch(metrics).items()}  # mean over runs
        done += calls[unit]
        save_checkpoint(ckpt_path, state, unit + 1, CHECKPOINT_SCHEMA, identity)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, done)
        took = time.perf_counter() - t0
        writer.add_scalar("charts/SPS", calls[unit] / took, done)
        progress(unit + 1, took=took, steps_per_s=calls[unit] / took, nll=metrics["losses/nll"],
                 action_mse=metrics["charts/action_mse"])
    train_s = time.perf_counter() - t_train
    steps_run = args.steps - sum(calls[:first])

    state = fetch(state)
    arrays = output_arrays(args, state, inp, seeds)
    summary = {"train_s": train_s, "compile_s": compile_s, "steps_per_s": steps_run / max(train_s, 1e-9),
               "nll": metrics.get("losses/nll"), "seeds": seeds.tolist()}
    # Evaluation (interpretation 5): from s_0 with the action field of Figure 1b on the navigation task, else in the
    # Gymnasium environment.
    eval_arrays, eval_summary = gym_eval.evaluate_where(
        inp.env, lambda: evaluate_nav(args, policy, inp, place(state.policy, seed_sharding), key_eval, writer, run_dir,
                                      seeds),
        lambda env: evaluate_gym(args, policy, inp, state.policy, env, key_eval, writer, seeds))
    arrays.update(eval_arrays)
    summary.update(eval_summary)
    save_output(args, arrays, "empo/bc/v1", {"dataset": inp.sha})
    writer.close()
    print(f"[bc] wrote {args.out}: compile {compile_s:.1f}s, training {train_s:.1f}s "
          f"({summary['steps_per_s']:.0f} steps/s per run, {args.num_seeds} runs at once)")
    return summary


if __name__ == "__main__":
    run(main, cli(Args, PRESETS))
