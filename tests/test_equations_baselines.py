"""Baselines: the jitted TD3+BC step (critic target and loss, lambda = alpha / mean|Q|, actor loss), the BC step and
the IQL step (V, then pi with the new V, then Q with the new V, then the targets) against NumPy, with target networks
that differ from the online ones, bootstrapping and terminal rows, gamma != 1
and Q of both signs; a TD3+BC learning test with a known better action. The loss functions alone are tested in
test_td3_bc.py and test_bc.py."""

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest

import empo_io
from baselines import bc, iql
from baselines import td3_bc as td

SCALE = (0.2, 0.5)  # a_max per dimension, unequal so that a / a_max matters


def _actor_np(params, obs):
    return np.asarray(SCALE) * np.tanh(ref.mlp(params["params"]["MLP_0"], obs))


def _critic_np(critic, obs, actions, i):
    """Q_i(s, a) on [s, a / a_max] with the stacked critic parameters."""
    return ref.mlp(ref.pick(critic, i)["params"], np.concatenate([obs, actions / np.asarray(SCALE)], 1))[:, 0]


def test_actor_loss_lambda_is_alpha_over_the_mean_absolute_q():
    """lambda = alpha / mean_B |Q1(s, pi(s))| with Q of both signs, where mean |Q| and |mean Q| differ."""
    rng = np.random.default_rng(0)
    q_pi = rng.normal(-0.5, 2.0, size=64).astype(np.float32)
    pi, actions = (rng.uniform(-0.2, 0.2, size=(64, 2)).astype(np.float32) for _ in range(2))
    loss, (lam, bc_term) = td.actor_loss(jnp.asarray(q_pi), jnp.asarray(pi), jnp.asarray(actions), 2.5)
    lam_ref = 2.5 / np.mean(np.abs(q_pi))
    assert abs(np.mean(np.abs(q_pi)) - abs(np.mean(q_pi))) > 0.5  # the two readings of lambda differ here
    assert float(lam) == pytest.approx(lam_ref, rel=1e-5)
    assert float(loss) == pytest.approx(-lam_ref * np.mean(q_pi) + np.mean((pi - actions) ** 2), rel=1e-5)


