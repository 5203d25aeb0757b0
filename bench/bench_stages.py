"""How far each training unit of each stage is from a bare-bones JAX floor, on this machine.

For every training unit (the jitted function a stage's ``main`` calls once per epoch or per chunk of steps) this
script builds the stage's OWN function from its factories and containers, exactly as ``main`` does (vmapped over
``--seeds`` seeds, ``jax.jit(jax.vmap(f, in_axes=(0, ..., None)))``), on synthetic data of the given size, and a
**floor**: the same maths written minimally here (plain jnp MLPs on lists of (W, b), the same sizes, batch 256,
optax.adam with the same learning rate, the same number of gradient steps, vmapped the same way), with no metrics,
no masks and no padding. The two are timed interleaved in one process (stage, floor, stage, floor, ...; compilation
and ``--warmup`` calls excluded, every call wrapped in jax.block_until_ready) and the best time of each is reported
(the least disturbed by other work on the cores; every time is in the --json file). The floor evaluates the networks
the stage evaluates (PPO: each row's own policy head, the rows sorted by cluster), so the ratio measures the
implementation (metrics, masks, padding, gathers, library layers), not an algorithmic choice.

Units (steps = gradient steps per call):
    m_epoch    stage 1 M-only epoch (bias / pre-training phases): ceil(N / B) M-steps           make_m_epoch
    em_epoch   stage 1 EM epoch: E-step over all N rows, momentum, ceil(N / B) M + classifier steps  make_em_epoch
    sarsa      stage 2 chunk of --steps-per-call SARSA steps with the target update             make_q_chunk
    v_epoch    stage 2 V epoch: ceil(N / B) Monte-Carlo regression steps                        make_v_epoch
    ppo_epoch  stage 2 full-batch PPO epoch: one Adam step on all N rows, own heads (1 step)    make_ppo_epoch
    iql        stage 3 chunk of --steps-per-call IQL steps (Q_H and V_H)                         make_train_chunk
    bc         baselines/bc.py chunk of --steps-per-call steps                                   make_train_chunk
    td3_bc     baselines/td3_bc.py chunk of --steps-per-call critic steps (actor every 2nd)      make_train_chunk

Sizes: nav = obs 2, act 2, hidden 64; d4rl = obs 17, act 6, hidden 256; both 3 hidden ReLU layers, K = 2 clusters,
episodes of 650 rows, N = --rows for both. The data are random: the speed of these units depends on the sizes only.

Reported per unit: seconds per call, steps/s (per seed: each of the S vmapped seeds takes that many steps), the
ratio floor time / stage time (1.0 = the stage is at the floor, 0.5 = twice slower), the FLOP rate of each and the
percentage of this CPU's peak, measured here as the best rate of repeated jitted f32 matmuls of 512^2, 1024^2 and
2048^2 matrices (at the start and at the end; the small ones, which fit in the caches, run fastest).
FLOPs per call come from XLA (``jitted.lower(*args).compile().cost_analysis()``). XLA's cost analysis counts the
body of a loop once whatever its trip count, so each unit is also compiled as a probe whose loops run once (one step
per epoch or chunk; the E-step and the PPO pass over their first chunk of rows alone; a step index fixed so that a
periodic update is in or out) and the probe's FLOPs are multiplied by the trip counts. The probes are compiled,
never run.

Then, per size, the wall time of the full default schedules extrapolated from the per-call times (the presets of
the stage files: stage 1 N_b + N_p M epochs and N_E EM epochs, stage 2 N_Q SARSA steps, N_V V epochs and N_pi PPO
epochs, stage 3 N_H steps, BC and TD3+BC their --steps), for the stage and for the floor; compilation, logging,
checkpoints and evaluation are left out.

By default everything runs on one XLA device. The stages' ``main`` shard their seeds over one host device per
core (as many as divide the seeds evenly), so ``--devices D`` does the same here: the per-seed inputs of stage and
floor alike are placed with a seed-axis sharding over D devices and the shared data replicated, and XLA partitions
the vmapped call. On a CPU, D > 1 makes this script expose one host device per core, as the stages do (unless
XLA_FLAGS is set). With 10 seeds at the nav size on a 2-core CPU, two devices ran the stage-1 M epoch 2.1 times as
fast as one (17.2 against 35.9 s), the EM epoch 1.5 times, and the full-batch PPO epoch no faster (80 GFLOP/s
either way). Examples:
    python bench/bench_stages.py                                             # the full measurement (long)
    python bench/bench_stages.py --size nav --rows 20000 --repeats 1          # a quick check
    python bench/bench_stages.py --size d4rl --units em_epoch ppo_epoch --json runs/bench_stages.json
    python bench/bench_stages.py --size nav --seeds 10 --devices 2 --units m_epoch em_epoch sarsa v_epoch ppo_epoch iql
"""

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "baselines")]


def requested_devices(argv: list) -> int:
    """--devices from the command line, read before JAX starts (0 where absent or malformed: parse_args reports it)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--devices", default="1")
    known, _ = pre.parse_known_args(argv)
    return int(known.devices) if known.devices.isdigit() else 0


if __name__ == "__main__" and requested_devices(sys.argv[1:]) > 1 and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.cpu_count() or 1}"  # as the stages do

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import empo_cluster  # noqa: E402
import empo_highlevel  # noqa: E402
import empo_io  # noqa: E402
import empo_ppo  # noqa: E402

bc = importlib.import_module("bc")  # baselines/bc.py and baselines/td3_bc.py (baselines/ is on sys.path)
td3_bc = importlib.import_module("td3_bc")

SIZES = {  # Appendix B: the didactic network and the D4RL one (HalfCheetah: 17-dim state, 6-dim action)
    "nav": dict(obs_dim=2, act_dim=2, hidden=64, layers=3, action_max=0.2),
    "d4rl": dict(obs_dim=17, act_dim=6, hidden=256, layers=3, action_max=1.0),
}
UNITS = ("m_epoch", "em_epoch", "sarsa", "v_epoch", "ppo_epoch", "iql", "bc", "td3_bc")
K = 2  # clusters
BATCH = 256
EPISODE_ROWS = 650
LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass
class Config:
    size: str
    obs_dim: int
    act_dim: int
    hidden: int
    layers: int
    action_max: float
    rows: int
    seeds: int
    steps_per_call: int

    @property
    def scale(self) -> tuple:  # action_scale as the stages take it
        return (self.action_max,) * self.act_dim


@dataclasses.dataclass
class Unit:
    """One training unit: the stage's jitted function and the floor's, their inputs and FLOPs per call."""

    name: str
    steps: int  # gradient steps per call
    stage: Callable
    stage_args: tuple
    floor: Callable
    floor_args: tuple
    stage_flops: Callable[[], float]  # FLOPs per call, from probes (see the module docstring)
    floor_flops: Callable[[], float]


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def xla_flops(jitted, *args) -> float:
    """FLOPs of one call as XLA's cost analysis counts them (loop bodies once); a dict or a list of dicts."""
    cost = jitted.lower(*args).compile().cost_analysis()
    costs = cost if isinstance(cost, (list, tuple)) else [cost]
    return float(sum((c or {}).get("flops", 0.0) for c in costs))


