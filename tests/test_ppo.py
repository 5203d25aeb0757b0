"""Stage 2 (empo_ppo.py): equations against NumPy, chunked gradients, a learning test, determinism, bad input."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from np_reference import sha256_file

import empo_cluster as ec
import empo_io
import empo_ppo as ep
import nav_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small navigation data set and a one-run and a two-run stage-1 output made from it."""
    root = tmp_path_factory.mktemp("ppo")
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=4000, log=lambda s: None)
    path = root / "tiny.npz"
    empo_io.save_npz(str(path), data, empo_io.DATASET_SCHEMA, {})
    for seeds in (1, 2):
        ec.main(ec.Args(dataset=str(path), out=str(root / f"cluster{seeds}.npz"), num_seeds=seeds, bias_epochs=1,
                        pretrain_epochs=2, em_epochs=3, hidden_dim=32, log_every=1000))
    return root


def _args(root, out, **kw):
    base = dict(dataset=str(root / "tiny.npz"), cluster=str(root / "cluster1.npz"), out=str(out), q_steps=600,
                steps_per_call=200, v_epochs=1, pi_epochs=2, eval_episodes=3, chunk=2048)
    base.update(kw)
    return ep.Args(**base)


def test_mc_returns_match_a_numpy_loop_with_episode_boundaries():
    rng = np.random.default_rng(0)
    lengths = [1, 5, 3, 7, 2]
    rewards = rng.normal(size=sum(lengths)).astype(np.float32)
    last = np.zeros(sum(lengths), bool)
    last[np.cumsum(lengths) - 1] = True
    gamma = 0.9
    ref, g = np.zeros_like(rewards), 0.0
    for i in reversed(range(len(rewards))):
        g = rewards[i] + (0.0 if last[i] else gamma * g)
        ref[i] = g
    np.testing.assert_allclose(ep.mc_returns(jnp.asarray(rewards), jnp.asarray(last), gamma), ref, rtol=1e-5, atol=1e-5)


def test_sarsa_target_terminal_timeout_and_cluster_head():
    rewards = np.array([-1.0, -2.0, 0.0, -1.0], np.float32)
    bootstrap = np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # row 2 ends in a terminal, row 3 in a timeout
    q_next = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0], [70.0, 80.0]], np.float32)
    z = np.array([1, 0, 1, 0])
    target = ep.sarsa_target(jnp.asarray(rewards), jnp.asarray(bootstrap), jnp.asarray(q_next), jnp.asarray(z), 0.5)
    np.testing.assert_allclose(target, [-1 + 0.5 * 20, -2 + 0.5 * 30, 0.0, -1 + 0.5 * 70])


def test_timeout_rows_get_a_next_action_from_their_clusters_policy():
    policy = ep.GaussianPolicy(2, (0.2, 0.2), 8, 1)
    beta = jax.vmap(policy.init, in_axes=(0, None))(jax.random.split(jax.random.key(0), 2), jnp.zeros((1, 2)))
    n = 6
    data = ep.Data(obs=jnp.zeros((n, 2)), actions=jnp.zeros((n, 2)), rewards=jnp.zeros(n),
                   next_obs=jnp.asarray(np.random.default_rng(1).normal(size=(n, 2)), jnp.float32),
                   next_actions=jnp.full((n, 2), 0.05), bootstrap=jnp.ones(n),
                   timeout_end=jnp.asarray([False, False, True, False, False, True]), returns=jnp.zeros(n))
    assign = jnp.asarray([0, 0, 0, 1, 1, 1])
    fill = jax.jit(ep.make_next_actions(policy, (0.2, 0.2), np.flatnonzero(np.asarray(data.timeout_end))))
    filled = np.asarray(fill(jax.random.key(2), beta, assign, data))
    np.testing.assert_array_equal(filled[[0, 1, 3, 4]], np.float32(0.05))
    assert np.all(np.abs(filled[[2, 5]]) <= 0.2) and not np.any(filled[[2, 5]] == np.float32(0.05))
    # Drawn from the trajectory's cluster: over many draws the mean approaches that policy's mean.
    draws = np.asarray(jax.vmap(fill, in_axes=(0, None, None, None))(jax.random.split(jax.random.key(3), 400),
                                                                     beta, assign, data))
    for row, z in ((2, 0), (5, 1)):
        mean = policy.apply(jax.tree.map(lambda x, z=z: x[z], beta), data.next_obs[row:row + 1])[0][0]
        np.testing.assert_allclose(draws[:, row].mean(0), mean, atol=0.015)