def test_td3_bc_step_matches_numpy():
    """Critic step 2 of a chunk (d = 2, so the actor updates too): y = r + gamma (1 - d) min_i Q_i(s', a~; theta_i')
    with a~ = clip(pi(s'; phi') + clip(sigma e, -c, c), -a_max, a_max); a gradient step on sum_i mean (Q_i - y)^2;
    then a gradient step of the actor on -lambda mean Q1(s, pi(s)) + mean (pi(s) - a)^2 with the updated Q1."""
    rng = np.random.default_rng(1)
    n, gamma, alpha = 40, 0.9, 2.5
    nets = td.make_networks(8, 2, 2, SCALE)
    args = td.Args(batch_size=32, gamma=gamma, alpha=alpha, hidden_dim=8, hidden_layers=2, tau=0.1)
    init, _ = td.make_init(args, nets, 2, 2)
    shapes = jax.eval_shape(init, jax.random.key(0))
    draw = lambda tree: jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), tree)
    actor, actor_target, critic, critic_target = (draw(shapes.actor), draw(shapes.actor), draw(shapes.critic),
                                                  draw(shapes.critic))
    lr = 0.05
    tx = optax.sgd(lr)
    state = td.TrainState(actor=actor, actor_target=actor_target, actor_opt=tx.init(actor), critic=critic,
                          critic_target=critic_target, critic_opt=tx.init(critic))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    data = td.Data(obs=f32(rng.normal(size=(n, 2))), actions=f32(rng.uniform(-1, 1, (n, 2)) * np.asarray(SCALE)),
                   rewards=f32(rng.normal(-1, 0.5, n)), next_obs=f32(rng.normal(size=(n, 2))),
                   not_done=f32(rng.random(n) < 0.7))
    key = jax.random.key(2)
    chunk = jax.jit(td.make_train_chunk(args, nets, tx, n, SCALE), static_argnums=4)
    new, metrics = chunk(state, key, data, np.int32(1), 1)
    assert float(metrics["actor_updates"]) == 1.0

    key_batch, key_noise = jax.random.split(jax.random.split(key, 1)[0])
    rows = np.asarray(jax.random.randint(key_batch, (32,), 0, n))
    noise = np.asarray(jax.random.normal(key_noise, (32, 2)), np.float64)
    obs, actions, next_obs = (np.asarray(x)[rows] for x in (data.obs, data.actions, data.next_obs))
    rewards, not_done = np.asarray(data.rewards)[rows], np.asarray(data.not_done)[rows]
    a_max = np.asarray(SCALE)
    smoothing = np.clip(0.2 * a_max * noise, -0.5 * a_max, 0.5 * a_max)
    next_action = np.clip(_actor_np(ref.to_numpy(actor_target), next_obs) + smoothing, -a_max, a_max)
    targets = [_critic_np(ref.to_numpy(critic_target), next_obs, next_action, i) for i in (0, 1)]
    y = rewards + gamma * not_done * np.minimum(*targets)
    assert 0 < not_done.sum() < len(rows) and np.mean(targets[0] < targets[1]) not in (0.0, 1.0)

    def critic_loss(params):
        return sum(np.mean((_critic_np(params, obs, actions, i) - y) ** 2) for i in (0, 1))

    assert float(metrics["charts/target_mean"]) == pytest.approx(np.mean(y), rel=1e-5)
    assert float(metrics["losses/critic"]) == pytest.approx(critic_loss(ref.to_numpy(critic)), rel=1e-4)
    # The online networks give another target: the case tells phi' from phi and theta' from theta.
    online = np.clip(_actor_np(ref.to_numpy(actor), next_obs) + smoothing, -a_max, a_max)
    y_online = rewards + gamma * not_done * np.minimum(*[_critic_np(ref.to_numpy(critic_target), next_obs, online, i)
                                                         for i in (0, 1)])
    y_theta = rewards + gamma * not_done * np.minimum(*[_critic_np(ref.to_numpy(critic), next_obs, next_action, i)
                                                        for i in (0, 1)])
    assert abs(np.mean(y_online) - np.mean(y)) > 1e-3 and abs(np.mean(y_theta) - np.mean(y)) > 1e-3
    ref.assert_gradient_step(critic_loss, critic, new.critic, lr)

    critic_after = ref.to_numpy(new.critic)

    def actor_loss(params):
        pi = _actor_np(params, obs)
        q_pi = _critic_np(critic_after, obs, pi, 0)
        lam = alpha / np.mean(np.abs(q_pi))  # held constant in the gradient
        return -lam * np.mean(q_pi) + np.mean((pi - actions) ** 2), lam, q_pi

    loss, lam, q_pi = actor_loss(ref.to_numpy(actor))
    assert abs(np.mean(np.abs(q_pi)) - abs(np.mean(q_pi))) > 0.01 * np.mean(np.abs(q_pi))  # Q of both signs
    assert float(metrics["charts/lambda"]) == pytest.approx(lam, rel=1e-4)
    assert float(metrics["losses/actor"]) == pytest.approx(loss, rel=1e-4)
    assert float(metrics["losses/bc"]) == pytest.approx(np.mean((_actor_np(ref.to_numpy(actor), obs) - actions) ** 2),
                                                        rel=1e-4)
    fixed_lambda = lambda params: -lam * np.mean(_critic_np(critic_after, obs, _actor_np(params, obs), 0)) + np.mean(
        (_actor_np(params, obs) - actions) ** 2)
    ref.assert_gradient_step(fixed_lambda, actor, new.actor, lr)


def test_bc_step_matches_numpy():
    """One BC step: a gradient step on -mean_B log N(a; mu(s), sigma(s)^2) (the log-density summed over actions)."""
    rng = np.random.default_rng(3)
    n = 40
    policy = bc.GaussianPolicy(2, SCALE, 8, 2)
    shapes = jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 2)))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), shapes)
    lr = 0.01
    tx = optax.sgd(lr)
    data = bc.Data(obs=jnp.asarray(rng.normal(size=(n, 2)), jnp.float32),
                   actions=jnp.asarray(rng.uniform(-1, 1, (n, 2)) * np.asarray(SCALE), jnp.float32))
    key = jax.random.key(4)
    new, metrics = jax.jit(bc.make_train_chunk(bc.Args(batch_size=32), policy, tx, n), static_argnums=3)(
        bc.TrainState(policy=params, policy_opt=tx.init(params)), key, data, 1)
    rows = ref.batch_rows(key, 1, 32, n)[0]
    obs, actions = np.asarray(data.obs)[rows], np.asarray(data.actions)[rows]
    loss = lambda p: -np.mean(ref.log_normal(*ref.gaussian_policy(p["params"], obs, SCALE), actions))
    assert float(metrics["losses/nll"]) == pytest.approx(loss(ref.to_numpy(params)), rel=1e-4)
    ref.assert_gradient_step(loss, params, new.policy, lr)


