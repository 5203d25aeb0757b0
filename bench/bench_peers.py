"""TD3+BC update-step throughput: this project's ``baselines/td3_bc.py`` against CORL and JAX-CORL, on one CPU.

What is measured
    Steps per second of the TD3+BC update (one critic step on a minibatch of B = 256 rows; every
    policy_freq = 2 steps also one actor step and the Polyak update of the three target networks) by
    three implementations doing the same work: the same data (synthetic, N rows), the same networks
    (--hidden-layers hidden ReLU layers of --hidden units for the actor and both critics, default 3 as
    the project's stages use, for ALL three implementations, so the arithmetic is identical), the same batch
    size and the same observation and action sizes. Nothing else (no evaluation, logging, checkpoints).

      project   baselines/td3_bc.py itself, imported (not copied): make_networks, make_init,
                seed_shardings, make_train_chunk and the Data container, built as its main() builds them with
                --num-seeds 1 (jit(vmap(chunk)) over one seed, the data replicated), --steps-per-call update
                steps inside one lax.scan per jitted call; per call the loop does what main's does apart from
                logging and checkpoints: a jitted fold_in for the call's key, the call, and a device_get of
                the chunk's metrics.
      jax-corl  a re-derivation (own code, same structure) of github.com/nissymori/JAX-CORL algos/td3bc.py:
                flax.linen MLPs (orthogonal(sqrt 2) kernels), one DoubleCritic module returning (Q1, Q2),
                flax.training.train_state.TrainState with optax.adam for actor, critic and (as JAX-CORL does)
                for the two target networks, minibatches drawn with jax.random.randint from the whole data set
                passed to the jitted function. JAX-CORL jits update_n_times, a static Python for-loop (unrolled
                at trace time, not lax.fori_loop or scan) of n_jitted_updates = 8 updates, called once per
                Python iteration after a jax.random.split of the loop's key outside jit; this mirrors that
                (--jax-corl-updates-per-call, default 8). Inside: critic step, then, when the unrolled index
                i % policy_freq == 0, an actor step against the just-updated critic (critic parameters under
                stop_gradient) and Polyak updates of both targets.
      corl      a re-derivation (own code, same structure) of github.com/tinkoff-ai/CORL
                algorithms/offline/td3_bc.py in PyTorch: nn.Sequential Actor (max_action * tanh) and two
                separate Critic modules on cat([s, a]), each with its own torch.optim.Adam(lr=3e-4); a replay
                buffer of float32 tensors on the device (rewards and dones [N, 1]); one Python call of
                train(batch) per step: target under torch.no_grad (smoothing noise randn * 0.2 * max_action
                clamped to +-0.5 * max_action, next action clamped to +-max_action, min of the two target
                critics, r + (1 - done) gamma min), critic loss F.mse_loss(Q1, y) + F.mse_loss(Q2, y) and one
                backward, both optimisers stepped, critic_loss.item(); every policy_freq-th call (total_it
                counted from 1) lambda = alpha / |Q1(s, pi(s))|.mean().detach(), actor loss
                -lambda Q1.mean() + F.mse_loss(pi, a) (its backward also fills critic_1's gradients, as CORL's
                does, they are zeroed next step), actor_loss.item(), and the soft update of critic_1, critic_2
                and actor targets as param.data.copy_((1 - tau) target + tau source). Indices are drawn as CORL
                draws them, np.random.randint on the host, then used to index the device tensors, and the
                batch goes through [b.to(device) for b in batch] (a no-op on the CPU); --corl-indices torch
                draws them with torch.randint instead.

    Hyperparameters for all three: Adam lr 3e-4, gamma 0.99, tau 0.005, policy_freq 2, alpha 2.5, target
    smoothing noise 0.2 clipped to 0.5 (both in units of max_action = 1; the project uses its per-dimension
    a_max, computed from the data as its main() does: ~1 here), B = 256. Speed does not depend on the values.

Details followed (checked against the stored public copies of both files) and deliberate differences
    - CORL samples with np.random.randint, not torch.randint (kept, --corl-indices torch to change).
    - CORL hard-codes two hidden layers of 256; here both peers get --hidden-layers x --hidden like the project.
    - JAX-CORL's DoubleCritic puts LayerNorm before each hidden ReLU of the critics (layer_norm=True) and uses
      lr 1e-3. The default leaves LayerNorm out so all three do the same arithmetic; --jax-corl-layer-norm puts
      it back. The learning rate is 3e-4 (no effect on speed).
    - JAX-CORL normalises states with std + 1e-5, CORL and the project with std + 1e-3; the synthetic states
      are already standard normal and are not normalised by any of the three (no effect on the update step).
    - The project's critic takes [s, a / a_max] (one extra division), the peers' [s, a].

How
    Every (implementation, hidden, threads) row runs in a fresh subprocess of this file in its hidden worker
    mode (``--worker IMPL``), so thread settings take effect before jax or torch loads: ``taskset -c 0`` for
    one thread and ``taskset -c 0,1`` for two, for every implementation; for JAX also
    XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false" for one thread
    (taskset is what bounds the cores) and XLA_FLAGS="--xla_force_host_platform_device_count=1" for more;
    for torch torch.set_num_threads(n) and OMP_NUM_THREADS=n (OMP_WAIT_POLICY is left to torch unless
    --omp-wait-policy sets it: on cores shared with other work, torch's spinning OpenMP threads made its
    two-thread rows 10-20 times slower than one thread in a smoke test, and PASSIVE avoided it; the table notes
    rows that started while other work was running). Each worker makes the same synthetic data
    (--rows rows, states and next states N(0, 1), actions U(-1, 1), rewards N(0, 1), terminals all False),
    runs one untimed repetition of --steps update steps (its first call compiles), then times --repeats
    repetitions of --steps steps, each ended by jax.block_until_ready (torch is synchronous on the CPU), and
    reports steps/s per repetition. The table gives the median and the min-max; "project / peer" is the
    project's median over the peer's median at the same hidden size and thread count.

Commands
    Peer environment (torch must never become a dependency of the project; this venv lies outside it):
        python3 -m venv /work/peers-venv
        /work/peers-venv/bin/pip install numpy torch --index-url https://download.pytorch.org/whl/cpu
    (or, where that host is unreachable but a CPU wheel is on a local index: pip install numpy 'torch==X+cpu').
    Full measurement (from the repository root, with the project's venv active, on an otherwise idle machine;
    where other work shares the cores add --omp-wait-policy PASSIVE and say so with the numbers):
        python bench/bench_peers.py --json runs/bench_peers_nav.json
        python bench/bench_peers.py --obs-dim 17 --act-dim 6 --json runs/bench_peers_d4rl.json
    Smoke test:
        python bench/bench_peers.py --steps 200 --repeats 2 --rows 20000 --hidden 64 --threads 1
    The CORL rows run under --torch-python (default /work/peers-venv/bin/python where it exists); where
    torch cannot be imported there they are skipped with a one-line message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import empo_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_PYTHON = "/work/peers-venv/bin/python"
IMPLS = ("project", "jax-corl", "corl")
LABELS = {"project": "project (baselines/td3_bc.py)", "jax-corl": "JAX-CORL (re-derived)",
          "corl": "CORL, PyTorch (re-derived)"}
MARK = "BENCH_PEERS_RESULT "  # the worker's result line
SKIP = "BENCH_PEERS_SKIP "  # the worker's one-line reason for skipping its row
GAMMA, TAU, POLICY_FREQ, ALPHA, LR, POLICY_NOISE, NOISE_CLIP = 0.99, 0.005, 2, 2.5, 3e-4, 0.2, 0.5
MAX_ACTION = 1.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                        help="implementations to time (default: all three)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 256],
                        help="hidden units per layer, one row set per value (default: 64 256)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="CPU threads (and cores given by taskset), one row set per value (default: 1 2)")
    parser.add_argument("--hidden-layers", type=int, default=3,
                        help="hidden ReLU layers of every network of all three implementations (default 3, the "
                             "project's; CORL and JAX-CORL themselves use 2)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows N of the synthetic data set")
    parser.add_argument("--obs-dim", type=int, default=2, help="observation size (2: navigation task; D4RL: 17)")
    parser.add_argument("--act-dim", type=int, default=2, help="action size (2: navigation task; D4RL: 6)")
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size B of every update step")
    parser.add_argument("--steps", type=int, default=2000, help="update steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions R (the median is reported)")
    parser.add_argument("--steps-per-call", type=int, default=1000,
                        help="project: update steps per jitted call (one lax.scan); capped at --steps")
    parser.add_argument("--jax-corl-updates-per-call", type=int, default=8,
                        help="JAX-CORL: updates unrolled in its one jitted call (its n_jitted_updates, default 8)")
    parser.add_argument("--jax-corl-layer-norm", action="store_true",
                        help="JAX-CORL: LayerNorm before each hidden ReLU of the critics, as JAX-CORL has it "
                             "(default off: the same arithmetic as the other two)")
    parser.add_argument("--corl-indices", choices=("numpy", "torch"), default="numpy",
                        help="CORL: draw minibatch indices with np.random.randint (CORL's code) or torch.randint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every implementation")
    parser.add_argument("--jax-python", default=sys.executable,
                        help="interpreter of the project and JAX-CORL rows (needs jax, flax, optax; default: this one)")
    parser.add_argument("--torch-python", default=PEERS_PYTHON if os.path.exists(PEERS_PYTHON) else sys.executable,
                        help=f"interpreter of the CORL rows (needs torch and numpy; default {PEERS_PYTHON} where "
                             "it exists, else this one)")
    parser.add_argument("--omp-wait-policy", choices=("default", "PASSIVE", "ACTIVE"), default="default",
                        help="CORL: OMP_WAIT_POLICY of the torch workers ('default' leaves it unset, torch's "
                             "behaviour; PASSIVE stops idle OpenMP threads spinning, which keeps multi-thread "
                             "rows from collapsing on cores that other work shares)")
    parser.add_argument("--no-taskset", action="store_true",
                        help="do not pin the workers to cores 0..threads-1 with taskset (thread settings only)")
    parser.add_argument("--row-timeout", type=float, default=3600.0, help="seconds after which a row is abandoned")
    parser.add_argument("--json", default=None, help="write the configuration and the raw timings to this file")
    parser.add_argument("--worker", choices=IMPLS, default=None,
                        help="(internal) time one implementation at the first --hidden and --threads value in "
                             "this process and print one result line; the benchmark runs itself this way")
    args = parser.parse_args(argv)
    for name in ("rows", "obs_dim", "act_dim", "batch_size", "steps", "repeats", "steps_per_call",
                 "jax_corl_updates_per_call", "hidden_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.hidden) < 1 or min(args.threads) < 1:
        parser.error("--hidden and --threads values must be at least 1")
    return args


# ----------------------------------------------------------------------------------------------
# Worker side: one implementation, one hidden size, one thread count
# ----------------------------------------------------------------------------------------------

def make_data(args):
    """The synthetic data set, identical in every worker: a dict of float32 numpy arrays."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    n, obs_dim, act_dim = args.rows, args.obs_dim, args.act_dim
    return {"obs": rng.standard_normal((n, obs_dim), np.float32),
            "actions": rng.uniform(-1.0, 1.0, (n, act_dim)).astype(np.float32),
            "rewards": rng.standard_normal(n, np.float32),
            "next_obs": rng.standard_normal((n, obs_dim), np.float32),
            "terminals": np.zeros(n, np.float32)}