def timed(fn, args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def peak_gflops(dims=(512, 1024, 2048), flop_per_size: float = 2e10) -> dict:
    """This CPU's f32 matmul rate in GFLOP/s per size: the best of repeated jitted dim x dim @ dim x dim products
    (about ``flop_per_size`` FLOPs of them per size). Matrices that fit in the caches run fastest, so the peak is the
    best over the sizes, not the 2048 one alone."""
    rates = {}
    matmul = jax.jit(lambda x, y: x @ y)
    for dim in dims:
        a = jax.random.normal(jax.random.key(0), (dim, dim), jnp.float32)
        jax.block_until_ready(matmul(a, a))
        reps = max(5, int(flop_per_size / (2.0 * dim ** 3)))
        rates[dim] = 2.0 * dim ** 3 / min(timed(matmul, (a, a)) for _ in range(reps)) / 1e9
    return rates


def place(args: tuple, devices: int) -> tuple:
    """The inputs of a ``vmapped`` call as the stages place theirs: every argument but the last (the shared data) is
    per seed and sharded over ``devices`` devices along its seed axis; the last is replicated. One device: as is."""
    if devices == 1:
        return args
    # the stages' own shardings; given ``devices`` as the seed count, their mesh holds exactly that many devices
    per_seed, replicated = empo_io.seed_shardings(devices)
    return (*jax.device_put(args[:-1], per_seed), jax.device_put(args[-1], replicated))


def measure(unit: Unit, cfg: Config, repeats: int, warmup: int, devices: int = 1) -> dict:
    """Compile both, then (stage, floor) pairs: ``warmup`` pairs left out, ``repeats`` pairs timed. The FLOPs come
    from the probes on unplaced inputs, so they count the whole call whatever ``devices``."""
    unit = dataclasses.replace(unit, stage_args=place(unit.stage_args, devices),
                               floor_args=place(unit.floor_args, devices))
    t0 = time.perf_counter()
    stage = unit.stage.lower(*unit.stage_args).compile()
    compile_stage = time.perf_counter() - t0
    t0 = time.perf_counter()
    floor = unit.floor.lower(*unit.floor_args).compile()
    compile_floor = time.perf_counter() - t0
    times = {"stage": [], "floor": []}
    for i in range(warmup + repeats):
        t_stage, t_floor = timed(stage, unit.stage_args), timed(floor, unit.floor_args)
        if i >= warmup:
            times["stage"].append(t_stage)
            times["floor"].append(t_floor)
    flops = {"stage": unit.stage_flops(), "floor": unit.floor_flops()}
    best = {who: min(t) for who, t in times.items()}
    return {"size": cfg.size, "unit": unit.name, "steps_per_call": unit.steps, "seeds": cfg.seeds, "rows": cfg.rows,
            "devices": devices,
            "stage_s": best["stage"], "floor_s": best["floor"], "ratio": best["floor"] / best["stage"],
            "stage_steps_per_s": unit.steps / best["stage"], "floor_steps_per_s": unit.steps / best["floor"],
            "stage_flops": flops["stage"], "floor_flops": flops["floor"],
            "stage_gflops_per_s": flops["stage"] / best["stage"] / 1e9,
            "floor_gflops_per_s": flops["floor"] / best["floor"] / 1e9,
            "stage_times_s": times["stage"], "floor_times_s": times["floor"],
            "stage_median_s": statistics.median(times["stage"]), "floor_median_s": statistics.median(times["floor"]),
            "compile_stage_s": compile_stage, "compile_floor_s": compile_floor}


def vmapped(f, per_seed: int):
    """jax.jit(jax.vmap(f)) with the first ``per_seed`` arguments mapped over seeds and the last one shared."""
    return jax.jit(jax.vmap(f, in_axes=(0,) * per_seed + (None,)))


# ----------------------------------------------------------------------------------------------
# The floor's building blocks: plain MLPs on lists of (W, b)
# ----------------------------------------------------------------------------------------------

def init_mlp(key, cfg: Config, in_dim: int, out_dim: int) -> list:
    sizes = [in_dim] + [cfg.hidden] * cfg.layers + [out_dim]
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (i, o)) / math.sqrt(i), jnp.zeros(o)) for k, i, o in zip(keys, sizes, sizes[1:])]


def init_mlps(key, cfg: Config, in_dim: int, out_dim: int, count: int) -> list:
    """``count`` MLPs stacked on a leading axis."""
    return jax.vmap(lambda k: init_mlp(k, cfg, in_dim, out_dim))(jax.random.split(key, count))


def mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def gaussian(params, obs, action_max: float):
    """(mean, log_std) of the stages' Gaussian policy: mean = a_max tanh(.), log_std squashed into [-5, 0]."""
    mean, log_std = jnp.split(mlp(params, obs), 2, axis=-1)
    return action_max * jnp.tanh(mean), -5.0 + 2.5 * (jnp.tanh(log_std) + 1.0)


def log_prob(mean, log_std, action):
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z * z - log_std, axis=-1) - 0.5 * LOG_2PI * action.shape[-1]


def all_heads(params, obs, action_max: float):
    """The K stacked policies at obs: (mean, log_std) [K, B, act_dim] each."""
    return jax.vmap(gaussian, in_axes=(0, None, None))(params, obs, action_max)


def pick(x, z):
    """x [K, B, ...] -> x[z_b, b] [B, ...]."""
    return jnp.take_along_axis(x, z[None, :, None], axis=0)[0]


def select(values, z):
    """values [B, K] -> values[b, z_b] [B]."""
    return jnp.take_along_axis(values, z[:, None], axis=1)[:, 0]


def adam(tx, grads, params, opt):
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt


def polyak(target, online, rate: float):
    return jax.tree.map(lambda t, p: (1.0 - rate) * t + rate * p, target, online)


