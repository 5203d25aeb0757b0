"""Stage 1 with --k auto: the criterion on a synthetic mixture with a known K, the whole run on three
behaviours, and bad input."""

import os
import socket
import subprocess

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
    """Three behaviours (action means -1, 0, 1): K = 1 and 2 lose held-out likelihood on every trajectory of the
    merged behaviours, K = 4 and 5 gain none; the held-out score is the mixture log-likelihood per transition, and
    the smallest K within one standard error of the best is 3."""
    rng = np.random.default_rng(0)
    train, _ = _trajectory_mixture(rng, [-1.0, 0.0, 1.0], 30)
    heldout, _ = _trajectory_mixture(rng, [-1.0, 0.0, 1.0], 8)
    per_trajectory, empty = [], []
    for k in range(1, 6):
        means, stds, post = _fit_em(train, k, rng)
        loglik = _log_normal(heldout[:, :, None], means, stds).sum(1)[None]  # [S=1, E, K]
        weights = post.mean(0)
        by_hand = [np.log(np.sum(weights * np.exp(row))) for row in loglik[0]]
        np.testing.assert_allclose(ec.mixture_log_likelihoods(loglik, post[None])[0], by_hand, rtol=1e-9)
        assert ec.heldout_score(loglik, post[None], heldout.size)[0] == pytest.approx(np.sum(by_hand) / heldout.size)
        per_trajectory.append(ec.mixture_log_likelihoods(loglik, post[None]))
        empty.append([k - len(np.unique(post.argmax(1)))])
    chosen, per_seed, gap, error = ec.choose_k(np.array(per_trajectory), np.array(empty), np.array([0]))
    assert (chosen, per_seed.tolist()) == (3, [3])
    assert gap[1] > 3 * error[1] and gap[2] <= error[2]  # two clusters: several standard errors worse (6.3)


def _runs(gains, noise=0.0, trajectories=12, seed=0):
    """Held-out log-likelihood per run and trajectory [K_max, N=1, E]: a base of -600 nats per trajectory plus,
    for K = k, gains[k - 1] nats on every trajectory (a constant offset), plus independent noise per K and
    trajectory."""
    rng = np.random.default_rng(seed)
    base = -600.0 + rng.normal(0, 50, trajectories)  # trajectories differ far more than the K's do
    return np.stack([base + g + rng.normal(0, noise, trajectories) for g in gains])[:, None, :]


def test_a_behaviour_that_gains_a_few_nats_on_every_trajectory_is_found():
    """The case a fixed tolerance per transition missed: K = 3 gains 2.3 nats on each 600-step trajectory over
    K = 2 (0.004 nats per transition, under the old 0.02), consistently; K = 4 adds nothing but noise. The paired
    rule chooses 3; the spread of whole trajectories (50 nats) cancels in the pairing."""
    per_trajectory = _runs([-200.0, 0.0, 2.3, 2.3], noise=0.5)
    chosen, _, gap, error = ec.choose_k(per_trajectory, np.zeros((4, 1), int), np.array([0]))
    assert chosen == 3
    assert gap[1] == pytest.approx(2.3, abs=0.5) and gap[1] > 5 * error[1]
    assert gap[1] / 600 < 0.02  # what the old tolerance per transition would have accepted


def test_a_gain_within_its_standard_error_is_not_worth_a_cluster():
    """K = 3 scores 0.3 nats per trajectory above K = 2 on average, with a spread of 3 nats between trajectories:
    within one standard error, so 2 is chosen; --k-se 0 takes the best K; a K whose gap is larger than its standard
    error times --k-se is passed over."""
    per_trajectory = _runs([-100.0, 0.0, 0.3, 0.25], noise=3.0, trajectories=20)
    none_empty = np.zeros((4, 1), int)
    chosen, _, gap, error = ec.choose_k(per_trajectory, none_empty, np.array([0]))
    assert chosen == 2 and gap[1] <= error[1]
    best = int(np.argmax(per_trajectory.sum(-1)[:, 0])) + 1
    assert ec.choose_k(per_trajectory, none_empty, np.array([0]), standard_errors=0.0)[0] == best
    assert ec.choose_k(per_trajectory, none_empty, np.array([0]), standard_errors=1e6)[0] == 1


