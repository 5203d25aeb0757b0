"""scripts/explain_table2.py on the tiny Table 2 run that tests/test_d4rl.py checks (conftest's table2_run: the hopper
files of scripts/make_d4rl_files.py, scripts/reproduce_table2.sh with tiny schedules, 2 seeds), the report's numbers
against direct counts and an independent NumPy recomputation of Q (a forward pass by hand) and of G (a Python loop
over the trajectories)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, load_script

import empo_io


@pytest.fixture(scope="module")
def explained(table2_run, d4rl_files):
    """(task folder, data set, the three files' arrays, explain's result, the report) of the 2-seed tiny run that
    tests/test_d4rl.py checks (conftest's table2_run)."""
    _, folder, _ = table2_run
    run = folder / "hopper"
    explain = load_script("explain_table2")
    result = explain.main(explain.Args(run=str(run), max_rows=500, seed=3))
    arrays = {name: dict(np.load(run / f"{name}.npz", allow_pickle=False)) for name in ("cluster", "ppo", "highlevel")}
    data, _ = empo_io.load_dataset(f"{d4rl_files}/hopper_medium-v2.hdf5,{d4rl_files}/hopper_expert-v2.hdf5")
    return run, data, arrays, result, (run / "explain.md").read_text()


def test_summary_lines_come_first_and_each_seed_has_its_four_sections(explained):
    _, _, arrays, result, report = explained
    seeds = arrays["highlevel"]["seeds"].tolist()
    assert [s["seed"] for s in result["seeds"]] == seeds == [1, 2]
    for seed in seeds:
        summary, section = report.index(f"- seed {seed}: final "), report.index(f"## Seed {seed} ")
        assert summary < report.index("## Seed 1 ") <= section
        for title in ("### 1. Clusters found", "### 2. What stage 2 did", "### 3. Which cluster π_H picks",
                      "### 4. How far SARSA's Q has propagated"):
            assert title in report[section:]


def test_cluster_fractions_and_trajectory_returns_match_a_direct_count(explained):
    _, data, arrays, result, report = explained
    labels, episodes = data["behaviour"], data["episode_ids"]
    for i, numbers in enumerate(result["seeds"]):
        assign = arrays["cluster"]["assignments"][arrays["highlevel"]["cluster_run"][i]]
        trajectory_z = {}  # the majority cluster of each trajectory, by a plain loop
        for e in np.unique(episodes):
            trajectory_z[e] = int(np.argmax(np.bincount(assign[episodes == e], minlength=2)))
        assert sum(c["rows"] for c in numbers["clusters"]) == len(assign)
        assert sum(c["trajectories"] for c in numbers["clusters"]) == len(trajectory_z)
        for z, c in enumerate(numbers["clusters"]):
            mine = assign == z
            assert c["rows"] == mine.sum()
            if c["rows"]:
                assert c["medium"] + c["expert"] == pytest.approx(1.0)
                assert c["medium"] == pytest.approx(np.sum(mine & (labels == 0)) / mine.sum())
                assert c["expert"] == pytest.approx(np.sum(mine & (labels == 1)) / mine.sum())
            held = [e for e, ze in trajectory_z.items() if ze == z]
            assert c["trajectories"] == len(held)
            if held:
                mean_return = np.mean([data["rewards"][episodes == e].sum() for e in held])
                assert c["mean_return"] == pytest.approx(mean_return, rel=1e-5)
                assert (f"| {z} | {c['rows']} | {c['medium']:.3f} | {c['expert']:.3f} | {len(held)} | "
                        f"{mean_return:.1f} |") in report
    rand = arrays["cluster"]["rand_index"]
    assert f"Rand index: {rand[0]:.4f}." in report and f"Rand index: {rand[1]:.4f}." in report


def test_stage_two_and_pi_h_numbers_are_the_files_own(explained):
    _, _, arrays, result, report = explained
    ppo, high = arrays["ppo"], arrays["highlevel"]
    for i, numbers in enumerate(result["seeds"]):
        steps = high["eval/cluster_steps"][i].sum(0)
        np.testing.assert_allclose(numbers["share"], steps / steps.sum())
        assert abs(sum(numbers["share"]) - 1) < 1e-9
        section = report[report.index(f"## Seed {numbers['seed']} "):]
        for z, share in enumerate(steps / steps.sum()):
            assert f"| {z} | {steps[z]} | {share:.1%} |" in section
        score = high["eval/normalized_score"][i]
        assert f"Final policy: normalised score {score.mean():.1f} ± {score.std():.1f}" in section
        p = high["ppo_run"][i]
        beta, pi = ppo["eval/beta_normalized_score"][p, 0], ppo["eval/pi_normalized_score"][p, 0]
        assert (f"| 0 | {beta.mean():.1f} ± {beta.std():.1f} | {pi.mean():.1f} ± {pi.std():.1f} | "
                f"{pi.mean() - beta.mean():+.1f} |") in section


def test_pi_h_shares_sum_over_episodes_of_unequal_mixes(explained, tmp_path):
    """The tiny run's pi_H keeps to one cluster per seed; here each episode mixes the clusters differently."""
    run, _, arrays, _, _ = explained
    shutil.copytree(run, tmp_path / "hopper", ignore=shutil.ignore_patterns("explain.md"))
    steps = np.array([[[3, 1], [0, 6]], [[5, 5], [2, 0]]], np.int64)  # [S, E, K]
    high = {**arrays["highlevel"], "eval/cluster_steps": steps}
    np.savez(tmp_path / "hopper" / "highlevel.npz", **high)
    explain = sys.modules["explain_table2"]
    result = explain.main(explain.Args(run=str(tmp_path / "hopper"), max_rows=50))
    np.testing.assert_allclose(result["seeds"][0]["share"], [3 / 10, 7 / 10])
    np.testing.assert_allclose(result["seeds"][1]["share"], [7 / 12, 5 / 12])
    report = (tmp_path / "hopper" / "explain.md").read_text()
    assert "π_H on z=1 for 70% of steps" in report and "π_H on z=0 for 58% of steps" in report
    assert "| 1 | 7 | 70.0% |" in report and "| 1 | 5 | 41.7% |" in report


def test_final_episodes_split_into_falls_and_full_length(explained, tmp_path):
    """A bimodal final score (some episodes fall, some run to the time limit) is reported as its two groups."""
    run, _, arrays, _, _ = explained
    shutil.copytree(run, tmp_path / "hopper", ignore=shutil.ignore_patterns("explain.md"))
    score = np.array([[30.0, 104.0], [100.0, 110.0]])
    fell = np.array([[True, False], [False, False]])
    np.savez(tmp_path / "hopper" / "highlevel.npz", **{**arrays["highlevel"], "eval/normalized_score": score,
                                                      "eval/terminated": fell})
    explain = sys.modules["explain_table2"]
    explain.main(explain.Args(run=str(tmp_path / "hopper"), max_rows=50))
    report = (tmp_path / "hopper" / "explain.md").read_text()
    assert ("Final policy: normalised score 67.0 ± 37.0 (2 episodes). 1 of 2 episodes ended in a terminal state, "
            "normalised score 30.0 ± 0.0; 1 of 2 ran to the time limit, 104.0 ± 0.0.") in report
    assert ("Final policy: normalised score 105.0 ± 5.0 (2 episodes). 2 of 2 ran to the time limit, "
            "105.0 ± 5.0.") in report


def numpy_q(ppo: dict, p: int, obs, actions):
    """Q(s, a) [R, K] of ppo run p by hand: ReLU layers then a linear one on [(s - mean) / std, a / scale]."""
    x = np.concatenate([(obs - ppo["arch/obs_mean"]) / ppo["arch/obs_std"], actions / ppo["arch/action_scale"]], 1)
    layers = int(ppo["arch/hidden_layers"]) + 1
    for j in range(layers):
        x = x.astype(np.float64) @ ppo[f"q/params/Dense_{j}/kernel"][p] + ppo[f"q/params/Dense_{j}/bias"][p]
        x = np.maximum(x, 0) if j < layers - 1 else x
    return x


def test_q_against_g_matches_an_independent_recomputation(explained):
    _, data, arrays, result, report = explained
    ppo, high = arrays["ppo"], arrays["highlevel"]
    rows = result["rows"]
    assert len(rows) == 500 and len(np.unique(rows)) == 500 and np.all(np.diff(rows) > 0)  # --max-rows 500
    gamma, c = float(ppo["arch/gamma"]), float(ppo["arch/value_scale"])
    rewards, episodes = data["rewards"].astype(np.float64), data["episode_ids"]
    g = np.zeros(len(rewards))
    for e in np.unique(episodes):  # G_t = r_t + gamma G_{t+1}, stopping at the trajectory's end (timeout or not)
        later = 0.0
        for t in np.flatnonzero(episodes == e)[::-1]:
            later = g[t] = rewards[t] + gamma * later
    np.testing.assert_allclose(result["returns"], g, rtol=1e-4, atol=1e-4)
    for i, numbers in enumerate(result["seeds"]):
        p = high["ppo_run"][i]
        z = arrays["cluster"]["assignments"][high["cluster_run"][i]][rows]
        q = numpy_q(ppo, p, data["observations"][rows], data["actions"][rows])[np.arange(len(rows)), z] * c
        np.testing.assert_allclose(numbers["q"]["q"], q, rtol=1e-4, atol=1e-5)
        section = report[report.index(f"## Seed {numbers['seed']} "):]
        for part, keep in (("all", np.ones(len(rows), bool)), ("medium", data["behaviour"][rows] == 0),
                           ("expert", data["behaviour"][rows] == 1)):
            mq, mg, r = q[keep].mean(), g[rows][keep].mean(), np.corrcoef(q[keep], g[rows][keep])[0, 1]
            got = numbers["q"][part]
            assert got["rows"] == keep.sum() > 0
            np.testing.assert_allclose([got["mean_q"], got["mean_g"], got["ratio"], got["corr"]],
                                       [mq, mg, mq / mg, r], rtol=1e-4, atol=1e-5)
            assert f"| {part} | {keep.sum()} | {got['mean_q']:.2f} | {got['mean_g']:.2f} | {got['ratio']:.3f} |" \
                in section


def test_the_fit_of_each_run_is_the_mixture_log_likelihood_of_the_data(explained):
    """Stage 1's objective per row, recomputed row by row with the stage's own policy density and summed per
    trajectory in a Python loop: log sum_z p(z) prod_t beta(a_t|s_t, z) / N, p(z) the mean posterior."""
    import jax.numpy as jnp

    import empo_cluster as ec

    _, data, arrays, result, report = explained
    cluster, high = arrays["cluster"], arrays["highlevel"]
    policy = ec.GaussianPolicy(int(cluster["arch/act_dim"]), tuple(float(x) for x in cluster["arch/action_scale"]),
                               int(cluster["arch/hidden_dim"]), int(cluster["arch/hidden_layers"]))
    obs = (data["observations"] - cluster["arch/obs_mean"]) / cluster["arch/obs_std"]
    for i, numbers in enumerate(result["seeds"]):
        c = int(high["cluster_run"][i])
        params = {"params": empo_io.unflatten_params("policy/params", {k: v[c] for k, v in cluster.items()
                                                                       if k.startswith("policy/params/")})}
        per_row = np.asarray(ec.policy_log_probs(policy, params, jnp.asarray(obs), jnp.asarray(data["actions"])),
                             np.float64)  # [N, K]
        total = 0.0
        weights = np.maximum(cluster["posterior"][c].mean(0), 1e-12)  # an empty cluster: as empo_cluster does
        for e in np.unique(data["episode_ids"]):
            per_cluster = np.log(weights) + per_row[data["episode_ids"] == e].sum(0)
            total += per_cluster.max() + np.log(np.exp(per_cluster - per_cluster.max()).sum())
        assert numbers["fit"] == pytest.approx(total / len(data["rewards"]), rel=1e-4)
        assert f"(log-likelihood {numbers['fit']:.4f} per row)" in report


def test_a_missing_file_or_an_empty_folder_is_one_sentence(explained, tmp_path):
    run = explained[0]
    shutil.copytree(run, tmp_path / "hopper", ignore=shutil.ignore_patterns("ppo.npz", "explain.md"))
    script = str(ROOT / "scripts" / "explain_table2.py")
    out = subprocess.run([sys.executable, script, "--run", str(tmp_path / "hopper")], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"error: {tmp_path}/hopper/ppo.npz does not exist; has scripts/reproduce_table2.sh "
                          "finished this task?\n")
    assert not (tmp_path / "hopper" / "explain.md").exists()
    explain = sys.modules["explain_table2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(empo_io.InputError, match=r"^\S+/empty holds none of cluster.npz, ppo.npz and highlevel.npz; "
                       r"give a task folder of scripts/reproduce_table2.sh such as runs/table2/hopper$"):
        explain.main(explain.Args(run=str(tmp_path / "empty")))