def row_chunks(rows: int, chunk: int, fn, init, *arrays):
    """fold fn(acc, *rows_of(arrays)) over consecutive chunks of ``chunk`` rows and the remainder (no padding)."""
    full = rows // chunk

    def body(acc, i):
        return fn(acc, *(jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk) for a in arrays)), None

    acc = jax.lax.scan(body, init, jnp.arange(full))[0] if full else init
    return fn(acc, *(a[full * chunk:rows] for a in arrays)) if full * chunk < rows else acc


def head(tree, rows: int):
    """The first ``rows`` rows of every array of a per-row pytree (a probe's one chunk of the data)."""
    return jax.tree.map(lambda x: x[:rows], tree)


def steps_xs(key, steps: int, offset: int):
    """Per-step keys and step indices offset, offset + 1, ... (a probe fixes offset to put a periodic update in)."""
    return jax.random.split(key, steps), offset + jnp.arange(steps)


def periodic_flops(probe, steps: int, period: int) -> float:
    """FLOPs of ``steps`` steps of which every ``period``-th runs a periodic update: probe(offset) is one step at
    step index ``offset`` (offset period - 1 is a step with the update, offset 0 one without when period > 1)."""
    plain, with_update = probe(0), probe(period - 1)
    return steps * plain + steps / period * (with_update - plain) if period > 1 else steps * with_update


def synthetic(cfg: Config, seed: int = 0) -> dict:
    """Random rows of the right shapes: states, actions in [-a_max, a_max], rewards, episodes of 650 rows."""
    rng = np.random.default_rng(seed)
    n = cfg.rows
    episodes = max(n // EPISODE_ROWS, K)
    ids = np.minimum(np.arange(n) // EPISODE_ROWS, episodes - 1).astype(np.int32)
    obs = rng.standard_normal((n + 1, cfg.obs_dim), dtype=np.float32)
    actions = (cfg.action_max * rng.uniform(-1, 1, (n, cfg.act_dim))).astype(np.float32)
    last = np.r_[np.diff(ids) != 0, True]
    return dict(obs=obs[:-1], next_obs=obs[1:], actions=actions, rewards=rng.standard_normal(n, dtype=np.float32),
                episode_ids=ids, episodes=episodes, last=last,
                cluster=rng.integers(0, K, episodes).astype(np.int32)[ids])  # A(s, a), one cluster per episode


def seed_keys(cfg: Config, stream: int):
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stream))(jnp.arange(1, cfg.seeds + 1))


# ----------------------------------------------------------------------------------------------
# Stage 1 (empo_cluster.py): M-only epoch, EM epoch
# ----------------------------------------------------------------------------------------------

def floor_m_step(cfg: Config, tx, rows: int, classifier: bool):
    """One M-step (weighted NLL of the K policies, Adam), with the classifier's step against the same weights."""

    def step(carry, key, q, data):
        idx = jax.random.randint(key, (BATCH,), 0, rows)
        obs, actions, weights = data["obs"][idx], data["actions"][idx], q[data["episode_ids"][idx]]  # w [B, K]

        def nll(params):
            mean, log_std = all_heads(params, obs, cfg.action_max)  # [K, B, act_dim]
            return -jnp.mean(jnp.sum(weights * log_prob(mean, log_std, actions[None]).T, axis=1))

        policy, policy_opt = adam(tx, jax.grad(nll)(carry["policy"]), carry["policy"], carry["policy_opt"])
        carry = dict(carry, policy=policy, policy_opt=policy_opt)
        if classifier:  # KL(Q || q) less the entropy of Q, a constant: the same gradient
            cross_entropy = lambda p: -jnp.mean(jnp.sum(weights * jax.nn.log_softmax(mlp(p, obs)), axis=1))
            params, opt = adam(tx, jax.grad(cross_entropy)(carry["classifier"]), carry["classifier"],
                               carry["classifier_opt"])
            carry = dict(carry, classifier=params, classifier_opt=opt)
        return carry

    return step


def floor_m_epoch(cfg: Config, tx, rows: int, steps: int, classifier: bool = False):
    step = floor_m_step(cfg, tx, rows, classifier)

    def epoch(carry, q, key, data):
        return jax.lax.scan(lambda c, k: (step(c, k, q, data), None), carry, jax.random.split(key, steps))[0]

    return epoch


def floor_em_epoch(cfg: Config, tx, rows: int, episodes: int, chunk: int, momentum: float, m_epoch):
    """E-step (forward pass over all rows in chunks, segment sums, logsumexp), the momentum mix (Eq. 5), M epoch."""

    def epoch(carry, q_prev, key, data):
        def add_chunk(loglik, obs, actions, ids):  # sum_t log beta(a_t | s_t, z) per episode [E, K]
            mean, log_std = all_heads(carry["policy"], obs, cfg.action_max)
            return loglik + jax.ops.segment_sum(log_prob(mean, log_std, actions[None]).T, ids, num_segments=episodes)

        loglik = row_chunks(rows, chunk, add_chunk, jnp.zeros((episodes, K)), data["obs"], data["actions"],
                            data["episode_ids"])
        log_post = loglik - jax.nn.logsumexp(loglik, axis=1, keepdims=True)  # Eq. (3)
        q = momentum * q_prev + (1.0 - momentum) * jnp.exp(log_post)  # Eq. (5)
        return m_epoch(carry, q, key, data), q

    return epoch