def test_ppo_surrogate_matches_numpy():
    rng = np.random.default_rng(3)
    log_pi, log_beta, adv = (rng.normal(size=50).astype(np.float32) * s for s in (0.5, 0.5, 3.0))
    ratio = np.exp(log_pi - log_beta)
    ref = np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    out = ep.ppo_surrogate(jnp.asarray(log_pi), jnp.asarray(log_beta), jnp.asarray(adv), 0.2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def _ppo_problem(n=1000, k=2):
    rng = np.random.default_rng(4)
    policy, q_net, v_net = ep.make_networks(16, 2, k, 2, (0.2, 0.2))
    keys = jax.random.split(jax.random.key(5), 3)
    beta = jax.vmap(policy.init, in_axes=(0, None))(jax.random.split(keys[0], k), jnp.zeros((1, 2)))
    state = ep.TrainState(q=q_net.init(keys[1], jnp.zeros((1, 4))), q_target=None, q_opt=None,
                          v=v_net.init(keys[2], jnp.zeros((1, 2))), v_opt=None, pi=beta, pi_opt=None,
                          q_step=jnp.int32(0))
    obs = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    data = ep.Data(obs=obs, actions=jnp.zeros((n, 2)), rewards=jnp.zeros(n), next_obs=obs,
                   next_actions=jnp.zeros((n, 2)), bootstrap=jnp.ones(n), timeout_end=jnp.zeros(n, bool),
                   returns=jnp.zeros(n))
    run = with_groups(ep.RunInputs(beta=beta, assign=jnp.asarray(rng.integers(0, k, n), jnp.int32),
                                   next_actions=data.actions), data, k, n)
    return policy, q_net, v_net, state, data, run


def with_groups(run, data, k: int, chunk: int):
    """``run`` with its rows grouped by cluster in chunks of ``chunk`` (ep.cluster_chunks for one run)."""
    groups = ep.cluster_chunks(np.asarray(run.assign)[None], k, chunk)
    return run.replace(groups=tuple(jnp.asarray(x[0]) for x in groups))


def test_chunked_full_batch_gradient_equals_the_one_shot_gradient():
    policy, q_net, v_net, state, data, run = _ppo_problem()
    tx = optax.sgd(1.0)  # the parameter change is then minus the gradient itself
    state = state.replace(pi_opt=tx.init(state.pi))
    # Move pi away from beta first, so that ratios differ from 1 and some rows are clipped.
    state = state.replace(pi=jax.tree.map(lambda x: x + 0.05 * jnp.sign(jnp.sin(jnp.arange(x.size))).reshape(x.shape),
                                          state.pi))
    results = {}
    for chunk in (1000, 250, 100):
        args = ep.Args(chunk=chunk)
        epoch = jax.jit(ep.make_ppo_epoch(args, policy, q_net, v_net, tx, 1000, 2, (0.2, 0.2)))
        new, stats = epoch(state, jax.random.key(6), with_groups(run, data, 2, chunk), data)
        results[chunk] = (jax.tree.map(lambda a, b: a - b, new.pi, state.pi), stats)
    one_shot_grad, one_shot_stats = results[1000]
    assert float(one_shot_stats["clipped"]) > 0  # the clip is active in this problem
    for chunk in (250, 100):
        for a, b in zip(jax.tree.leaves(one_shot_grad), jax.tree.leaves(results[chunk][0])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(results[chunk][1]["surrogate"], one_shot_stats["surrogate"], rtol=1e-4)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(one_shot_grad)) > 0


def _two_cluster_problem(root, episodes=400, length=3, better=(0.1, -0.1)):
    """Trajectories of 3 steps in [0, 1]^2, each run by cluster z (chosen at random per trajectory) with uniform
    actions in [-0.2, 0.2]^2. A step of cluster z costs 10 |a_0 - better[z]|: the clusters' better actions differ
    (a_1 is free). Half the trajectories end in a terminal, half by a timeout, so most rows bootstrap.

    Written with the cluster.npz that stage 1 would give if it found the clusters: the assignments, and for both
    clusters the behaviour's policy beta = N(0, 0.115^2) (the std of the uniform actions) in every state.
    Returns the states.
    """
    rng = np.random.default_rng(7)
    n = episodes * length
    obs = rng.uniform(0, 1, (n, 2)).astype(np.float32)
    actions = rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32)
    z = np.repeat(rng.integers(0, 2, episodes), length).astype(np.int32)
    last = np.arange(n) % length == length - 1
    terminal_episode = np.repeat(np.arange(episodes) % 2 == 0, length)
    data = dict(observations=obs, actions=actions,
                rewards=(-10 * np.abs(actions[:, 0] - np.asarray(better)[z])).astype(np.float32),
                next_observations=rng.uniform(0, 1, (n, 2)).astype(np.float32), terminals=last & terminal_episode,
                timeouts=last & ~terminal_episode, episode_ids=np.repeat(np.arange(episodes), length).astype(np.int32),
                behaviour=z)
    empo_io.save_npz(str(root / "data.npz"), data, empo_io.DATASET_SCHEMA, {})
    action_scale = np.abs(actions).max(0)
    policy = ep.GaussianPolicy(2, tuple(action_scale.tolist()), 32, 2)
    params = policy.init(jax.random.key(0), jnp.zeros((1, 2)))["params"]
    log_std_pre = np.arctanh((np.log(0.115) - ep.LOG_STD_MIN) / (0.5 * (ep.LOG_STD_MAX - ep.LOG_STD_MIN)) - 1.0)
    params["MLP_0"]["Dense_2"] = {"kernel": jnp.zeros((32, 4)),
                                  "bias": jnp.asarray([0.0, 0.0, log_std_pre, log_std_pre])}
    stacked = jax.tree.map(lambda x: jnp.stack([x, x])[None], params)  # [S = 1, K = 2, ...]
    cluster = {**empo_io.flatten_params("policy/params", stacked),
               "posterior": np.eye(2, dtype=np.float32)[z[::length]][None], "assignments": z[None],
               "arch/k": np.int64(2), "arch/obs_dim": np.int64(2), "arch/act_dim": np.int64(2),
               "arch/hidden_dim": np.int64(32), "arch/hidden_layers": np.int64(2),
               "arch/obs_mean": obs.mean(0), "arch/obs_std": obs.std(0) + np.float32(1e-3),
               "arch/action_scale": action_scale, "arch/log_std_range": np.asarray([ep.LOG_STD_MIN, ep.LOG_STD_MAX],
                                                                                   np.float32)}
    empo_io.save_npz(str(root / "cluster.npz"), cluster, "empo/cluster/v1", {},
                {"dataset": empo_io.load_dataset(str(root / "data.npz"))[1]})
    return obs, z


