"""Behaviour cloning on the navigation task: the "BC" row of Table 1 and the action field of Figure 1b.

Paper: §1 and Figure 1b (behaviour cloning fails where the two behaviours conflict), §4.1 and Table 1
("naive behaviour cloning"), Appendix B (the didactic network), Appendix C (10 seeds x 10 rollouts).

Input   a data set (``--dataset``, as the EMPO stages): an .npz (schema empo/dataset/v1), D4RL
        .hdf5 files or Minari ids.
Output  ``bc.npz`` (schema empo/bc/v1), figures beside it and TensorBoard logs in ``<out folder>/bc``:
        policy/params/... [S, ...] the Gaussian policy pi(a|s; theta) of every run, seeds [S], arch/* (what
        rebuilds it: hidden_dim, hidden_layers, obs_mean, obs_std, action_scale, obs_dim, act_dim),
        eval/{return, goal, penalty_steps, length, optimal_route} [S, E] and eval/positions [S, E, T+1, 2]
        float16 (rollouts of pi on the navigation task, paths frozen after their end), plus args,
        producer and inputs (the data set's sha256).
        Figures (navigation task): bc_rollouts.png (every run's rollouts, coloured by seed) and
        bc_action_field.png (Figure 1b: the mean action of run 0 as arrows over ||mean action||).

Equation map (behaviour cloning carries no equation number in the paper)
    l_BC(theta) = -E_{(s,a)~D} log pi(a|s; theta)                 -> bc_loss
    pi(a|s; theta) = N(a; mu_theta(s), diag sigma_theta(s)^2)      -> GaussianPolicy (shared block networks)
    minibatch Adam steps on l_BC, S runs vmapped                   -> make_train_chunk

Interpretations and deviations
    1. The paper names "naive behaviour cloning" and gives no details. We clone with the stage-1
       network of EMPO: a diagonal Gaussian policy, mean = action_scale * tanh(.) with action_scale the
       largest |action| per dimension in the data set, state-dependent log-std squashed into [-5, 0],
       on states standardised with the data set's mean and std (+ 1e-3), i.e. EMPO's stage 1 with K = 1.
       --hidden-dim 64 --hidden-layers 3 is the paper's didactic "4-layer MLP with hidden layers of size
       64" read as stage 1 reads it: three hidden layers and a linear output layer.
    2. Training is maximum likelihood: minimise -log pi(a|s), the Gaussian log-density summed over the
       action dimensions, averaged over a minibatch of B = 256 rows drawn uniformly with replacement from
       the whole data set (both behaviours); Adam, lr 3e-4. Where the state alone does not tell the
       behaviours apart the fitted mean is the average of their actions, whatever the std: this is the
       averaging that Figure 1b shows (a deterministic MSE-cloned policy has the same mean).
    3. Schedule: --steps 1,000,000 gradient steps by default, the default of CORL's BC (the paper gives
       no BC schedule), run in jitted lax.scan calls of --steps-per-call steps; a log line, TensorBoard
       scalars (chunk means) and a checkpoint after each call. The minibatches of call u are drawn from
       fold_in(key, u), so --resume continues to the identical result.
    4. Runs: run i uses seed --seed + i; the runs are vmapped in one call and sharded over the visible
       devices (on a CPU one XLA host device per core).
    5. Evaluation (navigation task only, never used for selection): --eval-episodes rollouts per run from
       s_0 with nav_env.rollout (the same JAX rollouts as EMPO's stage 3), executing the policy's mean
       action (--sample draws from the Gaussian instead); the environment clips actions to A. "Optimal
       route" is reaching g without ever entering S_p.
    6. Figure 1b: the arrows are run 0's mean action mu(s) on a 16 x 16 grid over S; the background is
       ||mu(s)|| on a 61 x 61 grid. We show the length of the mean action (not the std) because it is
       what fails: where the two behaviours move in opposite directions from the same states (the
       segments x = 10 and x = 20, 0 <= y <= 15) their actions average out and the arrows shrink.

Example
    python baselines/bc.py --dataset data/nav.npz --out runs/nav/bc.npz --num-seeds 10
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "XLA_FLAGS" not in os.environ:
    # One XLA host device per core, so that seeds run in parallel on a CPU (set before jax loads).
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # nav_env (evaluation and figures) lives in the repository root

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
    """Behaviour cloning: a Gaussian policy fitted by maximum likelihood to the whole data set (Table 1, BC)."""

    # --- experiment ---
    preset: Literal["nav"] = "nav"
    """the defaults of every other flag: 'nav' = the navigation task; flags given on the command line override it"""
    dataset: str = "data/nav.npz"
    """data set: an .npz (schema empo/dataset/v1), or comma-separated D4RL .hdf5 files or Minari ids, as the EMPO
    stages take"""
    out: str = "runs/nav/bc.npz"
    """output file (schema empo/bc/v1); figures go beside it, TensorBoard logs to the folder 'bc' beside it"""
    seed: int = 1
    """random seed of the first run; run i uses seed + i"""
    num_seeds: int = 1
    """independent runs in one vmapped call, sharded over the visible devices"""
    resume: bool = False
    """continue from the checkpoint beside --out (written after every chunk of steps)"""
    eval_episodes: int = 10
    """rollouts of each run's policy from s_0 (navigation task only; 0 skips the evaluation)"""
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
    """hidden units per layer (Appendix B: 64 didactic, 256 D4RL)"""
    hidden_layers: int = 3
    """hidden layers; 3 hidden + 1 output = the paper's '4-layer MLP'"""
    # --- speed ---
    steps_per_call: int = 5_000
    """gradient steps per jitted call: one log line and one checkpoint each"""


