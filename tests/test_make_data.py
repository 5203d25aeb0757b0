"""behaviour/make_data.py: D4RL v2-layout files recorded from a sac.npz's medium and expert policies.

The sac.npz is made with behaviour/sac.py's own functions from randomly initialised actors (nothing is trained):
three snapshots on InvertedPendulum-v5, whose action scale of 3 exercises bias + scale a, with returns that make
the middle one the medium policy. Episodes are cut at 10 steps so that the files hold terminations (the pole
falls) as well as timeouts.
"""

import dataclasses
import os
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest
from conftest import ROOT

import empo_io
from behaviour import make_data, sac

ENV_ID, ROWS, EPISODE_STEPS = "InvertedPendulum-v5", 3000, 10
FILES = ("medium", "expert", "medium_expert")


def write_sac_npz(path):
    """A sac.npz (empo/sac/v1) of three random actors; snapshot returns 10, 30, 100 make snapshot 1 the medium."""
    args = sac.Args(env_id=ENV_ID, out=str(path), hidden_dim=16, eval_episodes=1, buffer_size=1000)
    env = sac.prepare_env(args)
    nets = sac.make_networks(args.hidden_dim, args.hidden_layers, env["act_dim"])
    init, _ = sac.make_init(args, nets, env["obs_dim"], env["act_dim"])
    states = [jax.device_get(init(jax.random.key(s))) for s in (1, 2, 3)]
    snapshots = sac.Snapshots(actor=jax.tree.map(lambda *x: np.stack(x), *[s.actor for s in states]),
                              returns=np.array([[10.0], [30.0], [100.0]]), lengths=np.ones((3, 1), np.int64))
    arrays = sac.output_arrays(args, env, {"train": states[-1], "snapshots": snapshots}, np.array([1, 2, 3]) * 1000)
    empo_io.save_output(args, arrays, "empo/sac/v1", {})
    return arrays


def read(path):
    with h5py.File(path) as f:
        return {k: f[k][()] for k in _keys(f)}