def test_the_data_sets_k_pools_every_run_as_restarts_counting_collapsed_runs_at_the_clusters_they_use():
    """Four behaviours, two seeds with two runs each (owners 0, 1, 0, 1). Only run 2 (seed 0's restart) fits four
    clusters at K = 4, 5 nats per trajectory above every three-cluster fit; the other runs collapse to three. Pooled,
    K = 4; seed 1's own runs choose 3; the runs that used three clusters count there, the K = 5 run of seed 1 with
    two empty clusters counts for three."""
    three = _runs([-300.0, -100.0, 0.0, 0.0, 0.0], noise=0.2)[:, 0]  # [K_max, E]
    per_trajectory = np.repeat(three[:, None], 4, axis=1)  # [K_max, N=4, E]
    per_trajectory[3, 2] += 5.0  # run 2 at K = 4 found the fourth behaviour
    empty = np.array([[0] * 4, [0] * 4, [0] * 4, [1, 1, 0, 1], [2, 2, 2, 2]])
    owners = np.array([0, 1, 0, 1])
    chosen, per_seed, gap, error = ec.choose_k(per_trajectory, empty, owners)
    assert chosen == 4 and per_seed.tolist() == [4, 3]
    assert gap[2] == pytest.approx(5.0, abs=0.5) and gap[3] == 0.0 and gap[4] != gap[4]  # no run used five: NaN
    fits = ec.best_fits(per_trajectory, empty, owners == 1)
    assert 4 not in fits and fits[3][0] in (2, 3, 4)  # seed 1's three-cluster fits include its collapsed K = 4, 5
    # Every run put every trajectory in one cluster: K = 1 whatever the scores.
    all_in_one = np.arange(5)[:, None] + np.zeros((1, 4), int)
    assert ec.choose_k(per_trajectory, all_in_one, owners)[0] == 1


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
    base = dict(dataset=str(dataset), out=str(out), k="auto", k_max=4, k_restarts=2, bias_epochs=3,
                pretrain_epochs=10, em_epochs=20, log_every=1000)
    base.update(kw)
    return ec.Args(**base)


def test_k_auto_chooses_three_on_three_behaviours_and_writes_a_cluster_file(three_routes_path, tmp_path,
                                                                           monkeypatch):
    """One seed with two EM restarts per K (--k-restarts 2): K = 3, the written run separates the routes, and every
    K's runs are in the output's own folder; --resume reuses them and writes the same file."""
    out = tmp_path / "run" / "cluster.npz"
    summary = ec.main(_auto_args(three_routes_path, out))
    with np.load(out, allow_pickle=False) as z:
        f = dict(z)
    data = empo_io.load_dataset(str(three_routes_path))[0]
    assert summary["k"] == 3 and int(f["arch/k"]) == 3 and f["arch/k"].dtype == np.int64
    assert f["select_k/chosen_per_seed"].tolist() == [3] and int(f["select_k/chosen"]) == 3
    assert f["seeds"].tolist() == [1] and f["select_k/run_seeds"].tolist() == [1, 2]  # seed 1 and its restart
    assert f["select_k/source_seed"][0] in (1, 2)
    assert all(p.shape[:2] == (1, 3) for key, p in f.items() if key.startswith("policy/params/"))
    assert f[f"classifier/params/Dense_{f['arch/hidden_layers']}/bias"].shape == (1, 3)
    np.testing.assert_array_equal(f["select_k/k"], [1, 2, 3, 4])
    heldout = f["select_k/heldout_trajectories"]
    assert f["select_k/heldout_log_likelihood"].shape == (4, 2)
    assert f["select_k/heldout_trajectory_log_likelihood"].shape == (4, 2, len(heldout))
    assert f["select_k/gap"][2] == 0.0 and f["select_k/gap"][1] > f["select_k/gap_standard_error"][1]
    assert f["rand_index"][0] == 1.0  # the chosen run separates the three routes on every trajectory
    assert f["assignments"].shape == (1, len(data["rewards"]))
    assert f["posterior"].shape == (1, data["episode_ids"][-1] + 1, 3)
    assert str(f["schema"]) == "empo/cluster/v1" and empo_io.load_dataset(str(three_routes_path))[1] in str(f["inputs"])
    assert 0 < len(heldout) < f["posterior"].shape[1] and len(np.unique(heldout)) == len(heldout)
    folder = out.parent / "cluster.select_k"  # the output's own folder
    for k in range(1, 5):  # every K's runs in their own folder, trained on the training trajectories only
        run = np.load(folder / f"k{k}" / "cluster.npz")
        assert int(run["arch/k"]) == k and run["posterior"].shape[:2] == (2, f["posterior"].shape[1] - len(heldout))
    assert list(folder.glob("events.out.tfevents.*")) and not (folder / "lock").exists()

    # --resume reuses the finished K's (no training at all) and writes the same file.
    def no_training(*a, **kw):
        raise AssertionError("a finished K was trained again")

    monkeypatch.setattr(ec, "make_m_epoch", no_training)
    ec.main(_auto_args(three_routes_path, out, resume=True))
    with np.load(out, allow_pickle=False) as g:
        for key in f:
            if key not in ("args", "select_k/seconds"):
                np.testing.assert_array_equal(f[key], g[key], err_msg=key)


