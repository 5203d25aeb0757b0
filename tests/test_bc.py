"""Behaviour cloning (baselines/bc.py): the loss against NumPy, the output contract, determinism, a learning test
(the mean action of Figure 1b), resume and bad input."""

import ast
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_halfcheetah_evaluation

import empo_io
import nav_env
from baselines import bc

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small navigation data set (both behaviours, about 9k rows) as an .npz file."""
    root = tmp_path_factory.mktemp("bc")
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=4000, log=lambda s: None)
    empo_io.save_npz(str(root / "tiny.npz"), data, empo_io.DATASET_SCHEMA, {})
    return root


def _args(root, out, **kw):
    base = dict(dataset=str(root / "tiny.npz"), out=str(out), seed=4, num_seeds=2, steps=1800, steps_per_call=600,
                learning_rate=1e-3, hidden_dim=32, eval_episodes=3)
    base.update(kw)
    return bc.Args(**base)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """One uninterrupted run with the tiny arguments (enough steps for the learning test): (bc.npz, summary)."""
    out = tmp_path_factory.mktemp("full") / "bc.npz"
    return out, bc.main(_args(tiny, out))


def _policy(f, run: int = 0):
    """The Gaussian policy of one run of a bc.npz, as (module, params)."""
    policy = bc.GaussianPolicy(int(f["arch/act_dim"]), tuple(f["arch/action_scale"].tolist()),
                               int(f["arch/hidden_dim"]), int(f["arch/hidden_layers"]))
    return policy, {"params": jax.tree.map(lambda x: x[run], empo_io.unflatten_params("policy/params", f))}


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------

def test_bc_loss_and_its_gradient_match_numpy():
    mean = np.array([[0.1, -0.2], [0.0, 0.05], [-0.15, 0.2]], np.float32)
    log_std = np.array([[-1.0, -2.0], [0.0, -3.0], [-0.5, -0.5]], np.float32)
    actions = np.array([[0.2, -0.2], [0.1, 0.0], [-0.2, 0.15]], np.float32)
    std = np.exp(log_std)
    log_prob = np.sum(-0.5 * ((actions - mean) / std) ** 2 - log_std - 0.5 * np.log(2 * np.pi), axis=1)  # [B]
    args = (jnp.asarray(mean), jnp.asarray(log_std), jnp.asarray(actions))
    np.testing.assert_allclose(bc.bc_loss(*args), -log_prob.mean(), rtol=1e-6)
    # d/dmu = -(a - mu) / sigma^2 / B and d/dlog_sigma = (1 - (a - mu)^2 / sigma^2) / B.
    grad_mean, grad_log_std = jax.grad(bc.bc_loss, argnums=(0, 1))(*args)
    np.testing.assert_allclose(grad_mean, -(actions - mean) / std ** 2 / 3, rtol=1e-5)
    np.testing.assert_allclose(grad_log_std, (1 - (actions - mean) ** 2 / std ** 2) / 3, rtol=1e-5, atol=1e-7)
    # The best Gaussian at a state where two behaviours act in opposite directions has the mean of their actions.
    two = jnp.asarray([[0.0, 0.2], [0.0, -0.2], [0.0, 0.2]], jnp.float32)
    grid = jnp.linspace(-0.2, 0.2, 401)
    nll = jax.jit(jax.vmap(lambda m: bc.bc_loss(jnp.stack([jnp.zeros(3), jnp.full(3, m)], 1), jnp.full((3, 2), -1.0),
                                                two)))
    assert float(grid[jnp.argmin(nll(grid))]) == pytest.approx(0.2 / 3, abs=1e-3)


# ----------------------------------------------------------------------------------------------
# The output contract, determinism, learning
# ----------------------------------------------------------------------------------------------

def test_output_has_the_schema_shapes_and_figures(tiny, full_run):
    out, summary = full_run
    f = np.load(out, allow_pickle=False)
    assert str(f["schema"]) == "empo/bc/v1"
    np.testing.assert_array_equal(f["seeds"], [4, 5])
    assert f["policy/params/MLP_0/Dense_0/kernel"].shape == (2, 2, 32)
    assert f["policy/params/MLP_0/Dense_3/kernel"].shape == (2, 32, 4)  # 3 hidden layers, then mean and log-std
    assert int(f["arch/hidden_dim"]) == 32 and int(f["arch/hidden_layers"]) == 3
    data, data_sha = empo_io.load_dataset(str(tiny / "tiny.npz"))
    np.testing.assert_allclose(f["arch/obs_mean"], data["observations"].astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(f["arch/obs_std"], data["observations"].astype(np.float64).std(0) + 1e-3, rtol=1e-6)
    np.testing.assert_array_equal(f["arch/action_scale"], np.abs(data["actions"]).max(0))
    assert json.loads(str(f["inputs"])) == {"dataset": data_sha}
    assert json.loads(str(f["args"]))["steps"] == 1800
    for name in ("return", "goal", "penalty_steps", "length", "optimal_route"):
        assert f[f"eval/{name}"].shape == (2, 3), name
    positions, length = f["eval/positions"], f["eval/length"]
    assert positions.shape == (2, 3, 1001, 2) and positions.dtype == np.float16
    # Fields in their places: -1 per step, -1 more per step in S_p, 0 for the goal step; paths frozen after the end.
    np.testing.assert_array_equal(f["eval/return"], -(length - f["eval/goal"]) - f["eval/penalty_steps"])
    assert np.all(f["eval/optimal_route"] <= f["eval/goal"])
    for i in range(2):
        for e in range(3):
            assert np.all(positions[i, e, length[i, e]:] == positions[i, e, length[i, e]])
    assert summary["return_mean"] == pytest.approx(float(f["eval/return"].mean()))
    assert len(summary["per_run"]) == 2
    assert summary["per_run"][1]["goal_rate"] == pytest.approx(float(f["eval/goal"][1].mean()))
    for name in ("bc_rollouts.png", "bc_action_field.png"):
        assert (out.parent / name).stat().st_size > 10_000, name
    assert any(p.name.startswith("events.out.tfevents") for p in (out.parent / "bc").iterdir())
    assert not (out.parent / "bc.checkpoint.npz").exists()


def test_same_seed_same_output_and_the_runs_differ(tiny, full_run, tmp_path):
    again = tmp_path / "again" / "bc.npz"
    bc.main(_args(tiny, again))
    a, b = np.load(full_run[0]), np.load(again)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if key != "args":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in [k for k in a.files if k.startswith("policy/params/")]:
        assert not np.array_equal(a[key][0], a[key][1]), key  # two seeds, two different networks
    assert not np.array_equal(a["eval/positions"][0], a["eval/positions"][1])


def test_bc_learns_the_data_and_averages_where_the_behaviours_conflict(tiny, full_run):
    f = np.load(full_run[0])
    policy, params = _policy(f, run=0)
    data = empo_io.load_dataset(str(tiny / "tiny.npz"))[0]
    obs = jnp.asarray((data["observations"] - f["arch/obs_mean"]) / f["arch/obs_std"])
    mean, log_std = jax.jit(policy.apply)(params, obs)  # [N, 2] each
    log_lik = -float(bc.bc_loss(mean, log_std, jnp.asarray(data["actions"])))
    # The best state-blind Gaussian (the actions' mean and std) is beaten by a margin: the policy uses the state.
    a = data["actions"].astype(np.float64)
    blind = np.mean(np.sum(-0.5 * ((a - a.mean(0)) / a.std(0)) ** 2 - np.log(a.std(0)) - 0.5 * np.log(2 * np.pi), 1))
    assert log_lik > blind + 0.3
    mean = np.asarray(mean)
    # Where one behaviour acts alone (beta_0 up the left edge, beta_1 right along the bottom) the mean action is
    # that behaviour's mean action; on x = 10 and x = 20 below y = 15 they move in opposite directions, and the
    # mean action shrinks to their average (Figure 1b).
    x, y = data["observations"][:, 0], data["observations"][:, 1]
    alone = {"beta_0": (x < 1) & (y > 3) & (y < 27), "beta_1": (y < 1) & (x > 2) & (x < 8)}
    for name, rows in alone.items():
        assert len(np.unique(data["behaviour"][rows])) == 1 and rows.sum() > 100, name
        np.testing.assert_allclose(mean[rows].mean(0), data["actions"][rows].mean(0), atol=0.03, err_msg=name)
        assert np.linalg.norm(mean[rows], axis=1).mean() > 0.12, name
    conflict = ((np.abs(x - 10) < 0.5) | (np.abs(x - 20) < 0.5)) & (y > 2) & (y < 13)
    assert set(np.unique(data["behaviour"][conflict])) == {0, 1}
    assert np.linalg.norm(mean[conflict], axis=1).mean() < 0.06


# ----------------------------------------------------------------------------------------------
# Resume, bad input, the command line
# ----------------------------------------------------------------------------------------------

def test_interrupted_run_resumes_to_the_same_result(tiny, full_run, tmp_path, monkeypatch, capsys):
    def interrupt(self, done, **fields):
        if done == 2:  # after the second of three chunks
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _args(tiny, tmp_path / "cut" / "bc.npz", eval_episodes=0)  # the evaluation is a function of the policy
    with pytest.raises(KeyboardInterrupt):
        bc.main(args)
    assert not (tmp_path / "cut" / "bc.npz").exists()
    assert (tmp_path / "cut" / "bc.checkpoint.npz").exists()
    monkeypatch.undo()
    capsys.readouterr()
    bc.main(dataclasses.replace(args, resume=True))
    assert "at unit 2/3" in capsys.readouterr().out  # only the last chunk ran again
    assert not (tmp_path / "cut" / "bc.checkpoint.npz").exists()
    full, cut = np.load(full_run[0]), np.load(tmp_path / "cut" / "bc.npz")
    for key in [k for k in full.files if k.startswith("policy/")]:
        np.testing.assert_array_equal(full[key], cut[key], err_msg=key)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("not_npz", "is not an .npz file"),
    ("schema", "has schema 'empo/other/v1', expected 'empo/dataset/v1'"),
    ("missing_key", "has no key 'actions'"),
    ("nan", "'actions' contains NaN"),
    ("steps", "--steps must be at least 1, got 0"),
    ("num_seeds", "--num-seeds must be at least 1, got 0"),
    ("batch_size", "--batch-size must be at least 1, got -5"),
    ("eval_episodes", "--eval-episodes must be at least 0"),
    ("learning_rate", "--learning-rate must be positive, got 0.0"),
    ("out_is_folder", "it is a folder"),
])
def test_bad_input_gives_one_sentence_and_leaves_out_alone(tiny, tmp_path, case, message):
    data = dict(np.load(tiny / "tiny.npz"))
    dataset, kw = tmp_path / "data.npz", {}
    if case == "missing":
        dataset = tmp_path / "nowhere.npz"
    elif case == "not_npz":
        dataset.write_bytes(b"not a zip file")
    elif case == "schema":
        np.savez(dataset, **{**data, "schema": np.array("empo/other/v1")})
    elif case == "missing_key":
        np.savez(dataset, **{k: v for k, v in data.items() if k != "actions"})
    elif case == "nan":
        data["actions"][5, 1] = np.nan
        np.savez(dataset, **data)
    else:
        dataset = tiny / "tiny.npz"
        kw = {"steps": dict(steps=0), "num_seeds": dict(num_seeds=0), "batch_size": dict(batch_size=-5),
              "eval_episodes": dict(eval_episodes=-1), "learning_rate": dict(learning_rate=0.0)}.get(case, {})
    out = tmp_path / "out" / "bc.npz"
    out.parent.mkdir()
    if case == "out_is_folder":
        out.mkdir()
    else:
        out.write_bytes(b"an earlier result")
    with pytest.raises(empo_io.InputError, match=message) as err:
        bc.main(_args(tiny, out, dataset=str(dataset), **kw))
    assert "\n" not in str(err.value)
    assert out.is_dir() if case == "out_is_folder" else out.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in out.parent.iterdir()) == ["bc.npz"]  # no logs, figures or checkpoint


def test_command_line_help_and_error(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="300")
    script = str(ROOT / "baselines" / "bc.py")
    shown = subprocess.run([sys.executable, script, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    # Every flag's line (or the next, after a long flag) carries its docstring from Args and the evaluation flags it
    # inherits (tyro's --help).
    docs = {}
    for path, name in ((script, "Args"), (ROOT / "gym_eval.py", "EvalEnvFlags")):
        body = next(node for node in ast.parse(pathlib.Path(path).read_text()).body
                    if isinstance(node, ast.ClassDef) and node.name == name).body
        docs.update({a.target.id: " ".join(d.value.value.split()) for a, d in zip(body, body[1:])
                     if isinstance(a, ast.AnnAssign) and isinstance(d, ast.Expr)})
    assert set(docs) == {field.name for field in dataclasses.fields(bc.Args)}
    for name, doc in docs.items():
        flag = re.compile(rf"--{name.replace('_', '-')}[ ,]")
        assert any(flag.search(line) and doc[:40] in line + nxt for line, nxt in zip(lines, lines[1:])), name
    # A bad input from the command line: one line on stderr, no traceback, a non-zero exit status.
    failed = subprocess.run([sys.executable, script, "--dataset", str(tmp_path / "nowhere.npz"), "--out",
                             str(tmp_path / "bc.npz")], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert failed.stderr == f"error: {tmp_path / 'nowhere.npz'} does not exist\n"
    assert not (tmp_path / "bc.npz").exists()


# ----------------------------------------------------------------------------------------------
# D4RL / MuJoCo
# ----------------------------------------------------------------------------------------------

def test_d4rl_preset_holds_corls_bc_network_and_schedule():
    """CORL's BC (algorithms/offline/any_percent_bc.py): 2 x 256, batch 256, Adam 3e-4, 1M steps, on halfcheetah
    medium + expert; the Gaussian maximum-likelihood loss and the evaluation of the mean action are kept."""
    d4rl, nav = bc.PRESETS["d4rl"], bc.PRESETS["nav"]
    assert (d4rl.hidden_dim, d4rl.hidden_layers, d4rl.batch_size, d4rl.learning_rate) == (256, 2, 256, 3e-4)
    assert d4rl.steps == 1_000_000 and not d4rl.sample
    assert d4rl.dataset == "data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5"
    assert d4rl.out == "runs/halfcheetah-medium-expert/bc.npz"
    assert (nav.hidden_dim, nav.hidden_layers) == (64, 3)  # Appendix B's 4-layer MLP


def test_mujoco_data_is_evaluated_in_gymnasium_with_the_normalised_score(halfcheetah_npz, gym_steps, tmp_path):
    """An .npz of HalfCheetah's shapes with --eval-env: episodes of each run's mean action on the standardised
    observation in HalfCheetah-v4, D4RL's normalised score, no navigation figures and no sampled protocol."""
    dataset, _ = halfcheetah_npz
    out = tmp_path / "bc.npz"
    summary = bc.main(bc.Args(dataset=str(dataset), out=str(out), eval_env="HalfCheetah-v4", num_seeds=2, steps=100,
                              steps_per_call=100, hidden_dim=16, hidden_layers=2, eval_episodes=1))
    f = np.load(out)
    mean_action = lambda run, obs: _policy(f, run)[0].apply(_policy(f, run)[1],
                                                           (obs - f["arch/obs_mean"]) / f["arch/obs_std"])[0]
    check_halfcheetah_evaluation(out, summary, (2, 1), gym_steps, mean_action)
