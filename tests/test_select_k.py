"""Stage 1 with --k auto: the criterion on a synthetic mixture with a known K, the whole run on three
behaviours, and bad input."""

import numpy as np
import pytest

import empo_cluster as ec
import empo_io
import nav_env


def _trajectory_mixture(rng, means, per_behaviour, steps=20, std=0.3):
    """Trajectories of 1-d actions, each drawn by one of len(means) state-free Gaussian policies."""
    labels = np.repeat(np.arange(len(means)), per_behaviour)
    actions = rng.normal(np.asarray(means)[labels][:, None], std, (len(labels), steps))  # [E, T]
    return actions, labels


def _log_normal(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)


def _fit_em(actions, k, rng, iters=100, restarts=5):
    """EM for a mixture of K Gaussian policies over whole trajectories (the model stage 1 fits, without states):
    the best of a few restarts by training likelihood; returns (means, stds, training posterior [E, K])."""
    best = None
    for _ in range(restarts):
        means = rng.choice(actions.mean(1), k, replace=False)
        stds = np.full(k, actions.std())
        for _ in range(iters):
            loglik = _log_normal(actions[:, :, None], means, stds).sum(1)  # [E, K], Eq. (3) numerators
            post = np.exp(loglik - loglik.max(1, keepdims=True))
            post /= post.sum(1, keepdims=True)
            weight = post.sum(0) * actions.shape[1] + 1e-9  # [K] rows per cluster
            means = (post * actions.sum(1, keepdims=True)).sum(0) / weight
            var = (post * ((actions[:, :, None] - means) ** 2).sum(1)).sum(0) / weight
            stds = np.sqrt(np.maximum(var, 1e-4))
        total = np.logaddexp.reduce(loglik, axis=1).sum()
        if best is None or total > best[0]:
            best = (total, means, stds, post)
    return best[1:]


def test_criterion_finds_the_number_of_behaviours_of_a_synthetic_mixture():
    """Three behaviours (action means -1, 0, 1): K = 1 and 2 lose held-out likelihood, K = 4 and 5 gain none; the
    held-out score is the mixture log-likelihood per transition, and the smallest K within the tolerance is 3."""
    rng = np.random.default_rng(0)
    train, _ = _trajectory_mixture(rng, [-1.0, 0.0, 1.0], 30)
    heldout, _ = _trajectory_mixture(rng, [-1.0, 0.0, 1.0], 8)
    scores, empty = [], []
    for k in range(1, 6):
        means, stds, post = _fit_em(train, k, rng)
        loglik = _log_normal(heldout[:, :, None], means, stds).sum(1)[None]  # [S=1, E, K]
        score = ec.heldout_score(loglik, post[None], heldout.size)
        weights = post.mean(0)
        by_hand = np.mean([np.log(np.sum(weights * np.exp(row))) for row in loglik[0]]) / heldout.shape[1]
        assert score[0] == pytest.approx(by_hand, rel=1e-9)
        scores.append(score)
        empty.append([k - len(np.unique(post.argmax(1)))])
    scores, empty = np.array(scores), np.array(empty)
    assert scores[2, 0] - scores[1, 0] > 0.2  # the third behaviour is worth far more than the tolerance
    assert ec.choose_k(scores, empty, tolerance=0.02) == (3, [3])


def test_choose_k_takes_the_smallest_k_within_the_tolerance_counting_collapsed_runs_at_the_clusters_they_use():
    scores = np.array([[-3.0, -3.0], [-2.0, -2.0], [-1.99, -1.5], [-1.98, -1.49]])  # [K_max, S]
    none_empty = np.zeros((4, 2), int)
    per_seed = lambda *a: ec.choose_k(*a)[1].tolist()  # noqa: E731
    assert per_seed(scores, none_empty, 0.05) == [2, 3]
    assert per_seed(scores, none_empty, 0.0) == [4, 4]
    empty = none_empty.copy()
    empty[1] = 1  # the K = 2 runs use one cluster: their scores count for one, and no seed has one for two
    empty[3, 1] = 1  # seed 1's K = 4 run uses three: its score counts for three
    assert per_seed(scores, empty, 0.05) == [1, 3]
    assert per_seed(scores, empty, 0.0) == [4, 3]
    all_in_one = np.array([[0, 0], [1, 1], [2, 2], [3, 3]])  # every run put all trajectories in one cluster
    assert ec.choose_k(scores, all_in_one, 0.02)[0] == 1 and per_seed(scores, all_in_one, 0.02) == [1, 1]