def test_each_clusters_policy_moves_toward_its_own_better_action(tmp_path):
    """K = 2 with bootstrapping rows: pi_L(.|s, 0) moves toward a_0 = +0.1, pi_L(.|s, 1) toward a_0 = -0.1, from the
    same behaviour policy. An advantage from the wrong head, or a wrong sign, moves a policy the wrong way."""
    obs, z = _two_cluster_problem(tmp_path)
    ep.main(ep.Args(dataset=str(tmp_path / "data.npz"), cluster=str(tmp_path / "cluster.npz"),
                    out=str(tmp_path / "ppo.npz"), q_steps=2000, steps_per_call=2000, v_epochs=3, pi_epochs=20,
                    learning_rate=1e-3, eval_episodes=0))
    c, p = np.load(tmp_path / "cluster.npz"), np.load(tmp_path / "ppo.npz")
    policy = ep.GaussianPolicy(2, tuple(p["arch/action_scale"].tolist()), 32, 2)
    norm = (obs - p["arch/obs_mean"]) / p["arch/obs_std"]
    mean = lambda f, prefix, k: np.asarray(policy.apply(
        {"params": jax.tree.map(lambda x: x[0, k], empo_io.unflatten_params(prefix, f))}, norm)[0])
    for k, sign in ((0, 1.0), (1, -1.0)):
        before, after = mean(c, "policy/params", k), mean(p, "pi/params", k)
        np.testing.assert_allclose(before, 0.0, atol=1e-6)  # beta: mean action 0 in every state
        shift = after.mean(0) - before.mean(0)
        assert sign * shift[0] > 0.015, (k, shift)  # toward better[k]
        assert abs(shift[1]) < 0.5 * abs(shift[0]), (k, shift)  # the free dimension moves less


