"""gym_eval.py: evaluation in a Gymnasium (MuJoCo) environment: Minari env info, normalised score, vector rollouts.

The reference for ``gym_rollout`` is a plain single-env loop (``gym.make`` of the same spec, reset
with the same seed, stepped until its episode ends). Minari data sets are built here, small, in a
temporary store (``MINARI_DATASETS_PATH``), so nothing touches ~/.minari and nothing is downloaded.
"""

import dataclasses
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.registration import EnvSpec

import empo_io
import gym_eval

CHEETAH_LIMIT = 50
HOPPER_LIMIT = 200


def spec_json(env_id: str, limit: int) -> str:
    return dataclasses.replace(gym.spec(env_id), max_episode_steps=limit).to_json()


def single_env_episode(env_spec: str, act, seed: int) -> tuple[float, int, bool]:
    """The reference: one episode in one env, the same clipping, the policy on a batch of one."""
    env = gym.make(EnvSpec.from_json(env_spec))
    space = env.action_space
    obs, _ = env.reset(seed=seed)
    ret, length = 0.0, 0
    while True:
        action = np.asarray(act(np.asarray(obs, np.float32)[None]), np.float32)[0]
        obs, reward, terminated, truncated, _ = env.step(np.clip(action, space.low, space.high))
        ret, length = ret + reward, length + 1
        if terminated or truncated:
            env.close()
            return ret, length, bool(terminated)


def constant(value: float, act_dim: int):
    return lambda obs: np.full((obs.shape[0], act_dim), value, np.float32)


# ----------------------------------------------------------------------------------------------
# normalized_score
# ----------------------------------------------------------------------------------------------

def test_normalized_score_by_hand():
    score = gym_eval.normalized_score([-280.0, 12135.0, 5927.5], -280.0, 12135.0)
    np.testing.assert_allclose(score, [0.0, 100.0, 50.0])
    assert score.dtype == np.float64
    np.testing.assert_allclose(gym_eval.normalized_score(np.array([3.0]), 1.0, 5.0), [50.0])
    np.testing.assert_allclose(gym_eval.normalized_score([-1.0], 1.0, 5.0), [-50.0])


@pytest.mark.parametrize("ref_min, ref_max", [(5.0, 5.0), (6.0, 5.0), (np.nan, 5.0), (0.0, np.inf)])
def test_normalized_score_bad_references(ref_min, ref_max):
    with pytest.raises(empo_io.InputError, match="ref_max > ref_min"):
        gym_eval.normalized_score([1.0], ref_min, ref_max)


# ----------------------------------------------------------------------------------------------
# minari_env_info
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def minari_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path / "minari"


