"""Stage 1 (empo_cluster.py): equations against NumPy, clustering, determinism, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, rand_score

import empo_cluster as ec
import empo_io
import nav_env


def _tiny_args(dataset, out, **kw):
    """A short schedule for tests of plumbing (determinism, resume, shapes), not of clustering quality."""
    base = dict(dataset=str(dataset), out=str(out), bias_epochs=1, pretrain_epochs=2, em_epochs=3,
                hidden_dim=32, log_every=1000)
    base.update(kw)
    return ec.Args(**base)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=4000, log=lambda s: None)
    path = tmp_path_factory.mktemp("cluster") / "tiny.npz"
    empo_io.save_npz(str(path), data, empo_io.DATASET_SCHEMA, {})
    return path


def _np_log_normal(mean, log_std, a):
    return np.sum(-0.5 * ((a - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi), axis=-1)


def test_e_step_posterior_matches_numpy():
    rng = np.random.default_rng(0)
    n, k, e = 40, 3, 5
    log_probs = rng.normal(size=(n, k)).astype(np.float32) * 30  # large sums: log space matters
    ids = np.sort(rng.integers(0, e, n)).astype(np.int32)
    log_post, loglik = ec.e_step_log_posterior(jnp.asarray(log_probs), jnp.asarray(ids), e)
    sums = np.stack([log_probs[ids == i].sum(0) for i in range(e)])
    ref = np.exp(sums - sums.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(loglik, sums, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.exp(log_post), ref, atol=1e-5)


def test_padding_rows_are_dropped_from_the_posterior():
    log_probs = jnp.asarray([[0.0, -1.0], [-2.0, 0.0], [100.0, -100.0]])
    log_post, loglik = ec.e_step_log_posterior(log_probs, jnp.asarray([0, 0, 1]), 1)  # id 1 = padding
    np.testing.assert_allclose(loglik, [[-2.0, -1.0]])


def test_m_step_loss_matches_numpy():
    rng = np.random.default_rng(1)
    b, k, act = 16, 2, 3
    policy = ec.GaussianPolicy(act, (0.2, 0.5, 1.0), 8, 2)
    params = jax.vmap(policy.init, in_axes=(0, None))(jax.random.split(jax.random.key(0), k), jnp.zeros((1, 4)))
    obs = rng.normal(size=(b, 4)).astype(np.float32)
    actions = rng.uniform(-0.2, 0.2, size=(b, act)).astype(np.float32)
    weights = rng.dirichlet(np.ones(k), b).astype(np.float32)
    log_probs = ec.policy_log_probs(policy, params, jnp.asarray(obs), jnp.asarray(actions))
    ref_lp = np.zeros((b, k))
    for z in range(k):
        mean, log_std = policy.apply(jax.tree.map(lambda x, z=z: x[z], params), obs)
        assert np.all(np.abs(mean) <= np.array([0.2, 0.5, 1.0]) + 1e-6)
        assert np.all((log_std >= ec.LOG_STD_MIN) & (log_std <= ec.LOG_STD_MAX))
        ref_lp[:, z] = _np_log_normal(np.asarray(mean), np.asarray(log_std), actions)
    np.testing.assert_allclose(log_probs, ref_lp, rtol=1e-5, atol=1e-5)
    loss = ec.m_step_loss(log_probs, jnp.asarray(weights))
    np.testing.assert_allclose(loss, -np.mean(np.sum(weights * ref_lp, 1)), rtol=1e-5)


def test_classifier_kl_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(10, 3)).astype(np.float32)
    weights = rng.dirichlet(np.ones(3), 10).astype(np.float32)
    weights[0] = [1.0, 0.0, 0.0]  # 0 log 0 = 0
    q = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = np.mean([sum(p * np.log(p / qq) for p, qq in zip(w, qi) if p > 0) for w, qi in zip(weights, q)])
    np.testing.assert_allclose(ec.classifier_loss(jnp.asarray(logits), jnp.asarray(weights)), ref, rtol=1e-5)


def test_rand_indices_match_sklearn_and_ignore_cluster_numbering():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 30, 40)
    labels = rng.integers(0, 2, 40)
    assign = np.where(rng.random(40) < 0.8, labels, 1 - labels)
    per_row = lambda x: np.repeat(x, lengths)
    ri, ari = ec.rand_indices(labels, lengths, assign)
    assert ri == pytest.approx(rand_score(per_row(labels), per_row(assign)), abs=1e-12)
    assert ari == pytest.approx(adjusted_rand_score(per_row(labels), per_row(assign)), abs=1e-12)
    assert ec.rand_indices(labels, lengths, 1 - assign) == pytest.approx((ri, ari))
    three = rng.integers(0, 3, 40)
    assert ec.rand_indices(labels, lengths, three)[0] == pytest.approx(rand_score(per_row(labels), per_row(three)))


def test_two_behaviours_are_separated(small_dataset_path, tmp_path):
    """The paper's schedule and sizes (Table 4) on 40k transitions (~63 trajectories): 158 steps an epoch."""
    out = tmp_path / "cluster.npz"
    summary = ec.main(ec.Args(dataset=str(small_dataset_path), out=str(out), num_seeds=2, log_every=1000))
    assert summary["rand_index"] == [1.0, 1.0]
    f = np.load(out, allow_pickle=False)
    assert str(f["schema"]) == "empo/cluster/v1"
    np.testing.assert_array_equal(f["rand_index_history"][:, -1], 1.0)
    data, sha = empo_io.load_dataset(str(small_dataset_path))
    assert f["assignments"].shape == (2, len(data["rewards"]))
    assert f["posterior"].shape == (2, data["episode_ids"][-1] + 1, 2)
    assert sha in str(f["inputs"])
    np.testing.assert_allclose(f["posterior"].sum(-1), 1.0, atol=1e-5)
    assert (out.parent / "cluster").is_dir() and (out.parent / "clusters.png").exists()


