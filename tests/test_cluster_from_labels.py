"""scripts/cluster_from_labels.py on a labelled toy data set of two behaviours that any fit at the labels separates
(actions near +0.6 and near -0.6): the fit at the labels and EM from there keep the true partition, the run's own
seeds are scored as the run scored them, and a run whose K differs from the behaviours is refused in one sentence."""

import json

import numpy as np
import pytest
from conftest import load_script

import empo_cluster
import empo_io

SETTINGS = dict(k=2, bias_epochs=1, pretrain_epochs=1, em_epochs=2, hidden_dim=16, hidden_layers=2, batch_size=64,
                log_every=100)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(folder, data set path, cluster.npz of a 2-seed stage-1 run with K = 2, a copy whose args say K = 3)."""
    rng = np.random.default_rng(0)
    episodes, length = 16, 20
    n = episodes * length
    behaviour = np.repeat(np.arange(episodes) % 2, length).astype(np.int32)  # alternate trajectories
    obs = rng.normal(size=(n, 3)).astype(np.float32)
    actions = (np.where(behaviour[:, None] == 0, 0.6, -0.6) + 0.05 * rng.normal(size=(n, 2))).astype(np.float32)
    data = dict(observations=obs, actions=actions, rewards=rng.normal(size=n).astype(np.float32),
                next_observations=np.roll(obs, -1, 0), terminals=np.zeros(n, bool),
                timeouts=np.arange(n) % length == length - 1,
                episode_ids=np.repeat(np.arange(episodes), length).astype(np.int32), behaviour=behaviour)
    folder = tmp_path_factory.mktemp("from_labels")
    path = str(folder / "toy.npz")
    empo_io.save_npz(path, data, empo_io.DATASET_SCHEMA, {})
    cluster = str(folder / "cluster.npz")
    empo_cluster.main(empo_cluster.Args(**SETTINGS, dataset=path, out=cluster, num_seeds=2))
    arrays = dict(np.load(cluster, allow_pickle=False))
    arrays["args"] = np.array(json.dumps({**json.loads(str(arrays["args"])), "k": 3}))
    np.savez(folder / "cluster_k3.npz", **arrays)
    return folder, path, cluster, str(folder / "cluster_k3.npz")


def test_the_fit_at_the_labels_and_em_from_there_keep_the_true_partition(toy):
    folder, _, cluster, _ = toy
    script = load_script("cluster_from_labels")
    result = script.main(script.Args(cluster=cluster, out=str(folder / "report"), num_seeds=2, fit_epochs=150,
                                     em_epochs=3))
    assert result["at_labels"]["rand_index"] == [1.0, 1.0]
    assert result["after_em"]["rand_index"] == [1.0, 1.0]
    assert result["em_rand_index_history"] == [[1.0, 1.0]] * 3
    assert result["fixed_epochs"] == 150 and result["em_epochs"] == 3 and result["seeds"] == [1, 2]
    # EM's objective at the true partition: each policy explains its own behaviour, so the fit is the mixture of two
    # narrow Gaussians; with Q uniform instead of the labels the two policies would be alike and the index 0.5.
    assert all(np.isfinite(result["at_labels"]["fit"])) and all(np.isfinite(result["after_em"]["fit"]))
    assert json.loads((folder / "report.json").read_text()) == json.loads(json.dumps(result))
    report = (folder / "report.md").read_text()
    assert "| fitted at the labels (150 M-epochs, Eq. 6) | 1, 2 | 1.0000, 1.0000 |" in report


def test_the_runs_own_seeds_are_scored_as_the_run_scored_them(toy):
    folder, path, cluster, _ = toy
    script = load_script("cluster_from_labels")
    result = script.main(script.Args(cluster=cluster, out=str(folder / "zero"), num_seeds=2, fit_epochs=0,
                                     em_epochs=0))
    run = dict(np.load(cluster, allow_pickle=False))
    np.testing.assert_allclose(result["run"]["rand_index"], run["rand_index"], rtol=1e-9)
    data, _ = empo_io.load_dataset(path)
    loglik = empo_cluster.trajectory_log_likelihoods(run, data)  # [S, E, K]
    weights = run["posterior"].mean(1)  # [S, K]: p(z)
    with np.errstate(divide="ignore"):  # a cluster that holds no trajectory has p(z) = 0
        by_hand = [sum(np.logaddexp(np.log(weights[s, 0]) + loglik[s, e, 0], np.log(weights[s, 1]) + loglik[s, e, 1])
                       for e in range(loglik.shape[1])) / len(data["rewards"]) for s in range(2)]
    np.testing.assert_allclose(result["run"]["fit"], by_hand, rtol=1e-6)
    assert result["after_em"] == result["at_labels"]  # no epochs after the fit: the same policies


def test_a_run_whose_k_differs_from_the_behaviours_is_refused(toy):
    folder, _, _, cluster_k3 = toy
    script = load_script("cluster_from_labels")
    with pytest.raises(empo_io.InputError, match=r"has K = 3, but .* has 2 behaviours"):
        script.main(script.Args(cluster=cluster_k3, out=str(folder / "k3"), num_seeds=1, fit_epochs=1, em_epochs=1))
    assert not (folder / "k3.md").exists() and not (folder / "k3.json").exists()