PRESETS = {"nav": Args()}


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------

@struct.dataclass
class TrainState:
    policy: Any  # pi(a|s; theta)
    policy_opt: Any


@struct.dataclass
class Data:
    """The data set on the device (shared by all runs)."""

    obs: jax.Array  # [N, obs_dim], standardised
    actions: jax.Array  # [N, act_dim]


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


def observation_stats(name: str, observations):
    """(mean, std + 1e-3) per observation dimension, computed in float64 and checked to fit float32."""
    x = np.asarray(observations, np.float64)
    mean, std = x.mean(0).astype(np.float32), (x.std(0) + 1e-3).astype(np.float32)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise InputError(f"{name}: 'observations' are too large to standardise in float32 (largest |value| "
                         f"{np.abs(x).max():.3g})")
    return mean, std


# --- end shared block: networks ---


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------

def bc_loss(mean, log_std, actions):
    """l_BC = -(1/B) sum_b log N(a_b; mu(s_b), diag exp(log_std(s_b))^2), the log-density summed over
    the action dimensions. mean, log_std, actions [B, act_dim] -> []."""
    return -jnp.mean(gaussian_log_prob(mean, log_std, actions))  # l_BC, maximum likelihood


# ----------------------------------------------------------------------------------------------
# Training function
# ----------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------
# Evaluation and checkpoints
# ----------------------------------------------------------------------------------------------

def make_evaluate(policy, obs_mean, obs_std, episodes: int, sample: bool):
    """Rollouts of pi from s_0 (nav_env.rollout) with its mean action (or a draw), vmapped over runs."""
    import nav_env

    def evaluate(params, key):
        def act(key_t, pos):
            mean, log_std = policy.apply(params, (pos - obs_mean) / obs_std)  # [E, act_dim]
            if sample:
                return mean + jnp.exp(log_std) * jax.random.normal(key_t, mean.shape)
            return mean

        return nav_env.rollout(key, act, episodes)  # nav_env.report_rollouts picks the fields it stores

    return jax.jit(jax.vmap(evaluate))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

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