def test_same_seed_same_output_and_vmapped_seeds_are_separate_runs(tiny_path, tmp_path):
    ec.main(_tiny_args(tiny_path, tmp_path / "a.npz", seed=4, num_seeds=2))
    ec.main(_tiny_args(tiny_path, tmp_path / "b.npz", seed=4, num_seeds=2))
    ec.main(_tiny_args(tiny_path, tmp_path / "c.npz", seed=5, num_seeds=1))
    a, b, c = (np.load(tmp_path / f"{x}.npz") for x in "abc")
    for key in a.files:
        if key not in ("args",):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(a["assignments"][1], c["assignments"][0])
    np.testing.assert_allclose(a["posterior"][1], c["posterior"][0], atol=1e-4)
    np.testing.assert_allclose(a["policy/params/MLP_0/Dense_0/kernel"][1], c["policy/params/MLP_0/Dense_0/kernel"][0],
                               atol=1e-4)
    assert not np.allclose(a["policy/params/MLP_0/Dense_0/kernel"][0], a["policy/params/MLP_0/Dense_0/kernel"][1])


def test_k1_gives_the_rand_index_of_a_single_cluster(tiny_path, tmp_path):
    summary = ec.main(_tiny_args(tiny_path, tmp_path / "k1.npz", k=1))
    f = np.load(tmp_path / "k1.npz")
    assert np.all(f["assignments"] == 0) and f["posterior"].shape[-1] == 1
    np.testing.assert_array_equal(f["posterior"], 1.0)
    # One cluster: a pair of transitions is counted as agreeing exactly when both come from the same behaviour.
    counts = np.bincount(empo_io.load_dataset(str(tiny_path))[0]["behaviour"]).astype(np.float64)
    n = counts.sum()
    assert summary["rand_index"][0] == pytest.approx(np.sum(counts * (counts - 1)) / (n * (n - 1)), abs=1e-12)
    assert summary["adjusted_rand_index"][0] == pytest.approx(0.0, abs=1e-12)