def stage1_units(cfg: Config, wanted: list) -> dict:
    mod = empo_cluster
    raw = synthetic(cfg)
    n, episodes = cfg.rows, raw["episodes"]
    args = dataclasses.replace(mod.PRESETS[cfg.size], k=K, hidden_dim=cfg.hidden, hidden_layers=cfg.layers,
                               batch_size=BATCH)
    args = dataclasses.replace(args, estep_chunk=min(args.estep_chunk, n))  # as prepare_inputs and main do
    pad = (-n) % args.estep_chunk
    data = mod.Data(obs=jnp.asarray(np.pad(raw["obs"], ((0, pad), (0, 0)))),
                    actions=jnp.asarray(np.pad(raw["actions"], ((0, pad), (0, 0)))),
                    episode_ids=jnp.asarray(np.pad(raw["episode_ids"], (0, pad), constant_values=episodes)))
    policy, classifier = mod.make_networks(args, cfg.act_dim, cfg.scale)
    init, tx = mod.make_init(args, policy, classifier, cfg.obs_dim)
    keys = seed_keys(cfg, 0)
    state = jax.vmap(init)(keys)
    q = jnp.full((cfg.seeds, episodes, K), 1.0 / K)
    steps = math.ceil(n / BATCH)

    fdata = {name: jnp.asarray(raw[name]) for name in ("obs", "actions", "episode_ids")}
    ftx = optax.adam(args.learning_rate)

    def floor_init(key):
        key_policy, key_classifier = jax.random.split(key)
        p = init_mlps(key_policy, cfg, cfg.obs_dim, 2 * cfg.act_dim, K)
        c = init_mlp(key_classifier, cfg, cfg.obs_dim, K)
        return dict(policy=p, policy_opt=ftx.init(p), classifier=c, classifier_opt=ftx.init(c))

    carry = jax.vmap(floor_init)(keys)
    m_stage = lambda rows, cls: vmapped(mod.make_m_epoch(args, policy, classifier, tx, rows, cls), 3)
    m_floor = lambda rows, m_steps, cls: vmapped(floor_m_epoch(cfg, ftx, rows, m_steps, cls), 3)
    em_floor = lambda rows, chunk, m_epoch: vmapped(floor_em_epoch(cfg, ftx, rows, episodes, chunk, args.momentum,
                                                                   m_epoch), 3)
    units = {}
    if "m_epoch" in wanted:  # probes: an epoch of one step (rows = B)
        units["m_epoch"] = Unit(
            "m_epoch", steps, m_stage(n, False), (state, q, keys, data), m_floor(n, steps, False),
            (carry, q, keys, fdata),
            stage_flops=lambda: steps * xla_flops(m_stage(BATCH, False), state, q, keys, data),
            floor_flops=lambda: steps * xla_flops(m_floor(n, 1, False), carry, q, keys, fdata))
    if "em_epoch" in wanted:
        # Probes: the E-step over the first chunk of rows alone with no M epoch, times the number of chunks (XLA
        # counts a loop's body once; a probe over all rows as one chunk would hold [seeds, K, N, hidden] activations,
        # 83 GB at the D4RL size with 10 seeds), plus steps x one M-step.
        chunk = args.estep_chunk
        no_m = lambda st, q_, key, d: (st, {})
        e_stage = vmapped(mod.make_em_epoch(args, mod.make_e_step(args, policy, episodes), no_m), 3)
        first, ffirst = head(data, chunk), head(fdata, chunk)
        em_stage = vmapped(mod.make_em_epoch(args, mod.make_e_step(args, policy, episodes),
                                             mod.make_m_epoch(args, policy, classifier, tx, n, True)), 3)
        units["em_epoch"] = Unit(
            "em_epoch", steps, em_stage, (state, q, keys, data),
            em_floor(n, chunk, floor_m_epoch(cfg, ftx, n, steps, True)), (carry, q, keys, fdata),
            stage_flops=lambda: (data.obs.shape[0] / chunk * xla_flops(e_stage, state, q, keys, first)
                                 + steps * xla_flops(m_stage(BATCH, True), state, q, keys, data)),
            floor_flops=lambda: (n / chunk * xla_flops(em_floor(chunk, chunk, lambda c, q_, key, d: c), carry, q, keys,
                                                       ffirst)
                                 + steps * xla_flops(m_floor(n, 1, True), carry, q, keys, fdata)))
    return units


# ----------------------------------------------------------------------------------------------
# Stage 2 (empo_ppo.py): SARSA chunk, V epoch, full-batch PPO epoch
# ----------------------------------------------------------------------------------------------

def floor_sarsa(cfg: Config, tx, rows: int, steps: int, gamma: float, every: int, rate: float, offset: int = 0):
    """SARSA: the target net on (s', a'), MSE on the cluster's head, Adam; Polyak every ``every`` steps."""
    scale = cfg.action_max

    def step(carry, x, run, data):
        key, i = x
        idx = jax.random.randint(key, (BATCH,), 0, rows)
        z = run["assign"][idx]
        q_next = mlp(carry["target"], jnp.concatenate([data["next_obs"][idx], run["next_actions"][idx] / scale], 1))
        target = data["rewards"][idx] + gamma * data["bootstrap"][idx] * select(q_next, z)
        inputs = jnp.concatenate([data["obs"][idx], data["actions"][idx] / scale], 1)
        grads = jax.grad(lambda p: jnp.mean((select(mlp(p, inputs), z) - target) ** 2))(carry["q"])
        q, opt = adam(tx, grads, carry["q"], carry["opt"])
        target_net = jax.lax.cond((i + 1) % every == 0, lambda: polyak(carry["target"], q, rate),
                                  lambda: carry["target"])
        return dict(q=q, opt=opt, target=target_net), None

    def chunk(carry, key, run, data):
        return jax.lax.scan(lambda c, x: step(c, x, run, data), carry, steps_xs(key, steps, offset))[0]

    return chunk


def floor_v_epoch(cfg: Config, tx, rows: int, steps: int):
    """Monte-Carlo V: MSE of the cluster's head against the returns, Adam."""

    def step(carry, key, run, data):
        idx = jax.random.randint(key, (BATCH,), 0, rows)
        loss = lambda p: jnp.mean((select(mlp(p, data["obs"][idx]), run["assign"][idx]) - data["returns"][idx]) ** 2)
        v, opt = adam(tx, jax.grad(loss)(carry["v"]), carry["v"], carry["opt"])
        return dict(v=v, opt=opt), None

    def epoch(carry, key, run, data):
        return jax.lax.scan(lambda c, k: step(c, k, run, data), carry, jax.random.split(key, steps))[0]

    return epoch


def floor_ppo_epoch(cfg: Config, tx, rows: int, chunk: int, clip: float, bounds: tuple):
    """Full-batch PPO: the clipped surrogate's gradient summed over chunks of all rows (frozen beta, Q, V), Adam.
    The rows are sorted by cluster (rows bounds[z]..bounds[z + 1] are cluster z's), and each row's own policy head
    alone is evaluated, as the stage does."""
    scale = cfg.action_max

    def epoch(carry, key, run, data):
        noise = jax.random.normal(key, data["actions"].shape)

        def add_chunk(grads, obs, eps, z):
            own = lambda params: jax.tree.map(lambda x: x[z], params)
            beta_mean, beta_log_std = gaussian(own(run["beta"]), obs, scale)
            a_new = beta_mean + jnp.exp(beta_log_std) * eps
            log_beta = log_prob(beta_mean, beta_log_std, a_new)
            q_in = jnp.concatenate([obs, jnp.clip(a_new, -scale, scale) / scale], 1)
            adv = (mlp(carry["q"], q_in) - mlp(carry["v"], obs))[:, z]

            def loss(pi):
                ratio = jnp.exp(log_prob(*gaussian(own(pi), obs, scale), a_new) - log_beta)
                return -jnp.sum(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv)) / rows

            return jax.tree.map(jnp.add, grads, jax.grad(loss)(carry["pi"]))

        grads = jax.tree.map(jnp.zeros_like, carry["pi"])
        for z, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            grads = row_chunks(hi - lo, chunk, lambda g, o, e, z=z: add_chunk(g, o, e, z), grads, data["obs"][lo:hi],
                               noise[lo:hi])
        pi, opt = adam(tx, grads, carry["pi"], carry["opt"])
        return dict(carry, pi=pi, opt=opt)

    return epoch


