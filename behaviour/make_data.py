"""Record D4RL-style medium and expert data sets from a SAC run (behaviour/sac.py), in D4RL v2's HDF5 layout.

D4RL recorded its Gym-MuJoCo medium and expert sets by running an rlkit SAC policy and storing its *sampled*
actions, ``distr.sample()``, with their log-probabilities (``scripts/generation/mujoco/collect_data.py`` in D4RL's
repository). This script does the same with the two policies of one ``sac.npz``: the expert (the final actor) and
the medium (snapshot ``medium/index``, about a third of the expert's return). The discussion is docs/sac.md
("Recording the data sets").

Input   ``--sac``: a sac.npz (schema empo/sac/v1, docs/schemas.md) trained in ``--env-id``, or the two policies alone
        as ``--export`` writes them (schema empo/sac-policies/v1; behaviour/policies/{task}.npz are committed).
Output  ``--export`` (optional): the medium and the expert actor alone, their returns over ``--export-episodes``
        episodes of the deterministic policy and the command that trained them, a file of about 0.6 MB.
        In ``--out`` (unless ``--no-record``): ``{task}_medium-v2.hdf5``, ``{task}_expert-v2.hdf5`` and
        ``{task}_medium_expert-v2.hdf5`` (the two stitched as D4RL's stitch_dataset.py did), laid out and
        written as scripts/make_d4rl_files.py writes them (its docstring lists the keys): observations, actions,
        rewards, next_observations, terminals, timeouts, infos/{qpos,qvel,action_log_probs}, and metadata/* with
        the policy and the episodes' returns.
        {task} is D4RL's name of the environment (hopper for Hopper-v4) or the id's name in lower case.

Interpretations
    1. a = tanh(u), u = mu(s) + sigma(s) e, e ~ N(0, I) (behaviour/sac.py's Actor and sample_action); the file holds
       bias + scale a, the action the environment receives (a itself in D4RL's tasks, scale 1, bias 0), and
       infos/action_log_probs holds log pi(a|s), the tanh-Gaussian's log-density of a (sac.tanh_gaussian_log_prob).
    2. Episode k of a file is reset with a seed drawn from (--seed, policy, k) and its noise e from the same
       sequence, so its rows do not depend on which of the --num-envs copies ran it; the file is episodes 0, 1,
       ... concatenated and cut at --rows rows, mid-episode as D4RL cut its files. The same flags give
       byte-identical files; another --num-envs the same episodes up to the float rounding of the batched policy.
    3. terminals: the environment terminated; timeouts: step --episode-steps of an episode that did not
       (make_d4rl_files.py's convention: no row has both).
    4. The returns printed and stored (metadata/return_mean, return_std, episodes) are those of the complete
       episodes of each file, sampled actions and all: lower than the deterministic policy's evaluated returns.
    5. --export evaluates each policy's deterministic action bias + scale tanh(mu(s)) (behaviour/sac.py's
       evaluation, rlkit's MakeDeterministic) over --export-episodes episodes reset from --seed: a return measured
       again, not the training run's 10-episode snapshot return that chose the medium policy.

Example
    python behaviour/make_data.py --sac runs/behaviour/hopper/sac.npz --env-id Hopper-v4 --out data/d4rl_sac \
        --export behaviour/policies/hopper.npz
    python behaviour/make_data.py --sac behaviour/policies/hopper.npz --env-id Hopper-v4 --out data/d4rl_sac
    D4RL_DIR=data/d4rl_sac bash scripts/reproduce_table2.sh
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for folder in (ROOT, os.path.join(ROOT, "scripts")):  # empo_io, gym_eval; make_d4rl_files (the HDF5 writer)
    if folder not in sys.path:
        sys.path.append(folder)

import empo_io  # noqa: F401  first: its start-up guard makes Ctrl-C while the libraries load one sentence

# isort: split

import dataclasses
import json
import time
from dataclasses import dataclass

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import tyro

import gym_eval
from behaviour import sac

# The plumbing, by purpose: the sac.npz and its checks, the command line.
# isort: off
from empo_io import InputError, check_arch, check_arrays, check_param_shapes, load_npz, param_shapes, unflatten_params
from empo_io import check_writable, flatten_params, save_npz
from empo_io import check_flags, run
# isort: on

import make_d4rl_files  # scripts/: D4RL's keys, the HDF5 writer, the medium_expert stitching

POLICIES = ("medium", "expert")
SAC_SCHEMA, POLICIES_SCHEMA = "empo/sac/v1", "empo/sac-policies/v1"
ARCH_SPEC = {  # what rebuilds the actor, in both schemas (docs/schemas.md)
    "arch/obs_dim": ("int64", ()), "arch/act_dim": ("int64", ()), "arch/hidden_dim": ("int64", ()),
    "arch/hidden_layers": ("int64", ()), "arch/action_scale": ("float32", ("act_dim",)),
    "arch/action_bias": ("float32", ("act_dim",)),
}
SPECS = {  # what this script reads of each schema, besides the actors and env/*
    SAC_SCHEMA: {**ARCH_SPEC, "medium/index": ("int64", ()), "snapshots/step": ("int64", ("T",))},
    POLICIES_SCHEMA: {**ARCH_SPEC, "medium/step": ("int64", ()), "expert/step": ("int64", ())},
}


@dataclass
class Args:
    """Record the medium and the expert policy of a sac.npz into D4RL v2-layout HDF5 files (sampled actions)."""

    sac: str = "runs/behaviour/hopper/sac.npz"
    """the SAC run (schema empo/sac/v1) whose expert (final actor) and medium (snapshot medium/index) are recorded,
    or the two policies as --export writes them (empo/sac-policies/v1, e.g. behaviour/policies/hopper.npz)"""
    env_id: str = "Hopper-v4"
    """the Gymnasium environment the run was trained in (checked against the file's env/id); the data's task"""
    out: str = "data/d4rl_sac"
    """folder the files are written to (files of the same names are replaced)"""
    seed: int = 0
    """random seed of the reset seeds and the action noise"""
    rows: int = 1_000_000
    """rows of the medium file and of the expert file (D4RL: 1,000,000); recording stops there, mid-episode"""
    episode_steps: int = 1000
    """step limit of an episode (D4RL: 1000); its last step is a timeout"""
    maxlen: int = 0
    """rows of the medium_expert file at most (D4RL: 2,000,000); 0: 2 x --rows"""
    num_envs: int = 8
    """copies of the environment stepped together (one batched policy call per step of all copies)"""
    export: str = ""
    """also write the two policies alone to this .npz (schema empo/sac-policies/v1, about 0.6 MB): the actors, their
    returns over --export-episodes episodes and the command that trained them; --sac takes it in place of the run"""
    export_episodes: int = 20
    """episodes of each policy's deterministic action that --export evaluates and stores"""
    record: bool = True
    """record the data sets (--no-record: only --export's file)"""


def load_policies(args: Args) -> tuple[dict, str, dict, dict]:
    """(the file's arrays, its sha256, {'medium': actor params, 'expert': actor params}, {'medium': its training
    step, 'expert': ...}) from a SAC run or an exported policies file, checked against --env-id."""
    arrays, sha = load_npz(args.sac, (SAC_SCHEMA, POLICIES_SCHEMA), digest=True)
    schema = str(arrays["schema"])
    env_id = str(arrays.get("env/id", ""))
    if env_id != args.env_id:
        raise InputError(f"{args.sac} was trained in {env_id or 'no environment'}, not --env-id {args.env_id}")
    sizes = check_arrays(args.sac, arrays, SPECS[schema])
    check_arch(args.sac, arrays)
    obs_dim, act_dim = int(arrays["arch/obs_dim"]), int(arrays["arch/act_dim"])
    if sizes["act_dim"] != act_dim:
        raise InputError(f"{args.sac}: arch/action_scale has {sizes['act_dim']} entries for arch/act_dim {act_dim}")
    actor = sac.make_networks(int(arrays["arch/hidden_dim"]), int(arrays["arch/hidden_layers"]), act_dim)["actor"]
    check_param_shapes(args.sac, arrays, "actor/params", param_shapes(actor, obs_dim), 0)
    expert = {"params": unflatten_params("actor/params", arrays)}
    if schema == POLICIES_SCHEMA:
        check_param_shapes(args.sac, arrays, "medium/actor/params", param_shapes(actor, obs_dim), 0)
        return arrays, sha, {"medium": {"params": unflatten_params("medium/actor/params", arrays)},
                             "expert": expert}, {name: int(arrays[f"{name}/step"]) for name in POLICIES}
    check_param_shapes(args.sac, arrays, "snapshots/actor/params", param_shapes(actor, obs_dim), 1)
    medium = int(arrays["medium/index"])
    if not 0 <= medium < sizes["T"]:
        raise InputError(f"{args.sac}: medium/index {medium} is not one of its {sizes['T']} snapshots")
    snapshot = {"actor/params/" + k[len("snapshots/actor/params/"):]: v[medium] for k, v in arrays.items()
                if k.startswith("snapshots/actor/params/")}
    steps = {"medium": int(arrays["snapshots/step"][medium]), "expert": int(arrays["snapshots/step"][-1])}
    return arrays, sha, {"medium": {"params": unflatten_params("actor/params", snapshot)}, "expert": expert}, steps


def train_command(arrays: dict) -> tuple[str, str]:
    """(the command that trained the policies, that run's flags as JSON): from a SAC run's args, the flags that
    differ from its preset's defaults; an exported file's are copied."""
    if str(arrays["schema"]) == POLICIES_SCHEMA:
        return str(arrays["train/command"]), str(arrays["train/args"])
    flags = json.loads(str(arrays["args"]))
    defaults = dataclasses.asdict(sac.PRESETS.get(flags.get("preset"), sac.Args()))
    shown = [f"--{k.replace('_', '-')} {v}" for k, v in flags.items()
             if k in ("env_id", "seed", "out") or (k != "resume" and defaults.get(k, v) != v)]
    return "python behaviour/sac.py " + " ".join(shown), json.dumps(flags, sort_keys=True)


def export_policies(args: Args, arrays: dict, sha: str, policies: dict, steps: dict) -> dict:
    """The two actors, their returns over --export-episodes deterministic episodes (interpretation 5), arch/*,
    env/* and the training command, written to --export (empo/sac-policies/v1)."""
    actor = sac.make_networks(int(arrays["arch/hidden_dim"]), int(arrays["arch/hidden_layers"]),
                              int(arrays["arch/act_dim"]))["actor"]
    scale, bias = jnp.asarray(arrays["arch/action_scale"]), jnp.asarray(arrays["arch/action_bias"])
    act = sac.make_evaluate_act(actor, scale, bias)
    env = dict(gym_eval.gym_env_info(args.env_id), env_spec=str(arrays["env/spec"]))
    command, flags = train_command(arrays)
    out = {**{k: v for k, v in arrays.items() if k.startswith(("arch/", "env/"))},
           **flatten_params("actor/params", policies["expert"]["params"]),
           **flatten_params("medium/actor/params", policies["medium"]["params"]),
           "train/command": np.array(command), "train/args": np.array(flags)}
    for name in POLICIES:
        episodes = sac.evaluate(env, act, policies[name], args.export_episodes, args.seed)
        out[f"{name}/step"] = np.int64(steps[name])
        out[f"{name}/return"], out[f"{name}/length"] = episodes["return"], episodes["length"]
        if "normalized_score" in episodes:
            out[f"{name}/normalized_score"] = episodes["normalized_score"]
        print(f"{name} (step {steps[name]}), {args.export_episodes} episodes of the deterministic policy: "
              f"{gym_eval.describe_episodes(episodes)}", flush=True)
    save_npz(args.export, out, POLICIES_SCHEMA, vars(args), {"sac": sha})
    print(f"wrote {args.export}")
    return out


def make_sample(arrays: dict):
    """sample(params, obs [N, obs_dim], e [N, act_dim]) -> (bias + scale a [N, act_dim], log pi(a|s) [N]), jitted."""
    actor = sac.make_networks(int(arrays["arch/hidden_dim"]), int(arrays["arch/hidden_layers"]),
                              int(arrays["arch/act_dim"]))["actor"]
    scale, bias = jnp.asarray(arrays["arch/action_scale"]), jnp.asarray(arrays["arch/action_bias"])

    def sample(params, obs, noise):
        action, log_prob = sac.sample_action(*actor.apply(params, obs), noise)  # a = tanh(mu + sigma e), log pi
        return bias + scale * action, log_prob

    return jax.jit(sample)


class Episode:
    """Episode k of one policy: its reset seed, its noise and, as it runs, its rows."""

    def __init__(self, env, k: int, seed: int, policy: int, episode_steps: int, act_dim: int):
        seeds = np.random.SeedSequence([seed, policy, k])
        self.noise = np.random.default_rng(seeds).standard_normal((episode_steps, act_dim)).astype(np.float32)
        self.obs = np.asarray(env.reset(seed=int(seeds.generate_state(1)[0]))[0], np.float32)
        self.k, self.rows, self.done = k, {key: [] for key in make_d4rl_files.KEYS}, False

    def step(self, env, action, log_prob) -> None:
        sim, rows = env.unwrapped.data, self.rows
        rows["infos/qpos"].append(sim.qpos.copy())
        rows["infos/qvel"].append(sim.qvel.copy())
        low, high = env.action_space.low, env.action_space.high
        next_obs, reward, terminated, truncated, _ = env.step(np.clip(action, low, high).astype(low.dtype))
        next_obs = np.asarray(next_obs, np.float32)
        for key, value in (("observations", self.obs), ("actions", action), ("rewards", reward),
                           ("next_observations", next_obs), ("terminals", terminated),
                           ("timeouts", truncated and not terminated), ("infos/action_log_probs", log_prob)):
            rows[key].append(value)
        self.obs, self.done = next_obs, bool(terminated or truncated)


def record(args: Args, spec, sample, params, policy: int, act_dim: int) -> dict:
    """Episodes 0, 1, ... of one policy on --num-envs copies, concatenated and cut at --rows: D4RL's keys as arrays.

    Episode k is started only while episodes 0..k-1 are not known to fill --rows rows (interpretation 2)."""
    envs = [gym_eval.make_env(spec) for _ in range(args.num_envs)]
    lengths, finished = {}, {}  # episode -> its length, its rows
    needed = lambda k: sum(n for i, n in lengths.items() if i < k) < args.rows
    running, next_k, launching = [None] * args.num_envs, 0, True  # once not needed, no later episode is
    obs_batch = np.zeros((args.num_envs, envs[0].observation_space.shape[0]), np.float32)
    noise_batch = np.zeros((args.num_envs, act_dim), np.float32)
    while True:
        for i, env in enumerate(envs):  # idle copies take the next episode while it may be needed
            launching = launching and (running[i] is not None or needed(next_k))
            if running[i] is None and launching:
                running[i], next_k = Episode(env, next_k, args.seed, policy, args.episode_steps, act_dim), next_k + 1
        if all(ep is None for ep in running):
            break
        for i, ep in enumerate(running):
            obs_batch[i], noise_batch[i] = (ep.obs, ep.noise[len(ep.rows["rewards"])]) if ep else (0.0, 0.0)
        actions, log_probs = jax.device_get(sample(params, obs_batch, noise_batch))  # [N, act_dim], [N]
        for i, ep in enumerate(running):
            if ep is not None:
                ep.step(envs[i], actions[i], log_probs[i])
                if ep.done:
                    lengths[ep.k], finished[ep.k], running[i] = len(ep.rows["rewards"]), ep.rows, None
    for env in envs:
        env.close()
    episodes = [finished[k] for k in sorted(finished)]
    return {key: np.concatenate([np.asarray(ep[key], bool if key in ("terminals", "timeouts") else np.float32)
                                 for ep in episodes])[:args.rows] for key in make_d4rl_files.KEYS}


def returns_metadata(data: dict) -> dict:
    """metadata/episodes, return_mean and return_std of the file's complete episodes (interpretation 4)."""
    returns = make_d4rl_files.episode_returns(data)
    return {"episodes": np.int64(np.isfinite(returns).sum()), "return_mean": np.float64(np.mean(returns)),
            "return_std": np.float64(np.std(returns))}


def task_name(env_id: str) -> str:
    """D4RL's task of the environment (hopper for Hopper-v4), else the id's name in lower case."""
    return gym_eval.d4rl_task(env_id) or env_id.split("/")[-1].split("-")[0].lower()


def main(args: Args) -> dict:
    check_flags(args, dict(rows=1, episode_steps=1, maxlen=0, num_envs=1, export_episodes=1))
    if not args.record and not args.export:
        raise InputError("--no-record without --export writes nothing")
    if args.export:
        check_writable(args.export, [args.sac])
    arrays, sha, policies, iterations = load_policies(args)
    spec = dataclasses.replace(gym.envs.registration.EnvSpec.from_json(str(arrays["env/spec"])),
                               max_episode_steps=args.episode_steps)
    env = gym_eval.make_env(spec)
    shapes = (env.observation_space.shape, env.action_space.shape)
    env.close()
    if shapes != ((int(arrays["arch/obs_dim"]),), (int(arrays["arch/act_dim"]),)):
        raise InputError(f"{args.sac}'s actor takes {int(arrays['arch/obs_dim'])} observations and gives "
                         f"{int(arrays['arch/act_dim'])} actions, {args.env_id} has shapes {shapes}")
    summary = {}
    if args.export:
        exported = export_policies(args, arrays, sha, policies, iterations)
        summary["export"] = {name: float(exported[f"{name}/return"].mean()) for name in POLICIES}
    if not args.record:
        return summary
    os.makedirs(args.out, exist_ok=True)
    sample, task, start = make_sample(arrays), task_name(args.env_id), time.perf_counter()
    parts = []
    for policy, name in enumerate(POLICIES):
        data = record(args, spec, sample, policies[name], policy, int(arrays["arch/act_dim"]))
        path = os.path.join(args.out, f"{task}_{name}-v2.hdf5")
        metadata = {"algorithm": f"SAC ({name}: the actor after {iterations[name]} environment steps), sampled "
                                 f"actions, seed {args.seed}, behaviour/make_data.py",
                    "iteration": np.int64(iterations[name]), "policy_file": os.path.abspath(args.sac),
                    **returns_metadata(data)}
        make_d4rl_files.write(path, data, metadata)
        parts.append(data)
        summary[name] = metadata
        print(f"{path}: {make_d4rl_files.describe(data)}", flush=True)
    both = make_d4rl_files.stitch(*parts, args.maxlen or 2 * args.rows)
    path = os.path.join(args.out, f"{task}_medium_expert-v2.hdf5")
    summary["medium_expert"] = {"algorithm": "medium + expert (D4RL's stitch_dataset.py)", **returns_metadata(both)}
    make_d4rl_files.write(path, both, summary["medium_expert"])
    print(f"{path}: {make_d4rl_files.describe(both)}")
    print(f"wrote 3 files to {args.out} in {time.perf_counter() - start:.1f} s")
    return summary


if __name__ == "__main__":
    run(main, tyro.cli(Args))
