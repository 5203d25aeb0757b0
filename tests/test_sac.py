"""SAC behaviour policies (behaviour/sac.py): the losses and one jitted update against NumPy, learning
InvertedPendulum-v5, bad input in one sentence, and a resumed run equal to the uninterrupted one."""

import dataclasses
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest

import empo_io
from behaviour import sac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _log_prob_np(mean, log_std, pre_tanh):
    """log pi(tanh(u)|s) in float64 from the densities themselves: log N(u; mu, sigma^2) - sum log(1 - tanh(u)^2)."""
    std = np.exp(log_std)
    log_normal = np.sum(-0.5 * ((pre_tanh - mean) / std) ** 2 - np.log(std * np.sqrt(2 * np.pi)), axis=-1)
    return log_normal - np.sum(np.log(1.0 - np.tanh(pre_tanh) ** 2), axis=-1)


def _actor_np(params, obs):
    """(mu(s), log sigma(s)) of the actor in float64: the last layer's first act_dim outputs, then the clipped rest."""
    out = ref.mlp(params["params"]["MLP_0"], obs)
    act_dim = out.shape[-1] // 2
    return out[:, :act_dim], np.clip(out[:, act_dim:], sac.LOG_STD_MIN, sac.LOG_STD_MAX)


def _q_np(critic, obs, actions, i):
    """Q_i(s, a) on [s, a] with the stacked critic parameters."""
    return ref.mlp(ref.pick(critic, i)["params"], np.concatenate([obs, actions], 1))[:, 0]


# ----------------------------------------------------------------------------------------------
# Equations
# ----------------------------------------------------------------------------------------------

