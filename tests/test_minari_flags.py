"""Minari terminations and truncations, kept apart per trajectory, through every target that uses them.

A hand-made Minari set (recorded with the Hopper-v5 spec, no simulation needed) holds episodes that end in a
termination, in a truncation, and in neither (a cut episode, which the loader reads as a timeout). It is
loaded by each stage's own loader; then stage 2's Monte-Carlo returns (Eq. 10) and SARSA target (Eq. 11) and
stage 3's n-step target are checked against NumPy loops written from the flags.
"""

import gymnasium as gym
import jax.numpy as jnp
import numpy as np
import pytest

import empo_cluster as ec
import empo_highlevel as eh
import empo_io
import empo_ppo as ep

# (length, termination at the end, truncation at the end); the third is cut with neither flag.
EPISODES = [(4, True, False), (5, False, True), (3, False, False), (1, True, False), (6, False, True)]
GAMMA = 0.9


@pytest.fixture(scope="module")
def minari_sets(tmp_path_factory):
    """Two ids, as D4RL medium + expert: the first three episodes and the last two."""
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    store = tmp_path_factory.mktemp("minari")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(store))
    rng = np.random.default_rng(0)
    spec = gym.spec("Hopper-v5")
    env = gym.make(spec)
    episodes = []
    for n, term, trunc in EPISODES:
        ep_data = dict(observations=rng.normal(size=(n + 1, 11)).astype(np.float32),
                       actions=rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
                       rewards=rng.normal(size=n).astype(np.float32),
                       terminations=np.r_[np.zeros(n - 1, bool), term], truncations=np.r_[np.zeros(n - 1, bool), trunc])
        episodes.append(ep_data)
    for name, part in (("flags/first-v0", episodes[:3]), ("flags/second-v0", episodes[3:])):
        buffers = [EpisodeBuffer(id=j, observations=e["observations"], actions=e["actions"],
                                 rewards=e["rewards"].tolist(), terminations=e["terminations"].tolist(),
                                 truncations=e["truncations"].tolist(), infos={}) for j, e in enumerate(part)]
        minari.create_dataset_from_buffers(name, buffers, env=spec, observation_space=env.observation_space,
                                           action_space=env.action_space, algorithm_name="hand-made",
                                           data_format="hdf5")
    yield "flags/first-v0,flags/second-v0", episodes
    mp.undo()


def test_every_stage_reads_the_same_flags_and_labels(minari_sets):
    source, episodes = minari_sets
    loaded = [module.load_dataset(source) for module in (ec, ep, eh)]
    assert loaded[0][1] == loaded[1][1] == loaded[2][1]  # the same arrays, the same digest
    data = loaded[0][0]
    want_term = np.concatenate([e["terminations"] for e in episodes])
    want_timeout = np.concatenate([np.r_[np.zeros(len(e["rewards"]) - 1, bool), not e["terminations"][-1]]
                                   for e in episodes])  # a truncation, or a cut episode
    np.testing.assert_array_equal(data["terminals"], want_term)
    np.testing.assert_array_equal(data["timeouts"], want_timeout)
    lengths = [n for n, _, _ in EPISODES]
    np.testing.assert_array_equal(data["episode_ids"], np.repeat(np.arange(len(lengths)), lengths))
    np.testing.assert_array_equal(data["behaviour"], np.repeat([0, 0, 0, 1, 1], lengths))  # index of the id
    np.testing.assert_array_equal(data["next_observations"][0], episodes[0]["observations"][1])
    np.testing.assert_array_equal(data["observations"][4], episodes[1]["observations"][0])


def test_mc_returns_and_sarsa_targets_follow_the_flags(minari_sets):
    source, episodes = minari_sets
    data, _ = empo_io.load_dataset(source)
    last = np.r_[np.diff(data["episode_ids"]) != 0, True]
    # Eq. (10): the return stops at every episode end, terminal or timeout.
    want = []
    for e in episodes:
        g, out = 0.0, []
        for r in reversed(e["rewards"]):
            g = r + GAMMA * g
            out.append(g)
        want.extend(reversed(out))
    got = ep.mc_returns(jnp.asarray(data["rewards"]), jnp.asarray(last), GAMMA)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Eq. (11): bootstrap through a timeout, never through a terminal (stage 2 sets bootstrap = 1 - terminal).
    q_next = np.arange(2 * len(last), dtype=np.float32).reshape(-1, 2)
    z = np.arange(len(last)) % 2
    target = ep.sarsa_target(jnp.asarray(data["rewards"]), jnp.asarray((~data["terminals"]).astype(np.float32)),
                             jnp.asarray(q_next), jnp.asarray(z), GAMMA)
    for t in range(len(last)):
        boot = 0.0 if data["terminals"][t] else GAMMA * q_next[t, z[t]]
        assert target[t] == pytest.approx(data["rewards"][t] + boot, rel=1e-6), t
    assert np.sum(data["terminals"]) == 2 and np.sum(data["timeouts"]) == 3


@pytest.mark.parametrize("n", [1, 3])
def test_n_step_targets_follow_the_flags(minari_sets, n):
    source, episodes = minari_sets
    data, _ = empo_io.load_dataset(source)
    reward_sum, discount, bootstrap_obs = eh.n_step_returns(
        data["rewards"], data["next_observations"], data["terminals"], data["episode_ids"], GAMMA, n)
    t = 0
    for e in episodes:
        length = len(e["rewards"])
        for i in range(length):
            m = min(n, length - i)
            assert reward_sum[t] == pytest.approx(sum(GAMMA ** j * e["rewards"][i + j] for j in range(m)), rel=1e-5)
            ends_terminal = i + m == length and e["terminations"][-1]
            assert discount[t] == pytest.approx(0.0 if ends_terminal else GAMMA ** m, rel=1e-6)
            np.testing.assert_array_equal(bootstrap_obs[t], e["observations"][i + m])
            t += 1
