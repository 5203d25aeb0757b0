"""Stage 3 (empo_highlevel.py): n-step targets and the expectile loss against NumPy, ID(s) and pi_H, the target
refresh, a learning test with a known best cluster, determinism, resume, bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from np_reference import sha256_file

import empo_cluster as ec
import empo_highlevel as eh
import empo_io
import empo_ppo as ep
import nav_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small navigation data set, a two-run stage-1 output and a two-run stage-2 output made from them."""
    root = tmp_path_factory.mktemp("highlevel")
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=4000, log=lambda s: None)
    empo_io.save_npz(str(root / "tiny.npz"), data, empo_io.DATASET_SCHEMA, {})
    ec.main(ec.Args(dataset=str(root / "tiny.npz"), out=str(root / "cluster.npz"), num_seeds=2, bias_epochs=1,
                    pretrain_epochs=2, em_epochs=3, hidden_dim=32, log_every=1000))
    ep.main(ep.Args(dataset=str(root / "tiny.npz"), cluster=str(root / "cluster.npz"), out=str(root / "ppo.npz"),
                    num_seeds=2, q_steps=400, steps_per_call=200, v_epochs=1, pi_epochs=2, eval_episodes=0,
                    chunk=2048))
    return root


def _args(root, out, **kw):
    base = dict(dataset=str(root / "tiny.npz"), cluster=str(root / "cluster.npz"), ppo=str(root / "ppo.npz"),
                out=str(out), seed=4, num_seeds=2, steps=1500, steps_per_call=500, eval_episodes=3)
    base.update(kw)
    return eh.Args(**base)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """One uninterrupted run with the tiny arguments: (path of its highlevel.npz, main's summary)."""
    out = tmp_path_factory.mktemp("full") / "highlevel.npz"
    return out, eh.main(_args(tiny, out))


# ----------------------------------------------------------------------------------------------
# Equations
# ----------------------------------------------------------------------------------------------

def test_n_step_returns_match_a_numpy_loop_with_terminals_and_timeouts():
    rng = np.random.default_rng(0)
    lengths = [1, 2, 5, 3, 4, 1, 6]
    ends_in_terminal = [True, False, True, False, False, False, True]
    n_rows = sum(lengths)
    rewards = rng.normal(size=n_rows).astype(np.float32)
    next_obs = rng.normal(size=(n_rows, 2)).astype(np.float32)
    episode_ids = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    last = np.cumsum(lengths) - 1
    terminals = np.zeros(n_rows, bool)
    terminals[last[ends_in_terminal]] = True
    gamma = 0.9
    for n in (1, 3):
        reward_sum, discount, bootstrap_obs = eh.n_step_returns(rewards, next_obs, terminals, episode_ids, gamma, n)
        for t in range(n_rows):
            end = last[np.searchsorted(last, t)]  # the last row of t's trajectory
            total, stop = 0.0, t
            for j in range(n):
                total += gamma ** j * rewards[t + j]
                stop = t + j
                if t + j == end:
                    break
            m = stop - t + 1
            assert reward_sum[t] == pytest.approx(total, rel=1e-5, abs=1e-6), (n, t)
            assert discount[t] == pytest.approx(0.0 if terminals[stop] else gamma ** m, rel=1e-6), (n, t)
            np.testing.assert_array_equal(bootstrap_obs[t], next_obs[stop])
    # Spot checks of the three cases with n = 3: inside a trajectory, before a terminal, before a timeout.
    reward_sum, discount, bootstrap_obs = eh.n_step_returns(rewards, next_obs, terminals, episode_ids, gamma, 3)
    assert discount[3] == pytest.approx(gamma ** 3)  # rows 3, 4, 5 of the 5-row trajectory, then V_H(s_6)
    assert discount[6] == 0.0 and discount[7] == 0.0  # within 3 rows of its terminal end (row 7)
    assert discount[9] == pytest.approx(gamma ** 2) and np.all(bootstrap_obs[9] == next_obs[10])  # timeout at row 10