def call_sizes(steps: int, per_call: int) -> list:
    """Steps of each call of a repetition: full calls of per_call, then the remainder (as td3_bc.main splits)."""
    return [min(per_call, steps - i) for i in range(0, steps, per_call)]


def time_repetitions(run_steps, args) -> tuple:
    """One untimed warm-up repetition (compilation), then args.repeats timed ones: (warm-up s, [s, ...])."""
    t0 = time.perf_counter()
    run_steps()
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run_steps()
        times.append(time.perf_counter() - t0)
    return warmup, times


def worker_project(args, hidden: int) -> tuple:
    """baselines/td3_bc.py's own chunk function, built as its main() builds it with --num-seeds 1."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "baselines"))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import td3_bc

    raw = make_data(args)
    n = args.rows
    targs = td3_bc.Args(num_seeds=1, seed=args.seed, hidden_dim=hidden, hidden_layers=args.hidden_layers,
                        batch_size=args.batch_size, steps=args.steps, steps_per_call=args.steps_per_call,
                        gamma=GAMMA, tau=TAU, policy_freq=POLICY_FREQ, alpha=ALPHA, learning_rate=LR,
                        policy_noise=POLICY_NOISE, noise_clip=NOISE_CLIP, eval_episodes=0)
    action_scale = tuple(float(x) for x in np.maximum(np.abs(raw["actions"]).max(0), 1e-3))  # as main: ~1 here
    data = td3_bc.Data(obs=jnp.asarray(raw["obs"]), actions=jnp.asarray(raw["actions"]),
                       rewards=jnp.asarray(raw["rewards"]), next_obs=jnp.asarray(raw["next_obs"]),
                       not_done=jnp.asarray(1.0 - raw["terminals"]))
    nets = td3_bc.make_networks(hidden, args.hidden_layers, args.act_dim, action_scale)
    init, tx = td3_bc.make_init(targs, nets, args.obs_dim, args.act_dim)
    seed_sharding, replicated = empo_io.seed_shardings(1)
    data = jax.device_put(data, replicated)
    seeds = np.arange(args.seed, args.seed + 1)
    split = jax.jit(jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3), out_axes=1))
    key_init, key_train, _ = (jax.device_put(x, seed_sharding) for x in split(jnp.asarray(seeds)))
    state = jax.jit(jax.vmap(init), out_shardings=seed_sharding)(key_init)
    train_chunk = td3_bc.make_train_chunk(targs, nets, tx, n, action_scale)
    sizes = call_sizes(args.steps, args.steps_per_call)
    calls_jit = {s: jax.jit(jax.vmap(lambda st, key, d, step0, s=s: train_chunk(st, key, d, step0, s),
                                     in_axes=(0, 0, None, None)))
                 for s in set(sizes)}
    fold_in = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
    box = {"state": state, "unit": 0, "done": 0}

    def run_steps():
        state = box["state"]
        for size in sizes:
            key = jax.device_put(fold_in(key_train, box["unit"]), seed_sharding)
            state, metrics = calls_jit[size](state, key, data, np.int32(box["done"]))
            jax.device_get(metrics)  # main reads the chunk's metrics after every call
            box["unit"] += 1
            box["done"] += size
        box["state"] = jax.block_until_ready(state)

    return time_repetitions(run_steps, args), {"jax": jax.__version__, "backend": jax.default_backend(),
                                                 "calls_per_repetition": len(sizes)}


def worker_jax_corl(args, hidden: int) -> tuple:
    """JAX-CORL's TD3+BC update (algos/td3bc.py), re-derived: flax.linen, TrainState, n updates per jitted call."""
    from functools import partial
    from typing import NamedTuple

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training.train_state import TrainState

    raw = make_data(args)
    layers = (hidden,) * args.hidden_layers
    kernel_init = nn.initializers.orthogonal(jnp.sqrt(2.0))

    class Net(nn.Module):
        """Dense layers of the given sizes; LayerNorm (optional) and ReLU after every one but the last."""

        sizes: tuple
        layer_norm: bool = False

        @nn.compact
        def __call__(self, x):
            for i, size in enumerate(self.sizes):
                x = nn.Dense(size, kernel_init=kernel_init)(x)
                if i + 1 < len(self.sizes):
                    x = nn.relu(nn.LayerNorm()(x) if self.layer_norm else x)
            return x

    class TwinQ(nn.Module):
        """Both critics in one module: (Q1, Q2), each [B, 1], on concat(s, a)."""

        sizes: tuple
        layer_norm: bool

        @nn.compact
        def __call__(self, obs, act):
            sa = jnp.concatenate([obs, act], axis=-1)
            return Net((*self.sizes, 1), self.layer_norm)(sa), Net((*self.sizes, 1), self.layer_norm)(sa)

    class Policy(nn.Module):
        sizes: tuple
        act_dim: int
        max_action: float = MAX_ACTION

        @nn.compact
        def __call__(self, obs):
            return self.max_action * jnp.tanh(Net((*self.sizes, self.act_dim))(obs))

    class Batch(NamedTuple):
        observations: jax.Array
        actions: jax.Array
        rewards: jax.Array
        next_observations: jax.Array
        dones: jax.Array

    class Learner(NamedTuple):
        actor: TrainState
        critic: TrainState
        target_actor: TrainState
        target_critic: TrainState

    data = Batch(*(jnp.asarray(raw[k]) for k in ("obs", "actions", "rewards", "next_obs", "terminals")))
    critic_def, actor_def = TwinQ(layers, args.jax_corl_layer_norm), Policy(layers, args.act_dim)
    key = jax.random.PRNGKey(args.seed)
    key, key_init = jax.random.split(key)
    _, key_critic, key_actor = jax.random.split(key_init, 3)
    obs0, act0 = data.observations[0], data.actions[0]

    def new_state(module, key_params, *example):  # targets get their own (unused) Adam state, as in JAX-CORL
        return TrainState.create(apply_fn=module.apply, params=module.init(key_params, *example), tx=optax.adam(LR))

    learner = Learner(actor=new_state(actor_def, key_actor, obs0), critic=new_state(critic_def, key_critic, obs0, act0),
                      target_actor=new_state(actor_def, key_actor, obs0),
                      target_critic=new_state(critic_def, key_critic, obs0, act0))

    def soft(online: TrainState, target: TrainState) -> TrainState:
        return target.replace(params=jax.tree.map(lambda p, t: TAU * p + (1.0 - TAU) * t, online.params,
                                                  target.params))

    def gradient_step(state: TrainState, loss_fn):
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    def critic_step(learner: Learner, batch: Batch, key):
        def loss_fn(params):
            q1, q2 = learner.critic.apply_fn(params, batch.observations, batch.actions)
            next_act = learner.target_actor.apply_fn(learner.target_actor.params, batch.next_observations)
            noise = POLICY_NOISE * MAX_ACTION * jax.random.normal(key, batch.actions.shape)
            next_act = jnp.clip(next_act + jnp.clip(noise, -NOISE_CLIP, NOISE_CLIP), -MAX_ACTION, MAX_ACTION)
            nq1, nq2 = learner.target_critic.apply_fn(learner.target_critic.params, batch.next_observations,
                                                      next_act)
            y = batch.rewards[:, None] + GAMMA * jnp.minimum(nq1, nq2) * (1.0 - batch.dones[:, None])
            y = jax.lax.stop_gradient(y)
            return (jnp.square(q1 - y) + jnp.square(q2 - y)).mean()

        critic, loss = gradient_step(learner.critic, loss_fn)
        return learner._replace(critic=critic), loss

    def actor_step(learner: Learner, batch: Batch):
        def loss_fn(params):
            pi = learner.actor.apply_fn(params, batch.observations)
            q1, _ = learner.critic.apply_fn(jax.lax.stop_gradient(learner.critic.params), batch.observations, pi)
            lam = ALPHA / jax.lax.stop_gradient(jnp.abs(q1).mean())
            return -lam * q1.mean() + jnp.square(pi - batch.actions).mean()

        actor, loss = gradient_step(learner.actor, loss_fn)
        return learner._replace(actor=actor), loss

    @partial(jax.jit, static_argnums=(3,))
    def update_n(learner: Learner, data: Batch, key, n: int):
        actor_loss = jnp.float32(0.0)
        for i in range(n):  # a static loop: unrolled at trace time, as JAX-CORL's update_n_times
            key, key_batch = jax.random.split(key)
            idx = jax.random.randint(key_batch, (args.batch_size,), 0, data.observations.shape[0])
            batch = jax.tree.map(lambda x, idx=idx: x[idx], data)
            key, key_critic, _ = jax.random.split(key, 3)
            learner, critic_loss = critic_step(learner, batch, key_critic)
            if i % POLICY_FREQ == 0:
                learner, actor_loss = actor_step(learner, batch)
                learner = learner._replace(target_critic=soft(learner.critic, learner.target_critic),
                                           target_actor=soft(learner.actor, learner.target_actor))
        return learner, {"critic_loss": critic_loss, "actor_loss": actor_loss}

    sizes = call_sizes(args.steps, args.jax_corl_updates_per_call)
    box = {"learner": learner, "key": key}

    def run_steps():
        learner, key = box["learner"], box["key"]
        for size in sizes:
            key, key_update = jax.random.split(key)  # outside jit, once per call, as JAX-CORL's loop
            learner, _ = update_n(learner, data, key_update, size)
        box["learner"], box["key"] = jax.block_until_ready(learner), key

    return time_repetitions(run_steps, args), {"jax": jax.__version__, "backend": jax.default_backend(),
                                                 "calls_per_repetition": len(sizes),
                                                 "layer_norm": args.jax_corl_layer_norm}


