"""TD3+BC baseline (baselines/td3_bc.py): the critic target and the actor loss against NumPy, the delayed updates,
end to end (schema, shapes, figures), determinism, resume and bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from conftest import (
    FLAG_CASES,
    assert_refused,
    bad_dataset,
    bad_input_cases,
    check_halfcheetah_evaluation,
    earlier_result,
    other_sizes_checkpoint,
)

import empo_io
import nav_env
from baselines import td3_bc as td

EVAL_KEYS = ("return", "goal", "penalty_steps", "length", "optimal_route")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small navigation data set (about 9k rows) as an .npz file."""
    root = tmp_path_factory.mktemp("td3_bc")
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=4000, log=lambda s: None)
    empo_io.save_npz(str(root / "tiny.npz"), data, empo_io.DATASET_SCHEMA, {})
    return root


def _args(root, out, **kw):
    base = dict(dataset=str(root / "tiny.npz"), out=str(out), seed=3, num_seeds=2, steps=600, steps_per_call=200,
                hidden_dim=32, eval_episodes=3)
    base.update(kw)
    return td.Args(**base)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """One uninterrupted run with the tiny arguments: (path of its td3_bc.npz, main's summary)."""
    out = tmp_path_factory.mktemp("full") / "td3_bc.npz"
    return out, td.main(_args(tiny, out))


# ----------------------------------------------------------------------------------------------
# Equations
# ----------------------------------------------------------------------------------------------

def test_smoothed_target_action_clips_the_noise_then_the_action():
    scale = (0.2, 0.5)  # a_max per dimension
    next_pi = np.array([[0.0, 0.0], [0.19, -0.45], [-0.1, 0.3], [0.05, 0.0]], np.float32)
    noise = np.array([[0.5, -1.0], [3.0, -4.0], [-10.0, 10.0], [-0.3, 2.4]], np.float32)  # e ~ N(0, 1) draws
    out = np.asarray(td.smoothed_target_action(jnp.asarray(next_pi), jnp.asarray(noise), scale, 0.2, 0.5))
    a_max = np.array(scale)
    smoothing = np.clip(noise * 0.2 * a_max, -0.5 * a_max, 0.5 * a_max)
    np.testing.assert_allclose(out, np.clip(next_pi + smoothing, -a_max, a_max), rtol=1e-6, atol=1e-7)
    # By hand: row 0 is inside every bound; row 1 is clipped at a_max after the noise; row 2's noise is clipped
    # to c = 0.5 a_max = (0.1, 0.25); row 3's second noise 0.2 * 0.5 * 2.4 = 0.24 stays below c = 0.25.
    np.testing.assert_allclose(out, [[0.02, -0.1], [0.2, -0.5], [-0.2, 0.5], [0.038, 0.24]], rtol=1e-5, atol=1e-7)
    # sigma = 0 leaves the target policy's action (clipped to A).
    np.testing.assert_allclose(td.smoothed_target_action(jnp.asarray(next_pi), jnp.asarray(noise), scale, 0.0, 0.5),
                               next_pi, atol=1e-7)