def _keys(f):
    names = []
    f.visit(lambda name: names.append(name) if isinstance(f[name], h5py.Dataset) else None)
    return names


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(folder, the sac.npz's arrays, Args): the files recorded twice with the same flags (a, b), once with another
    seed (c), once with one copy of the environment instead of three (d)."""
    folder = tmp_path_factory.mktemp("make_data")
    arrays = write_sac_npz(folder / "sac.npz")
    args = make_data.Args(sac=str(folder / "sac.npz"), env_id=ENV_ID, out=str(folder / "a"), rows=ROWS,
                          episode_steps=EPISODE_STEPS, num_envs=3)
    make_data.main(args)
    make_data.main(dataclasses.replace(args, out=str(folder / "b")))
    make_data.main(dataclasses.replace(args, out=str(folder / "c"), seed=1))
    make_data.main(dataclasses.replace(args, out=str(folder / "d"), num_envs=1))
    return folder, arrays, args


def path(folder, sub, name):
    return str(folder / sub / f"invertedpendulum_{name}-v2.hdf5")


def test_files_pass_the_d4rl_loader_as_reproduce_table2_joins_them(made):
    folder, _, _ = made
    pair, _ = empo_io.load_dataset(f"{path(folder, 'a', 'medium')},{path(folder, 'a', 'expert')}")
    assert len(pair["rewards"]) == 2 * ROWS and np.array_equal(np.bincount(pair["behaviour"]), [ROWS, ROWS])
    stitched, _ = empo_io.load_dataset(path(folder, "a", "medium_expert"))
    medium, expert = read(path(folder, "a", "medium")), read(path(folder, "a", "expert"))
    last_end = np.flatnonzero(medium["terminals"] | medium["timeouts"])[-1]  # D4RL's stitch_dataset.py
    np.testing.assert_array_equal(stitched["observations"],
                                  np.concatenate([medium["observations"][:last_end + 1], expert["observations"]]))


def test_keys_dtypes_shapes_and_episode_ends_are_d4rls(made):
    folder, arrays, _ = made
    for name in ("medium", "expert"):
        d = read(path(folder, "a", name))
        assert {k: (d[k].dtype, d[k].shape) for k in ("observations", "next_observations", "actions", "rewards",
                                                      "terminals", "timeouts", "infos/action_log_probs")} == {
            "observations": (np.float32, (ROWS, 4)), "next_observations": (np.float32, (ROWS, 4)),
            "actions": (np.float32, (ROWS, 1)), "rewards": (np.float32, (ROWS,)), "terminals": (bool, (ROWS,)),
            "timeouts": (bool, (ROWS,)), "infos/action_log_probs": (np.float32, (ROWS,))}
        # InvertedPendulum's observation is (qpos, qvel): the simulator state before each step
        np.testing.assert_allclose(np.concatenate([d["infos/qpos"], d["infos/qvel"]], 1), d["observations"],
                                   atol=1e-6)
        # terminated exactly when the pole leaves |angle| <= 0.2 (Gymnasium's InvertedPendulum-v5)
        np.testing.assert_array_equal(d["terminals"], np.abs(d["next_observations"][:, 1]) > 0.2)
        ends = np.flatnonzero(d["terminals"] | d["timeouts"])
        lengths = np.diff(np.r_[-1, ends])
        assert not np.any(d["terminals"] & d["timeouts"]) and d["terminals"].any() and d["timeouts"].any()
        assert np.all(lengths[d["timeouts"][ends]] == EPISODE_STEPS) and lengths.max() == EPISODE_STEPS
        within = np.setdiff1d(np.arange(ROWS - 1), ends)
        np.testing.assert_array_equal(d["next_observations"][within], d["observations"][within + 1])
        starts = ends[:-1] + 1  # a new episode starts after each end: not the previous one's next observation
        assert not np.allclose(d["observations"][starts], d["next_observations"][ends[:-1]])
        assert np.all(np.abs(d["actions"]) <= 3.0)
        returns = np.add.reduceat(d["rewards"].astype(np.float64)[:ends[-1] + 1], np.r_[0, ends[:-1] + 1])
        assert d["metadata/episodes"] == len(ends)
        np.testing.assert_allclose([d["metadata/return_mean"], d["metadata/return_std"]],
                                   [returns.mean(), returns.std()])
        step = arrays["snapshots/step"][1 if name == "medium" else -1]
        assert d["metadata/iteration"] == step


def _actor_np(arrays, prefix, index):
    """(mu, log sigma) of the actor stored under prefix (snapshot ``index`` when given), in NumPy float64."""
    def layer(i):
        w = arrays[f"{prefix}/MLP_0/Dense_{i}/kernel"]
        b = arrays[f"{prefix}/MLP_0/Dense_{i}/bias"]
        return (w, b) if index is None else (w[index], b[index])
    return lambda obs: _forward(obs.astype(np.float64), [layer(i) for i in range(3)])


def _forward(x, layers):
    for w, b in layers[:-1]:
        x = np.maximum(x @ w + b, 0.0)
    out = x @ layers[-1][0] + layers[-1][1]
    act_dim = out.shape[1] // 2
    return out[:, :act_dim], np.clip(out[:, act_dim:], -20.0, 2.0)


def _tanh_gaussian_log_prob(mean, log_std, a):
    """log pi(a|s) of a = tanh(u), u ~ N(mean, exp(log_std)^2): the density of u minus log |da/du|."""
    u = np.arctanh(a)
    log_normal = -0.5 * ((u - mean) / np.exp(log_std)) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
    return np.sum(log_normal - np.log(1.0 - a ** 2), axis=1)


def test_log_probs_are_the_tanh_gaussian_density_of_the_stored_action_under_its_policy(made):
    folder, arrays, _ = made
    scale, bias = arrays["arch/action_scale"], arrays["arch/action_bias"]
    actors = {"medium": _actor_np(arrays, "snapshots/actor/params", 1), "expert": _actor_np(arrays, "actor/params",
                                                                                           None)}
    for name, other in (("medium", "expert"), ("expert", "medium")):
        d = read(path(folder, "a", name))
        a = (d["actions"].astype(np.float64) - bias) / scale  # the policy's action in [-1, 1]
        keep = np.all(np.abs(a) < 0.99, axis=1)  # away from +-1, where arctanh of a float32 action is imprecise
        assert keep.mean() > 0.5
        mine = _tanh_gaussian_log_prob(*actors[name](d["observations"][keep]), a[keep])
        np.testing.assert_allclose(d["infos/action_log_probs"][keep], mine, rtol=1e-3, atol=1e-3)
        theirs = _tanh_gaussian_log_prob(*actors[other](d["observations"][keep]), a[keep])
        assert np.abs(d["infos/action_log_probs"][keep] - theirs).max() > 0.1  # the other policy does not fit


def test_same_flags_give_identical_files_and_another_seed_other_data(made):
    folder, _, _ = made
    for name in FILES:  # byte-identical files (no HDF5 time stamps), arrays and all
        with open(path(folder, "a", name), "rb") as fa, open(path(folder, "b", name), "rb") as fb:
            assert fa.read() == fb.read(), name
        a, c = read(path(folder, "a", name)), read(path(folder, "c", name))
        assert sorted(a) == sorted(c) and not np.array_equal(a["observations"][:100], c["observations"][:100])
        assert not np.array_equal(a["infos/action_log_probs"][:100], c["infos/action_log_probs"][:100])


def test_episodes_do_not_depend_on_the_copy_that_ran_them(made):
    """Episode k's reset seed and noise come from (seed, policy, k): one copy records the same episodes as three,
    up to the float rounding of the policy's batched call (a batch of 1 against 3)."""
    folder, _, _ = made
    for name in FILES:
        a, d = read(path(folder, "a", name)), read(path(folder, "d", name))
        for key in ("terminals", "timeouts"):
            np.testing.assert_array_equal(a[key], d[key])
        for key in ("observations", "actions", "rewards", "infos/action_log_probs"):
            np.testing.assert_allclose(a[key], d[key], rtol=1e-4, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("schema", "has schema 'empo/other/v1', expected 'empo/sac/v1' or 'empo/sac-policies/v1'"),
    ("nothing", "--no-record without --export writes nothing"),
    ("export", "refusing to write .*sac.npz: it is the input"),
    ("env", "was trained in InvertedPendulum-v5, not --env-id Hopper-v4"),
    ("rows", "--rows must be at least 1, got 0"),
    ("index", r"medium/index 7 is not one of its 3 snapshots"),
    ("actor", r"'actor/params/MLP_0/Dense_2/kernel' has shape \(16, 4\) per run, but its arch/\* entries give "
              r"\(16, 2\)"),
])
def test_bad_input_is_one_sentence(made, tmp_path, case, message):
    folder, _, args = made
    other = tmp_path / "other.npz"
    np.savez(other, schema=np.array("empo/other/v1"))
    arrays = dict(np.load(args.sac))
    if case == "index":
        arrays["medium/index"] = np.int64(7)
    if case == "actor":  # an actor of two actions for a task of one
        arrays["actor/params/MLP_0/Dense_2/kernel"] = np.zeros((16, 4), np.float32)
    np.savez(tmp_path / "sac.npz", **arrays)
    kw = {"missing": dict(sac=str(tmp_path / "none.npz")), "schema": dict(sac=str(other)),
          "env": dict(env_id="Hopper-v4"), "rows": dict(rows=0), "index": dict(sac=str(tmp_path / "sac.npz")),
          "actor": dict(sac=str(tmp_path / "sac.npz")), "nothing": dict(record=False),
          "export": dict(export=args.sac)}[case]
    with pytest.raises(empo_io.InputError, match=message) as err:
        make_data.main(dataclasses.replace(args, out=str(tmp_path / "out"), **kw))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_command_line_bad_input_is_one_sentence(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "behaviour", "make_data.py"), "--sac",
                             str(tmp_path / "none.npz"), "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"error: {tmp_path / 'none.npz'} does not exist\n"