def stage2_units(cfg: Config, wanted: list) -> dict:
    mod = empo_ppo
    raw = synthetic(cfg)
    n = cfg.rows
    args = dataclasses.replace(mod.PRESETS[cfg.size], steps_per_call=cfg.steps_per_call, batch_size=BATCH,
                               ppo_minibatch=0)
    next_actions = np.where(raw["last"][:, None], 0.0, np.roll(raw["actions"], -1, axis=0)).astype(np.float32)
    returns = raw["rewards"] * 10.0  # any numbers: the speed does not depend on them
    data = mod.Data(**{name: jnp.asarray(x) for name, x in dict(
        obs=raw["obs"], actions=raw["actions"], rewards=raw["rewards"], next_obs=raw["next_obs"],
        next_actions=next_actions, bootstrap=np.ones(n, np.float32), timeout_end=raw["last"], returns=returns).items()})
    policy, q_net, v_net = mod.make_networks(cfg.hidden, cfg.layers, K, cfg.act_dim, cfg.scale)
    init, tx = mod.make_init(args, q_net, v_net, cfg.obs_dim, cfg.act_dim)
    keys, beta_keys = seed_keys(cfg, 0), seed_keys(cfg, 1)
    dummy = jnp.zeros((1, cfg.obs_dim))
    beta = jax.vmap(lambda k: jax.vmap(policy.init, in_axes=(0, None))(jax.random.split(k, K), dummy))(beta_keys)
    assign = jnp.broadcast_to(jnp.asarray(raw["cluster"]), (cfg.seeds, n))
    per_seed_next = jnp.broadcast_to(data.next_actions, (cfg.seeds,) + data.next_actions.shape)  # main fills timeouts
    size = mod.group_size(args.chunk, n, K)
    groups = mod.cluster_chunks(np.asarray(assign), K, size)
    run = mod.RunInputs(beta=beta, assign=assign, next_actions=per_seed_next, groups=tuple(map(jnp.asarray, groups)))
    state = jax.vmap(init)(keys, beta)

    ftx = optax.adam(args.learning_rate)
    fdata = dict(obs=jnp.asarray(raw["obs"]), actions=jnp.asarray(raw["actions"]),
                 rewards=jnp.asarray(raw["rewards"]), next_obs=jnp.asarray(raw["next_obs"]),
                 bootstrap=jnp.ones(n), returns=jnp.asarray(returns))
    frun = dict(beta=jax.vmap(lambda k: init_mlps(k, cfg, cfg.obs_dim, 2 * cfg.act_dim, K))(beta_keys),
                assign=assign[:, :n], next_actions=run.next_actions[:, :n])

    def floor_init(key):
        key_q, key_v, key_pi = jax.random.split(key, 3)
        q = init_mlp(key_q, cfg, cfg.obs_dim + cfg.act_dim, K)
        v = init_mlp(key_v, cfg, cfg.obs_dim, K)
        pi = init_mlps(key_pi, cfg, cfg.obs_dim, 2 * cfg.act_dim, K)
        return dict(q=q, target=q, opt=ftx.init(q)), dict(v=v, opt=ftx.init(v)), dict(pi=pi, opt=ftx.init(pi), q=q, v=v)

    carry_q, carry_v, carry_pi = jax.vmap(floor_init)(keys)
    units = {}
    if "sarsa" in wanted:
        spc = cfg.steps_per_call
        q_chunk = mod.make_q_chunk(args, q_net, tx, n, cfg.scale)
        sarsa = lambda s: vmapped(lambda st, key, r, d: q_chunk(st, key, r, d, s), 3)
        sarsa_floor = lambda s, offset=0: vmapped(floor_sarsa(cfg, ftx, n, s, args.gamma, args.q_target_every,
                                                              args.q_target_rate, offset), 3)
        units["sarsa"] = Unit(
            "sarsa", spc, sarsa(spc), (state, keys, run, data), sarsa_floor(spc), (carry_q, keys, frun, fdata),
            stage_flops=lambda: spc * xla_flops(sarsa(1), state, keys, run, data),
            floor_flops=lambda: periodic_flops(lambda off: xla_flops(sarsa_floor(1, off), carry_q, keys, frun, fdata),
                                               spc, args.q_target_every))
    if "v_epoch" in wanted:
        steps = math.ceil(n / BATCH)
        v_epoch = lambda rows: vmapped(mod.make_v_epoch(args, v_net, tx, rows), 3)
        v_floor = lambda s: vmapped(floor_v_epoch(cfg, ftx, n, s), 3)
        units["v_epoch"] = Unit(
            "v_epoch", steps, v_epoch(n), (state, keys, run, data), v_floor(steps), (carry_v, keys, frun, fdata),
            stage_flops=lambda: steps * xla_flops(v_epoch(BATCH), state, keys, run, data),
            floor_flops=lambda: steps * xla_flops(v_floor(1), carry_v, keys, frun, fdata))
    if "ppo_epoch" in wanted:
        # Probes: the epoch over the first chunk of rows alone, times the number of chunks (as for the E-step: a
        # probe over all rows as one chunk would hold [seeds, K, N, hidden] activations, 40 GB at the D4RL size
        # with 10 seeds). The Adam step is counted once per chunk too, a negligible excess.
        # The floor's rows sorted by cluster, each cluster's rows in chunks of the stage's size.
        order = np.argsort(raw["cluster"], kind="stable")
        bounds = tuple(int(b) for b in np.searchsorted(raw["cluster"][order], np.arange(K + 1)))
        fsorted = jax.tree.map(lambda x: x[order], fdata)
        ppo_epoch = lambda: vmapped(mod.make_ppo_epoch(args, policy, q_net, v_net, tx, n, K, cfg.scale), 3)
        ppo_floor = lambda b: vmapped(floor_ppo_epoch(cfg, ftx, n, size, args.clip, b), 3)
        run_first = run.replace(groups=tuple(g[:, :1] for g in run.groups))  # one chunk of the M
        one = tuple(min(b, size) for b in (0,) + (size,) * K)  # one chunk of the first cluster alone
        units["ppo_epoch"] = Unit(
            "ppo_epoch", 1, ppo_epoch(), (state, keys, run, data), ppo_floor(bounds), (carry_pi, keys, frun, fsorted),
            stage_flops=lambda: groups[0].shape[1] * xla_flops(ppo_epoch(), state, keys, run_first, data),
            floor_flops=lambda: n / size * xla_flops(ppo_floor(one), carry_pi, keys, frun, fsorted))
    return units