def test_main_runs_the_heuristics_momentum_and_final_assignment_of_algorithm_1(tiny_path, tmp_path, monkeypatch):
    """What main feeds the training functions, phase by phase (K = 3, mu = 0.6): the one-hot random split
    Q^(-1) in the N_b epochs (Eq. 8), Q^(0) = 1/K in the N_p epochs and as the start of the momentum (Eq. 7), each
    EM epoch's Q^(k) into the next (Eq. 5); then the stored posterior is Eq. (3) at the final parameters
    (NumPy) and the assignments its argmax (Eq. 9)."""
    seen = []
    real_m_epoch, real_em_epoch = ec.make_m_epoch, ec.make_em_epoch
    record = lambda tag: lambda q: seen.append((tag, np.asarray(q)))

    def m_epoch_spy(args, policy, classifier, tx, num_rows, train_classifier):
        epoch = real_m_epoch(args, policy, classifier, tx, num_rows, train_classifier)
        if train_classifier:  # the EM epochs' M-step, seen through em_epoch below
            return epoch

        def spied(state, q, key, data):
            jax.debug.callback(record("m"), q)
            return epoch(state, q, key, data)

        return spied

    def em_epoch_spy(args, e_step, m_epoch):
        epoch = real_em_epoch(args, e_step, m_epoch)

        def spied(state, q_prev, key, data):
            jax.debug.callback(record("em_in"), q_prev)
            out = epoch(state, q_prev, key, data)
            jax.debug.callback(record("em_out"), out[1])
            return out

        return spied

    monkeypatch.setattr(ec, "make_m_epoch", m_epoch_spy)
    monkeypatch.setattr(ec, "make_em_epoch", em_epoch_spy)
    ec.main(_tiny_args(tiny_path, tmp_path / "k3.npz", k=3, bias_epochs=2, pretrain_epochs=2, em_epochs=3,
                       momentum=0.6))
    assert [tag for tag, _ in seen] == ["m"] * 4 + ["em_in", "em_out"] * 3
    (_, split), (_, split_again), (_, uniform), (_, uniform_again) = seen[:4]
    np.testing.assert_array_equal(split, split_again)  # one random split for all N_b epochs
    assert set(np.unique(split)) == {0.0, 1.0} and np.all(split.sum(1) == 1)  # Eq. (8): one-hot per trajectory
    assert set(split.argmax(1)) == {0, 1, 2}
    np.testing.assert_array_equal(uniform, np.float32(1.0 / 3))  # Eq. (7)
    np.testing.assert_array_equal(uniform_again, np.float32(1.0 / 3))
    em = [q for tag, q in seen[4:]]
    np.testing.assert_array_equal(em[0], np.float32(1.0 / 3))  # the momentum starts from Q^(0) = 1/K, not the split
    for k in (1, 2):
        np.testing.assert_array_equal(em[2 * k], em[2 * k - 1])  # Q^(k) carried into the next epoch

    f = np.load(tmp_path / "k3.npz")
    data = empo_io.load_dataset(str(tiny_path))[0]
    obs = (data["observations"] - f["arch/obs_mean"]) / f["arch/obs_std"]
    params = empo_io.unflatten_params("policy/params", f)
    log_probs = np.stack([ref.log_normal(*ref.gaussian_policy(ref.pick(params, (0, z)), obs, f["arch/action_scale"]),
                                         data["actions"]) for z in range(3)], axis=1)  # [N, K]
    sums = np.stack([log_probs[data["episode_ids"] == e].sum(0) for e in range(f["posterior"].shape[1])])
    np.testing.assert_allclose(f["posterior"][0], np.exp(ref.log_softmax(sums)), atol=1e-4)  # Eq. (3)
    np.testing.assert_array_equal(f["assignments"][0], f["posterior"][0].argmax(1)[data["episode_ids"]])  # Eq. (9)
    assert len(np.unique(f["assignments"])) >= 2


@pytest.mark.parametrize("every, units", [(0, [1, 3, 6]), (2, [1, 2, 3, 4, 6])])
def test_checkpoints_after_every_phase_and_every_n_epochs(tiny_path, tmp_path, monkeypatch, every, units):
    """--checkpoint-every 0 writes checkpoints at the phase ends only (N_b = 1, N_p = 2, N_E = 3: epochs 1, 3, 6)."""
    saved = []
    monkeypatch.setattr(ec, "save_checkpoint", lambda path, state, unit, schema, identity: saved.append(unit))
    ec.main(_tiny_args(tiny_path, tmp_path / "cluster.npz", checkpoint_every=every))
    assert saved == units


def test_interrupted_run_resumes_to_the_same_result(tiny_path, tmp_path, monkeypatch):
    ec.main(_tiny_args(tiny_path, tmp_path / "full" / "cluster.npz", checkpoint_every=1))
    calls = []

    def interrupt(self, done, **fields):
        calls.append(done)
        if done == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _tiny_args(tiny_path, tmp_path / "cut" / "cluster.npz", checkpoint_every=1, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        ec.main(args)
    assert not (tmp_path / "cut" / "cluster.npz").exists()
    assert (tmp_path / "cut" / "cluster.checkpoint.npz").exists()
    monkeypatch.undo()
    ec.main(dataclasses.replace(args, resume=True))
    full, cut = np.load(tmp_path / "full" / "cluster.npz"), np.load(tmp_path / "cut" / "cluster.npz")
    np.testing.assert_array_equal(full["assignments"], cut["assignments"])
    np.testing.assert_allclose(full["posterior"], cut["posterior"], atol=1e-6)
    assert not (tmp_path / "cut" / "cluster.checkpoint.npz").exists()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("schema", "has schema"),
    ("k0", "--k must be at least 1"),
    ("k_large", "larger than the"),
    ("nan", "NaN"),
])
def test_bad_input_gives_one_sentence_and_no_output(tiny_path, tmp_path, case, message):
    dataset, kw = tiny_path, {}
    if case == "missing":
        dataset = tmp_path / "nope.npz"
    elif case == "schema":
        dataset = tmp_path / "other.npz"
        np.savez(dataset, schema=np.array("empo/cluster/v1"))
    elif case == "k0":
        kw = dict(k=0)
    elif case == "k_large":
        kw = dict(k=10_000)
    elif case == "nan":
        data = dict(np.load(tiny_path))
        data["observations"][5, 0] = np.nan
        dataset = tmp_path / "nan.npz"
        np.savez(dataset, **data)
    out = tmp_path / "out" / "cluster.npz"
    with pytest.raises(empo_io.InputError, match=message) as err:
        ec.main(_tiny_args(dataset, out, **kw))
    assert "\n" not in str(err.value)
    assert not out.exists()