def worker_corl(args, hidden: int, threads: int) -> tuple:
    """CORL's TD3+BC update (algorithms/offline/td3_bc.py), re-derived in PyTorch: one train(batch) per step."""
    import copy

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(threads)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = "cpu"
    raw = make_data(args)

    def layers(inp: int, out: int) -> list:
        mods, width = [], inp
        for _ in range(args.hidden_layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        return mods + [nn.Linear(width, out)]

    class Actor(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*layers(args.obs_dim, args.act_dim), nn.Tanh())

        def forward(self, s):
            return MAX_ACTION * self.net(s)

    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(*layers(args.obs_dim + args.act_dim, 1))

        def forward(self, s, a):
            return self.net(torch.cat([s, a], 1))

    def polyak_(target: nn.Module, online: nn.Module):
        for t, p in zip(target.parameters(), online.parameters()):
            t.data.copy_(t.data * (1.0 - TAU) + p.data * TAU)

    class Buffer:
        """The data set as float32 tensors on the device; rewards and dones [N, 1]."""

        def __init__(self):
            as_tensor = lambda x: torch.tensor(x, dtype=torch.float32, device=device)
            self.tensors = [as_tensor(raw["obs"]), as_tensor(raw["actions"]), as_tensor(raw["rewards"][:, None]),
                            as_tensor(raw["next_obs"]), as_tensor(raw["terminals"][:, None])]
            self.size = args.rows

        def sample(self, batch_size: int) -> list:
            if args.corl_indices == "numpy":
                idx = np.random.randint(0, self.size, size=batch_size)
            else:
                idx = torch.randint(0, self.size, (batch_size,), device=device)
            return [x[idx] for x in self.tensors]

    class Trainer:
        def __init__(self):
            self.actor, self.critic_1, self.critic_2 = Actor().to(device), Critic().to(device), Critic().to(device)
            self.actor_target = copy.deepcopy(self.actor)
            self.critic_1_target, self.critic_2_target = copy.deepcopy(self.critic_1), copy.deepcopy(self.critic_2)
            self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=LR)
            self.critic_1_opt = torch.optim.Adam(self.critic_1.parameters(), lr=LR)
            self.critic_2_opt = torch.optim.Adam(self.critic_2.parameters(), lr=LR)
            self.total_it = 0

        def train(self, batch: list) -> dict:
            self.total_it += 1
            log = {}
            s, a, r, s2, done = batch
            with torch.no_grad():
                noise = (torch.randn_like(a) * POLICY_NOISE * MAX_ACTION).clamp(-NOISE_CLIP * MAX_ACTION,
                                                                                NOISE_CLIP * MAX_ACTION)
                a2 = (self.actor_target(s2) + noise).clamp(-MAX_ACTION, MAX_ACTION)
                q_next = torch.min(self.critic_1_target(s2, a2), self.critic_2_target(s2, a2))
                y = r + (1 - done) * GAMMA * q_next
            critic_loss = F.mse_loss(self.critic_1(s, a), y) + F.mse_loss(self.critic_2(s, a), y)
            log["critic_loss"] = critic_loss.item()
            self.critic_1_opt.zero_grad()
            self.critic_2_opt.zero_grad()
            critic_loss.backward()
            self.critic_1_opt.step()
            self.critic_2_opt.step()
            if self.total_it % POLICY_FREQ == 0:
                pi = self.actor(s)
                q = self.critic_1(s, pi)
                lam = ALPHA / q.abs().mean().detach()
                actor_loss = -lam * q.mean() + F.mse_loss(pi, a)
                log["actor_loss"] = actor_loss.item()
                self.actor_opt.zero_grad()
                actor_loss.backward()
                self.actor_opt.step()
                polyak_(self.critic_1_target, self.critic_1)
                polyak_(self.critic_2_target, self.critic_2)
                polyak_(self.actor_target, self.actor)
            return log

    buffer, trainer = Buffer(), Trainer()

    def run_steps():
        for _ in range(args.steps):
            batch = [b.to(device) for b in buffer.sample(args.batch_size)]
            trainer.train(batch)

    return time_repetitions(run_steps, args), {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                                 "indices": args.corl_indices}


