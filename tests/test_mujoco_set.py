"""scripts/make_mujoco_set.py: two local Minari data sets of a MuJoCo task, one per behaviour (gaits, controllers).

Every test writes into its own temporary Minari store (MINARI_DATASETS_PATH), never ~/.minari, and
calls the script's ``main`` in-process with tiny sizes.
"""

import hashlib
import importlib.util
import pathlib
import socket
import sys

import minari
import numpy as np
import pytest

import empo_io

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = ["empotest/halfcheetah/gait-b0-v0", "empotest/halfcheetah/gait-b1-v0"]
EPISODES, STEPS = 8, 100


@pytest.fixture(scope="module")
def mms():
    """The script as a module (it lives in scripts/, outside the import path)."""
    spec = importlib.util.spec_from_file_location("make_mujoco_set", ROOT / "scripts" / "make_mujoco_set.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty local Minari store, and no network."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network access"))
    return tmp_path / "minari"


def tiny_args(mms, **overrides):
    kwargs = dict(behaviours="gaits", prefix="empotest/halfcheetah/gait", episodes=EPISODES, episode_steps=STEPS,
                  ref_episodes=3)
    return mms.Args(**{**kwargs, **overrides})


def episodes_of(dataset_id: str) -> list:
    return list(minari.load_dataset(dataset_id, download=False).iterate_episodes())


def arrays_of(dataset_id: str) -> dict:
    eps = episodes_of(dataset_id)
    return {key: np.concatenate([np.asarray(getattr(ep, key)) for ep in eps])
            for key in ("observations", "actions", "rewards", "terminations", "truncations")}


def file_digest(folder: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_halfcheetah_sets_round_trip(mms, store):
    mms.main(tiny_args(mms))
    ref = []
    for b, dataset_id in enumerate(IDS):
        dataset = minari.load_dataset(dataset_id, download=False)
        eps = list(dataset.iterate_episodes())
        assert dataset.total_episodes == len(eps) == EPISODES and dataset.total_steps == EPISODES * STEPS
        for ep in eps:
            assert len(ep.rewards) == STEPS and ep.observations.shape == (STEPS + 1, 17)
            assert ep.actions.shape == (STEPS, 6) and ep.actions.dtype == np.float32
            assert np.all(np.abs(ep.actions) <= 1.0)
            assert not ep.terminations.any()  # HalfCheetah never terminates
            assert ep.truncations[-1] and not ep.truncations[:-1].any()  # the step limit is a truncation
        env = dataset.recover_environment(eval_env=True)
        assert env.spec.id == "HalfCheetah-v5" and env.spec.max_episode_steps == STEPS
        assert env.observation_space.shape == (17,) and env.action_space.shape == (6,)
        assert dataset.env_spec.id == "HalfCheetah-v5"
        labels = [m["behaviour"] for m in dataset.storage.get_episode_metadata(dataset.episode_indices)]
        assert labels == [b] * EPISODES
        meta = dataset.storage.metadata
        ref.append((meta["ref_min_score"], meta["ref_max_score"]))
        assert minari.get_normalized_score(dataset, np.array(ref[-1])) == pytest.approx([0.0, 1.0])
    assert ref[0] == ref[1] and ref[0][1] > ref[0][0]  # one normalisation for both sets
    mean_returns = [np.mean([ep.rewards.sum() for ep in episodes_of(i)]) for i in IDS]
    assert ref[0][1] == pytest.approx(max(mean_returns))  # ref_max: the better behaviour's mean return
    # The stages' loader: the concatenation, labelled by the index of the id, whole episodes.
    data, _ = empo_io.load_dataset(",".join(IDS))
    assert np.bincount(data["behaviour"]).tolist() == [EPISODES * STEPS] * 2
    assert data["episode_ids"][-1] == 2 * EPISODES - 1 and data["timeouts"].sum() == 2 * EPISODES
    assert not data["terminals"].any()


def test_the_two_behaviours_differ(mms, store):
    mms.main(tiny_args(mms))
    # Forward velocity (observation 8 of HalfCheetah-v5), one mean per episode (independent samples).
    velocity = [np.array([ep.observations[1:, 8].mean() for ep in episodes_of(i)]) for i in IDS]
    gap = velocity[0].mean() - velocity[1].mean()
    stderr = np.sqrt(velocity[0].var(ddof=1) / EPISODES + velocity[1].var(ddof=1) / EPISODES)
    assert velocity[0].mean() > 0.5 and velocity[1].mean() < -0.5  # one runs forward, one backward
    assert gap > 10 * stderr


def test_same_seed_same_data_other_seed_other_data(mms, store, monkeypatch):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(store / name))
        mms.main(tiny_args(mms, seed=seed, episodes=3, episode_steps=50))
        runs.append([arrays_of(i) for i in IDS])
    for b in range(2):
        for key in runs[0][b]:
            np.testing.assert_array_equal(runs[0][b][key], runs[1][b][key])
        assert not np.array_equal(runs[0][b]["observations"], runs[2][b]["observations"])
        assert not np.array_equal(runs[0][b]["actions"], runs[2][b]["actions"])


def test_existing_id_is_refused_unless_overwrite(mms, store, capsys):
    mms.main(tiny_args(mms, episodes=3, episode_steps=50))
    before = file_digest(store)
    with pytest.raises(mms.InputError, match=IDS[0]) as error:
        mms.main(tiny_args(mms, episodes=2, episode_steps=50, seed=1))
    assert "--overwrite" in str(error.value) and "\n" not in str(error.value)
    assert file_digest(store) == before  # untouched
    mms.main(tiny_args(mms, episodes=2, episode_steps=50, seed=1, overwrite=True))
    for dataset_id in IDS:  # replaced, not appended to
        assert minari.load_dataset(dataset_id, download=False).total_episodes == 2
    assert f"--dataset {','.join(IDS)}" in capsys.readouterr().out


def test_a_relative_store_path_works(mms, store, monkeypatch):
    """MINARI_DATASETS_PATH relative to the working folder, as the README's example sets it."""
    monkeypatch.chdir(store.parent)
    monkeypatch.setenv("MINARI_DATASETS_PATH", "relative/minari")
    mms.main(tiny_args(mms, episodes=2, episode_steps=50))
    for dataset_id in IDS:
        assert minari.load_dataset(dataset_id, download=False).total_episodes == 2
    assert (store.parent / "relative" / "minari" / IDS[0]).is_dir()


@pytest.mark.parametrize("overrides, words", [
    (dict(episodes=0), "--episodes"),
    (dict(episode_steps=0), "--episode-steps"),
    (dict(action_noise=(0.1, -0.1)), "--action-noise"),
    (dict(env_id="NoSuchEnv-v9"), "NoSuchEnv-v9"),
    (dict(env_id="CartPole-v1"), "Box"),
    (dict(prefix="x/gait"), "x/gait-b0-v0"),  # Minari wants namespaces of two characters or more
    (dict(prefix="bad id"), "bad id-b0-v0"),
    (dict(behaviours="controllers", env_id=None, gains_b0=(1.0, 2.0, 3.0)), "1 x 4 = 4 numbers for InvertedPendulum"),
    (dict(behaviours="controllers", env_id="HalfCheetah-v5"), "6 x 17 = 102 numbers"),  # the pendulum's gains
    (dict(behaviours="controllers", env_id=None, gains_b1=(1.0, float("nan"), 0.0, 0.0)), "--gains-b1"),
])
def test_bad_arguments_fail_in_one_sentence_and_write_nothing(mms, store, overrides, words):
    with pytest.raises(mms.InputError, match=words) as error:
        mms.main(tiny_args(mms, **overrides))
    assert "\n" not in str(error.value)
    assert not store.exists() or not any(store.rglob("*"))


def test_hopper_falls_are_terminations(mms, store):
    steps = 300
    mms.main(tiny_args(mms, env_id="Hopper-v5", prefix="empotest/hopper/gait", episodes=4, episode_steps=steps))
    ids = ["empotest/hopper/gait-b0-v0", "empotest/hopper/gait-b1-v0"]
    fell = 0
    for dataset_id in ids:
        for ep in episodes_of(dataset_id):
            n = len(ep.rewards)
            assert not ep.terminations[:-1].any() and not ep.truncations[:-1].any()
            if n < steps:  # it fell: a termination, not a truncation
                assert ep.terminations[-1] and not ep.truncations[-1]
                fell += 1
            else:
                assert ep.truncations[-1]
    assert fell > 0  # open-loop gaits do fall over
    data, _ = empo_io.load_dataset(",".join(ids))
    assert data["terminals"].sum() == fell and data["timeouts"].sum() == 8 - fell


def test_actions_follow_the_action_space_bounds(mms, store):
    # InvertedPendulum-v5 acts in [-3, 3]: the gaits are scaled to the bounds, not to +-1.
    mms.main(tiny_args(mms, env_id="InvertedPendulum-v5", prefix="empotest/pendulum/gait", episodes=3,
                       episode_steps=50))
    actions = np.concatenate([arrays_of(f"empotest/pendulum/gait-b{b}-v0")["actions"] for b in range(2)])
    assert actions.shape[1] == 1 and np.all(np.abs(actions) <= 3.0) and np.abs(actions).max() > 1.5


def test_controllers_share_states_and_act_differently_there(mms, store):
    """The default family: two noisy linear controllers on InvertedPendulum-v5, written and labelled."""
    steps = 1000
    mms.main(mms.Args(prefix="empotest/pendulum/ctl", episodes=6, episode_steps=steps, ref_episodes=2))
    ids = ["empotest/pendulum/ctl-b0-v0", "empotest/pendulum/ctl-b1-v0"]
    arrays = [arrays_of(i) for i in ids]
    for dataset_id in ids:
        dataset = minari.load_dataset(dataset_id, download=False)
        assert dataset.recover_environment(eval_env=True).spec.id == "InvertedPendulum-v5"
        assert "linear state-feedback controller" in dataset.storage.metadata["algorithm_name"]
    # Actions are u in [-1, 1] mapped to the [-3, 3] bounds: a = 3 u, with u = clip(G o + sigma eps).
    for b, gains in enumerate((mms.Args.gains_b0, mms.Args.gains_b1)):
        eps = episodes_of(ids[b])
        obs = np.concatenate([ep.observations[:-1] for ep in eps])  # [N, 4]
        actions = np.concatenate([ep.actions for ep in eps])[:, 0]  # [N]
        mean = np.clip(obs @ np.asarray(gains), -1.0, 1.0) * 3.0
        residual = (actions - mean)[np.abs(obs @ np.asarray(gains)) < 0.5]  # away from the clip
        assert abs(residual.mean()) < 0.1 and residual.std() == pytest.approx(3.0 * (0.1, 0.2)[b], rel=0.15)
    # Shared states: both keep the pole near upright, in overlapping ranges of every observation.
    for j in range(4):
        lo = max(np.percentile(a["observations"][:, j], 10) for a in arrays)
        hi = min(np.percentile(a["observations"][:, j], 90) for a in arrays)
        assert lo < hi
    # Behaviour 0 keeps the pole up to the step limit; the noisier behaviour 1 drops it in some episode.
    assert all(len(ep.rewards) == steps and ep.truncations[-1] for ep in episodes_of(ids[0]))
    assert any(ep.terminations[-1] for ep in episodes_of(ids[1]))