def test_critic_target_takes_the_min_of_the_twins_and_stops_at_terminals():
    rewards = np.array([-1.0, -2.0, 0.0, -1.0], np.float32)
    not_done = np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # row 2: the goal step (terminal); row 3: a timeout row
    q1 = np.array([-10.0, -5.0, -7.0, -3.0], np.float32)
    q2 = np.array([-12.0, -4.0, -1.0, -3.5], np.float32)
    y = np.asarray(td.critic_target(jnp.asarray(rewards), jnp.asarray(not_done), jnp.asarray(q1), jnp.asarray(q2), 0.9))
    np.testing.assert_allclose(y, rewards + 0.9 * not_done * np.minimum(q1, q2), rtol=1e-6)
    np.testing.assert_allclose(y, [-11.8, -6.5, 0.0, -4.15], rtol=1e-6)
    # The critic loss: the two MSEs summed, the target held fixed.
    rng = np.random.default_rng(0)
    q, target = rng.normal(size=(2, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    ref = np.mean((q[0] - target) ** 2) + np.mean((q[1] - target) ** 2)
    assert float(td.critic_loss(jnp.asarray(q), jnp.asarray(target))) == pytest.approx(ref, rel=1e-5)
    grad_q, grad_y = jax.grad(td.critic_loss, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(target))
    np.testing.assert_allclose(grad_q, 2 * (q - target) / 16, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad_y, 0.0)


def test_actor_loss_normalises_q_by_a_constant_lambda_and_adds_the_bc_term():
    rng = np.random.default_rng(1)
    b, alpha = 32, 2.5
    q_pi = rng.normal(-300, 50, size=b).astype(np.float32)
    pi, actions = (rng.uniform(-0.2, 0.2, size=(b, 2)).astype(np.float32) for _ in range(2))
    loss, (lam, bc) = td.actor_loss(jnp.asarray(q_pi), jnp.asarray(pi), jnp.asarray(actions), alpha)
    lam_ref = alpha / np.mean(np.abs(q_pi))
    bc_ref = np.mean((pi - actions) ** 2)  # over the batch and the action dimensions, as F.mse_loss
    assert float(lam) == pytest.approx(lam_ref, rel=1e-5)
    assert float(bc) == pytest.approx(bc_ref, rel=1e-5)
    assert float(loss) == pytest.approx(-lam_ref * np.mean(q_pi) + bc_ref, rel=1e-5)
    # lambda is a constant: d loss / d Q1(s_b, pi(s_b)) = -lambda / B, with no term from the denominator.
    grad_q, grad_pi = jax.grad(lambda q, p: td.actor_loss(q, p, jnp.asarray(actions), alpha)[0], argnums=(0, 1))(
        jnp.asarray(q_pi), jnp.asarray(pi))
    np.testing.assert_allclose(grad_q, np.full(b, -lam_ref / b), rtol=1e-5)
    np.testing.assert_allclose(grad_pi, 2 * (pi - actions) / (b * 2), rtol=1e-5, atol=1e-9)
    # ... so the actor's gradient does not depend on the scale of Q (what lambda is for).
    w = jnp.asarray([1.0, -2.0])
    grad_at = lambda c: jax.grad(lambda p: td.actor_loss(c * (-100 + p @ w), p, jnp.asarray(actions), alpha)[0])(
        jnp.asarray(pi))
    np.testing.assert_allclose(grad_at(1.0), grad_at(50.0), rtol=1e-4, atol=1e-8)


def test_polyak_moves_the_target_by_tau():
    target, online = {"w": jnp.asarray([1.0, 2.0])}, {"w": jnp.asarray([3.0, -2.0])}
    np.testing.assert_allclose(td.polyak(target, online, 0.25)["w"], [1.5, 1.0])


# ----------------------------------------------------------------------------------------------
# Delayed updates
# ----------------------------------------------------------------------------------------------

def test_actor_and_targets_move_only_on_every_second_critic_step():
    rng = np.random.default_rng(2)
    n = 64
    data = td.Data(obs=jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
                   actions=jnp.asarray(rng.uniform(-0.2, 0.2, (n, 2)), jnp.float32),
                   rewards=-jnp.ones(n), next_obs=jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
                   not_done=jnp.asarray(rng.random(n) < 0.9, jnp.float32))
    args = td.Args(batch_size=16, hidden_dim=8, hidden_layers=1, tau=0.1)
    nets = td.make_networks(8, 1, 2, (0.2, 0.2))
    init, tx = td.make_init(args, nets, 2, 2)
    one_step = jax.jit(lambda s, k, c: td.make_train_chunk(args, nets, tx, n, (0.2, 0.2))(s, k, data, c, 1))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # Random parameters of init's shapes, drawn with NumPy (compiling Flax's initialisers costs seconds).
    shapes = jax.eval_shape(init, jax.random.key(0))
    actor, critic = (jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), tree)
                     for tree in (shapes.actor, shapes.critic))
    state = td.TrainState(actor=actor, actor_target=actor, actor_opt=tx.init(actor), critic=critic,
                          critic_target=critic, critic_opt=tx.init(critic))
    assert same(state.actor_target, state.actor) and same(state.critic_target, state.critic)
    assert not same(jax.tree.map(lambda x: x[0], state.critic), jax.tree.map(lambda x: x[1], state.critic))
    for count in range(4):  # critic steps 1, 2, 3, 4 (first_step = count steps taken before)
        new, metrics = one_step(state, jax.random.key(10 + count), np.int32(count))
        assert not same(new.critic, state.critic) and not same(new.critic_opt, state.critic_opt)
        if (count + 1) % 2:  # steps 1 and 3: the critics alone
            assert float(metrics["actor_updates"]) == 0.0
            for name in ("actor", "actor_opt", "actor_target", "critic_target"):
                assert same(getattr(new, name), getattr(state, name)), (count, name)
        else:  # steps 2 and 4: the actor, then both targets by Polyak tau towards the updated networks
            assert float(metrics["actor_updates"]) == 1.0
            assert not same(new.actor, state.actor)
            for name, online in (("actor_target", new.actor), ("critic_target", new.critic)):
                expected = td.polyak(getattr(state, name), online, 0.1)
                for x, y in zip(jax.tree.leaves(getattr(new, name)), jax.tree.leaves(expected)):
                    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)
            assert float(metrics["charts/lambda"]) > 0 and float(metrics["losses/bc"]) > 0
        state = new