def test_iql_step_matches_numpy():
    """One IQL step with SGD: V on the 0.7-expectile of min_i Q_i(s, a; theta_i'); pi on -mean min(exp(beta (min_i
    Q_i(s, a; theta_i') - V_new(s))), 100) log pi(a|s); Q on sum_i mean (Q_i - r - gamma (1 - d) V_new(s'))^2; then
    theta' <- tau theta + (1 - tau) theta'. Target critics differ from the online ones, terminals and bootstrapping
    rows are mixed, advantages have both signs."""
    rng = np.random.default_rng(6)
    n, gamma, lr = 40, 0.9, 0.05
    args = iql.Args(batch_size=32, gamma=gamma, expectile=0.7, temperature=3.0, tau=0.1, hidden_dim=8,
                    hidden_layers=2)
    nets = iql.make_networks(8, 2, 2, SCALE)
    init, _ = iql.make_init(args, nets, 2, 2)
    shapes = jax.eval_shape(init, jax.random.key(0))
    draw = lambda tree: jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), tree)
    actor, critic, critic_target, value = (draw(shapes.actor), draw(shapes.critic), draw(shapes.critic),
                                           draw(shapes.value))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    data = iql.Data(obs=f32(rng.normal(size=(n, 2))), actions=f32(rng.uniform(-1, 1, (n, 2)) * np.asarray(SCALE)),
                    rewards=f32(rng.normal(-1, 0.5, n)), next_obs=f32(rng.normal(size=(n, 2))),
                    not_done=f32(rng.random(n) < 0.7))
    # Output biases that let the twins' min switch between them and the advantages take both signs.
    critic_target["params"]["Dense_2"]["bias"] = jnp.zeros((2, 1))
    x = jnp.concatenate([data.obs, data.actions], 1)
    q_min = jnp.min(jax.vmap(lambda p: nets["critic"].apply(p, x)[:, 0])(critic_target), 0)
    value["params"]["Dense_2"]["bias"] = value["params"]["Dense_2"]["bias"] + jnp.median(
        q_min - nets["value"].apply(value, data.obs)[:, 0])
    tx = optax.sgd(lr)
    txs = {"actor": tx, "critic": tx, "value": tx}
    state = iql.TrainState(actor=actor, actor_opt=tx.init(actor), critic=critic, critic_target=critic_target,
                           critic_opt=tx.init(critic), value=value, value_opt=tx.init(value))
    key = jax.random.key(7)
    new, metrics = jax.jit(iql.make_train_chunk(args, nets, txs, n), static_argnums=3)(state, key, data, 1)

    rows = ref.batch_rows(key, 1, 32, n)[0]
    obs, actions, next_obs = (np.asarray(x, np.float64)[rows] for x in (data.obs, data.actions, data.next_obs))
    rewards, not_done = np.asarray(data.rewards)[rows], np.asarray(data.not_done)[rows]
    q_np = lambda p, i: ref.mlp(ref.pick(p, i)["params"], np.concatenate([obs, actions], 1))[:, 0]
    v_np = lambda p, x: ref.mlp(p["params"], x)[:, 0]
    target_q = np.minimum(q_np(ref.to_numpy(critic_target), 0), q_np(ref.to_numpy(critic_target), 1))
    assert np.mean(q_np(ref.to_numpy(critic_target), 0) < q_np(ref.to_numpy(critic_target), 1)) not in (0.0, 1.0)

    def value_loss(p):
        u = target_q - v_np(p, obs)
        return np.mean(np.where(u > 0, 0.7, 0.3) * u ** 2)

    assert float(metrics["losses/value"]) == pytest.approx(value_loss(ref.to_numpy(value)), rel=1e-4)
    ref.assert_gradient_step(value_loss, value, new.value, lr)

    value_after = ref.to_numpy(new.value)
    adv = target_q - v_np(value_after, obs)
    weights = np.minimum(np.exp(3.0 * adv), 100.0)
    assert adv.min() < 0 < adv.max()

    def actor_loss(p):
        mean = np.asarray(SCALE) * np.tanh(ref.mlp(p["params"]["MLP_0"], obs))
        log_std = np.clip(p["params"]["log_std"], -5.0, 2.0)
        return -np.mean(weights * ref.log_normal(mean, log_std, actions))

    assert float(metrics["charts/weight_mean"]) == pytest.approx(np.mean(weights), rel=1e-4)
    assert float(metrics["losses/actor"]) == pytest.approx(actor_loss(ref.to_numpy(actor)), rel=1e-4)
    ref.assert_gradient_step(actor_loss, actor, new.actor, lr)

    y = rewards + gamma * not_done * v_np(value_after, next_obs)
    y_old_v = rewards + gamma * not_done * v_np(ref.to_numpy(value), next_obs)
    assert 0 < not_done.sum() < len(rows) and abs(np.mean(y_old_v) - np.mean(y)) > 1e-4

    def critic_loss(p):
        return sum(np.mean((q_np(p, i) - y) ** 2) for i in (0, 1))

    assert float(metrics["charts/target_mean"]) == pytest.approx(np.mean(y), rel=1e-5)
    assert float(metrics["losses/critic"]) == pytest.approx(critic_loss(ref.to_numpy(critic)), rel=1e-4)
    ref.assert_gradient_step(critic_loss, critic, new.critic, lr)
    expected = jax.tree.map(lambda t, p: 0.9 * np.asarray(t) + 0.1 * np.asarray(p), critic_target, new.critic)
    for x, e in zip(jax.tree.leaves(new.critic_target), jax.tree.leaves(expected)):
        np.testing.assert_allclose(x, e, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Learning: a known better action
# ----------------------------------------------------------------------------------------------

def _better_action_data(path, episodes=500, length=3, best=0.1):
    """Trajectories of 3 steps in [0, 1]^2 with uniform actions in [-0.2, 0.2]^2; each step costs 10 |a_0 - best|
    (a_1 is free). Half the trajectories end in a terminal, half by a timeout, so most rows bootstrap."""
    rng = np.random.default_rng(5)
    n = episodes * length
    obs = rng.uniform(0, 1, (n, 2)).astype(np.float32)
    next_obs = np.roll(obs, -1, axis=0)
    actions = rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32)
    last = np.arange(n) % length == length - 1
    terminal_episode = np.repeat(np.arange(episodes) % 2 == 0, length)
    data = dict(observations=obs, actions=actions, rewards=(-10 * np.abs(actions[:, 0] - best)).astype(np.float32),
                next_observations=next_obs, terminals=last & terminal_episode, timeouts=last & ~terminal_episode,
                episode_ids=np.repeat(np.arange(episodes), length).astype(np.int32),
                behaviour=np.zeros(n, np.int32))
    empo_io.save_npz(str(path), data, empo_io.DATASET_SCHEMA, {})
    return obs


def test_td3_bc_actor_moves_to_the_better_action(tmp_path):
    obs = _better_action_data(tmp_path / "data.npz")
    td.main(td.Args(dataset=str(tmp_path / "data.npz"), out=str(tmp_path / "td3_bc.npz"), steps=3000,
                    steps_per_call=3000, hidden_dim=32, hidden_layers=2, learning_rate=1e-3, eval_episodes=0))
    f = np.load(tmp_path / "td3_bc.npz")
    actor = {"params": jax.tree.map(lambda x: x[0], empo_io.unflatten_params("actor/params", f))}
    pi = np.asarray(td.make_networks(32, 2, 2, tuple(f["arch/action_scale"].tolist()))["actor"].apply(
        actor, (obs - f["arch/obs_mean"]) / f["arch/obs_std"]))
    # The data's mean action is 0 (what BC alone would give); the Q term moves a_0 to the better action 0.1.
    assert abs(np.mean(pi[:, 0]) - 0.1) < 0.03 and np.std(pi[:, 0]) < 0.03