# ----------------------------------------------------------------------------------------------
# Stage 3 (empo_highlevel.py): IQL chunk
# ----------------------------------------------------------------------------------------------

def floor_iql(cfg: Config, tx, rows: int, steps: int, expectile: float, every: int, offset: int = 0):
    """IQL: Q_H regression on the n-step target with V_H, V_H expectile regression on the target Q_H, two Adams;
    the target copied every ``every`` steps."""

    def step(carry, x, assign, data):
        key, i = x
        idx = jax.random.randint(key, (BATCH,), 0, rows)
        z, obs = assign[idx], data["obs"][idx]
        target = data["reward_sum"][idx] + data["discount"][idx] * mlp(carry["vh"], data["bootstrap_obs"][idx])[:, 0]
        q_bar = select(mlp(carry["target"], obs), z)
        q_loss = lambda p: jnp.mean((select(mlp(p, obs), z) - target) ** 2)

        def v_loss(p):
            u = q_bar - mlp(p, obs)[:, 0]
            return jnp.mean(jnp.abs(expectile - (u < 0)) * u * u)

        qh, qh_opt = adam(tx, jax.grad(q_loss)(carry["qh"]), carry["qh"], carry["qh_opt"])
        vh, vh_opt = adam(tx, jax.grad(v_loss)(carry["vh"]), carry["vh"], carry["vh_opt"])
        target_net = jax.lax.cond((i + 1) % every == 0, lambda: qh, lambda: carry["target"])
        return dict(qh=qh, qh_opt=qh_opt, vh=vh, vh_opt=vh_opt, target=target_net), None

    def chunk(carry, key, assign, data):
        return jax.lax.scan(lambda c, x: step(c, x, assign, data), carry, steps_xs(key, steps, offset))[0]

    return chunk


def stage3_units(cfg: Config, wanted: list) -> dict:
    if "iql" not in wanted:
        return {}
    mod = empo_highlevel
    raw = synthetic(cfg)
    n, spc = cfg.rows, cfg.steps_per_call
    args = dataclasses.replace(mod.PRESETS[cfg.size], steps_per_call=spc, batch_size=BATCH)
    discount = np.where(raw["last"], 0.0, args.gamma ** args.n_step).astype(np.float32)
    data = mod.Data(obs=jnp.asarray(raw["obs"]), reward_sum=jnp.asarray(raw["rewards"]),
                    discount=jnp.asarray(discount), bootstrap_obs=jnp.asarray(raw["next_obs"]))
    nets = mod.make_networks(cfg.hidden, cfg.layers, K, cfg.act_dim, cfg.scale)
    init, tx = mod.make_init(args, nets, cfg.obs_dim)
    keys = seed_keys(cfg, 0)
    state = jax.vmap(init)(keys)
    assign = jnp.broadcast_to(jnp.asarray(raw["cluster"]), (cfg.seeds, n))
    train_chunk = mod.make_train_chunk(args, nets, tx, n)
    stage = lambda s: vmapped(lambda st, key, a, d: train_chunk(st, key, a, d, s), 3)

    ftx = optax.adam(args.learning_rate)
    fdata = {"obs": data.obs, "reward_sum": data.reward_sum, "discount": data.discount,
             "bootstrap_obs": data.bootstrap_obs}

    def floor_init(key):
        key_q, key_v = jax.random.split(key)
        qh, vh = init_mlp(key_q, cfg, cfg.obs_dim, K), init_mlp(key_v, cfg, cfg.obs_dim, 1)
        return dict(qh=qh, qh_opt=ftx.init(qh), vh=vh, vh_opt=ftx.init(vh), target=qh)

    carry = jax.vmap(floor_init)(keys)
    floor = lambda s, offset=0: vmapped(floor_iql(cfg, ftx, n, s, args.expectile, args.target_every, offset), 3)
    return {"iql": Unit(
        "iql", spc, stage(spc), (state, keys, assign, data), floor(spc), (carry, keys, assign, fdata),
        stage_flops=lambda: spc * xla_flops(stage(1), state, keys, assign, data),
        floor_flops=lambda: periodic_flops(lambda off: xla_flops(floor(1, off), carry, keys, assign, fdata),
                                           spc, args.target_every))}


# ----------------------------------------------------------------------------------------------
# Baselines: BC, TD3+BC
# ----------------------------------------------------------------------------------------------

def floor_bc(cfg: Config, tx, rows: int, steps: int):
    """BC: Gaussian NLL on a minibatch, Adam."""

    def step(carry, key, data):
        idx = jax.random.randint(key, (BATCH,), 0, rows)
        obs, actions = data["obs"][idx], data["actions"][idx]
        nll = lambda p: -jnp.mean(log_prob(*gaussian(p, obs, cfg.action_max), actions))
        policy, opt = adam(tx, jax.grad(nll)(carry["policy"]), carry["policy"], carry["opt"])
        return dict(policy=policy, opt=opt), None

    def chunk(carry, key, data):
        return jax.lax.scan(lambda c, k: step(c, k, data), carry, jax.random.split(key, steps))[0]

    return chunk