# ----------------------------------------------------------------------------------------------
# End to end: outputs, determinism, resume, bad input
# ----------------------------------------------------------------------------------------------

def test_output_schema_shapes_and_figures(tiny, full_run):
    out, summary = full_run
    f = np.load(out, allow_pickle=False)
    assert str(f["schema"]) == "empo/td3_bc/v1"
    np.testing.assert_array_equal(f["seeds"], [3, 4])
    # Actor: 3 hidden layers of 32 and a linear output; twin critics on [s, a / a_max].
    assert f["actor/params/MLP_0/Dense_0/kernel"].shape == (2, 2, 32)
    assert f["actor/params/MLP_0/Dense_3/kernel"].shape == (2, 32, 2)
    for critic in ("critic1", "critic2"):
        assert f[f"{critic}/params/Dense_0/kernel"].shape == (2, 4, 32)
        assert f[f"{critic}/params/Dense_3/kernel"].shape == (2, 32, 1)
    assert not np.array_equal(f["critic1/params/Dense_0/kernel"], f["critic2/params/Dense_0/kernel"])
    data, sha = empo_io.load_dataset(str(tiny / "tiny.npz"))
    np.testing.assert_allclose(f["arch/obs_mean"], data["observations"].astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(f["arch/obs_std"], data["observations"].astype(np.float64).std(0) + 1e-3, rtol=1e-5)
    np.testing.assert_allclose(f["arch/action_scale"], np.abs(data["actions"]).max(0))
    assert int(f["arch/hidden_dim"]) == 32 and int(f["arch/hidden_layers"]) == 3
    assert float(f["arch/gamma"]) == pytest.approx(0.999)
    assert json.loads(str(f["inputs"]))["dataset"] == sha
    assert json.loads(str(f["args"]))["steps"] == 600
    for name in EVAL_KEYS:
        assert f[f"eval/{name}"].shape == (2, 3), name
    assert f["eval/positions"].shape == (2, 3, 1001, 2) and f["eval/positions"].dtype == np.float16
    # Paths are frozen after the end: the last position repeats from the episode's length on.
    for i in range(2):
        for e in range(3):
            length = int(f["eval/length"][i, e])
            np.testing.assert_array_equal(f["eval/positions"][i, e, length:], f["eval/positions"][i, e, length][None]
                                          .repeat(1001 - length, 0))
    assert summary["return_mean"] == pytest.approx(float(f["eval/return"].mean()))
    assert len(summary["per_run"]) == 2
    for name in ("td3_bc_rollouts.png", "td3_bc_action_field.png"):
        assert (out.parent / name).stat().st_size > 0, name
    assert any((out.parent / "td3_bc").iterdir())  # TensorBoard events
    assert not (out.parent / "td3_bc.checkpoint.npz").exists()


def test_same_seed_same_output_and_the_seeds_differ(tiny, full_run, tmp_path):
    out, _ = full_run
    td.main(_args(tiny, tmp_path / "again.npz"))
    a, b = np.load(out), np.load(tmp_path / "again.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if key != "args":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ("actor/params/MLP_0/Dense_3/kernel", "critic1/params/Dense_3/kernel", "eval/positions"):
        assert not np.array_equal(a[key][0], a[key][1]), key


def test_interrupted_run_resumes_to_the_same_result(tiny, full_run, tmp_path, monkeypatch, capsys):
    def interrupt(self, done, **fields):
        if done == 2:  # after the second of three chunks
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _args(tiny, tmp_path / "cut" / "td3_bc.npz")
    with pytest.raises(KeyboardInterrupt):
        td.main(args)
    assert not (tmp_path / "cut" / "td3_bc.npz").exists()
    assert (tmp_path / "cut" / "td3_bc.checkpoint.npz").exists()
    monkeypatch.undo()
    capsys.readouterr()
    td.main(dataclasses.replace(args, resume=True))
    assert "at unit 2/3" in capsys.readouterr().out  # only the last chunk ran again
    assert not (tmp_path / "cut" / "td3_bc.checkpoint.npz").exists()
    full, cut = np.load(full_run[0]), np.load(tmp_path / "cut" / "td3_bc.npz")
    for key in [k for k in full.files if k.startswith(("actor/", "critic1/", "critic2/", "eval/"))]:
        np.testing.assert_array_equal(full[key], cut[key], err_msg=key)


TD3_BC_FLAG_CASES = {"alpha": (dict(alpha=0.0), "--alpha")}


@pytest.mark.parametrize("case, message", bad_input_cases(TD3_BC_FLAG_CASES))
def test_bad_input_gives_one_sentence_and_leaves_out_untouched(tiny, tmp_path, case, message):
    dataset = bad_dataset(tiny / "tiny.npz", tmp_path, case)
    kw = {**FLAG_CASES, **TD3_BC_FLAG_CASES}.get(case, ({},))[0]
    out = earlier_result(tmp_path, "td3_bc.npz")
    args = _args(tiny, out, dataset=str(dataset), **kw)
    if case == "resume_other_sizes":
        other_sizes_checkpoint(td, args, out)
    assert_refused(td.main, args, out, message)


def test_help_names_every_flag_with_its_symbol(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(td.Args, args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(td.Args):
        assert "--" + field.name.replace("_", "-") in text, field.name
    for symbol in ("gamma:", "alpha:", "d:", "tau:", "sigma / a_max", "c / a_max", "B:"):
        assert symbol in text, symbol


# ----------------------------------------------------------------------------------------------
# D4RL / MuJoCo
# ----------------------------------------------------------------------------------------------

def test_d4rl_preset_holds_the_td3_bc_authors_settings():
    """github.com/sfujim/TD3_BC (main.py, TD3_BC.py): 2 x 256 networks, discount 0.99, alpha 2.5, batch 256, Adam
    3e-4, policy noise 0.2 and noise clip 0.5 (times max_action), policy_freq 2, tau 0.005, 1M steps; raw rewards
    and actions (a_max = 1 on D4RL), on halfcheetah medium + expert."""
    d4rl, nav = td.PRESETS["d4rl"], td.PRESETS["nav"]
    assert (d4rl.hidden_dim, d4rl.hidden_layers, d4rl.gamma, d4rl.alpha) == (256, 2, 0.99, 2.5)
    assert (d4rl.batch_size, d4rl.learning_rate, d4rl.steps, d4rl.tau) == (256, 3e-4, 1_000_000, 0.005)
    assert (d4rl.policy_noise, d4rl.noise_clip, d4rl.policy_freq, d4rl.action_units) == (0.2, 0.5, 2, "raw")
    assert d4rl.dataset == "data/d4rl/halfcheetah_medium-v2.hdf5,data/d4rl/halfcheetah_expert-v2.hdf5"
    assert d4rl.out == "runs/halfcheetah-medium-expert/td3_bc.npz"
    assert (nav.hidden_dim, nav.hidden_layers, nav.gamma) == (64, 3, 0.999)  # Appendix B, Table 4


def test_mujoco_data_is_evaluated_in_gymnasium_with_the_normalised_score(halfcheetah_npz, gym_steps, tmp_path):
    """An .npz of HalfCheetah's shapes with --eval-env: episodes of each run's deterministic actor pi(s) on the
    standardised observation in HalfCheetah-v4, D4RL's normalised score, no navigation figures and no
    exploration-noise protocol."""
    dataset, _ = halfcheetah_npz
    out = tmp_path / "td3_bc.npz"
    summary = td.main(td.Args(dataset=str(dataset), out=str(out), eval_env="HalfCheetah-v4", num_seeds=2, steps=100,
                              steps_per_call=100, hidden_dim=16, hidden_layers=2, eval_episodes=1))
    f = np.load(out)
    actors = {"params": empo_io.unflatten_params("actor/params", f)}
    net = td.make_networks(16, 2, 6, tuple(f["arch/action_scale"].tolist()))["actor"]
    policy = lambda run, obs: net.apply(jax.tree.map(lambda x: x[run], actors),
                                        (obs - f["arch/obs_mean"]) / f["arch/obs_std"])
    check_halfcheetah_evaluation(out, summary, (2, 1), gym_steps, policy)
