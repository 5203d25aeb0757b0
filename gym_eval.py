"""Policies run in Gymnasium MuJoCo tasks, and D4RL's tasks and reference scores (§4.2, Table 2).

The stages and baselines evaluate here when their data set is not the navigation task's: D4RL v2 HDF5 files (the
task's Gymnasium -v4 environment, ``D4RL_TASKS``), a Minari set (the environment it records) or an .npz with
``--eval-env``. ``evaluation_env`` decides where, once, before training (``evaluation_env_of``: from a script's
flags), and ``evaluate_where`` follows it after training; ``gym_evaluate`` runs many episodes at once
(``gym_rollout``: a vector env and a jitted, batched policy) and D4RL's normalised score (``normalized_score``);
``describe_episodes`` is the line the stages print for them. ``evaluate_runs`` (the baselines' policies, S runs
at once) and ``report_runs`` (a line per run, TensorBoard scalars, the eval/* arrays) are the evaluation the
baselines and stage 3 share. Nothing here is part of EMPO's algorithm.
"""

from __future__ import annotations

import itertools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import gymnasium as gym
import jax
import numpy as np

from empo_io import InputError, open_minari


@dataclass
class EvalEnvFlags:
    """The evaluation-environment flags of a stage that can evaluate in Gymnasium (its Args inherit them)."""

    ref_min_score: Optional[float] = None
    """reference return of score 0 for the normalised score (default: D4RL's random return for a D4RL task's
    environment, else the Minari data set's ref_min_score)"""
    ref_max_score: Optional[float] = None
    """reference return of score 100 for the normalised score (default: D4RL's expert return for a D4RL task's
    environment, else the Minari data set's ref_max_score)"""
    eval_env: str = ""
    """Gymnasium environment to evaluate in (default: for D4RL files the task's -v4 environment from the file
    names, e.g. halfcheetah_*.hdf5 -> HalfCheetah-v4; for Minari ids the recorded one; an .npz of a MuJoCo task
    needs it)"""

def minari_env_info(source: str) -> dict:
    """The environment to evaluate in and the reference scores of comma-separated Minari ids.

    The environment is the first id's ``eval_env_spec`` (else its ``env_spec``); every id must
    record the same one (id, kwargs, time limit). The reference scores (D4RL's random and expert
    returns) live in each data set's metadata (``dataset.storage.metadata``, keys ``ref_min_score``
    and ``ref_max_score``); they are taken from the first id that has both, None when none has.
    Nothing is downloaded. Returns {"env_spec": EnvSpec JSON, "env_id", "ref_min_score", "ref_max_score"}.
    """
    ids = [s.strip() for s in source.split(",") if s.strip()]
    if not ids:
        raise InputError("no Minari data set id was given")
    first_spec, first_id, ref = None, None, (None, None)
    for dataset_id in ids:
        dataset = open_minari(dataset_id)
        # Minari parses both specs (with its fixes for older gymnasium JSON); only env_spec is public.
        spec = getattr(dataset, "_eval_env_spec", None) or dataset.env_spec
        if spec is None:
            raise InputError(f"Minari data set '{dataset_id}' records no environment spec to evaluate in")
        if first_spec is None:
            first_spec, first_id = spec, dataset_id
        elif (spec.id, spec.kwargs, spec.max_episode_steps) != (
                first_spec.id, first_spec.kwargs, first_spec.max_episode_steps):
            raise InputError(f"Minari data sets '{first_id}' and '{dataset_id}' record different environments "
                             f"({first_spec.id} with {first_spec.max_episode_steps} steps vs "
                             f"{spec.id} with {spec.max_episode_steps} steps)")
        meta = dataset.storage.metadata
        if ref == (None, None) and meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
            ref = (float(meta["ref_min_score"]), float(meta["ref_max_score"]))
    return {"env_spec": first_spec.to_json(), "env_id": first_spec.id,
            "ref_min_score": ref[0], "ref_max_score": ref[1]}


def normalized_score(returns, ref_min: float, ref_max: float) -> np.ndarray:
    """D4RL's normalised score 100 (R - ref_min) / (ref_max - ref_min), as float64."""
    if not (np.isfinite(ref_min) and np.isfinite(ref_max) and ref_max > ref_min):
        raise InputError(f"reference scores must be finite with ref_max > ref_min, got ref_min={ref_min}, "
                         f"ref_max={ref_max}")
    return 100.0 * (np.asarray(returns, np.float64) - ref_min) / (ref_max - ref_min)