def test_the_data_sets_k_pools_the_seeds_as_restarts():
    """Four behaviours; seed 0 fits four clusters at K = 4, seeds 1 and 2 collapse to three at K = 4 and 5 and
    choose 3 on their own. Pooled, the four-cluster fit of seed 0 beats every three-cluster fit by more than the
    tolerance, so the data set's K is 4, though two of three seeds chose 3 (a vote would say 3)."""
    scores = np.array([[1.6, 1.6, 1.6], [1.9, 1.9, 1.9], [2.0, 2.05, 2.06], [2.2, 2.04, 2.05], [2.21, 2.06, 2.03]])
    empty = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 1], [1, 2, 2]])
    chosen, per_seed = ec.choose_k(scores, empty, 0.02)
    assert chosen == 4 and per_seed.tolist() == [4, 3, 3]
    best = ec.best_by_clusters(scores, empty)
    np.testing.assert_array_equal(best[3], [2.21, -np.inf, -np.inf])  # seed 0's K = 5 run used four
    np.testing.assert_array_equal(best[2], [2.0, 2.06, 2.06])  # the best three-cluster fit of each seed
    assert np.all(best[4] == -np.inf)  # no run used five
    # The pooled rule still takes the smallest k within the tolerance: a four-cluster fit 0.01 above three is not
    # worth a cluster.
    close = scores.copy()
    close[3, 0], close[4, 0] = 2.07, 2.065
    assert ec.choose_k(close, empty, 0.02)[0] == 3


@pytest.fixture(scope="module")
def three_routes_path(tmp_path_factory):
    """nav_env's three routes (--subgoals three): 24,799 transitions, 33 trajectories."""
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=8000, subgoal_lists=nav_env.SUBGOAL_SETS["three"],
                                    log=lambda s: None)
    path = tmp_path_factory.mktemp("select_k") / "three.npz"
    empo_io.save_npz(str(path), data, empo_io.DATASET_SCHEMA, {})
    return path


def _auto_args(dataset, out, **kw):
    """Table 4's networks and a shorter schedule (N_b 3, N_p 10, N_E 20)."""
    base = dict(dataset=str(dataset), out=str(out), k="auto", k_max=4, bias_epochs=3, pretrain_epochs=10,
                em_epochs=20, log_every=1000)
    base.update(kw)
    return ec.Args(**base)


def test_k_auto_chooses_three_on_three_behaviours_and_writes_a_cluster_file(three_routes_path, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "run" / "cluster.npz"
    summary = ec.main(_auto_args(three_routes_path, out))
    f = np.load(out, allow_pickle=False)
    data = empo_io.load_dataset(str(three_routes_path))[0]
    assert summary["k"] == 3 and int(f["arch/k"]) == 3 and f["arch/k"].dtype == np.int64
    assert f["select_k/chosen_per_seed"].tolist() == [3] and int(f["select_k/chosen"]) == 3
    assert all(p.shape[:2] == (1, 3) for key, p in f.items() if key.startswith("policy/params/"))
    assert f[f"classifier/params/Dense_{f['arch/hidden_layers']}/bias"].shape == (1, 3)
    np.testing.assert_array_equal(f["select_k/k"], [1, 2, 3, 4])
    assert f["select_k/heldout_log_likelihood"].shape == (4, 1)
    assert f["rand_index"][0] == 1.0  # the chosen run separates the three routes on every trajectory
    assert f["assignments"].shape == (1, len(data["rewards"]))
    assert f["posterior"].shape == (1, data["episode_ids"][-1] + 1, 3)
    assert str(f["schema"]) == "empo/cluster/v1" and empo_io.load_dataset(str(three_routes_path))[1] in str(f["inputs"])
    heldout = f["select_k/heldout_trajectories"]
    assert 0 < len(heldout) < f["posterior"].shape[1] and len(np.unique(heldout)) == len(heldout)
    for k in range(1, 5):  # every K's run in its own folder, trained on the training trajectories only
        run = np.load(out.parent / "select_k" / f"k{k}" / "cluster.npz")
        assert int(run["arch/k"]) == k and run["posterior"].shape[1] == f["posterior"].shape[1] - len(heldout)
    assert list((out.parent / "select_k").glob("events.out.tfevents.*"))

    # --resume reuses the finished K's (no training at all) and writes the same file.
    def no_training(*a, **kw):
        raise AssertionError("a finished K was trained again")

    monkeypatch.setattr(ec, "make_m_epoch", no_training)
    again = tmp_path / "run" / "again.npz"
    ec.main(_auto_args(three_routes_path, again, resume=True))
    g = np.load(again, allow_pickle=False)
    for key in f.files:
        if key not in ("args", "select_k/seconds"):
            np.testing.assert_array_equal(f[key], g[key], err_msg=key)


@pytest.mark.parametrize("kw, message", [
    (dict(k_max=0), "--k-max must be at least 1"),
    (dict(k_max=10_000), "--k-max 10000 is larger than the"),
    (dict(k_holdout=1.0), "--k-holdout must be in"),
])
def test_bad_k_auto_input_gives_one_sentence_and_no_output(three_routes_path, tmp_path, kw, message):
    out = tmp_path / "out" / "cluster.npz"
    with pytest.raises(empo_io.InputError, match=message) as err:
        ec.main(_auto_args(three_routes_path, out, **kw))
    assert "\n" not in str(err.value)
    assert not out.exists()