def test_expectile_loss_and_value_loss_match_numpy():
    rng = np.random.default_rng(1)
    u = rng.normal(size=200).astype(np.float32)
    for tau in (0.9, 0.3):
        ref = np.where(u >= 0, tau, 1 - tau) * u * u
        np.testing.assert_allclose(eh.expectile_loss(jnp.asarray(u), tau), ref, rtol=1e-6)
    q_bar, v = rng.normal(size=64).astype(np.float32), rng.normal(size=64).astype(np.float32)
    diff = q_bar - v
    np.testing.assert_allclose(eh.vh_loss(jnp.asarray(q_bar), jnp.asarray(v), 0.9),
                               np.mean(np.where(diff >= 0, 0.9, 0.1) * diff ** 2), rtol=1e-5)
    grad_q, grad_v = jax.grad(eh.vh_loss, argnums=(0, 1))(jnp.asarray(q_bar), jnp.asarray(v), 0.9)
    np.testing.assert_array_equal(grad_q, 0.0)  # Q_H(s; psi_bar_H) is a fixed target
    np.testing.assert_allclose(grad_v, -2 * np.where(diff >= 0, 0.9, 0.1) * diff / 64, rtol=1e-5, atol=1e-7)
    # The expectile minimises the loss: with tau = 0.9 the best constant V lies above the mean.
    grid = jnp.linspace(-2, 2, 401)
    best = grid[jnp.argmin(jax.vmap(lambda c: eh.vh_loss(jnp.asarray(u), jnp.full(u.shape, c), 0.9))(grid))]
    assert best > u.mean() + 0.5
    target = jnp.asarray([1.0, -2.0])
    assert float(jax.grad(lambda y: eh.qh_loss(jnp.zeros(2), y))(target).sum()) == 0.0  # y held fixed
    np.testing.assert_allclose(eh.n_step_target(jnp.asarray([-1.0, -2.0]), jnp.asarray([0.5, 0.0]),
                                                jnp.asarray([10.0, 10.0])), [4.0, -2.0])