def test_exported_policies_are_small_measured_again_and_record_the_same_files(made, tmp_path):
    """--export writes the two actors alone with their returns and the training command; --sac takes that file and
    records the same data as from the run (only metadata/policy_file, the path it came from, differs)."""
    folder, arrays, args = made
    policies = tmp_path / "policies.npz"
    summary = make_data.main(dataclasses.replace(args, out=str(tmp_path / "from_run"), export=str(policies),
                                                 export_episodes=3))
    out = dict(np.load(policies))
    assert str(out["schema"]) == "empo/sac-policies/v1" and os.path.getsize(policies) < 20_000
    assert not any(k.startswith("snapshots/") for k in out)  # two actors, not the run's history
    for key in [k for k in arrays if k.startswith("actor/params/")]:  # expert: the final actor; medium: snapshot 1
        np.testing.assert_array_equal(out[key], arrays[key])
        np.testing.assert_array_equal(out["medium/" + key], arrays["snapshots/" + key][1])
    assert (int(out["medium/step"]), int(out["expert/step"])) == (2000, 3000)
    assert out["medium/return"].shape == out["expert/return"].shape == (3,)
    assert summary["export"] == {name: float(out[f"{name}/return"].mean()) for name in ("medium", "expert")}
    assert str(out["train/command"]).startswith("python behaviour/sac.py ")
    assert f"--env-id {ENV_ID}" in str(out["train/command"]) and "--hidden-dim 16" in str(out["train/command"])
    make_data.main(dataclasses.replace(args, sac=str(policies), out=str(tmp_path / "from_policies")))
    for name in FILES:
        a, b = read(path(tmp_path, "from_run", name)), read(path(tmp_path, "from_policies", name))
        assert sorted(a) == sorted(b)
        for key in a:
            if key != "metadata/policy_file":
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    # Exported again from the exported file: the same actors and the same training command.
    again = tmp_path / "again.npz"
    make_data.main(dataclasses.replace(args, sac=str(policies), export=str(again), export_episodes=3, record=False))
    second = dict(np.load(again))
    assert str(second["train/command"]) == str(out["train/command"])
    np.testing.assert_array_equal(second["expert/return"], out["expert/return"])


@pytest.mark.parametrize("policies", sorted((ROOT / "behaviour" / "policies").glob("*.npz")), ids=lambda p: p.stem)
def test_committed_policies_record_data_in_their_environment(policies, tmp_path):
    """Each committed behaviour/policies/{task}.npz is read as --sac takes it and records a short file pair in the
    environment it names; its stored 20-episode returns are those of the file's own deterministic actors."""
    arrays = dict(np.load(policies, allow_pickle=False))
    env_id = str(arrays["env/id"])
    assert make_data.task_name(env_id) == policies.stem
    summary = make_data.main(make_data.Args(sac=str(policies), env_id=env_id, out=str(tmp_path), rows=300,
                                            num_envs=2))
    for name in ("medium", "expert"):
        with h5py.File(tmp_path / f"{policies.stem}_{name}-v2.hdf5") as f:
            assert f["observations"].shape == (300, arrays["arch/obs_dim"])
    assert summary["medium"]["iteration"] == arrays["medium/step"] < arrays["expert/step"]
    assert arrays["medium/return"].shape == arrays["expert/return"].shape == (20,)
    assert arrays["medium/return"].mean() < arrays["expert/return"].mean()