def test_tanh_gaussian_log_prob_is_the_change_of_variables():
    rng = np.random.default_rng(0)
    mean = rng.normal(0, 1.5, (6, 3))
    log_std = rng.uniform(-2.0, 1.0, (6, 3))
    noise = rng.normal(0, 1, (6, 3))
    noise[0] = [3.0, -2.5, 0.1]  # u far out where the tanh correction is large
    pre_tanh = mean + np.exp(log_std) * noise
    action, log_pi = sac.sample_action(jnp.asarray(mean, jnp.float32), jnp.asarray(log_std, jnp.float32),
                                       jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(action, np.tanh(pre_tanh), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_pi, _log_prob_np(mean, log_std, pre_tanh), rtol=1e-4, atol=1e-4)
    # The correction is summed over the action dimensions and matters here (several nats per row).
    assert np.all(-np.sum(np.log(1 - np.tanh(pre_tanh) ** 2), axis=-1) > 0.05)
    # pi is a density on (-1, 1): in one dimension it integrates to 1 (no Jacobian, or a wrong one, does not).
    a = np.linspace(-1, 1, 200_001)[1:-1]
    u = np.arctanh(a)
    mu, ls = 0.7, np.log(0.8)
    density = np.exp(np.asarray(sac.tanh_gaussian_log_prob(jnp.asarray((u - mu) / 0.8)[:, None],
                                                           jnp.asarray(u)[:, None], jnp.full((len(u), 1), ls)),
                                np.float64))
    assert np.trapezoid(density, a) == pytest.approx(1.0, abs=2e-3)
    # Far in the tail, where tanh(u) rounds to 1 in float32, the log-probability stays finite.
    far = sac.tanh_gaussian_log_prob(jnp.zeros((1, 1)), jnp.full((1, 1), 20.0), jnp.zeros((1, 1)))
    # log(1 - tanh(u)^2) -> 2 (log 2 - u) for large u
    assert np.isfinite(float(far[0]))
    assert float(far[0]) == pytest.approx(-0.5 * np.log(2 * np.pi) - 2 * (np.log(2) - 20.0), rel=1e-5)


def test_soft_critic_target_takes_the_min_of_the_twins_minus_alpha_log_pi_and_stops_at_terminals():
    rewards = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    not_done = np.array([1.0, 1.0, 0.0, 1.0], np.float32)  # row 2 terminated: y = r
    q1 = np.array([10.0, -5.0, 7.0, 2.0], np.float32)
    q2 = np.array([12.0, -6.0, 1.0, 1.5], np.float32)  # the min is Q1 in row 0, Q2 in rows 1 and 3
    log_pi = np.array([-1.0, 2.0, 0.3, -0.5], np.float32)
    y = sac.soft_critic_target(*(jnp.asarray(x) for x in (rewards, not_done, q1, q2, log_pi)), 0.2, 0.9)
    np.testing.assert_allclose(y, rewards + 0.9 * not_done * (np.minimum(q1, q2) - 0.2 * log_pi), rtol=1e-6)
    np.testing.assert_allclose(y, [1 + 0.9 * 10.2, -2 + 0.9 * -6.4, 0.5, 3 + 0.9 * 1.6], rtol=1e-6)


def test_critic_loss_sums_the_twins_mses_and_holds_the_target():
    rng = np.random.default_rng(1)
    q, target = rng.normal(size=(2, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    ref_loss = np.mean((q[0] - target) ** 2) + np.mean((q[1] - target) ** 2)
    assert float(sac.critic_loss(jnp.asarray(q), jnp.asarray(target))) == pytest.approx(ref_loss, rel=1e-5)
    grad_q, grad_y = jax.grad(sac.critic_loss, argnums=(0, 1))(jnp.asarray(q), jnp.asarray(target))
    np.testing.assert_allclose(grad_q, 2 * (q - target) / 16, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad_y, 0.0)


def test_actor_loss_is_alpha_log_pi_minus_the_min_q_with_alpha_held():
    rng = np.random.default_rng(2)
    b, alpha = 32, 0.3
    log_pi, q1, q2 = (rng.normal(0, 2, b).astype(np.float32) for _ in range(3))
    loss = sac.actor_loss(*(jnp.asarray(x) for x in (log_pi, q1, q2)), jnp.float32(alpha))
    assert float(loss) == pytest.approx(np.mean(alpha * log_pi - np.minimum(q1, q2)), rel=1e-5)
    grads = jax.grad(sac.actor_loss, argnums=(0, 1, 2, 3))(*(jnp.asarray(x) for x in (log_pi, q1, q2)),
                                                           jnp.float32(alpha))
    np.testing.assert_allclose(grads[0], np.full(b, alpha / b), rtol=1e-5)
    np.testing.assert_allclose(grads[1], np.where(q1 < q2, -1.0 / b, 0.0), rtol=1e-5)
    np.testing.assert_allclose(grads[2], np.where(q2 < q1, -1.0 / b, 0.0), rtol=1e-5)
    assert float(grads[3]) == 0.0  # alpha is not trained by the actor's loss


def test_temperature_loss_moves_log_alpha_towards_the_target_entropy():
    log_pi = np.array([-2.0, 0.5, 1.0, -0.3], np.float32)  # entropy estimate -mean = 0.2
    for target_entropy in (-3.0, 1.0):  # the entropy is above -3 (alpha falls) and below 1 (alpha rises)
        loss, (grad_log_alpha, grad_log_pi) = jax.value_and_grad(sac.temperature_loss, argnums=(0, 1))(
            jnp.float32(np.log(0.4)), jnp.asarray(log_pi), target_entropy)
        assert float(loss) == pytest.approx(-np.log(0.4) * np.mean(log_pi + target_entropy), rel=1e-5)
        assert float(grad_log_alpha) == pytest.approx(-np.mean(log_pi + target_entropy), rel=1e-5)
        np.testing.assert_array_equal(grad_log_pi, 0.0)
        assert np.sign(-float(grad_log_alpha)) == np.sign(target_entropy - 0.2)  # gradient descent's direction


def test_polyak_moves_the_target_by_tau():
    target, online = {"w": jnp.asarray([1.0, 2.0])}, {"w": jnp.asarray([3.0, -2.0])}
    np.testing.assert_allclose(sac.polyak(target, online, 0.25)["w"], [1.5, 1.0])


def test_actor_clips_log_std_and_splits_its_heads():
    actor = sac.Actor(act_dim=2, hidden_dim=4, hidden_layers=1)
    params = actor.init(jax.random.key(0), jnp.zeros((1, 3)))
    params = jax.tree.map(lambda x: x * 0.0, params)
    params["params"]["MLP_0"]["Dense_1"]["bias"] = jnp.asarray([0.5, -0.5, 30.0, -30.0])
    mean, log_std = actor.apply(params, jnp.zeros((1, 3)))
    np.testing.assert_allclose(mean, [[0.5, -0.5]])
    np.testing.assert_allclose(log_std, [[sac.LOG_STD_MAX, sac.LOG_STD_MIN]])


def test_one_update_matches_numpy():
    """One jitted update with SGD: the soft target y (target critics, the current actor at s', alpha = exp(log alpha)
    != 1), a gradient step of the critics on sum_i mean (Q_i - y)^2, of the actor on mean(alpha log pi - min_i Q_i)
    with the critics before their step, of log alpha on -mean log alpha (log pi + H_bar), H_bar = -act_dim, and the
    targets moved by tau towards the new critics; rows drawn from the buffer's first ``size`` rows only."""
    rng = np.random.default_rng(3)
    obs_dim, act_dim, capacity, size, lr, gamma, tau = 3, 2, 50, 37, 0.02, 0.9, 0.1
    args = sac.Args(batch_size=32, gamma=gamma, tau=tau, hidden_dim=8, hidden_layers=2)
    nets = sac.make_networks(8, 2, act_dim)
    init, _ = sac.make_init(args, nets, obs_dim, act_dim)
    shapes = jax.eval_shape(init, jax.random.key(0))
    draw = lambda tree: jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), tree)
    actor, critic, critic_target = draw(shapes.actor), draw(shapes.critic), draw(shapes.critic)
    tx = optax.sgd(lr)
    log_alpha = jnp.float32(np.log(0.3))
    state = sac.TrainState(actor=actor, actor_opt=tx.init(actor), critic=critic, critic_target=critic_target,
                           critic_opt=tx.init(critic), log_alpha=log_alpha, alpha_opt=tx.init(log_alpha))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    buffer = sac.Buffer(obs=f32(rng.normal(size=(capacity, obs_dim))), actions=f32(rng.uniform(-1, 1, (capacity,
                        act_dim))), rewards=f32(rng.normal(0, 1, capacity)),
                        next_obs=f32(rng.normal(size=(capacity, obs_dim))), not_done=f32(rng.random(capacity) < 0.7))
    key = jax.random.key(4)
    chunk = jax.jit(sac.make_train_chunk(args, nets, tx, act_dim), static_argnums=4)
    new, metrics = chunk(state, buffer, key, np.int32(size), 1)

    key_batch, key_next, key_pi = jax.random.split(jax.random.split(key, 1)[0], 3)
    rows = np.asarray(jax.random.randint(key_batch, (32,), 0, size))
    noise_next, noise_pi = (np.asarray(jax.random.normal(k, (32, act_dim)), np.float64) for k in (key_next, key_pi))
    obs, actions, next_obs, rewards, not_done = (np.asarray(x, np.float64)[rows] for x in (
        buffer.obs, buffer.actions, buffer.next_obs, buffer.rewards, buffer.not_done))
    alpha = 0.3
    np_actor, np_critic, np_target = ref.to_numpy(actor), ref.to_numpy(critic), ref.to_numpy(critic_target)

    def policy(params, states, noise):  # a = tanh(u) and log pi(a|s)
        mean, log_std = _actor_np(params, states)
        pre_tanh = mean + np.exp(log_std) * noise
        return np.tanh(pre_tanh), _log_prob_np(mean, log_std, pre_tanh)

    next_action, next_log_pi = policy(np_actor, next_obs, noise_next)
    next_q = [_q_np(np_target, next_obs, next_action, i) for i in (0, 1)]
    y = rewards + gamma * not_done * (np.minimum(*next_q) - alpha * next_log_pi)
    assert 0 < not_done.sum() < 32 and np.mean(next_q[0] < next_q[1]) not in (0.0, 1.0)
    # The online critics would give another target: the case tells theta' from theta.
    y_online = rewards + gamma * not_done * (np.minimum(*[_q_np(np_critic, next_obs, next_action, i) for i in (0, 1)])
                                             - alpha * next_log_pi)
    assert abs(np.mean(y_online) - np.mean(y)) > 1e-3

    def critic_loss(params):
        return sum(np.mean((_q_np(params, obs, actions, i) - y) ** 2) for i in (0, 1))

    def actor_loss(params):
        action, log_pi = policy(params, obs, noise_pi)
        return np.mean(alpha * log_pi - np.minimum(*[_q_np(np_critic, obs, action, i) for i in (0, 1)]))

    assert float(metrics["charts/target_mean"]) == pytest.approx(np.mean(y), rel=1e-4)
    assert float(metrics["losses/critic"]) == pytest.approx(critic_loss(np_critic), rel=1e-4)
    assert float(metrics["losses/actor"]) == pytest.approx(actor_loss(np_actor), rel=1e-4)
    ref.assert_gradient_step(critic_loss, critic, new.critic, lr)
    ref.assert_gradient_step(actor_loss, actor, new.actor, lr)
    _, log_pi = policy(np_actor, obs, noise_pi)
    assert float(metrics["charts/entropy"]) == pytest.approx(-np.mean(log_pi), rel=1e-4)
    # log alpha <- log alpha - lr d/d log alpha [-log alpha mean(log pi + H_bar)], H_bar = -act_dim.
    assert float(new.log_alpha) == pytest.approx(np.log(0.3) + lr * np.mean(log_pi - act_dim), rel=1e-5)
    for x, t, c in zip(*(jax.tree.leaves(tree) for tree in (new.critic_target, critic_target, new.critic))):
        np.testing.assert_allclose(x, (1 - tau) * np.asarray(t) + tau * np.asarray(c), rtol=1e-5, atol=1e-6)


def test_insert_wraps_around_the_capacity():
    zeros = lambda *s: jnp.zeros(s)
    buffer = sac.Buffer(obs=zeros(5, 1), actions=zeros(5, 1), rewards=zeros(5), next_obs=zeros(5, 1), not_done=zeros(5))
    rows = sac.Buffer(obs=jnp.arange(3.0)[:, None] + 1, actions=zeros(3, 1), rewards=jnp.arange(3.0) + 1,
                      next_obs=zeros(3, 1), not_done=jnp.ones(3))
    out = sac.insert(buffer, rows, 4)  # steps 4, 5, 6 of a 5-row buffer: rows 4, 0, 1
    np.testing.assert_array_equal(out.rewards, [2.0, 3.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(out.obs[:, 0], [2.0, 3.0, 0.0, 0.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Learning, resume, bad input
# ----------------------------------------------------------------------------------------------

def test_learns_inverted_pendulum(tmp_path, capsys):
    """The 'pendulum' preset (2 x 64 units, 30k steps) balances InvertedPendulum-v5 to its maximum return, 1000."""
    args = dataclasses.replace(sac.PRESETS["pendulum"], out=str(tmp_path / "sac.npz"))
    t0 = time.perf_counter()
    summary = sac.main(args)
    wall = time.perf_counter() - t0
    print(f"learning test: {wall:.0f}s wall, final return {summary['final_return']:.1f}")
    f = np.load(tmp_path / "sac.npz", allow_pickle=False)
    assert str(f["schema"]) == "empo/sac/v1" and str(f["env/id"]) == "InvertedPendulum-v5"
    returns = f["snapshots/return"].mean(axis=1)  # [T]
    assert returns[-1] >= 950, returns
    assert returns[0] < 300  # it was learnt: the first snapshot falls over
    steps = f["snapshots/step"]
    np.testing.assert_array_equal(steps, np.arange(1, len(steps) + 1) * args.eval_every)
    # The final actor is the last snapshot; medium is the snapshot closest to a third of the final return.
    for key in [k for k in f.files if k.startswith("actor/params/")]:
        np.testing.assert_array_equal(f[key], f["snapshots/" + key][-1], err_msg=key)
    medium = int(f["medium/index"])
    assert medium == np.argmin(np.abs(returns - returns[-1] / 3))
    assert f["snapshots/actor/params/MLP_0/Dense_0/kernel"].shape == (len(steps), 4, 64)
    assert f["snapshots/actor/params/MLP_0/Dense_2/kernel"].shape == (len(steps), 64, 2)  # mu and log sigma
    assert any((tmp_path / "sac").iterdir())  # TensorBoard events
    assert not (tmp_path / "sac.checkpoint.npz").exists()


def _small(out, **kw):
    base = dict(env_id="InvertedPendulum-v5", out=str(out), total_steps=3000, learning_starts=1000, eval_every=500,
                eval_episodes=2, checkpoint_every=500, steps_per_call=500, buffer_size=2000, hidden_dim=32,
                batch_size=64)  # the buffer wraps around after 2000 steps
    base.update(kw)
    return sac.Args(**base)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, capsys):
    sac.main(_small(tmp_path / "full" / "sac.npz"))

    def interrupt(self, done, **fields):
        if done == 4:  # after the fourth of six calls: two of them trained
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _small(tmp_path / "cut" / "sac.npz")
    with pytest.raises(KeyboardInterrupt):
        sac.main(args)
    checkpoint = np.load(tmp_path / "cut" / "sac.checkpoint.npz")
    episode = [checkpoint[k] for k in checkpoint.files if k.startswith("leaf_") and checkpoint[k].shape == (2,)
               and checkpoint[k].dtype == np.int64]
    assert len(episode) == 1 and episode[0][1] > 0  # cut in the middle of an episode: resume replays it
    monkeypatch.undo()
    capsys.readouterr()
    sac.main(dataclasses.replace(args, resume=True))
    assert "at unit 4/6" in capsys.readouterr().out
    full, cut = np.load(tmp_path / "full" / "sac.npz"), np.load(tmp_path / "cut" / "sac.npz")
    assert sorted(full.files) == sorted(cut.files)
    for key in full.files:
        if key != "args":
            np.testing.assert_array_equal(full[key], cut[key], err_msg=key)
    assert not (tmp_path / "cut" / "sac.checkpoint.npz").exists()


@pytest.mark.parametrize("case, message", [
    ("env_id", "'NoSuchTask-v0' is not a registered Gymnasium environment"),
    ("total_steps", "--total-steps must be at least 1, got 0"),
    ("steps_per_call", "--steps-per-call must be at least 1, got -5"),
    ("eval_every", "--eval-every 700 must be a multiple of --steps-per-call 500"),
    ("buffer_size", "needs a time limit of at most --buffer-size 100 steps"),
    ("gamma", "--gamma"),
    ("discrete", "needs Box observations and bounded Box actions"),
])
def test_bad_input_gives_one_sentence_and_leaves_out_untouched(tmp_path, case, message):
    kw = {"env_id": dict(env_id="NoSuchTask-v0"), "total_steps": dict(total_steps=0),
          "steps_per_call": dict(steps_per_call=-5), "eval_every": dict(eval_every=700),
          "buffer_size": dict(buffer_size=100), "gamma": dict(gamma=1.5), "discrete": dict(env_id="CartPole-v1")}[case]
    out = tmp_path / "sac.npz"
    out.write_bytes(b"an earlier result")
    with pytest.raises(empo_io.InputError, match=message) as err:
        sac.main(_small(out, **kw))
    assert "\n" not in str(err.value)
    assert out.read_bytes() == b"an earlier result"


def test_a_checkpoint_that_does_not_replay_is_refused(tmp_path, monkeypatch):
    """The buffer's observations of the current episode are what --resume checks the replayed environment against."""
    def interrupt(self, done, **fields):
        if done == 4:  # in the middle of an episode (test_interrupted_run_resumes_to_the_same_result)
            raise KeyboardInterrupt

    monkeypatch.setattr(empo_io.Progress, "__call__", interrupt)
    args = _small(tmp_path / "sac.npz")
    with pytest.raises(KeyboardInterrupt):
        sac.main(args)
    monkeypatch.undo()
    path = tmp_path / "sac.checkpoint.npz"
    arrays = dict(np.load(path))
    arrays["leaf_0000"] = arrays["leaf_0000"] + 1e-3  # the buffer's observations (the first leaf), shifted
    np.savez(path, **arrays)
    with pytest.raises(empo_io.InputError, match="did not replay to the checkpoint's state"):
        sac.main(dataclasses.replace(args, resume=True))


def test_command_line_bad_input_is_one_sentence(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "behaviour", "sac.py"), "--env-id", "NoSuchTask-v0",
                             "--out", str(tmp_path / "sac.npz")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: 'NoSuchTask-v0' is not a registered Gymnasium environment")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
