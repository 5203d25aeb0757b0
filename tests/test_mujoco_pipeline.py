"""The MuJoCo / D4RL path end to end, offline: a local Minari set from scripts/make_mujoco_set.py (two noisy
linear controllers on InvertedPendulum-v5), stage 1 separating them, the three stages at the D4RL preset with
tiny schedules, and their evaluation in the data set's Gymnasium environment."""

import dataclasses
import importlib.util
import json
import sys

import minari
import numpy as np
import pytest
from conftest import ROOT
from sklearn.metrics import rand_score

import empo_cluster as ec
import empo_highlevel as eh
import empo_io
import empo_ppo as ep
import gym_eval

IDS = "empopipe/pendulum/ctl-b0-v0,empopipe/pendulum/ctl-b1-v0"
EPISODES, STEPS = 10, 1000  # behaviour 1 drops the pole in most episodes: N is about 17,400
SEEDS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The set (10 + 10 episodes, up to 1000 steps) and the three stages run on it, D4RL preset.

    Stage 1 runs Table 4's heuristics (N_b 3, N_p 20) with N_E 30 and hidden 64 on 4 seeds: enough for
    EM to separate the controllers on this small set. Stages 2 and 3 run tiny schedules on those seeds.
    """
    root = tmp_path_factory.mktemp("mujoco")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
    spec = importlib.util.spec_from_file_location("make_mujoco_set", ROOT / "scripts" / "make_mujoco_set.py")
    mms = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mms
    spec.loader.exec_module(mms)
    mms.main(mms.Args(prefix="empopipe/pendulum/ctl", episodes=EPISODES, episode_steps=STEPS, ref_episodes=2))
    tiny = dict(dataset=IDS)
    preset = lambda module, **kw: dataclasses.replace(module.PRESETS["d4rl"], **tiny, **kw)
    ec.main(preset(ec, out=str(root / "cluster.npz"), num_seeds=SEEDS, em_epochs=30, hidden_dim=64,
                   log_every=100))
    ep.main(preset(ep, cluster=str(root / "cluster.npz"), out=str(root / "ppo.npz"),
                   q_steps=100, steps_per_call=50, v_epochs=1, pi_epochs=1, eval_episodes=2, chunk=256))
    eh.main(preset(eh, cluster=str(root / "cluster.npz"), ppo=str(root / "ppo.npz"),
                   out=str(root / "highlevel.npz"), steps=100, steps_per_call=50, eval_episodes=3))
    yield root
    mp.undo()


def refs():
    meta = minari.load_dataset(IDS.split(",")[0], download=False).storage.metadata
    return meta["ref_min_score"], meta["ref_max_score"]


def test_stages_read_the_concatenation_with_labels_and_the_preset(run):
    cluster = np.load(run / "cluster.npz", allow_pickle=False)
    data, _ = empo_io.load_dataset(IDS)
    assert cluster["assignments"].shape == (SEEDS, len(data["behaviour"]))
    assert np.bincount(data["behaviour"])[0] == EPISODES * STEPS  # behaviour 0 never drops the pole
    assert int(cluster["arch/obs_dim"]) == 4 and int(cluster["arch/act_dim"]) == 1
    for name, want in (("ppo.npz", dict(preset="d4rl", gamma=0.99)),
                       ("highlevel.npz", dict(preset="d4rl", gamma=0.99, expectile=0.7))):
        args = json.loads(str(np.load(run / name, allow_pickle=False)["args"]))
        assert {k: args[k] for k in want} == want


def test_stage1_separates_the_two_controllers(run):
    cluster = np.load(run / "cluster.npz", allow_pickle=False)
    data, _ = empo_io.load_dataset(IDS)
    ri = cluster["rand_index"]  # [S], against the labels of the two ids
    assert ri.shape == (SEEDS,) and ri.mean() >= 0.9  # one cluster for both, or a random split: about 0.5
    for s in range(SEEDS):  # the stored rand index is sklearn's, on the stored assignments
        assert ri[s] == pytest.approx(rand_score(data["behaviour"], cluster["assignments"][s]))


def test_stage2_evaluates_every_policy_in_the_environment(run):
    ppo = np.load(run / "ppo.npz", allow_pickle=False)
    lo, hi = refs()
    for name in ("beta", "pi"):
        returns = ppo[f"eval/{name}_return"]
        length, terminated = ppo[f"eval/{name}_length"], ppo[f"eval/{name}_terminated"]
        assert returns.shape == length.shape == (1, 2, 2)  # [S, K, E]: stage 2 runs one seed here
        assert np.all((1 <= length) & (length <= STEPS)) and np.all(terminated == (length < STEPS))
        np.testing.assert_array_equal(returns, length - terminated)  # reward 1 per step, 0 on the fall
        np.testing.assert_allclose(ppo[f"eval/{name}_normalized_score"], 100 * (returns - lo) / (hi - lo))
    assert "eval/pi_positions" not in ppo  # navigation-only arrays stay out


def test_stage3_evaluates_the_final_policy_in_the_environment(run):
    out = np.load(run / "highlevel.npz", allow_pickle=False)
    lo, hi = refs()
    returns = out["eval/return"]
    assert returns.shape == (1, 3)
    np.testing.assert_allclose(out["eval/normalized_score"], 100 * (returns - lo) / (hi - lo))
    np.testing.assert_array_equal(out["eval/cluster_steps"].sum(-1), out["eval/length"])  # pi_H at every step
    length, terminated = out["eval/length"], out["eval/terminated"]
    assert np.all((1 <= length) & (length <= STEPS)) and np.all(terminated == (length < STEPS))
    np.testing.assert_array_equal(returns, length - terminated)  # no step counted after an episode's end


def test_reference_scores_from_flags_override_the_metadata(run, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(run / "minari"))
    env = gym_eval.evaluation_env(IDS, 4, -100.0, 100.0)
    assert env["kind"] == "gym" and env["env_id"] == "InvertedPendulum-v5"
    assert (env["ref_min_score"], env["ref_max_score"]) == (-100.0, 100.0)
    with pytest.raises(empo_io.InputError, match="both --ref-min-score and --ref-max-score"):
        gym_eval.evaluation_env(IDS, 4, -100.0, None)
    with pytest.raises(empo_io.InputError, match="ref_max > ref_min"):
        gym_eval.evaluation_env(IDS, 4, 5.0, 5.0)


def test_a_missing_data_set_fails_before_training_and_names_the_download(run, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(run / "minari"))
    out = tmp_path / "ppo.npz"
    with pytest.raises(empo_io.InputError, match="minari download mujoco/halfcheetah/medium-v0"):
        ep.main(dataclasses.replace(ep.PRESETS["d4rl"], cluster=str(run / "cluster.npz"), out=str(out),
                                    dataset="mujoco/halfcheetah/medium-v0,mujoco/halfcheetah/expert-v0"))
    assert not out.exists()