def make_minari(dataset_id: str, env_id: str, limit: int, refs=(None, None), episodes: int = 2, steps: int = 5,
                eval_limit=None):
    """A tiny Minari data set of random episodes in ``env_id``, ``limit`` steps (eval env: ``eval_limit``)."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    spec = EnvSpec.from_json(spec_json(env_id, limit))
    env = gym.make(spec)
    buffers = []
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        observations, actions = [obs], []
        for _ in range(steps):
            actions.append(env.action_space.sample())
            observations.append(env.step(actions[-1])[0])
        buffers.append(EpisodeBuffer(id=i, observations=np.stack(observations), actions=np.stack(actions),
                                     rewards=[0.0] * steps, terminations=[False] * steps,
                                     truncations=[False] * (steps - 1) + [True], infos={}))
    env.close()
    with warnings.catch_warnings():  # Minari's reminders about author and code link fields
        warnings.simplefilter("ignore", UserWarning)
        eval_env = EnvSpec.from_json(spec_json(env_id, eval_limit or limit))
        minari.create_dataset_from_buffers(dataset_id, buffers, env=spec, eval_env=eval_env, algorithm_name="random",
                                           ref_min_score=refs[0], ref_max_score=refs[1], data_format="hdf5",
                                           description="test")


def test_minari_env_info_spec_and_references(minari_store):
    make_minari("test/halfcheetah/medium-v0", "HalfCheetah-v5", CHEETAH_LIMIT)  # no reference scores
    make_minari("test/halfcheetah/expert-v0", "HalfCheetah-v5", CHEETAH_LIMIT, refs=(-280.5, 12135.25))
    make_minari("test/halfcheetah/random-v0", "HalfCheetah-v5", CHEETAH_LIMIT, refs=(0.0, 1.0))
    info = gym_eval.minari_env_info("test/halfcheetah/medium-v0, test/halfcheetah/expert-v0,test/halfcheetah/random-v0")
    assert info["env_id"] == "HalfCheetah-v5"
    assert (info["ref_min_score"], info["ref_max_score"]) == (-280.5, 12135.25)  # from the first id with both
    env = gym.make(EnvSpec.from_json(info["env_spec"]))
    assert env.observation_space.shape == (17,) and env.action_space.shape == (6,)
    assert env.spec.max_episode_steps == CHEETAH_LIMIT
    env.close()
    alone = gym_eval.minari_env_info("test/halfcheetah/medium-v0")
    assert alone["ref_min_score"] is None and alone["ref_max_score"] is None
    assert alone["env_spec"] == info["env_spec"]


def test_minari_env_info_prefers_the_eval_env(minari_store):
    make_minari("test/halfcheetah/eval-v0", "HalfCheetah-v5", CHEETAH_LIMIT, eval_limit=30)
    info = gym_eval.minari_env_info("test/halfcheetah/eval-v0")
    assert EnvSpec.from_json(info["env_spec"]).max_episode_steps == 30


def test_minari_env_info_missing_id(minari_store):
    with pytest.raises(empo_io.InputError) as error:
        gym_eval.minari_env_info("test/halfcheetah/absent-v0")
    assert "minari download test/halfcheetah/absent-v0" in str(error.value)


def test_minari_env_info_different_environments(minari_store):
    make_minari("test/halfcheetah/medium-v0", "HalfCheetah-v5", CHEETAH_LIMIT)
    make_minari("test/hopper/medium-v0", "Hopper-v5", CHEETAH_LIMIT)
    make_minari("test/halfcheetah/short-v0", "HalfCheetah-v5", 10)
    for other in ("test/hopper/medium-v0", "test/halfcheetah/short-v0"):
        with pytest.raises(empo_io.InputError, match="record different environments") as error:
            gym_eval.minari_env_info(f"test/halfcheetah/medium-v0,{other}")
        assert other in str(error.value)


# ----------------------------------------------------------------------------------------------
# gym_rollout
# ----------------------------------------------------------------------------------------------

def test_gym_rollout_matches_single_env_episodes_halfcheetah():
    env_spec = spec_json("HalfCheetah-v5", CHEETAH_LIMIT)
    calls = []

    def act(obs):  # elementwise, so a row gives the same action alone or in a batch
        calls.append((obs.shape, obs.dtype))
        return np.tanh(2.0 * obs[:, :6] + 0.3)

    out = gym_eval.gym_rollout(env_spec, act, num_envs=3, seed=7)
    assert set(calls) == {((3, 17), np.dtype(np.float32))}
    assert len(calls) == CHEETAH_LIMIT
    np.testing.assert_array_equal(out["length"], [CHEETAH_LIMIT] * 3)
    assert out["length"].dtype == np.int64 and out["return"].dtype == np.float64
    assert not out["terminated"].any()
    reference = [single_env_episode(env_spec, act, 7 + i) for i in range(3)]
    np.testing.assert_allclose(out["return"], [r for r, _, _ in reference], rtol=1e-12)
    assert len(set(out["return"].tolist())) == 3  # the seeds differ


def test_gym_rollout_hopper_terminations_are_masked():
    env_spec = spec_json("Hopper-v5", HOPPER_LIMIT)
    act = constant(1.0, 3)  # falls over in about 20 steps
    out = gym_eval.gym_rollout(env_spec, act, num_envs=3, seed=0)
    reference = [single_env_episode(env_spec, act, i) for i in range(3)]
    assert out["terminated"].all() and np.all(out["length"] < HOPPER_LIMIT)
    assert len(set(out["length"].tolist())) > 1  # envs end at different steps: the masking matters
    np.testing.assert_array_equal(out["length"], [n for _, n, _ in reference])
    np.testing.assert_allclose(out["return"], [r for r, _, _ in reference], rtol=1e-12)


def test_gym_rollout_clips_actions_and_max_steps():
    env_spec = spec_json("HalfCheetah-v5", CHEETAH_LIMIT)
    clipped = gym_eval.gym_rollout(env_spec, constant(10.0, 6), num_envs=2, seed=3)
    at_bound = gym_eval.gym_rollout(env_spec, constant(1.0, 6), num_envs=2, seed=3)
    np.testing.assert_array_equal(clipped["return"], at_bound["return"])
    short = gym_eval.gym_rollout(env_spec, constant(1.0, 6), num_envs=2, seed=3, max_steps=10)
    np.testing.assert_array_equal(short["length"], [10, 10])
    assert not short["terminated"].any()
    assert np.all(short["return"] != at_bound["return"])
    with pytest.raises(empo_io.InputError, match="no time limit"):
        gym_eval.gym_rollout(spec_json("HalfCheetah-v5", None), constant(0.0, 6), num_envs=1, seed=0)