def test_in_distribution_and_high_level_action_on_hand_made_values():
    q_probs = jnp.asarray([[0.70, 0.20, 0.10],  # max / 5 = 0.14: z = 2 is out
                           [0.50, 0.09, 0.41],  # 0.10: z = 1 is out
                           [0.34, 0.33, 0.33],  # all in
                           [0.97, 0.02, 0.01]])  # only z = 0
    q_h = jnp.asarray([[-5.0, -3.0, 9.0],  # the highest Q_H (z = 2) is excluded by the classifier
                       [-1.0, 0.0, -2.0],  # z = 1 is the best but excluded: z = 0 beats z = 2
                       [-3.0, -2.0, -1.0],
                       [-9.0, 5.0, 7.0]])
    np.testing.assert_array_equal(eh.in_distribution(q_probs, 5.0), [[1, 1, 0], [1, 0, 1], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(eh.high_level_action(q_h, q_probs, 5.0), [1, 0, 2, 0])
    # b = 1 keeps only the classifier's argmax; a huge b admits every cluster (plain argmax of Q_H).
    np.testing.assert_array_equal(eh.high_level_action(q_h, q_probs, 1.0), [0, 0, 0, 0])
    np.testing.assert_array_equal(eh.high_level_action(q_h, q_probs, 1e6), [2, 1, 2, 2])
    # The threshold is inclusive: q(z|s) = max / b is in distribution.
    np.testing.assert_array_equal(eh.in_distribution(jnp.asarray([0.8, 0.2]), 4.0), [True, True])


def test_target_network_is_copied_every_n_h_steps_and_fixed_in_between():
    rng = np.random.default_rng(2)
    n = 64
    data = eh.Data(obs=jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
                   reward_sum=jnp.asarray(rng.normal(size=n), jnp.float32), discount=jnp.full(n, 0.9),
                   bootstrap_obs=jnp.asarray(rng.normal(size=(n, 2)), jnp.float32))
    assign = jnp.asarray(rng.integers(0, 2, n), jnp.int32)
    args = eh.Args(target_every=3, batch_size=16, learning_rate=1e-2)
    nets = eh.make_networks(8, 1, 2, 2, (0.2, 0.2))
    init, tx = eh.make_init(args, nets, 2)
    chunk = jax.jit(eh.make_train_chunk(args, nets, tx, n), static_argnums=4)
    state = init(jax.random.key(0))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(state.qh_target, state.qh)
    history = [state]
    for step in range(1, 8):
        state, _ = chunk(state, jax.random.key(step), assign, data, 1)
        history.append(state)
        assert int(state.step) == step
        assert not same(state.qh, history[step - 1].qh)  # psi_H moves every step
        last_copy = history[3 * (step // 3)].qh  # psi_H right after the latest multiple of n_H
        assert same(state.qh_target, last_copy), step
    # Inside one scanned chunk too: after 6 steps psi_bar_H = psi_H, and one more step leaves it there.
    state_6, metrics = chunk(init(jax.random.key(0)), jax.random.key(99), assign, data, 6)
    assert int(state_6.step) == 6 and same(state_6.qh_target, state_6.qh)
    state_7, _ = chunk(state_6, jax.random.key(100), assign, data, 1)
    assert same(state_7.qh_target, state_6.qh) and not same(state_7.qh_target, state_7.qh)
    assert set(metrics) == {"losses/q_h", "losses/v_h", "charts/q_h_mean", "charts/v_h_mean"}


# ----------------------------------------------------------------------------------------------
# Learning: a problem where the best cluster of every state is known
# ----------------------------------------------------------------------------------------------

def _two_region_problem(root, episodes=600, length=3):
    """Trajectories of 3 steps that stay in one half of [0, 1]^2, run by cluster z (chosen at random).

    Each step costs -1 when z is the better cluster of the half (z = 0 for x < 0.5, z = 1 for x >= 0.5) and
    -3 otherwise; half the trajectories end in a terminal, half by a timeout. Written with a cluster.npz
    (uniform classifier: ID(s) holds both clusters) and a ppo.npz of untrained policies, as stages 1-2 would.
    """
    rng = np.random.default_rng(3)
    n = episodes * length
    right = np.repeat(rng.random(episodes) < 0.5, length)  # the half of each trajectory
    obs = np.stack([np.where(right, rng.uniform(0.5, 1, n), rng.uniform(0, 0.5, n)), rng.uniform(0, 1, n)], 1)
    next_obs = np.stack([np.where(right, rng.uniform(0.5, 1, n), rng.uniform(0, 0.5, n)), rng.uniform(0, 1, n)], 1)
    z = np.repeat(rng.integers(0, 2, episodes), length).astype(np.int32)
    last = np.arange(n) % length == length - 1
    terminal_episode = np.repeat(np.arange(episodes) % 2 == 0, length)
    data = dict(observations=obs.astype(np.float32), actions=rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32),
                rewards=np.where(z == right, -1.0, -3.0).astype(np.float32),
                next_observations=next_obs.astype(np.float32), terminals=last & terminal_episode,
                timeouts=last & ~terminal_episode, episode_ids=np.repeat(np.arange(episodes), length).astype(np.int32),
                behaviour=z)
    empo_io.save_npz(str(root / "regions.npz"), data, empo_io.DATASET_SCHEMA, {})
    data_sha = empo_io.load_dataset(str(root / "regions.npz"))[1]
    nets = eh.make_networks(32, 2, 2, 2, (0.2, 0.2))
    classifier = nets["classifier"].init(jax.random.key(0), jnp.zeros((1, 2)))
    classifier["params"]["Dense_2"] = jax.tree.map(jnp.zeros_like, classifier["params"]["Dense_2"])  # q(z|s) = 1/2
    policies = jax.vmap(nets["policy"].init, in_axes=(0, None))(jax.random.split(jax.random.key(1), 2),
                                                                  jnp.zeros((1, 2)))
    arch = {"arch/k": np.int64(2), "arch/obs_dim": np.int64(2), "arch/act_dim": np.int64(2),
            "arch/hidden_dim": np.int64(32), "arch/hidden_layers": np.int64(2),
            "arch/obs_mean": obs.mean(0).astype(np.float32), "arch/obs_std": obs.std(0).astype(np.float32),
            "arch/action_scale": np.full(2, 0.2, np.float32)}
    cluster = {**empo_io.flatten_params("classifier/params", jax.tree.map(lambda x: x[None], classifier["params"])),
               "assignments": z[None], **arch}
    empo_io.save_npz(str(root / "cluster.npz"), cluster, "empo/cluster/v1", {}, {"dataset": data_sha})
    ppo = {**empo_io.flatten_params("pi/params", jax.tree.map(lambda x: x[None], policies["params"])),
           "cluster_run": np.zeros(1, np.int64), **arch, "arch/value_scale": np.float32(3.0),
           "arch/gamma": np.float32(0.999)}
    empo_io.save_npz(str(root / "ppo.npz"), ppo, "empo/ppo/v1", {},
                {"dataset": data_sha, "cluster": sha256_file(str(root / "cluster.npz"))})
    return arch


def test_pi_h_learns_the_better_cluster_of_each_region(tmp_path):
    arch = _two_region_problem(tmp_path)
    eh.main(eh.Args(dataset=str(tmp_path / "regions.npz"), cluster=str(tmp_path / "cluster.npz"),
                    ppo=str(tmp_path / "ppo.npz"), out=str(tmp_path / "highlevel.npz"), steps=3000,
                    steps_per_call=1000, learning_rate=1e-3, eval_episodes=0))
    f = np.load(tmp_path / "highlevel.npz")
    nets = eh.make_networks(32, 2, 2, 2, (0.2, 0.2))
    first = lambda prefix: {"params": jax.tree.map(lambda x: x[0], empo_io.unflatten_params(prefix, f))}
    run = eh.RunParams(classifier=first("classifier/params"), qh=first("qh/params"), pi=None)
    rng = np.random.default_rng(4)
    states = np.stack([np.r_[rng.uniform(0, 0.4, 200), rng.uniform(0.6, 1, 200)], rng.uniform(0, 1, 400)], 1)
    obs = jnp.asarray((states - arch["arch/obs_mean"]) / arch["arch/obs_std"], jnp.float32)
    best = (states[:, 0] >= 0.5).astype(int)
    chosen = np.asarray(eh.choose_cluster(nets, run, obs, 5.0))
    assert np.mean(chosen == best) > 0.95
    # Q_H in reward units (c = 3 in ppo.npz): the better cluster saves 2 per remaining step of its trajectory,
    # 6, 4 or 2 from its first, second or last row; Q_H sees the state alone, so it learns their mean, 4.
    q_h = np.asarray(nets["qh"].apply(run.qh, obs)) * 3.0
    gap = np.where(best == 1, q_h[:, 1] - q_h[:, 0], q_h[:, 0] - q_h[:, 1])
    assert abs(np.median(gap) - 4.0) < 1.0
    # With a classifier that rules out z = 1 everywhere, pi_H picks z = 0 even where z = 1 is better.
    biased = jax.tree.map(lambda x: x, run.classifier)
    biased["params"]["Dense_2"]["bias"] = jnp.asarray([5.0, 0.0])
    np.testing.assert_array_equal(eh.choose_cluster(nets, run.replace(classifier=biased), obs, 5.0), 0)


# ----------------------------------------------------------------------------------------------
# The pipeline: determinism, runs, resume, bad input
# ----------------------------------------------------------------------------------------------

def test_same_seed_same_output_and_runs_follow_the_ppo_runs(tiny, full_run, tmp_path):
    out, summary = full_run
    eh.main(_args(tiny, tmp_path / "again.npz"))
    a, b = np.load(out), np.load(tmp_path / "again.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if key != "args":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    ppo = np.load(tiny / "ppo.npz")
    assert str(a["schema"]) == "empo/highlevel/v1"
    np.testing.assert_array_equal(a["seeds"], [4, 5])
    np.testing.assert_array_equal(a["ppo_run"], [0, 1])
    np.testing.assert_array_equal(a["cluster_run"], ppo["cluster_run"])
    np.testing.assert_array_equal(a["pi/params/MLP_0/Dense_0/kernel"], ppo["pi/params/MLP_0/Dense_0/kernel"])
    assert a["qh/params/Dense_3/kernel"].shape == (2, 32, 2) and a["vh/params/Dense_3/kernel"].shape == (2, 32, 1)
    assert not np.array_equal(a["qh/params/Dense_3/kernel"][0], a["qh/params/Dense_3/kernel"][1])
    assert a["eval/return"].shape == (2, 3) and a["eval/cluster_steps"].shape == (2, 3, 2)
    np.testing.assert_array_equal(a["eval/cluster_steps"].sum(-1), a["eval/length"])
    assert a["eval/positions"].shape == (2, 3, 1001, 2) and a["eval/positions"].dtype == np.float16
    assert summary["return_mean"] == pytest.approx(float(a["eval/return"].mean()))
    assert len(summary["per_run"]) == 2
    inputs = json.loads(str(a["inputs"]))
    assert inputs["cluster"] == sha256_file(str(tiny / "cluster.npz"))
    assert inputs["ppo"] == sha256_file(str(tiny / "ppo.npz"))
    for name in ("rollouts", "rollouts_runs", "pi_h", "id", "v_h"):
        assert (out.parent / f"highlevel_{name}.png").exists(), name


def test_one_ppo_run_serves_every_seed(tiny, tmp_path):
    ppo = dict(np.load(tiny / "ppo.npz"))
    for key in [k for k in ppo if k.startswith("pi/params/") or k == "cluster_run"]:
        ppo[key] = ppo[key][1:]  # keep ppo run 1 alone (clustering run 1)
    np.savez(tmp_path / "ppo.npz", **ppo)
    eh.main(_args(tiny, tmp_path / "out.npz", ppo=str(tmp_path / "ppo.npz"), steps=0, eval_episodes=0))
    f = np.load(tmp_path / "out.npz")
    np.testing.assert_array_equal(f["ppo_run"], [0, 0])
    np.testing.assert_array_equal(f["cluster_run"], [1, 1])
    # --first-run adds seeds to an earlier run: run 0 of this call uses ppo run 1.
    eh.main(_args(tiny, tmp_path / "more.npz", first_run=1, num_seeds=1, steps=0, eval_episodes=0))
    f = np.load(tmp_path / "more.npz")
    np.testing.assert_array_equal(f["ppo_run"], [1])
    np.testing.assert_array_equal(f["cluster_run"], np.load(tiny / "ppo.npz")["cluster_run"][1:])


def test_interrupted_run_resumes_to_the_same_result(tiny, full_run, tmp_path, monkeypatch, capsys):
    calls = []

    def interrupt(self, done, **fields):
        calls.append(done)
        if done == 2:  # after the second of three chunks
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _args(tiny, tmp_path / "cut" / "highlevel.npz")
    with pytest.raises(KeyboardInterrupt):
        eh.main(args)
    assert not (tmp_path / "cut" / "highlevel.npz").exists()
    assert (tmp_path / "cut" / "highlevel.checkpoint.npz").exists()
    monkeypatch.undo()
    capsys.readouterr()
    eh.main(dataclasses.replace(args, resume=True))
    assert "at unit 2/3" in capsys.readouterr().out  # only the last chunk ran again
    assert not (tmp_path / "cut" / "highlevel.checkpoint.npz").exists()
    full, cut = np.load(full_run[0]), np.load(tmp_path / "cut" / "highlevel.npz")
    for key in [k for k in full.files if k.startswith(("qh/", "vh/", "eval/"))]:
        np.testing.assert_allclose(full[key], cut[key], atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case, message", [
    ("ppo_other_data", "ppo.npz was made from another data set"),
    ("cluster_other_data", "cluster.npz was made from another data set"),
    ("ppo_other_cluster", "made from another cluster file"),
    ("k_mismatch", "has K=1 clusters but"),
    ("k_inconsistent", "'arch/k' is 3 but its arrays hold K=2"),
    ("missing_key", "has no key 'cluster_run'"),
    ("missing_classifier", "has no key 'classifier/params/...'"),
    ("nan", "NaN"),
    ("too_many_seeds", "more than the 2 runs"),
    ("expectile", "--expectile"),
    ("b", "--b"),
])
def test_bad_input_gives_one_sentence_and_no_output(tiny, tmp_path, case, message):
    cluster, ppo = dict(np.load(tiny / "cluster.npz")), dict(np.load(tiny / "ppo.npz"))
    paths = {"cluster": str(tiny / "cluster.npz"), "ppo": str(tiny / "ppo.npz")}
    kw = {}
    if case == "ppo_other_data":
        ppo["inputs"] = np.array(json.dumps({**json.loads(str(ppo["inputs"])), "dataset": "0" * 64}))
    elif case == "cluster_other_data":
        cluster["inputs"] = np.array(json.dumps({"dataset": "0" * 64}))
    elif case == "ppo_other_cluster":
        ppo["inputs"] = np.array(json.dumps({**json.loads(str(ppo["inputs"])), "cluster": "0" * 64}))
    elif case == "k_mismatch":
        for key in [k for k in ppo if k.startswith("pi/params/")]:
            ppo[key] = ppo[key][:, :1]
        ppo["arch/k"] = np.int64(1)
    elif case == "k_inconsistent":
        ppo["arch/k"] = np.int64(3)
    elif case == "missing_key":
        del ppo["cluster_run"]
    elif case == "missing_classifier":
        cluster = {k: v for k, v in cluster.items() if not k.startswith("classifier/")}
    elif case == "nan":
        ppo["pi/params/MLP_0/Dense_0/kernel"][0, 0, 0, 0] = np.nan
    elif case == "too_many_seeds":
        kw = dict(num_seeds=3)
    elif case == "expectile":
        kw = dict(expectile=1.5)
    elif case == "b":
        kw = dict(b=0.0)
    if case.startswith(("cluster_", "missing_classifier")):
        np.savez(tmp_path / "cluster.npz", **cluster)
        paths["cluster"] = str(tmp_path / "cluster.npz")
    elif case.startswith(("ppo_", "k_", "missing_key", "nan")):
        np.savez(tmp_path / "ppo.npz", **ppo)
        paths["ppo"] = str(tmp_path / "ppo.npz")
    out = tmp_path / "out" / "highlevel.npz"
    with pytest.raises(empo_io.InputError, match=message) as err:
        eh.main(_args(tiny, out, **paths, **kw))
    assert "\n" not in str(err.value)
    assert not out.exists() and not (tmp_path / "out" / "highlevel").exists()