def floor_td3_bc(cfg: Config, tx, rows: int, steps: int, args, offset: int = 0):
    """TD3+BC: the twin critics' step every step; the actor's step and both Polyak updates every policy_freq-th."""
    scale = cfg.action_max
    actor = lambda p, obs: scale * jnp.tanh(mlp(p, obs))
    twin = lambda critics, obs, actions: jax.vmap(lambda p: mlp(p, jnp.concatenate([obs, actions / scale], 1))[:, 0])(
        critics)  # [2, B]

    def step(carry, x, data):
        key, i = x
        key_batch, key_noise = jax.random.split(key)
        idx = jax.random.randint(key_batch, (BATCH,), 0, rows)
        obs, actions, next_obs = data["obs"][idx], data["actions"][idx], data["next_obs"][idx]
        noise = jnp.clip(jax.random.normal(key_noise, actions.shape) * args.policy_noise * scale,
                         -args.noise_clip * scale, args.noise_clip * scale)
        next_action = jnp.clip(actor(carry["actor_target"], next_obs) + noise, -scale, scale)
        next_q = twin(carry["critic_target"], next_obs, next_action)
        target = data["rewards"][idx] + args.gamma * data["not_done"][idx] * jnp.min(next_q, axis=0)
        critic_loss = lambda c: jnp.sum(jnp.mean((twin(c, obs, actions) - target) ** 2, axis=1))
        critic, critic_opt = adam(tx, jax.grad(critic_loss)(carry["critic"]), carry["critic"], carry["critic_opt"])
        carry = dict(carry, critic=critic, critic_opt=critic_opt)

        def actor_step(carry):
            def loss(p):
                pi = actor(p, obs)
                q_pi = mlp(jax.tree.map(lambda w: w[0], carry["critic"]), jnp.concatenate([obs, pi / scale], 1))[:, 0]
                return -args.alpha / jax.lax.stop_gradient(jnp.mean(jnp.abs(q_pi))) * jnp.mean(q_pi) + jnp.mean(
                    (pi - actions) ** 2)

            params, opt = adam(tx, jax.grad(loss)(carry["actor"]), carry["actor"], carry["actor_opt"])
            return dict(carry, actor=params, actor_opt=opt,
                        actor_target=polyak(carry["actor_target"], params, args.tau),
                        critic_target=polyak(carry["critic_target"], carry["critic"], args.tau))

        return jax.lax.cond((i + 1) % args.policy_freq == 0, actor_step, lambda c: c, carry), None

    def chunk(carry, key, data):
        return jax.lax.scan(lambda c, x: step(c, x, data), carry, steps_xs(key, steps, offset))[0]

    return chunk


def bc_units(cfg: Config, wanted: list) -> dict:
    if "bc" not in wanted:
        return {}
    raw = synthetic(cfg)
    n, spc = cfg.rows, cfg.steps_per_call
    args = dataclasses.replace(bc.PRESETS["nav"], hidden_dim=cfg.hidden, hidden_layers=cfg.layers, batch_size=BATCH,
                               steps_per_call=spc)
    policy = bc.GaussianPolicy(cfg.act_dim, cfg.scale, cfg.hidden, cfg.layers)
    init, tx = bc.make_init(args, policy, cfg.obs_dim)
    data = bc.Data(obs=jnp.asarray(raw["obs"]), actions=jnp.asarray(raw["actions"]))
    keys = seed_keys(cfg, 0)
    state = jax.vmap(init)(keys)
    train_chunk = bc.make_train_chunk(args, policy, tx, n)
    stage = lambda s: vmapped(lambda st, key, d: train_chunk(st, key, d, s), 2)

    ftx = optax.adam(args.learning_rate)
    carry = jax.vmap(lambda k: (lambda p: dict(policy=p, opt=ftx.init(p)))(
        init_mlp(k, cfg, cfg.obs_dim, 2 * cfg.act_dim)))(keys)
    fdata = {"obs": data.obs, "actions": data.actions}
    floor = lambda s: vmapped(floor_bc(cfg, ftx, n, s), 2)
    return {"bc": Unit("bc", spc, stage(spc), (state, keys, data), floor(spc), (carry, keys, fdata),
                       stage_flops=lambda: spc * xla_flops(stage(1), state, keys, data),
                       floor_flops=lambda: spc * xla_flops(floor(1), carry, keys, fdata))}


def td3_bc_units(cfg: Config, wanted: list) -> dict:
    if "td3_bc" not in wanted:
        return {}
    raw = synthetic(cfg)
    n, spc = cfg.rows, cfg.steps_per_call
    args = dataclasses.replace(td3_bc.PRESETS["nav"], hidden_dim=cfg.hidden, hidden_layers=cfg.layers,
                               batch_size=BATCH, steps_per_call=spc)
    nets = td3_bc.make_networks(cfg.hidden, cfg.layers, cfg.act_dim, cfg.scale)
    init, tx = td3_bc.make_init(args, nets, cfg.obs_dim, cfg.act_dim)
    data = td3_bc.Data(obs=jnp.asarray(raw["obs"]), actions=jnp.asarray(raw["actions"]),
                       rewards=jnp.asarray(raw["rewards"]), next_obs=jnp.asarray(raw["next_obs"]),
                       not_done=jnp.ones(n))
    keys = seed_keys(cfg, 0)
    state = jax.vmap(init)(keys)
    train_chunk = td3_bc.make_train_chunk(args, nets, tx, n, cfg.scale)
    stage = jax.jit(jax.vmap(lambda st, key, d, step0: train_chunk(st, key, d, step0, spc),
                             in_axes=(0, 0, None, None)))  # as main: first_step is shared by the seeds
    stage_probe = lambda first: vmapped(lambda st, key, d: train_chunk(st, key, d, first, 1), 2)

    ftx = optax.adam(args.learning_rate)

    def floor_init(key):
        key_actor, key_critic = jax.random.split(key)
        a = init_mlp(key_actor, cfg, cfg.obs_dim, cfg.act_dim)
        c = init_mlps(key_critic, cfg, cfg.obs_dim + cfg.act_dim, 1, 2)
        return dict(actor=a, actor_target=a, actor_opt=ftx.init(a), critic=c, critic_target=c, critic_opt=ftx.init(c))

    carry = jax.vmap(floor_init)(keys)
    fdata = {"obs": data.obs, "actions": data.actions, "rewards": data.rewards, "next_obs": data.next_obs,
             "not_done": data.not_done}
    floor = lambda s, offset=0: vmapped(floor_td3_bc(cfg, ftx, n, s, args, offset), 2)
    return {"td3_bc": Unit(
        "td3_bc", spc, stage, (state, keys, data, np.int32(0)), floor(spc), (carry, keys, fdata),
        stage_flops=lambda: periodic_flops(lambda first: xla_flops(stage_probe(first), state, keys, data),
                                           spc, args.policy_freq),
        floor_flops=lambda: periodic_flops(lambda off: xla_flops(floor(1, off), carry, keys, fdata),
                                           spc, args.policy_freq))}


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def schedules(size: str, per_call: dict, steps_per_call: int) -> list:
    """The default schedules of every stage at this size (the stage files' presets), from per-call seconds
    {unit: (stage_s, floor_s)}: a list of (name, description, stage seconds, floor seconds); None if unmeasured."""
    c, p, h = empo_cluster.PRESETS[size], empo_ppo.PRESETS[size], empo_highlevel.PRESETS[size]
    plans = [
        ("stage 1", f"{c.bias_epochs} + {c.pretrain_epochs} M epochs, {c.em_epochs} EM epochs",
         {"m_epoch": c.bias_epochs + c.pretrain_epochs, "em_epoch": c.em_epochs}),
        ("stage 2", f"{p.q_steps:,} SARSA steps, {p.v_epochs} V epochs, {p.pi_epochs} PPO epochs",
         {"sarsa": p.q_steps / steps_per_call, "v_epoch": p.v_epochs, "ppo_epoch": p.pi_epochs}),
        ("stage 3", f"{h.steps:,} IQL steps", {"iql": h.steps / steps_per_call}),
        ("BC", f"{bc.Args.steps:,} steps", {"bc": bc.Args.steps / steps_per_call}),
        ("TD3+BC", f"{td3_bc.Args.steps:,} critic steps", {"td3_bc": td3_bc.Args.steps / steps_per_call}),
    ]
    out = []
    for name, what, calls in plans:
        if all(unit in per_call for unit in calls):
            out.append((name, what, *(sum(count * per_call[u][i] for u, count in calls.items()) for i in (0, 1))))
        else:
            out.append((name, what, None, None))
    return out


