"""Shared pytest fixtures: a small navigation data set (Algorithm 3), in memory and as an .npz file.

The suite runs on the CPU (set before JAX is imported) and imports the project's single files from
the repository root whatever the working directory.
"""

import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import empo_io  # noqa: E402
import nav_env  # noqa: E402

SMALL_SEED = 0
SMALL_TRANSITIONS_PER_BEHAVIOUR = 20_000  # about 27 + 36 episodes, about 40k rows, ~2 s on 2 CPU cores


@pytest.fixture(scope="session", autouse=True)
def compile_once(tmp_path_factory):
    """Tests run the stages' main() many times with the same sizes, and each run builds new jitted functions: a
    persistent compilation cache for the session lets XLA compile each program once (the cache is keyed by the
    program, so results are unchanged). The scripts that tests start as subprocesses (the pipelines, the
    reproduction scripts, the device check) share it through the environment: the same stage with the same
    sizes recurs in several of them. The settings are restored afterwards."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: the workers share one cache, next to their own folders
        base = base.parent
    cache = str(base / "xla_cache")
    os.makedirs(cache, exist_ok=True)
    settings = {"jax_compilation_cache_dir": cache, "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}
    saved = {name: getattr(jax.config, name) for name in settings}
    saved_env = {name.upper(): os.environ.get(name.upper()) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    compilation_cache.reset_cache()
    yield
    for name, value in saved.items():
        jax.config.update(name, value)
    for name, value in saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def small_dataset_target() -> int:
    """The ``transitions_per_behaviour`` the small data set was generated with."""
    return SMALL_TRANSITIONS_PER_BEHAVIOUR


@pytest.fixture(scope="session")
def small_dataset() -> dict:
    """``nav_env.generate_dataset(seed=0, transitions_per_behaviour=20_000)``, schema empo/dataset/v1.

    Shared by the whole session, so its arrays are read-only: copy before changing one.
    """
    data = nav_env.generate_dataset(SMALL_SEED, SMALL_TRANSITIONS_PER_BEHAVIOUR, log=lambda _: None)
    for array in data.values():
        array.setflags(write=False)
    return data


@pytest.fixture(scope="session")
def small_dataset_path(small_dataset, tmp_path_factory) -> str:
    """The small data set written with ``empo_io.save_npz`` (schema ``empo_io.DATASET_SCHEMA``)."""
    path = tmp_path_factory.mktemp("data") / "nav_small.npz"
    args = dict(seed=SMALL_SEED, transitions_per_behaviour=SMALL_TRANSITIONS_PER_BEHAVIOUR)
    empo_io.save_npz(str(path), small_dataset, empo_io.DATASET_SCHEMA, args)
    return str(path)


def subset_episodes(data: dict, episodes) -> dict:
    """Rows of the given episodes (in the given order), episode ids renumbered 0..len(episodes)-1."""
    parts = []
    for new_id, old_id in enumerate(episodes):
        rows = data["episode_ids"] == old_id
        part = {k: np.array(v[rows]) for k, v in data.items()}
        part["episode_ids"] = np.full(rows.sum(), new_id, np.int32)
        parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in data}


@pytest.fixture(scope="session")
def subset():
    """``subset(data, episode_list)``: a smaller data set of whole episodes (writable copies)."""
    return subset_episodes


def load_script(name: str):
    """A script of scripts/ as a module (they are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def d4rl_files(tmp_path_factory):
    """Hopper files from scripts/make_d4rl_files.py: 600 rows per behaviour, episodes of at most 15 steps (both
    behaviours' files hold terminations and timeouts, and end mid-episode)."""
    folder = tmp_path_factory.mktemp("d4rl")
    mdf = load_script("make_d4rl_files")
    mdf.main(mdf.Args(out=str(folder), tasks=("hopper",), rows=600, episode_steps=15))
    return folder


@pytest.fixture(scope="session")
def table2_run(d4rl_files, tmp_path_factory):
    """scripts/reproduce_table2.sh on those files, 2 seeds, tiny schedules (STEP_FRACTION 2e-5: SARSA 30 steps,
    stage 3 and the three baselines 20): (environment, run folder, the finished process). tests/test_d4rl.py checks
    the run and the table, tests/test_explain_table2.py explains it."""
    import subprocess

    run = tmp_path_factory.mktemp("table2") / "run"
    env = dict(os.environ, RUN=str(run), D4RL_DIR=str(d4rl_files), SEEDS="2", TASKS="hopper", JAX_PLATFORMS="cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=2", STEP_FRACTION="0.00002",
               CLUSTER_ARGS="--bias-epochs 1 --pretrain-epochs 1 --em-epochs 2 --hidden-dim 16 --log-every 100",
               PPO_ARGS="--steps-per-call 30 --v-epochs 1 --pi-epochs 1 --eval-episodes 1 --chunk 512",
               HIGHLEVEL_ARGS="--steps-per-call 20 --eval-episodes 2",
               BASELINE_ARGS="--steps-per-call 20 --eval-episodes 2 --hidden-dim 16")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_table2.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return env, run, out


@pytest.fixture(scope="session")
def halfcheetah_npz(tmp_path_factory):
    """(path, arrays) of an .npz of HalfCheetah's shapes (17 observations, 6 actions in [-1, 1]): 20 episodes of 50
    random rows, each ended by a timeout, for a baseline evaluated in HalfCheetah-v4 with ``--eval-env``."""
    rng = np.random.default_rng(0)
    episodes, length = 20, 50
    n = episodes * length
    obs = rng.normal(size=(n, 17)).astype(np.float32)
    data = dict(observations=obs, actions=rng.uniform(-1, 1, (n, 6)).astype(np.float32),
                rewards=rng.normal(size=n).astype(np.float32), next_observations=np.roll(obs, -1, 0),
                terminals=np.zeros(n, bool), timeouts=np.arange(n) % length == length - 1,
                episode_ids=np.repeat(np.arange(episodes), length).astype(np.int32), behaviour=np.zeros(n, np.int32))
    path = tmp_path_factory.mktemp("halfcheetah") / "hc.npz"
    empo_io.save_npz(str(path), data, empo_io.DATASET_SCHEMA, {})
    return path, data


@pytest.fixture
def gym_steps(monkeypatch):
    """The observations and actions of the first 10 steps of every gym_eval.gym_rollout in a test: a list of
    (obs [num_envs, obs_dim], actions [num_envs, act_dim]). The episodes themselves cannot be replayed to check which
    policy acted: MuJoCo is chaotic, and a change of 1e-7 in an action moves HalfCheetah's return by several %."""
    import gym_eval

    steps, real = [], gym_eval.gym_rollout

    def rollout(env_spec, act, num_envs, seed, max_steps=None):
        def recorded(obs):
            actions = act(obs)
            if len(steps) < 10:
                steps.append((np.array(obs), np.array(actions)))
            return actions

        return real(env_spec, recorded, num_envs, seed, max_steps)

    monkeypatch.setattr(gym_eval, "gym_rollout", rollout)
    return steps


def check_halfcheetah_evaluation(out, summary: dict, shape: tuple, steps=None, policy=None):
    """A baseline's output ``out`` evaluated in HalfCheetah-v4: eval/{return,length,terminated,normalized_score} of
    ``shape`` [S, E], the score D4RL's from the return (its random and expert returns), main's summary its mean,
    and neither the navigation task's protocols nor its figures. With ``steps`` (gym_steps) and ``policy(run, obs)``
    (run's action at raw observations [E, 17]): every episode took its own run's actions."""
    f = np.load(out, allow_pickle=False)
    for obs, actions in steps or []:
        for run in range(shape[0]):
            rows = slice(run * shape[1], (run + 1) * shape[1])  # the episodes are ordered run by run
            np.testing.assert_allclose(actions[rows], policy(run, obs[rows]), atol=1e-5)
    for name in ("return", "length", "terminated", "normalized_score"):
        assert f[f"eval/{name}"].shape == shape, name
    assert np.all(f["eval/length"] == 1000) and not f["eval/terminated"].any()  # HalfCheetah's time limit
    score = 100 * (f["eval/return"] + 280.178953) / (12135.0 + 280.178953)  # D4RL's random and expert returns
    np.testing.assert_allclose(f["eval/normalized_score"], score, rtol=1e-6)
    assert summary["normalized_score_mean"] == pytest.approx(float(f["eval/normalized_score"].mean()))
    assert summary["return_mean"] == pytest.approx(float(f["eval/return"].mean()))
    assert "eval/sampled_return" not in f.files and not list(pathlib.Path(out).parent.glob("*.png"))
    return f


# The bad-input cases every baseline refuses alike: what is wrong with the data set, and the sentence naming it.
DATASET_CASES = [
    ("missing", "does not exist"),
    ("not_npz", "is not an .npz file"),
    ("schema", "has schema 'empo/cluster/v1'"),
    ("missing_key", "has no key 'terminals'"),
    ("nan", "NaN"),
]

# The flags every baseline checks alike: case -> (the bad flag, the sentence naming it).
FLAG_CASES = {
    "steps": (dict(steps=0), "--steps must be at least 1"),
    "num_seeds": (dict(num_seeds=0), "--num-seeds must be at least 1"),
    "batch_size": (dict(batch_size=0), "--batch-size must be at least 1"),
    "eval_episodes": (dict(eval_episodes=-1), "--eval-episodes"),
    "gamma": (dict(gamma=1.5), "--gamma"),
    "resume_other_sizes": (dict(resume=True), "was written by a run with other sizes"),
}


def bad_input_cases(extra: dict) -> list:
    """(case, message) pairs for pytest: DATASET_CASES, FLAG_CASES and a baseline's own ``extra`` flag cases."""
    return DATASET_CASES + [(case, message) for case, (_, message) in {**FLAG_CASES, **extra}.items()]


def bad_dataset(source, folder, case: str) -> pathlib.Path:
    """The data set of a bad-input case, written in ``folder`` from the good .npz ``source``: one of DATASET_CASES
    spoilt as it names, or an unchanged copy for any other case (a bad flag)."""
    dataset = pathlib.Path(folder) / "data.npz"
    if case == "missing":
        return pathlib.Path(folder) / "nowhere.npz"
    if case == "not_npz":
        dataset.write_text("not a zip file")
        return dataset
    data = {k: np.array(v) for k, v in np.load(source).items()}
    if case == "schema":
        data["schema"] = np.array("empo/cluster/v1")
    elif case == "missing_key":
        del data["terminals"]
    elif case == "nan":
        data["rewards"][5] = np.nan
    np.savez(dataset, **data)
    return dataset


def earlier_result(folder, name: str) -> pathlib.Path:
    """``folder/out/name`` holding the bytes of an earlier result, which a refused run must leave as they are."""
    out = pathlib.Path(folder) / "out" / name
    out.parent.mkdir()
    out.write_bytes(b"an earlier result")
    return out


def other_sizes_checkpoint(module, args, out) -> None:
    """Beside ``out``, a checkpoint with the identity of ``module``'s run ``args`` but networks of other sizes."""
    other = {"actor": np.zeros((2, 16, 16), np.float32), "critic": np.zeros((2, 2, 16), np.float32)}
    identity = empo_io.run_identity(args, module.NEUTRAL_FLAGS, {"dataset": empo_io.load_dataset(args.dataset)[1]})
    empo_io.save_checkpoint(empo_io.checkpoint_path(str(out)), other, 1, module.CHECKPOINT_SCHEMA, identity)


def assert_refused(main, args, out, message: str) -> None:
    """``main(args)`` raises one InputError sentence matching ``message``, and ``out`` keeps its earlier bytes with
    nothing written beside it."""
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(empo_io.InputError, match=message) as err:
        main(args)
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no figures, logs or checkpoint