def main(args: Args) -> dict:
    validate_args(args)
    for path in (args.out, checkpoint_path(args.out)):
        check_writable(path, [args.dataset])
    data_np, data_sha = load_dataset(args.dataset)
    n = len(data_np["rewards"])
    obs_dim, act_dim = data_np["observations"].shape[1], data_np["actions"].shape[1]
    obs_mean, obs_std = observation_stats(args.dataset, data_np["observations"])
    action_scale = tuple(float(x) for x in np.maximum(np.abs(data_np["actions"]).max(0), 1e-3))
    data = Data(obs=jnp.asarray((data_np["observations"] - obs_mean) / obs_std),
                actions=jnp.asarray(data_np["actions"]))

    policy = GaussianPolicy(act_dim, action_scale, args.hidden_dim, args.hidden_layers)
    init, tx = make_init(args, policy, obs_dim)
    seed_sharding, replicated = seed_shardings(args.num_seeds)
    data = jax.device_put(data, replicated)
    seeds = np.arange(args.seed, args.seed + args.num_seeds)
    seed_keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
    key_init, key_train, key_eval = (
        jax.device_put(x, seed_sharding) for x in jax.vmap(lambda s: jax.random.split(s, 3), out_axes=1)(seed_keys))
    # Not jitted: XLA takes seconds over the initialisers of a fresh closure, while the eager ops are compiled once.
    state = jax.device_put(jax.vmap(init)(key_init), seed_sharding)

    # The schedule: chunks of gradient steps, a checkpoint after each.
    calls = [min(args.steps_per_call, args.steps - i) for i in range(0, args.steps, args.steps_per_call)]
    run_dir = os.path.dirname(os.path.abspath(args.out))
    identity = run_identity(args, {"dataset": data_sha})
    ckpt_path, state, first = resume_checkpoint(args, state, "empo/bc-checkpoint/v2", identity, len(calls))
    state = jax.device_put(state, seed_sharding)
    writer = make_writer(os.path.join(run_dir, "bc"), args)

    # Compile ahead of time, so that the reported speed leaves the compile time out.
    t0 = time.perf_counter()
    train_chunk = make_train_chunk(args, policy, tx, n)
    chunk_key = lambda unit: jax.device_put(jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_train, unit),
                                            seed_sharding)
    compiled = {s: jax.jit(jax.vmap(lambda st, key, d, s=s: train_chunk(st, key, d, s), in_axes=(0, 0, None)))
                .lower(state, chunk_key(0), data).compile() for s in set(calls[first:])}
    compile_s = time.perf_counter() - t0
    print(f"[bc] N={n} seeds={args.num_seeds} on {seed_sharding.mesh.devices.size} device(s); {args.steps} steps "
          f"in {len(calls)} chunks; compiled in {compile_s:.1f}s", flush=True)

    progress = Progress(len(calls), "bc", first=first)
    t_train = time.perf_counter()
    done = sum(calls[:first])
    metrics = {}
    for unit in range(first, len(calls)):
        t0 = time.perf_counter()
        state, metrics = compiled[calls[unit]](state, chunk_key(unit), data)
        metrics = {name: float(np.mean(x)) for name, x in jax.device_get(metrics).items()}  # mean over runs
        done += calls[unit]
        save_checkpoint(ckpt_path, state, unit + 1, "empo/bc-checkpoint/v2", identity)
        for tag, value in metrics.items():
            writer.add_scalar(tag, value, done)
        took = time.perf_counter() - t0
        writer.add_scalar("charts/SPS", calls[unit] / took, done)
        progress(unit + 1, took=took, steps_per_s=calls[unit] / took, nll=metrics["losses/nll"],
                 action_mse=metrics["charts/action_mse"])
    train_s = time.perf_counter() - t_train
    steps_run = args.steps - sum(calls[:first])

    state = jax.device_get(state)
    arrays = {
        **flatten_params("policy/params", state.policy["params"]), "seeds": seeds.astype(np.int64),
        "arch/obs_dim": np.int64(obs_dim), "arch/act_dim": np.int64(act_dim),
        "arch/hidden_dim": np.int64(args.hidden_dim), "arch/hidden_layers": np.int64(args.hidden_layers),
        "arch/obs_mean": obs_mean, "arch/obs_std": obs_std, "arch/action_scale": np.asarray(action_scale, np.float32),
    }
    summary = {"train_s": train_s, "compile_s": compile_s, "steps_per_s": steps_run / max(train_s, 1e-9),
               "nll": metrics.get("losses/nll"), "seeds": seeds.tolist()}

    # Evaluation for insight (navigation task only): rollouts from s_0 and the action field of Figure 1b.
    if obs_dim == 2 and act_dim == 2 and args.eval_episodes > 0:
        policy_params = jax.device_put(state.policy, seed_sharding)
        eval_arrays, eval_summary = evaluate_policy(args, policy, obs_mean, obs_std, policy_params, key_eval, writer,
                                                    run_dir, seeds)
        arrays.update(eval_arrays)
        summary.update(eval_summary)
    save_npz(args.out, arrays, "empo/bc/v1", asdict(args), {"dataset": data_sha})
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    writer.close()
    print(f"[bc] wrote {args.out}: compile {compile_s:.1f}s, training {train_s:.1f}s "
          f"({summary['steps_per_s']:.0f} steps/s per run, {args.num_seeds} runs at once)")
    return summary


def evaluate_policy(args: Args, policy, obs_mean, obs_std, policy_params, key_eval, writer, run_dir, seeds):
    """Rollouts of every run, a table, TensorBoard scalars and figures; returns (eval/* arrays, summary)."""
    import nav_env

    # Both protocols of Appendix C, from the same start states: eval/* with the mean action, eval/sampled_* with
    # actions drawn from pi (the paper's "sampled 10 trajectories"); --sample only picks the one the figures show.
    outs, arrays, summaries = {}, {}, {}
    for sample in (False, True):
        evaluate = make_evaluate(policy, jnp.asarray(obs_mean), jnp.asarray(obs_std), args.eval_episodes, sample)
        outs[sample] = jax.device_get(evaluate(policy_params, key_eval))  # [S, E, ...]
        part, part_summary = nav_env.report_rollouts(
            outs[sample], seeds, f"[bc] policy pi ({'sampled' if sample else 'mean'} actions), "
                                 f"{args.eval_episodes} rollouts per run:", prefix="sampled_" if sample else "")
        arrays.update(part)
        summaries[sample] = part_summary
    summary = {**summaries[False], "sampled": summaries[True]}
    out, actions = outs[args.sample], "sampled" if args.sample else "mean"
    for name in ("return_mean", "goal_rate", "length", "penalty_steps", "optimal_route"):
        writer.add_scalar(f"eval/{name}", summary[name], args.steps)
        writer.add_scalar(f"eval/sampled_{name}", summary["sampled"][name], args.steps)

    # Figures: every run's rollouts, and Figure 1b (run 0's mean action over the length of the mean action).
    title = f"BC: {args.eval_episodes} rollouts per run ({actions} actions)"
    images = {"rollouts": nav_env.plot_runs(out, seeds, title, os.path.join(run_dir, "bc_rollouts.png"))}
    params0 = jax.tree.map(lambda x: x[0], jax.device_get(policy_params))
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