def test_same_seed_same_output_and_vmapped_seeds_are_separate_runs(tiny, tmp_path):
    ep.main(_args(tiny, tmp_path / "a.npz", seed=4, num_seeds=2))
    ep.main(_args(tiny, tmp_path / "b.npz", seed=4, num_seeds=2))
    ep.main(_args(tiny, tmp_path / "c.npz", seed=5, num_seeds=1))
    a, b, c = (np.load(tmp_path / f"{x}.npz") for x in "abc")
    for key in a.files:
        if key != "args":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Run 1 of the vmapped call is the separate run with seed 5, up to float rounding of batched matmuls
    # that Adam amplifies in near-zero gradient entries; the two seeds of one call differ a hundred times more.
    for key in [k for k in a.files if k.startswith(("q/", "v/"))]:
        same = np.linalg.norm(a[key][1] - c[key][0])
        assert same <= 0.01 * np.linalg.norm(a[key][1] - a[key][0]), key
    assert str(a["schema"]) == "empo/ppo/v1" and a["eval/pi_return"].shape == (2, 2, 3)
    assert a["eval/beta_positions"].shape == (2, 2, 3, 1001, 2) and a["eval/pi_length"].shape == (2, 2, 3)
    assert json.loads(str(a["inputs"]))["cluster"] == sha256_file(str(tiny / "cluster1.npz"))


def test_runs_follow_the_clustering_runs_and_k1_works(tiny, tmp_path):
    ep.main(_args(tiny, tmp_path / "two.npz", cluster=str(tiny / "cluster2.npz"), num_seeds=2))
    f = np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(f["cluster_run"], [0, 1])
    # --first-run adds seeds to an earlier run: run 0 of this call improves clustering run 1.
    ep.main(_args(tiny, tmp_path / "more.npz", cluster=str(tiny / "cluster2.npz"), first_run=1, q_steps=0,
                  v_epochs=0, pi_epochs=0, eval_episodes=0))
    np.testing.assert_array_equal(np.load(tmp_path / "more.npz")["cluster_run"], [1])
    ec.main(ec.Args(dataset=str(tiny / "tiny.npz"), out=str(tmp_path / "k1.npz"), k=1, bias_epochs=0,
                    pretrain_epochs=1, em_epochs=1, hidden_dim=32, log_every=1000))
    ep.main(_args(tiny, tmp_path / "ppo_k1.npz", cluster=str(tmp_path / "k1.npz")))
    g = np.load(tmp_path / "ppo_k1.npz")
    assert int(g["arch/k"]) == 1 and g["pi/params/MLP_0/Dense_0/kernel"].shape[:2] == (1, 1)
    assert g["q/params/Dense_3/kernel"].shape[-1] == 1