def worker(args) -> int:
    impl, hidden, threads = args.worker, args.hidden[0], args.threads[0]
    try:
        if impl == "corl":
            try:
                import torch  # noqa: F401
            except ImportError as err:
                print(f"{SKIP}CORL row skipped: torch cannot be imported by {sys.executable} ({err})", flush=True)
                return 3
            (warmup, times), info = worker_corl(args, hidden, threads)
        elif impl == "jax-corl":
            (warmup, times), info = worker_jax_corl(args, hidden)
        else:
            (warmup, times), info = worker_project(args, hidden)
    except ImportError as err:
        print(f"{SKIP}{impl} row skipped: {sys.executable} cannot import a module it needs ({err})", flush=True)
        return 3
    result = {"impl": impl, "hidden": hidden, "threads": threads, "steps": args.steps, "warmup_s": warmup,
              "times_s": times, "steps_per_s": [args.steps / t for t in times], "python": sys.executable,
              "xla_flags": os.environ.get("XLA_FLAGS"), **info}
    print(MARK + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# Parent side: one fresh subprocess per row, then the table
# ----------------------------------------------------------------------------------------------

def row_command(args, impl: str, hidden: int, threads: int) -> tuple:
    """(argv, env) of the worker for one row: taskset, interpreter, thread settings."""
    python = args.torch_python if impl == "corl" else args.jax_python
    argv = [python, os.path.abspath(__file__), "--worker", impl, "--hidden", str(hidden), "--threads", str(threads),
            "--hidden-layers", str(args.hidden_layers), "--rows", str(args.rows), "--obs-dim", str(args.obs_dim),
            "--act-dim", str(args.act_dim), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            "--repeats", str(args.repeats), "--steps-per-call", str(args.steps_per_call),
            "--jax-corl-updates-per-call", str(args.jax_corl_updates_per_call), "--corl-indices", args.corl_indices,
            "--seed", str(args.seed)]
    if args.jax_corl_layer_norm:
        argv.append("--jax-corl-layer-norm")
    if not args.no_taskset:
        argv = ["taskset", "-c", ",".join(str(c) for c in range(threads))] + argv
    env = dict(os.environ)
    if impl == "corl":
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if args.omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    elif threads == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false"
    else:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return argv, env


def run_row(args, impl: str, hidden: int, threads: int) -> dict:
    argv, env = row_command(args, impl, hidden, threads)
    row = {"impl": impl, "hidden": hidden, "threads": threads, "command": argv,
           "load_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if not os.path.exists(argv[argv.index("--worker") - 2]):
        return dict(row, skipped=f"{impl} row skipped: no interpreter at {argv[argv.index('--worker') - 2]}")
    try:
        proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return dict(row, skipped=f"{impl} row abandoned after {args.row_timeout:.0f} s (--row-timeout)")
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return dict(row, **json.loads(line[len(MARK):]))
        if line.startswith(SKIP):
            return dict(row, skipped=line[len(SKIP):])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return dict(row, skipped=f"{impl} row failed (exit {proc.returncode}): " + " | ".join(tail))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(args, rows: list) -> None:
    medians = {(r["impl"], r["hidden"], r["threads"]): statistics.median(r["steps_per_s"])
               for r in rows if "steps_per_s" in r}
    print(f"\nTD3+BC update steps/s on {cpu_name()} ({os.cpu_count()} cores visible): N={args.rows}, "
          f"obs {args.obs_dim}, act {args.act_dim}, {args.hidden_layers} hidden layers for every network, "
          f"B={args.batch_size}, {args.steps} steps x {args.repeats} repetitions (median, min-max); project "
          f"{min(args.steps_per_call, args.steps)} steps per call, JAX-CORL "
          f"{min(args.jax_corl_updates_per_call, args.steps)}, CORL 1"
          + (", JAX-CORL critics with LayerNorm" if args.jax_corl_layer_norm else "") + "\n")
    print("| implementation | hidden | threads | steps/s (median) | min-max | project / peer |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        label = LABELS[r["impl"]]
        if "steps_per_s" not in r:
            print(f"| {label} | {r['hidden']} | {r['threads']} | skipped | | |")
            continue
        sps, med = r["steps_per_s"], medians[(r["impl"], r["hidden"], r["threads"])]
        project = medians.get(("project", r["hidden"], r["threads"]))
        ratio = "-" if r["impl"] == "project" or project is None else f"{project / med:.2f}x"
        print(f"| {label} | {r['hidden']} | {r['threads']} | {med:,.0f} | {min(sps):,.0f}-{max(sps):,.0f} | "
              f"{ratio} |")
    for r in rows:
        if "skipped" in r:
            print(f"note: {r['skipped']}")
    busy = [r for r in rows if (r.get("load_before") or 0.0) > 0.5 * (os.cpu_count() or 1)]
    if busy:
        print(f"note: other work was running ({len(busy)} of {len(rows)} rows started at a 1-minute load average "
              f"above half the {os.cpu_count()} cores, up to {max(r['load_before'] for r in busy):.1f}): timings "
              "are noisy, and torch's multi-thread rows can collapse (OpenMP spin-waits; see --omp-wait-policy)")


def main() -> int:
    args = parse_args()
    if args.worker:
        return worker(args)
    if not args.no_taskset and shutil.which("taskset") is None:
        print("taskset not found: running without core pinning (thread settings only)", flush=True)
        args.no_taskset = True
    if not args.no_taskset and max(args.threads) > (os.cpu_count() or 1):
        print(f"warning: --threads {max(args.threads)} exceeds the {os.cpu_count()} visible cores", flush=True)
    rows = []
    for hidden in args.hidden:
        for threads in args.threads:
            for impl in args.impls:
                t0 = time.perf_counter()
                row = run_row(args, impl, hidden, threads)
                rows.append(row)
                what = (f"median {statistics.median(row['steps_per_s']):,.0f} steps/s" if "steps_per_s" in row
                        else row["skipped"])
                print(f"[bench_peers] {impl} hidden={hidden} threads={threads}: {what} "
                      f"({time.perf_counter() - t0:.0f} s with start-up)", flush=True)
    print_table(args, rows)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("worker", "json")}
        with open(args.json, "w") as f:
            json.dump({"config": config, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
        print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