def hours(seconds) -> str:
    if seconds is None:
        return "not measured"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def table(results: list, peak: float) -> str:
    lines = ["| size | unit | steps / call | stage s / call | floor s / call | stage steps/s | floor steps/s | "
             "ratio (floor/stage time) | stage GFLOP/s | floor GFLOP/s | % of peak (stage / floor) | "
             "FLOPs / call (stage / floor) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['size']} | {r['unit']} | {r['steps_per_call']:,} | {r['stage_s']:.4g} | {r['floor_s']:.4g} | "
            f"{r['stage_steps_per_s']:,.0f} | {r['floor_steps_per_s']:,.0f} | {r['ratio']:.2f} | "
            f"{r['stage_gflops_per_s']:.2f} | {r['floor_gflops_per_s']:.2f} | "
            f"{100 * r['stage_gflops_per_s'] / peak:.1f} / {100 * r['floor_gflops_per_s'] / peak:.1f} | "
            f"{r['stage_flops']:.3g} / {r['floor_flops']:.3g} ({r['stage_flops'] / r['floor_flops']:.2f}x) |")
    return "\n".join(lines)


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(), "cpu": cpu,
            "jax": jax.__version__, "optax": optax.__version__, "python": platform.python_version(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", nargs="+", choices=list(SIZES), default=list(SIZES),
                        help="network and data sizes to measure (default: both)")
    parser.add_argument("--units", nargs="+", choices=UNITS, default=list(UNITS),
                        help="training units to measure (default: all)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="transitions N of the synthetic data set")
    parser.add_argument("--seeds", type=int, default=1, help="seeds vmapped in one call (stage and floor alike)")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices to shard the seeds over, as the stages' main does (must divide --seeds; on a "
                             "CPU one host device per core is exposed when this is above 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed (stage, floor) pairs per unit")
    parser.add_argument("--warmup", type=int, default=1,
                        help="(stage, floor) pairs run after compiling and left out of the timings")
    parser.add_argument("--steps-per-call", type=int, default=1000,
                        help="gradient steps per call of the chunked units (sarsa, iql, bc, td3_bc)")
    parser.add_argument("--json", default=None, help="also write every number and the machine to this JSON file")
    args = parser.parse_args()
    for flag in ("rows", "seeds", "repeats", "steps_per_call"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.devices < 1 or args.seeds % args.devices:
        parser.error(f"--devices {args.devices} must be at least 1 and divide --seeds {args.seeds}")
    if args.devices > jax.device_count():
        parser.error(f"--devices {args.devices} asks for more devices than JAX sees ({jax.device_count()}: "
                     f"{jax.devices()})")
    return args


def main() -> None:
    args = parse_args()
    info = machine()
    print(f"JAX {info['jax']} on {info['devices']}, {info['cpu_count']} CPU cores ({info['cpu']}), "
          f"load average {info['load_average']}", flush=True)
    peaks = [peak_gflops()]
    print("peak: " + ", ".join(f"{dim}^3 {rate:.1f}" for dim, rate in peaks[0].items())
          + " GFLOP/s (best of repeated jitted f32 matmuls)", flush=True)
    results = []
    for size in args.size:
        cfg = Config(size=size, **SIZES[size], rows=args.rows, seeds=args.seeds, steps_per_call=args.steps_per_call)
        for build in (stage1_units, stage2_units, stage3_units, bc_units, td3_bc_units):
            units = build(cfg, [u for u in UNITS if u in args.units])
            for name in [u for u in UNITS if u in units]:
                r = measure(units.pop(name), cfg, args.repeats, args.warmup, args.devices)
                results.append(r)
                print(f"[{size}] {name}: stage {r['stage_s']:.4g} s/call ({r['stage_steps_per_s']:,.0f} steps/s, "
                      f"compile {r['compile_stage_s']:.1f} s), floor {r['floor_s']:.4g} s/call "
                      f"({r['floor_steps_per_s']:,.0f} steps/s, compile {r['compile_floor_s']:.1f} s), ratio "
                      f"{r['ratio']:.2f}; FLOPs/call stage {r['stage_flops']:.3g}, floor {r['floor_flops']:.3g}",
                      flush=True)
            del units
    peaks.append(peak_gflops())  # again at the end: the cores may have been busy at the start
    peak = max(max(p.values()) for p in peaks)
    print("\npeak: " + ", ".join(f"{dim}^3 {rate:.1f}" for dim, rate in peaks[1].items())
          + f" GFLOP/s at the end; the peak used is the best at start or end: {peak:.1f} GFLOP/s. N = {args.rows:,} "
          f"rows, {args.seeds} seed(s) on {args.devices} device(s), best of {args.repeats} interleaved pairs\n")
    print(table(results, peak))

    plans = {}
    for size in args.size:
        per_call = {r["unit"]: (r["stage_s"], r["floor_s"]) for r in results if r["size"] == size}
        plans[size] = schedules(size, per_call, args.steps_per_call)
        print(f"\nExtrapolated wall time of the default schedules, {size} preset (training only, {args.seeds} "
              f"seed(s) at once on {args.devices} device(s)):\n\n| stage | schedule | stage | floor |\n"
              "|---|---|---|---|")
        for name, what, stage_s, floor_s in plans[size]:
            print(f"| {name} | {what} | {hours(stage_s)} | {hours(floor_s)} |")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": info, "peak_gflops_per_s": peak,
                       "matmul_gflops_per_s": [{str(d): r for d, r in p.items()} for p in peaks],
                       "args": vars(args), "results": results,
                       "schedules": {size: [dict(zip(("stage", "schedule", "stage_s", "floor_s"), row))
                                            for row in rows] for size, rows in plans.items()}}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