def test_two_k_auto_runs_never_share_a_folder_and_a_split_inside_one_is_not_an_input(three_routes_path, tmp_path):
    """Two --out in one folder get a folder each; a run that finds its folder held by a live process is refused in
    one sentence (the holder's files untouched), one whose holder is gone takes the lock over; --dataset naming a
    file the run would write is refused before anything is written."""
    folder = tmp_path / "a.select_k"
    folder.mkdir()
    (folder / "lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # held by this (live) process
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(empo_io.InputError, match="in use by another run") as err:
        ec.main(_auto_args(three_routes_path, tmp_path / "a.npz", k_max=1, em_epochs=1, pretrain_epochs=1))
    assert "\n" not in str(err.value) and sorted(p.name for p in folder.iterdir()) == before
    assert not (tmp_path / "a.npz").exists()
    dead = _dead_pid()
    (folder / "lock").write_text(f"{socket.gethostname()} {dead}")  # its run was killed
    ec.main(_auto_args(three_routes_path, tmp_path / "a.npz", k_max=1, em_epochs=1, pretrain_epochs=1))
    ec.main(_auto_args(three_routes_path, tmp_path / "b.npz", k_max=1, em_epochs=1, pretrain_epochs=1))
    assert not (folder / "lock").exists() and (tmp_path / "b.select_k" / "k1" / "cluster.npz").exists()
    split = folder / "train.npz"
    kept = split.read_bytes()
    with pytest.raises(empo_io.InputError, match="it is the input"):
        ec.main(_auto_args(split, tmp_path / "a.npz", k_max=1, em_epochs=1, pretrain_epochs=1))
    assert split.read_bytes() == kept


def _dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("kw, message", [
    (dict(k_max=0), "--k-max must be at least 1"),
    (dict(k_max=10_000), "--k-max 10000 is larger than the"),
    (dict(k_holdout=1.0), "--k-holdout must be in"),
    (dict(k_holdout=0.01), "--k-holdout 0.01 holds out 1 of the"),
    (dict(k_se=-1.0), "--k-se must be at least 0"),
    (dict(k_restarts=0), "--k-restarts must be at least 1"),
])
def test_bad_k_auto_input_gives_one_sentence_and_no_output(three_routes_path, tmp_path, kw, message):
    out = tmp_path / "out" / "cluster.npz"
    with pytest.raises(empo_io.InputError, match=message) as err:
        ec.main(_auto_args(three_routes_path, out, **kw))
    assert "\n" not in str(err.value)
    assert not out.exists()