def gym_rollout(env_spec: str, act: Callable[[np.ndarray], np.ndarray], num_envs: int, seed: int,
                max_steps: Optional[int] = None) -> dict:
    """One episode in each of ``num_envs`` copies of the environment, stepped together.

    ``act`` maps observations [num_envs, obs_dim] float32 to actions [num_envs, act_dim] (a jitted,
    batched policy); actions are clipped to the action space before stepping. Env i is reset with
    ``seed + i``. Each env counts its first episode only, until terminated or truncated (the spec's
    time limit) or ``max_steps``: the vector env resets a finished env on its next step
    (AutoresetMode.NEXT_STEP, reward 0), and those steps are masked. Returns ``return`` [E] float64,
    ``length`` [E] int64 and ``terminated`` [E] bool.
    """
    spec = gym.envs.registration.EnvSpec.from_json(env_spec)
    if num_envs < 1:
        raise InputError(f"the number of evaluation episodes must be at least 1, got {num_envs}")
    if max_steps is None and spec.max_episode_steps is None:
        raise InputError(f"environment {spec.id} has no time limit; give max_steps")
    if max_steps is not None and max_steps < 1:
        raise InputError(f"max_steps must be at least 1, got {max_steps}")
    envs = gym.vector.SyncVectorEnv([lambda: make_env(spec) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        space = envs.single_action_space
        if not isinstance(space, gym.spaces.Box):
            raise InputError(f"environment {spec.id} has a {type(space).__name__} action space, not a Box")
        obs, _ = envs.reset(seed=seed)  # env i gets seed + i
        returns = np.zeros(num_envs, np.float64)
        lengths = np.zeros(num_envs, np.int64)
        terminated = np.zeros(num_envs, bool)
        done = np.zeros(num_envs, bool)
        steps = 0
        while not done.all() and (max_steps is None or steps < max_steps):
            actions = np.asarray(act(np.asarray(obs, np.float32)), space.dtype).reshape(envs.action_space.shape)
            obs, reward, term, trunc, _ = envs.step(np.clip(actions, space.low, space.high))
            alive = ~done  # steps after an env's first episode are autoreset steps: masked
            returns += np.where(alive, reward, 0.0)
            lengths += alive
            terminated |= alive & term
            done |= alive & (term | trunc)
            steps += 1
    finally:
        envs.close()
    return {"return": returns, "length": lengths, "terminated": terminated}


# D4RL's Gym-MuJoCo tasks: the Gymnasium environment that evaluates each, and D4RL's reference returns for the
# normalised score (d4rl/infos.py, REF_MIN_SCORE / REF_MAX_SCORE of every *-v2 set: the random and the expert
# policy's mean return). The -v4 environments are Gymnasium's port of Gym's v3 MuJoCo environments to the
# `mujoco` bindings: the observation, action, reward, termination and reset of the environments D4RL v2 was
# recorded in (docs/d4rl.md, "Evaluation", for what still differs).
D4RL_TASKS = {  # task: (Gymnasium env id, ref_min_score, ref_max_score)
    "halfcheetah": ("HalfCheetah-v4", -280.178953, 12135.0),
    "hopper": ("Hopper-v4", -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", 1.629008, 4592.3),
}


def d4rl_task(name: str) -> Optional[str]:
    """The D4RL task a file or environment name starts with ('halfcheetah_medium-v2.hdf5', 'Hopper-v4'), or None."""
    base = os.path.basename(name).lower().replace("-", "_")
    return next((task for task in D4RL_TASKS if base.startswith(task + "_")), None)


def make_env(spec) -> gym.Env:
    """``gym.make(spec)`` without Gymnasium's notice that -v4 has a successor (v4 is chosen on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of date.*")
        return gym.make(spec)


def gym_env_info(env_id: str) -> dict:
    """The spec of a registered Gymnasium environment and, for a D4RL task's environment, D4RL's reference scores."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise InputError(f"'{env_id}' is not a registered Gymnasium environment ({e})") from None
    task = d4rl_task(spec.id)
    ref = D4RL_TASKS[task][1:] if task else (None, None)
    return {"env_spec": spec.to_json(), "env_id": spec.id, "ref_min_score": ref[0], "ref_max_score": ref[1]}


def evaluation_env(dataset: str, obs_dim: int, ref_min: Optional[float] = None,
                   ref_max: Optional[float] = None, eval_env: str = "") -> Optional[dict]:
    """Where a stage evaluates its policies, decided (and checked) before it trains.

    {"kind": "nav"} for the navigation task (JAX rollouts from s_0: an .npz with 2-dim states, or a Minari set
    recorded in EMPONav-v0). Otherwise {"kind": "gym", "env_spec", "env_id", "ref_min_score", "ref_max_score"}:
    episodes in a Gymnasium environment, which is ``eval_env`` when given, else for D4RL HDF5 files the task's
    environment named by the file names (``D4RL_TASKS``, e.g. halfcheetah_medium-v2.hdf5 -> HalfCheetah-v4) and
    for Minari ids the environment the data set records. The reference scores are the flags' when both are
    given, else D4RL's for a D4RL task's environment (D4RL files, an .npz with ``eval_env``), else the Minari
    data set's metadata, else None (returns only). None for an .npz of another task without ``eval_env``.
    The environment is made once here, so a missing dependency or a wrong observation size fails now.
    """
    if (ref_min is None) != (ref_max is None):
        raise InputError("give both --ref-min-score and --ref-max-score, or neither")
    parts = [s.strip() for s in dataset.split(",") if s.strip()]
    if parts and all(p.endswith((".hdf5", ".h5")) for p in parts):
        tasks = {d4rl_task(p) for p in parts}
        if not eval_env and (None in tasks or len(tasks) > 1):
            raise InputError(f"the D4RL task of {dataset} cannot be told from the file names (one of "
                             f"{', '.join(t + '_*' for t in D4RL_TASKS)} for every file); give --eval-env, e.g. "
                             f"{D4RL_TASKS['halfcheetah'][0]}")
        info = gym_env_info(eval_env or D4RL_TASKS[tasks.pop()][0])
    elif dataset.endswith(".npz") or os.path.isfile(dataset):
        if eval_env:
            info = gym_env_info(eval_env)
        elif obs_dim == 2:
            return {"kind": "nav"}
        else:
            print(f"note: {dataset} records no environment, so the policies are not evaluated (give --eval-env)")
            return None
    else:
        info = minari_env_info(dataset)
        if info["env_id"].split("/")[-1].startswith("EMPONav") and not eval_env:
            return {"kind": "nav"}
        if eval_env:  # another environment, the data set's reference scores
            info.update({k: v for k, v in gym_env_info(eval_env).items() if k in ("env_spec", "env_id")})
    if ref_min is not None:
        info.update(ref_min_score=float(ref_min), ref_max_score=float(ref_max))
    if info["ref_min_score"] is not None:
        normalized_score(np.zeros(1), info["ref_min_score"], info["ref_max_score"])  # checks the pair
    try:
        env = make_env(gym.envs.registration.EnvSpec.from_json(info["env_spec"]))
    except Exception as e:  # a missing simulator, a broken spec
        raise InputError(f"environment {info['env_id']} cannot be made ({type(e).__name__}: {e})") from None
    env_obs = int(np.prod(env.observation_space.shape))
    env.close()
    if env_obs != obs_dim:
        raise InputError(f"{info['env_id']} observes {env_obs} numbers per step, the data set {dataset} "
                         f"{obs_dim}: evaluate it in its own task's environment (--eval-env)")
    return {"kind": "gym", **info}


def evaluation_env_of(args, obs_dim: int) -> Optional[dict]:
    """evaluation_env for a script's flags (--dataset, the EvalEnvFlags), None when --eval-episodes is 0."""
    if args.eval_episodes <= 0:
        return None
    return evaluation_env(args.dataset, obs_dim, args.ref_min_score, args.ref_max_score, args.eval_env)


def evaluate_where(env: Optional[dict], on_nav: Callable, on_gym: Callable) -> tuple:
    """(eval/* arrays, summary) of a script's final policies where ``env`` (evaluation_env's) says: ``on_nav()`` on
    the navigation task, ``on_gym(env)`` in a Gymnasium environment, nothing for None."""
    if env is None:
        return {}, {}
    return on_nav() if env["kind"] == "nav" else on_gym(env)


def gym_evaluate(env: dict, act: Callable, shape: tuple, seed: int) -> dict:
    """prod(shape) episodes at once in ``env`` (from evaluation_env) with the batched policy ``act``.

    Returns "return", "length" and "terminated" arrays of ``shape`` (e.g. [S, K, E]), and "normalized_score"
    when the environment has reference scores.
    """
    out = gym_rollout(env["env_spec"], act, int(np.prod(shape)), seed)
    result = {name: np.asarray(out[name]).reshape(shape) for name in ("return", "length", "terminated")}
    if env.get("ref_min_score") is not None:
        result["normalized_score"] = normalized_score(result["return"], env["ref_min_score"], env["ref_max_score"])
    return result


def describe_episodes(out: dict, index=...) -> str:
    """'return R +- s, normalised score N +- s, length L' of the episodes ``out[field][index]`` (gym_evaluate's)."""
    pick = lambda field: np.asarray(out[field])[index]
    score = (f", normalised score {pick('normalized_score').mean():.1f} +- {pick('normalized_score').std():.1f}"
             if "normalized_score" in out else "")
    length = pick("length").mean()
    return f"return {pick('return').mean():.1f} +- {pick('return').std():.1f}{score}, length {length:.0f}"


def evaluate_runs(env: dict, action: Callable, params, obs_mean, obs_std, shape: tuple, seed: int,
                  key=None) -> dict:
    """Episodes of S runs' policies, E each, all S x E = ``shape`` at once in ``env`` (gym_evaluate's arrays [S, E]).

    ``action(p, obs, key)`` is one run's action [E, act_dim] for its parameters ``p`` (``params`` holds them
    stacked, [S, ...]) at its standardised observations (obs - obs_mean) / obs_std [E, obs_dim]; ``key`` is that
    run's key of ``key`` [S] folded in with the step, for a policy that draws its actions (None: deterministic).
    """

    @jax.jit
    def act(params, key, obs, t):  # obs [S*E, obs_dim] at step t -> each episode's run's action [S*E, act_dim]
        obs = ((obs - obs_mean) / obs_std).reshape(shape + obs.shape[-1:])  # [S, E, obs_dim]
        keys = None if key is None else jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, t)  # [S]
        actions = jax.vmap(action)(params, obs, keys)  # [S, E, act_dim]
        return actions.reshape(-1, actions.shape[-1])

    steps = itertools.count()
    return gym_evaluate(env, lambda obs: np.asarray(act(params, key, obs, next(steps))), shape, seed)


def report_runs(out: dict, header: str, seeds, writer, step: int) -> tuple:
    """gym_evaluate's episodes of S runs ``out`` ([S, E] arrays): ``header`` and a line per run, the normalised score
    over all of them, TensorBoard's eval/return_mean and eval/normalized_score at ``step``. Returns (the eval/*
    arrays, a summary of the means and stds)."""
    summary = {"return_mean": float(out["return"].mean()), "return_std": float(out["return"].std())}
    lines = [header] + [f"  seed {seed}: {describe_episodes(out, i)}" for i, seed in enumerate(seeds)]
    writer.add_scalar("eval/return_mean", summary["return_mean"], step)
    if "normalized_score" in out:
        summary["normalized_score_mean"] = float(out["normalized_score"].mean())
        summary["normalized_score_std"] = float(out["normalized_score"].std())
        writer.add_scalar("eval/normalized_score", summary["normalized_score_mean"], step)
        lines.append(f"  all: normalised score {summary['normalized_score_mean']:.1f} +- "
                     f"{summary['normalized_score_std']:.1f} (std of seed means "
                     f"{out['normalized_score'].mean(1).std():.1f})")
    print("\n".join(lines))
    return {f"eval/{name}": x for name, x in out.items()}, summary


def evaluate_clusters(env: dict, policy, obs_mean, obs_std, params: dict, shape: tuple, seed: int, writer, step: int,
                      tag: str):
    """Episodes of K Gaussian policies per run (the mean action of ``policy.apply(p, obs) -> (mean, log_std)`` on the
    standardised observation), all S x K x E = ``shape`` at once in one vector env, for each entry of ``params``
    ({name: [S, K, ...]}). Returns (eval/<name>_* arrays, per-cluster means of the return and normalised score);
    TensorBoard scalars and a line per cluster."""

    @jax.jit
    def act(p, obs):  # obs [S*K*E, obs_dim] -> the mean action of each episode's policy [S*K*E, act_dim]
        obs = ((obs - obs_mean) / obs_std).reshape(shape + obs.shape[-1:])  # [S, K, E, obs_dim]
        mean = jax.vmap(jax.vmap(lambda q, o: policy.apply(q, o)[0]))(p, obs)  # [S, K, E, act_dim]
        return mean.reshape(-1, mean.shape[-1])

    arrays, summary = {}, {}
    for name, p in params.items():
        out = gym_evaluate(env, lambda obs, p=p: act(p, obs), shape, seed)
        arrays.update({f"eval/{name}_{field}": x for field, x in out.items()})
        for field in ("return", "normalized_score"):
            if field in out:
                summary[f"{name}_{field}"] = out[field].mean(axis=(0, 2)).tolist()  # per cluster
                for z in range(shape[1]):
                    writer.add_scalar(f"eval/{name}_{field}/{z}", float(out[field][:, z].mean()), step)
        for z in range(shape[1]):
            print(f"{tag} {name}_{z} in {env['env_id']}: {describe_episodes(out, (slice(None), z))}")
    return arrays, summary
