"""IQL baseline (baselines/iql.py): the expectile, value, Q and advantage-weighted losses against NumPy, the actor's
log-std and learning-rate schedule, the reward scaling, end to end (schema, shapes, figures), determinism, resume,
bad input, and a learning test: IQL takes the better of two behaviours' actions where BC would average them."""

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
from baselines import iql

EVAL_KEYS = ("return", "goal", "penalty_steps", "length", "optimal_route")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small navigation data set (about 9k rows) as an .npz file."""
    root = tmp_path_factory.mktemp("iql")
    data = nav_env.generate_dataset(seed=0, transitions_per_behaviour=4000, log=lambda s: None)
    empo_io.save_npz(str(root / "tiny.npz"), data, empo_io.DATASET_SCHEMA, {})
    return root


def _args(root, out, **kw):
    base = dict(dataset=str(root / "tiny.npz"), out=str(out), seed=3, num_seeds=2, steps=600, steps_per_call=200,
                hidden_dim=32, eval_episodes=3)
    base.update(kw)
    return iql.Args(**base)


@pytest.fixture(scope="module")
def full_run(tiny, tmp_path_factory):
    """One uninterrupted run with the tiny arguments: (path of its iql.npz, main's summary)."""
    out = tmp_path_factory.mktemp("full") / "iql.npz"
    return out, iql.main(_args(tiny, out))


# ----------------------------------------------------------------------------------------------
# Equations
# ----------------------------------------------------------------------------------------------

def test_expectile_loss_weighs_tau_above_and_one_minus_tau_below():
    u = np.array([2.0, -1.0, 0.5, -3.0, 0.0], np.float32)
    loss = float(iql.expectile_loss(jnp.asarray(u), 0.7))
    weight = np.abs(0.7 - (u < 0))  # |tau - 1(u < 0)|
    assert loss == pytest.approx(np.mean(weight * u ** 2), rel=1e-6)
    # By hand: (0.7 * 4 + 0.3 * 1 + 0.7 * 0.25 + 0.3 * 9 + 0) / 5.
    assert loss == pytest.approx((2.8 + 0.3 + 0.175 + 2.7) / 5, rel=1e-6)
    grad = np.asarray(jax.grad(iql.expectile_loss)(jnp.asarray(u), 0.7))
    np.testing.assert_allclose(grad, 2 * weight * u / len(u), rtol=1e-6)
    # The minimiser over a constant v of L(x - v) is the 0.7-expectile, above the mean of x.
    x = np.array([0.0, 1.0, 5.0], np.float32)
    vs = jnp.linspace(0, 5, 501)
    best = float(vs[jnp.argmin(jax.vmap(lambda v: iql.expectile_loss(jnp.asarray(x) - v, 0.7))(vs))])
    assert best > x.mean() + 0.3


def test_value_loss_regresses_v_on_the_min_of_the_twin_targets_held_fixed():
    target_q = np.array([[-1.0, 3.0, 0.5, -2.0], [-2.0, 4.0, 0.0, -1.0]], np.float32)  # the min swaps between twins
    v = np.array([0.0, 1.0, 0.2, -1.5], np.float32)
    u = np.minimum(target_q[0], target_q[1]) - v  # [-2, 2, -0.2, -0.5]
    loss = iql.value_loss(jnp.asarray(target_q), jnp.asarray(v), 0.7)
    assert float(loss) == pytest.approx(np.mean(np.abs(0.7 - (u < 0)) * u ** 2), rel=1e-6)
    assert float(loss) == pytest.approx((0.3 * 4 + 0.7 * 4 + 0.3 * 0.04 + 0.3 * 0.25) / 4, rel=1e-6)
    grad_q, grad_v = jax.grad(iql.value_loss, argnums=(0, 1))(jnp.asarray(target_q), jnp.asarray(v), 0.7)
    np.testing.assert_array_equal(grad_q, 0.0)
    np.testing.assert_allclose(grad_v, -2 * np.abs(0.7 - (u < 0)) * u / 4, rtol=1e-6)


def test_q_target_stops_at_terminals_and_the_critic_loss_sums_the_twins():
    rewards = np.array([-1.0, -2.0, 0.0, 1.0], np.float32)
    not_done = np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # row 2: a terminal
    next_v = np.array([-10.0, 4.0, -7.0, 2.0], np.float32)
    y = np.asarray(iql.q_target(jnp.asarray(rewards), jnp.asarray(not_done), jnp.asarray(next_v), 0.9))
    np.testing.assert_allclose(y, [-10.0, 1.6, 0.0, 2.8], rtol=1e-6)
    rng = np.random.default_rng(0)
    q, target = rng.normal(size=(2, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    ref = np.mean((q[0] - target) ** 2) + np.mean((q[1] - target) ** 2)
    assert float(iql.critic_loss(jnp.asarray(q), jnp.asarray(target))) == pytest.approx(ref, rel=1e-5)
    grad_q, grad_y = jax.grad(iql.critic_loss, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(target))
    np.testing.assert_allclose(grad_q, 2 * (q - target) / 16, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad_y, 0.0)


def test_awr_weights_are_exp_beta_advantage_clipped_and_weight_the_log_prob():
    q = np.array([1.0, 0.0, 3.0, -1.0], np.float32)
    v = np.array([0.5, 0.0, 0.5, 0.0], np.float32)  # advantages 0.5, 0, 2.5, -1
    w = np.asarray(iql.awr_weights(jnp.asarray(q), jnp.asarray(v), 3.0, 100.0))
    np.testing.assert_allclose(w, [np.exp(1.5), 1.0, 100.0, np.exp(-3.0)], rtol=1e-6)  # exp(7.5) = 1808 -> 100
    np.testing.assert_allclose(iql.awr_weights(jnp.asarray(q), jnp.asarray(v), 3.0, 1e6)[2], np.exp(7.5), rtol=1e-5)
    grad_q, grad_v = jax.grad(lambda a, b: jnp.sum(iql.awr_weights(a, b, 3.0, 100.0)), argnums=(0, 1))(
        jnp.asarray(q), jnp.asarray(v))
    np.testing.assert_array_equal(grad_q, 0.0)
    np.testing.assert_array_equal(grad_v, 0.0)
    log_prob = np.array([-1.0, -2.0, 0.5, -4.0], np.float32)
    loss = float(iql.actor_loss(jnp.asarray(w), jnp.asarray(log_prob)))
    assert loss == pytest.approx(-np.mean(w * log_prob), rel=1e-6)
    np.testing.assert_allclose(jax.grad(iql.actor_loss, argnums=1)(jnp.asarray(w), jnp.asarray(log_prob)), -w / 4,
                               rtol=1e-6)


def test_polyak_moves_the_target_by_tau():
    target, online = {"w": jnp.asarray([1.0, 2.0])}, {"w": jnp.asarray([3.0, -2.0])}
    np.testing.assert_allclose(iql.polyak(target, online, 0.25)["w"], [1.5, 1.0])


def test_actor_has_a_clipped_state_independent_log_std_and_a_bounded_mean():
    actor = iql.GaussianActor(2, (0.2, 0.5), 8, 1)
    params = actor.init(jax.random.key(0), jnp.zeros((1, 3)))
    np.testing.assert_array_equal(params["params"]["log_std"], 0.0)  # the authors' initialisation
    obs = jnp.asarray(np.random.default_rng(0).normal(0, 50, (16, 3)), jnp.float32)
    for raw, clipped in ((-9.0, -5.0), (4.0, 2.0), (-1.0, -1.0)):
        params["params"]["log_std"] = jnp.full(2, raw)
        mean, log_std = actor.apply(params, obs)
        np.testing.assert_allclose(log_std, [clipped, clipped])  # one log-std for every state
        assert log_std.shape == (2,) and mean.shape == (16, 2)
    assert np.all(np.abs(np.asarray(mean)) <= np.array([0.2, 0.5]) + 1e-6)
    z = (np.array([0.1, -0.2]) - np.asarray(mean)) / np.exp(-1.0)
    np.testing.assert_allclose(iql.gaussian_log_prob(mean, log_std, jnp.asarray([0.1, -0.2])),
                               np.sum(-0.5 * z ** 2 + 1.0 - 0.5 * np.log(2 * np.pi), -1), rtol=1e-5)


def test_the_actor_lr_decays_by_a_cosine_to_zero_and_the_critics_do_not():
    """With a constant gradient Adam's bias-corrected step is lr(t): lr(t) = lr (1 + cos(pi t / T)) / 2."""
    txs = iql.make_optimisers(iql.Args(steps=4, learning_rate=0.1))
    for name, expected in (("actor", 0.05 * (1 + np.cos(np.pi * np.arange(6).clip(max=4) / 4))),
                           ("critic", np.full(6, 0.1)), ("value", np.full(6, 0.1))):
        params, opt, steps = jnp.zeros(()), txs[name].init(jnp.zeros(())), []
        for _ in range(6):
            updates, opt = txs[name].update(jnp.ones(()), opt, params)
            steps.append(-float(updates))
        np.testing.assert_allclose(steps, expected, rtol=1e-4, atol=1e-8, err_msg=name)


def test_reward_scale_is_1000_over_the_range_of_trajectory_returns():
    rewards = np.array([1.0, 2.0, -1.0, 5.0, 5.0, 0.5], np.float32)
    ids = np.array([0, 0, 1, 2, 2, 3])  # returns 3, -1, 10, 0.5
    assert iql.reward_factor(rewards, ids, "returns") == pytest.approx(1000.0 / 11.0)
    assert iql.reward_factor(rewards, ids, "none") == 1.0
    with pytest.raises(empo_io.InputError, match="different returns"):
        iql.reward_factor(np.ones(4, np.float32), np.array([0, 0, 1, 1]), "returns")


# ----------------------------------------------------------------------------------------------
# End to end: outputs, determinism, resume, bad input
# ----------------------------------------------------------------------------------------------

def test_output_schema_shapes_and_figures(tiny, full_run):
    out, summary = full_run
    f = np.load(out, allow_pickle=False)
    assert str(f["schema"]) == "empo/iql/v1"
    np.testing.assert_array_equal(f["seeds"], [3, 4])
    assert f["actor/params/MLP_0/Dense_0/kernel"].shape == (2, 2, 32)
    assert f["actor/params/MLP_0/Dense_3/kernel"].shape == (2, 32, 2)
    assert f["actor/params/log_std"].shape == (2, 2)
    for critic in ("critic1", "critic2"):
        assert f[f"{critic}/params/Dense_0/kernel"].shape == (2, 4, 32)
        assert f[f"{critic}/params/Dense_3/kernel"].shape == (2, 32, 1)
    assert f["value/params/Dense_0/kernel"].shape == (2, 2, 32)
    assert not np.array_equal(f["critic1/params/Dense_0/kernel"], f["critic2/params/Dense_0/kernel"])
    data, sha = empo_io.load_dataset(str(tiny / "tiny.npz"))
    np.testing.assert_allclose(f["arch/obs_mean"], data["observations"].astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(f["arch/action_scale"], np.abs(data["actions"]).max(0))
    assert float(f["arch/gamma"]) == pytest.approx(0.999) and float(f["arch/reward_scale"]) == 1.0
    assert json.loads(str(f["inputs"]))["dataset"] == sha
    for prefix in ("eval/", "eval/sampled_"):
        for name in EVAL_KEYS:
            assert f[f"{prefix}{name}"].shape == (2, 3), prefix + name
    assert summary["return_mean"] == pytest.approx(float(f["eval/return"].mean()))
    for name in ("iql_rollouts.png", "iql_action_field.png"):
        assert (out.parent / name).stat().st_size > 0, name
    assert any((out.parent / "iql").iterdir())  # TensorBoard events
    assert not (out.parent / "iql.checkpoint.npz").exists()


def test_same_seed_same_output_and_the_seeds_differ(tiny, full_run, tmp_path):
    out, _ = full_run
    iql.main(_args(tiny, tmp_path / "again.npz"))
    a, b = np.load(out), np.load(tmp_path / "again.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if key != "args":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ("actor/params/MLP_0/Dense_3/kernel", "value/params/Dense_3/kernel", "eval/positions"):
        assert not np.array_equal(a[key][0], a[key][1]), key


def test_interrupted_run_resumes_to_the_same_result(tiny, full_run, tmp_path, monkeypatch, capsys):
    def interrupt(self, done, **fields):
        if done == 2:  # after the second of three chunks
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _args(tiny, tmp_path / "cut" / "iql.npz")
    with pytest.raises(KeyboardInterrupt):
        iql.main(args)
    assert not (tmp_path / "cut" / "iql.npz").exists()
    assert (tmp_path / "cut" / "iql.checkpoint.npz").exists()
    monkeypatch.undo()
    capsys.readouterr()
    iql.main(dataclasses.replace(args, resume=True))
    assert "at unit 2/3" in capsys.readouterr().out  # only the last chunk ran again
    full, cut = np.load(full_run[0]), np.load(tmp_path / "cut" / "iql.npz")
    for key in [k for k in full.files if k.startswith(("actor/", "critic1/", "critic2/", "value/", "eval/"))]:
        np.testing.assert_array_equal(full[key], cut[key], err_msg=key)


IQL_FLAG_CASES = {
    "expectile": (dict(expectile=1.0), "--expectile"),
    "temperature": (dict(temperature=-1.0), "--temperature"),
    "same_returns": (dict(reward_scale="returns"), "different returns"),
}


@pytest.mark.parametrize("case, message", bad_input_cases(IQL_FLAG_CASES))
def test_bad_input_gives_one_sentence_and_leaves_out_untouched(tiny, tmp_path, case, message):
    dataset = bad_dataset(tiny / "tiny.npz", tmp_path, case)
    if case == "same_returns":  # every trajectory returns the same: the return range is 0
        data = dict(np.load(dataset))
        np.savez(dataset, **{**data, "rewards": np.zeros_like(data["rewards"])})
    kw = {**FLAG_CASES, **IQL_FLAG_CASES}.get(case, ({},))[0]
    out = earlier_result(tmp_path, "iql.npz")
    args = _args(tiny, out, dataset=str(dataset), **kw)
    if case == "resume_other_sizes":
        other_sizes_checkpoint(iql, args, out)
    assert_refused(iql.main, args, out, message)


def test_help_names_every_flag_with_its_symbol(capsys):
    with pytest.raises(SystemExit):
        tyro.cli(iql.Args, args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(iql.Args):
        assert "--" + field.name.replace("_", "-") in text, field.name
    for symbol in ("gamma:", "tau:", "beta:", "alpha:", "B:"):
        assert symbol in text, symbol


def test_d4rl_preset_holds_iqls_locomotion_settings():
    d4rl = iql.PRESETS["d4rl"]
    assert (d4rl.gamma, d4rl.expectile, d4rl.temperature, d4rl.max_weight, d4rl.tau) == (0.99, 0.7, 3.0, 100.0, 0.005)
    assert (d4rl.batch_size, d4rl.learning_rate, d4rl.steps, d4rl.hidden_dim, d4rl.hidden_layers) == (
        256, 3e-4, 1_000_000, 256, 2)
    assert d4rl.reward_scale == "returns" and iql.PRESETS["nav"].reward_scale == "none"


# ----------------------------------------------------------------------------------------------
# Learning: the better of two behaviours
# ----------------------------------------------------------------------------------------------

def test_iql_takes_the_better_of_two_behaviours_actions(tmp_path):
    """Two behaviours act at the same states: one moves a_0 to +0.1 (reward 0), the other to -0.1 (reward -1); a_1
    is free. Their mean, what BC learns, is a_0 = 0; IQL's advantage weights exp(3 (Q - V)) pick +0.1."""
    rng = np.random.default_rng(5)
    episodes, length = 400, 3
    n = episodes * length
    obs = rng.uniform(0, 1, (n, 2)).astype(np.float32)
    good = np.repeat(np.arange(episodes) % 2 == 0, length)  # each behaviour's trajectories
    actions = np.stack([np.where(good, 0.1, -0.1) + rng.normal(0, 0.01, n), rng.uniform(-0.2, 0.2, n)], 1)
    last = np.arange(n) % length == length - 1
    terminal = np.repeat(np.arange(episodes) % 4 < 2, length)  # both behaviours end in terminals and in timeouts
    data = dict(observations=obs, actions=actions.astype(np.float32), rewards=np.where(good, 0.0, -1.0).astype(
                np.float32), next_observations=np.roll(obs, -1, axis=0), terminals=last & terminal,
                timeouts=last & ~terminal, episode_ids=np.repeat(np.arange(episodes), length).astype(np.int32),
                behaviour=(~good).astype(np.int32))
    empo_io.save_npz(str(tmp_path / "data.npz"), data, empo_io.DATASET_SCHEMA, {})
    iql.main(iql.Args(dataset=str(tmp_path / "data.npz"), out=str(tmp_path / "iql.npz"), steps=3000,
                      steps_per_call=3000, hidden_dim=32, hidden_layers=2, gamma=0.9, learning_rate=1e-3,
                      eval_episodes=0))
    f = np.load(tmp_path / "iql.npz")
    actor = {"params": jax.tree.map(lambda x: x[0], empo_io.unflatten_params("actor/params", f))}
    net = iql.make_networks(32, 2, 2, tuple(f["arch/action_scale"].tolist()))["actor"]
    mean, _ = net.apply(actor, (obs - f["arch/obs_mean"]) / f["arch/obs_std"])
    assert np.mean(data["actions"][:, 0]) == pytest.approx(0.0, abs=0.01)  # BC's answer
    assert abs(np.mean(mean[:, 0]) - 0.1) < 0.02 and np.std(mean[:, 0]) < 0.03


def test_mujoco_data_is_evaluated_in_gymnasium_with_the_normalised_score(halfcheetah_npz, gym_steps, tmp_path):
    """An .npz of HalfCheetah's shapes with --eval-env: the rewards scaled by 1000 / (max - min return), episodes of
    each run's mean action on the standardised observation in HalfCheetah-v4 with D4RL's normalised score, no
    navigation figures."""
    dataset, data = halfcheetah_npz
    out = tmp_path / "iql.npz"
    summary = iql.main(iql.Args(dataset=str(dataset), out=str(out), eval_env="HalfCheetah-v4",
                                reward_scale="returns", num_seeds=2, steps=100, steps_per_call=100, hidden_dim=16,
                                hidden_layers=2, eval_episodes=1))
    f = np.load(out)
    actors = {"params": empo_io.unflatten_params("actor/params", f)}
    net = iql.make_networks(16, 2, 6, tuple(f["arch/action_scale"].tolist()))["actor"]
    policy = lambda run, obs: net.apply(jax.tree.map(lambda x: x[run], actors),
                                        (obs - f["arch/obs_mean"]) / f["arch/obs_std"])[0]
    check_halfcheetah_evaluation(out, summary, (2, 1), gym_steps, policy)
    returns = np.bincount(data["episode_ids"], weights=data["rewards"].astype(np.float64))
    assert float(f["arch/reward_scale"]) == pytest.approx(1000 / (returns.max() - returns.min()), rel=1e-5)
