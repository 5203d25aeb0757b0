"""D4RL v2 files: the HDF5 loader (labels, trajectory cuts, flags, dtypes, bad files), the evaluation environment
and reference scores chosen for them, the files scripts/make_d4rl_files.py writes, and scripts/reproduce_table2.sh
end to end on such files down to the table.

Files are written here with h5py in D4RL v2's layout (observations, actions, rewards, next_observations,
terminals, timeouts, plus infos/* and metadata/* that the loader ignores); nothing is downloaded.
"""

import dataclasses
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT, load_script

import empo_cluster as ec
import empo_highlevel as eh
import empo_io
import empo_ppo as ep
import gym_eval

D4RL_REFS = {  # env, obs_dim, act_dim, d4rl/infos.py's REF_MIN_SCORE and REF_MAX_SCORE
    "halfcheetah": ("HalfCheetah-v4", 17, 6, -280.178953, 12135.0),
    "hopper": ("Hopper-v4", 11, 3, -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", 17, 6, 1.629008, 4592.3),
}


def write_d4rl(path, n, terminal_rows=(), timeout_rows=(), obs_dim=3, act_dim=2, seed=0, **override):
    """A D4RL-format file of n rows with the given rows flagged; ``override`` replaces (or, None, drops) keys."""
    rng = np.random.default_rng(seed)
    arrays = dict(observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
                  actions=rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
                  rewards=rng.normal(size=n).astype(np.float32),
                  next_observations=rng.normal(size=(n, obs_dim)).astype(np.float32),
                  terminals=np.isin(np.arange(n), terminal_rows), timeouts=np.isin(np.arange(n), timeout_rows))
    arrays.update(override)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f.create_dataset(key, data=value)
        f.create_dataset("infos/qpos", data=np.zeros((n, 4), np.float32))
        f.create_dataset("metadata/algorithm", data="SAC")
    return {k: v for k, v in arrays.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# The loader (the shared dataset block)
# ----------------------------------------------------------------------------------------------

def test_comma_joined_files_are_labelled_by_file_and_cut_at_every_flag(tmp_path):
    medium = write_d4rl(tmp_path / "hopper_medium-v2.hdf5", 10, [2], [6], seed=1)  # rows 7-9 cut
    expert = write_d4rl(tmp_path / "hopper_expert-v2.hdf5", 6, [5], seed=2)
    source = f"{tmp_path}/hopper_medium-v2.hdf5, {tmp_path}/hopper_expert-v2.hdf5"
    data, digest = empo_io.load_dataset(source)
    np.testing.assert_array_equal(data["episode_ids"], [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(data["behaviour"], [0] * 10 + [1] * 6)
    np.testing.assert_array_equal(np.flatnonzero(data["terminals"]), [2, 15])
    np.testing.assert_array_equal(np.flatnonzero(data["timeouts"]), [6, 9])  # the cut trajectory: a timeout
    for key in ("observations", "actions", "rewards", "next_observations"):  # the file's own s', not a shift
        np.testing.assert_array_equal(data[key], np.concatenate([medium[key], expert[key]]))
    alone, _ = empo_io.load_dataset(f"{tmp_path}/hopper_medium-v2.hdf5")  # one file: no label
    np.testing.assert_array_equal(alone["behaviour"], np.full(10, -1))
    np.testing.assert_array_equal(alone["episode_ids"], [0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    for module in (ec, eh):  # every stage's copy of the loader reads the same arrays
        again, again_digest = module.load_dataset(source)
        assert again_digest == digest and all(np.array_equal(again[k], data[k]) for k in data)


def test_dtypes_and_shapes_of_older_writers_are_read(tmp_path):
    n = 5
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 3))  # float64
    path = tmp_path / "walker2d_medium-v2.hdf5"
    write_d4rl(path, n, observations=obs, next_observations=obs + 1, actions=np.ones((n, 2), np.float64),
               rewards=np.arange(n, dtype=np.float64)[:, None],  # [N, 1]
               terminals=np.array([0, 1, 0, 0, 0], np.float32), timeouts=np.array([0, 0, 0, 0, 1], np.uint8))
    data, _ = empo_io.load_dataset(str(path))
    assert data["observations"].dtype == np.float32 and data["terminals"].dtype == bool
    np.testing.assert_allclose(data["observations"], obs.astype(np.float32))
    np.testing.assert_array_equal(data["rewards"], np.arange(n, dtype=np.float32))
    np.testing.assert_array_equal(data["episode_ids"], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(data["terminals"], [0, 1, 0, 0, 0])


@pytest.mark.parametrize("override, message", [
    (dict(terminal_rows=[3], timeout_rows=[3]), r"x_medium-v2.hdf5: row 3 has both 'terminals' and 'timeouts' set"),
    (dict(timeouts=None), r"x_medium-v2.hdf5 has no key 'timeouts'"),
    (dict(next_observations=None), r"has no key 'next_observations'"),
    (dict(observations=np.where(np.arange(8)[:, None] == 5, np.nan, np.zeros((8, 3), np.float32))),
     r"'observations' contains NaN or infinite values \(row 5\)"),
    (dict(rewards=np.zeros(7, np.float32)), r"'rewards' has shape \(7,\), expected \[8\]"),
    (dict(actions=np.zeros((9, 2), np.float32)), r"'actions' has shape \(9, 2\), expected \[8, 'dim'\]"),
    (dict(next_observations=np.zeros((8, 4), np.float32)), r"'next_observations' has shape \(8, 4\), 'observations'"),
    (dict(terminals=np.full(8, 2, np.int64)), r"'terminals' is 2 at row 0, expected 0 or 1"),
    (dict(observations=np.zeros((0, 3), np.float32)), r"holds no transitions"),
])
def test_bad_files_get_one_sentence_naming_file_key_and_row(tmp_path, override, message):
    path = tmp_path / "x_medium-v2.hdf5"
    write_d4rl(path, 8, **override)
    with pytest.raises(empo_io.InputError, match=message):
        empo_io.load_dataset(str(path))


def test_missing_unreadable_mixed_and_mismatched_sources(tmp_path):
    with pytest.raises(empo_io.InputError, match=r"halfcheetah_expert-v2.hdf5 does not exist; D4RL's copy: "
                       r"http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/halfcheetah_expert-v2.hdf5"):
        empo_io.load_dataset(f"{tmp_path}/halfcheetah_expert-v2.hdf5")
    (tmp_path / "broken.hdf5").write_text("not an HDF5 file")
    with pytest.raises(empo_io.InputError, match="broken.hdf5 is not a readable HDF5 file"):
        empo_io.load_dataset(str(tmp_path / "broken.hdf5"))
    write_d4rl(tmp_path / "a.hdf5", 4, timeout_rows=[3])
    with pytest.raises(empo_io.InputError, match="mixes D4RL .hdf5 files with other sources"):
        empo_io.load_dataset(f"{tmp_path}/a.hdf5,mujoco/hopper/expert-v0")
    write_d4rl(tmp_path / "b.hdf5", 4, obs_dim=5)
    with pytest.raises(empo_io.InputError, match="b.hdf5 has 5-dim observations, .*a.hdf5 has 3"):
        empo_io.load_dataset(f"{tmp_path}/a.hdf5,{tmp_path}/b.hdf5")


def test_a_folder_named_like_a_file_is_called_a_folder_and_a_path_with_commas_is_one_file(tmp_path):
    """Before: the folder was reported as missing, and the path was split at its comma."""
    (tmp_path / "x.hdf5").mkdir()
    with pytest.raises(empo_io.InputError, match=r"x.hdf5 is a folder, not a D4RL HDF5 file"):
        empo_io.load_dataset(str(tmp_path / "x.hdf5"))
    written = write_d4rl(tmp_path / "hopper,medium.hdf5", 4, timeout_rows=[3])
    data, _ = empo_io.load_dataset(str(tmp_path / "hopper,medium.hdf5"))
    np.testing.assert_array_equal(data["actions"], written["actions"])
    assert (data["behaviour"] == -1).all()  # one file, not two


# ----------------------------------------------------------------------------------------------
# The evaluation environment and the reference scores
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(D4RL_REFS))
def test_the_task_in_the_file_names_picks_the_v4_environment_and_d4rls_reference_scores(task):
    env_id, obs_dim, act_dim, lo, hi = D4RL_REFS[task]
    for source in (f"/d/{task}_medium-v2.hdf5,/d/{task}_expert-v2.hdf5", f"/d/{task}_medium_expert-v2.hdf5",
                   f"/d/{task}-medium-expert-v2.hdf5"):
        env = gym_eval.evaluation_env(source, obs_dim)
        assert (env["kind"], env["env_id"], env["ref_min_score"], env["ref_max_score"]) == ("gym", env_id, lo, hi)
    assert json.loads(env["env_spec"])["max_episode_steps"] == 1000  # D4RL's time limit
    out = gym_eval.gym_evaluate(env, lambda obs: np.zeros((len(obs), act_dim)), (1, 2), seed=0)
    np.testing.assert_allclose(out["normalized_score"], 100 * (out["return"] - lo) / (hi - lo))


def test_flags_override_the_environment_and_the_reference_scores(tmp_path):
    env = gym_eval.evaluation_env("/d/hopper_medium-v2.hdf5", 11, -1.0, 1.0)
    assert (env["env_id"], env["ref_min_score"], env["ref_max_score"]) == ("Hopper-v4", -1.0, 1.0)
    env = gym_eval.evaluation_env("/d/my_data.hdf5", 17, eval_env="Walker2d-v4")  # D4RL's walker2d references
    assert (env["env_id"], env["ref_min_score"], env["ref_max_score"]) == ("Walker2d-v4", 1.629008, 4592.3)
    env = gym_eval.evaluation_env("/d/hopper_medium-v2.hdf5", 4, eval_env="InvertedPendulum-v5")
    assert (env["env_id"], env["ref_min_score"]) == ("InvertedPendulum-v5", None)  # not a D4RL task: returns only
    npz = tmp_path / "halfcheetah.npz"
    npz.write_bytes(b"")  # an .npz path: no environment recorded
    assert gym_eval.evaluation_env(str(npz), 17) is None
    assert gym_eval.evaluation_env(str(npz), 17, eval_env="HalfCheetah-v4")["ref_max_score"] == 12135.0


@pytest.mark.parametrize("source, kwargs, message", [
    ("/d/mydata.hdf5", {}, r"cannot be told from the file names .*give --eval-env"),
    ("/d/hopper_medium-v2.hdf5,/d/walker2d_expert-v2.hdf5", {}, r"cannot be told from the file names"),
    ("/d/hopper_medium-v2.hdf5", dict(obs_dim=17), r"Hopper-v4 observes 11 numbers per step, the data set .* 17"),
    ("/d/x.hdf5", dict(eval_env="Cheetah-v9"), r"'Cheetah-v9' is not a registered Gymnasium environment"),
    ("/d/hopper_medium-v2.hdf5", dict(ref_min=0.0), r"give both --ref-min-score and --ref-max-score"),
])
def test_environment_errors_come_before_training(source, kwargs, message):
    kwargs = {"obs_dim": 11, **kwargs}
    with pytest.raises(empo_io.InputError, match=message):
        gym_eval.evaluation_env(source, **kwargs)


# ----------------------------------------------------------------------------------------------
# scripts/make_d4rl_files.py and scripts/reproduce_table2.sh
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(d4rl_files):
    return d4rl_files


def test_generated_files_have_d4rls_layout_and_its_medium_expert_stitching(files):
    with h5py.File(files / "hopper_medium-v2.hdf5") as f:
        assert {k: f[k].dtype for k in ("observations", "terminals", "timeouts", "rewards")} == dict(
            observations=np.float32, terminals=bool, timeouts=bool, rewards=np.float32)
        assert f["observations"].shape == (600, 11) and f["infos/qpos"].shape[0] == 600
        assert not np.any(f["terminals"][()] & f["timeouts"][()])
        last_end = np.flatnonzero(f["terminals"][()] | f["timeouts"][()])[-1]  # as written, before the loader
    pair, _ = empo_io.load_dataset(f"{files}/hopper_medium-v2.hdf5,{files}/hopper_expert-v2.hdf5")
    stitched, _ = empo_io.load_dataset(f"{files}/hopper_medium_expert-v2.hdf5")
    medium = pair["behaviour"] == 0
    assert last_end < 599 and pair["timeouts"][599]  # cut mid-episode at 600 rows: the loader's timeout
    keep = (np.arange(len(medium)) <= last_end) | ~medium  # D4RL: medium up to its last trajectory end + expert
    np.testing.assert_array_equal(stitched["observations"], pair["observations"][keep])
    assert np.all(stitched["behaviour"] == -1)
    lengths = np.bincount(pair["episode_ids"])
    assert lengths.max() == 15 and pair["terminals"].any()  # Hopper falls: terminations as well as timeouts


def test_reproduce_table2_runs_empo_and_the_baselines_on_d4rl_files_down_to_the_table(table2_run, files):
    env, run, out = table2_run
    for step in ("stage 1", "stage 2", "stage 3", "bc", "td3_bc", "iql"):
        assert f"=== hopper {step} took" in out.stdout
    assert "in Hopper-v4" in out.stdout  # the environment from the file names
    load = lambda name: np.load(run / "hopper" / f"{name}.npz", allow_pickle=False)
    cluster, ppo, high = load("cluster"), load("ppo"), load("highlevel")
    args = json.loads(str(high["args"]))
    dataset = f"{files}/hopper_medium-v2.hdf5,{files}/hopper_expert-v2.hdf5"
    assert args["dataset"] == dataset
    assert (args["preset"], args["gamma"], args["expectile"], args["steps"]) == ("d4rl", 0.99, 0.7, 20)
    assert json.loads(str(ppo["args"]))["q_steps"] == 30  # 1.5M x STEP_FRACTION
    assert high["seeds"].tolist() == cluster["seeds"].tolist() == [1, 2]
    lo, hi = D4RL_REFS["hopper"][3:]
    np.testing.assert_allclose(high["eval/normalized_score"], 100 * (high["eval/return"] - lo) / (hi - lo))
    outputs = {"EMPO": high, **{name: load(file) for name, file in (("BC", "bc"), ("TD3+BC", "td3_bc"),
                                                                    ("IQL", "iql"))}}
    for name, f in outputs.items():
        a = json.loads(str(f["args"]))
        assert (a["dataset"], a["preset"], a["steps"], f["seeds"].tolist()) == (dataset, "d4rl", 20, [1, 2]), name
        assert f["eval/normalized_score"].shape == (2, 2)
    table = (run / "table2.md").read_text()
    lines = table.splitlines()
    row = lines[lines.index("| task (medium-expert) | seeds × episodes | EMPO | BC | TD3+BC | IQL |") + 2]
    cell = lambda f, paper: (f"{f['eval/normalized_score'].mean(axis=1).mean():.1f} ± "
                             f"{f['eval/normalized_score'].mean(axis=1).std():.1f} ({paper})")
    assert row == ("| hopper | 2 × 2 | " + " | ".join(cell(outputs[n], p) for n, p in (
        ("EMPO", "110.2"), ("BC", "52.5"), ("TD3+BC", "98.0"), ("IQL", "91.5"))) + " |")
    ri = 100 * cluster["rand_index"]
    assert f"| hopper | {ri.mean():.2f} ± {ri.std():.2f} | 100.00 ± 0.00 |" in table
    runs_row = next(line for line in lines if line.startswith("| hopper | hopper_medium-v2 + hopper_expert-v2 — "))
    assert "this project's linear controllers (scripts/make_d4rl_files.py)" in runs_row
    assert ("1,200 rows; EMPO stage 1: 1 + 1 + 2 epochs (bias, pretraining, EM), hidden 16; stage 2: SARSA 30 steps, "
            "V 1 and π 1 epochs; stage 3: 20 steps; BC, TD3+BC, IQL: 20 steps each; batch 256") in runs_row
    with h5py.File(files / "hopper_expert-v2.hdf5") as f:
        data = {k: f[k][()] for k in ("rewards", "terminals", "timeouts")}
    returns = load_script("make_d4rl_files").episode_returns(data)
    score = 100 * (returns - lo) / (hi - lo)
    assert (f"| hopper | hopper_expert-v2 | 600 | {len(returns)} | {returns.mean():.1f} ± {returns.std():.1f} | "
            f"{score.mean():.1f} ± {score.std():.1f} | linear controller 1") in table
    assert "| hopper | 52.5 | 107.6 | 55.8 | 103.3 | 98.0 | 105.4 | 91.5 | 110.2 |" in table
    assert (run / "table2.png").stat().st_size > 10_000
    joined = subprocess.run([sys.executable, str(ROOT / "scripts" / "table2.py"), "--runs", f"{run},{run}", "--tasks",
                             "hopper", "--out", str(run / "joined")], capture_output=True, text=True, timeout=60)
    assert joined.returncode != 0 and "the runs of hopper repeat seeds [1, 1, 2, 2]" in joined.stderr
    # The same command again finds every output, recomputes nothing, and writes the table again.
    again = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_table2.sh")], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("exists, skipped") == 6 and " took " not in again.stdout
    assert (run / "table2.md").read_text() == table
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_table2.sh")], capture_output=True, text=True,
                         env=dict(env, STEP_FRACTION="-1"), timeout=60)
    assert bad.returncode != 0 and "STEP_FRACTION must be a positive number, got '-1'" in bad.stderr


def test_stages_2_and_3_take_eval_env_and_check_it_before_training(table2_run, files, tmp_path):
    _, run, _ = table2_run
    dataset = f"{files}/hopper_medium-v2.hdf5,{files}/hopper_expert-v2.hdf5"
    for module, extra in ((ep, {}), (eh, dict(ppo=str(run / "hopper" / "ppo.npz")))):
        args = dataclasses.replace(module.PRESETS["d4rl"], dataset=dataset, cluster=str(run / "hopper" / "cluster.npz"),
                                   out=str(tmp_path / "out.npz"), eval_env="HalfCheetah-v4", **extra)
        with pytest.raises(module.InputError, match="HalfCheetah-v4 observes 17 numbers per step, the data set"):
            module.main(args)
        assert not (tmp_path / "out.npz").exists()


def test_reproduce_table2_without_the_files_says_what_to_download_and_runs_nothing(tmp_path):
    env = dict(os.environ, RUN=str(tmp_path / "run"), D4RL_DIR=str(tmp_path / "none"), TASKS="hopper walker2d")
    out = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_table2.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "===" not in out.stdout
    assert (f"error: {tmp_path}/none holds neither hopper_medium-v2.hdf5 and hopper_expert-v2.hdf5 nor "
            f"hopper_medium_expert-v2.hdf5; download them: wget -P {tmp_path}/none "
            "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5") in out.stderr


def test_table2_joins_run_folders_along_seeds_and_leaves_out_an_unknown_rand_index(tmp_path):
    """Two run folders (seeds 1-2 and 3) of a medium_expert file read alone: no labels, so no rand index; no
    baseline was run, so the table has EMPO's column alone and says what the budget was."""
    source = "/d/walker2d_medium_expert-v2.hdf5"
    scores = {1: [10.0, 20.0], 2: [30.0, 50.0], 3: [60.0, 70.0]}
    schedule = dict(bias_epochs=3, pretrain_epochs=20, em_epochs=100, hidden_dim=256, q_steps=1_500_000, v_epochs=40,
                    pi_epochs=100, steps=1_000_000, batch_size=256, dataset=source)
    for run, seeds in (("a", [1, 2]), ("b", [3])):
        folder = tmp_path / run / "walker2d"
        folder.mkdir(parents=True)
        for name in ("cluster", "ppo"):  # no rand_index: unlabelled data
            np.savez(folder / f"{name}.npz", seeds=np.array(seeds), args=np.array(json.dumps(schedule)))
        score = np.array([scores[s] for s in seeds])
        np.savez(folder / "highlevel.npz", seeds=np.array(seeds), args=np.array(json.dumps(schedule)),
                 **{"eval/normalized_score": score, "eval/return": score * 2})
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "table2.py"), "--runs", f"{tmp_path}/a,{tmp_path}/b",
                          "--tasks", "walker2d", "--out", str(tmp_path / "t2")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    per_seed = np.array([15.0, 40.0, 65.0])
    table = (tmp_path / "t2.md").read_text()
    assert f"| walker2d | 3 × 2 | {per_seed.mean():.1f} ± {per_seed.std():.1f} (108.4) |" in table
    assert "| walker2d | – | 99.93 ± 0.08 |" in table
    assert ("| walker2d | walker2d_medium_expert-v2 — files no longer on disk | 0 rows; EMPO stage 1: 3 + 20 + 100 "
            "epochs (bias, pretraining, EM), hidden 256; stage 2: SARSA 1.5M steps, V 40 and π 100 epochs; stage 3: "
            f"1M steps; batch 256 | {2 * per_seed.mean():.1f} ± {2 * per_seed.std():.1f} |") in table
    # A baseline in one run folder but not the other is an error, not a column of fewer seeds.
    np.savez(tmp_path / "a" / "walker2d" / "bc.npz", seeds=np.array([1, 2]), args=np.array(json.dumps(schedule)),
             **{"eval/normalized_score": np.ones((2, 2)), "eval/return": np.ones((2, 2))})
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "table2.py"), "--runs", f"{tmp_path}/a,{tmp_path}/b",
                          "--tasks", "walker2d", "--out", str(tmp_path / "t3")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and f"{tmp_path}/b/walker2d/bc.npz does not exist" in out.stderr
    assert not (tmp_path / "t3.md").exists()