def test_interrupted_run_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    ep.main(_args(tiny, tmp_path / "full" / "ppo.npz"))
    calls = []

    def interrupt(self, done, **fields):
        calls.append(done)
        if done == 4:  # inside the V epochs, after the SARSA calls
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _args(tiny, tmp_path / "cut" / "ppo.npz")
    with pytest.raises(KeyboardInterrupt):
        ep.main(args)
    assert not (tmp_path / "cut" / "ppo.npz").exists() and (tmp_path / "cut" / "ppo.checkpoint.npz").exists()
    monkeypatch.undo()
    ep.main(dataclasses.replace(args, resume=True))
    full, cut = np.load(tmp_path / "full" / "ppo.npz"), np.load(tmp_path / "cut" / "ppo.npz")
    for key in [k for k in full.files if k.startswith(("pi/", "q/", "v/"))]:
        np.testing.assert_allclose(full[key], cut[key], atol=1e-6, err_msg=key)


def test_a_run_with_a_figure4_sweep_resumes_to_the_uninterrupted_result_and_keeps_its_eval_at(tiny, tmp_path,
                                                                                              monkeypatch):
    """The --eval-at entries a run has passed are part of its checkpoint, written after each epoch's evaluation:
    interrupted right after PPO epoch 1 (and its entry), --resume gives the uninterrupted run's arrays; another
    --eval-at or --eval-episodes on resume is refused in one sentence that names the flag, before any work."""
    full = _args(tiny, tmp_path / "full" / "ppo.npz", eval_at="0,1,2")
    ep.main(full)
    args = _args(tiny, tmp_path / "cut" / "ppo.npz", eval_at="0,1,2")

    def interrupt(self, done, **fields):
        if done == 5:  # 3 SARSA calls, 1 V epoch, PPO epoch 1 and its sweep entry
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ep.main(args)
    monkeypatch.undo()
    for flag, value in (("eval_at", "1,2"), ("eval_episodes", 4)):
        with pytest.raises(empo_io.InputError, match=f"belongs to another run \\(flags.{flag} is "):
            ep.main(dataclasses.replace(args, resume=True, **{flag: value}))
    assert int(np.load(tmp_path / "cut" / "ppo.checkpoint.npz")["unit"]) == 5 and not os.path.exists(args.out)
    ep.main(dataclasses.replace(args, resume=True))
    want, got = np.load(full.out), np.load(args.out)
    for key in [k for k in want.files if k.startswith(("eval/", "pi/", "q/", "v/"))]:
        np.testing.assert_array_equal(want[key], got[key], err_msg=key)
    assert want["eval/sweep_return"].shape == (1, 2, 3, 3)  # [S, K, P, E]
    assert not os.path.exists(tmp_path / "cut" / "ppo.checkpoint.npz")


@pytest.mark.parametrize("case, message", [
    ("other_data", "made from another data set"),
    ("k_mismatch", "arch/k"),
    ("missing_key", "has no key 'assignments'"),
    ("too_many_seeds", "more than the 2 clustering runs"),
    ("nan", "NaN"),
    ("clip", "--clip"),
])
def test_bad_input_gives_one_sentence_and_no_output(tiny, tmp_path, case, message):
    cluster = dict(np.load(tiny / "cluster2.npz"))
    kw = {}
    if case == "other_data":
        cluster["inputs"] = np.array(json.dumps({"dataset": "0" * 64}))
    elif case == "k_mismatch":
        cluster["arch/k"] = np.int64(3)
    elif case == "missing_key":
        del cluster["assignments"]
    elif case == "too_many_seeds":
        kw = dict(num_seeds=4)
    elif case == "nan":
        cluster["policy/params/MLP_0/Dense_0/kernel"][0, 0, 0, 0] = np.nan
    elif case == "clip":
        kw = dict(clip=1.5)
    np.savez(tmp_path / "cluster.npz", **cluster)
    out = tmp_path / "out" / "ppo.npz"
    with pytest.raises(empo_io.InputError, match=message) as err:
        ep.main(_args(tiny, out, cluster=str(tmp_path / "cluster.npz"), **kw))
    assert "\n" not in str(err.value)
    assert not out.exists()
