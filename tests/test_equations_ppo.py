"""Stage 2 (empo_ppo.py): the jitted SARSA step (Eq. 11, 13), V step (Eq. 12) and full-batch PPO step (Eq. 14)
against NumPy, on K = 2 clusters with rows of both, non-terminal rows that bootstrap, a target network that
differs from the online one, gamma != 1 and tau_Q != 0.5. The loss functions alone are tested in test_ppo.py."""

import chex
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest

import empo_ppo as ep

SCALE = (0.2, 0.2)
K = 2


def _problem(n=40, seed=0, k=K, chunk=16):
    """Random networks of stage 2's shapes (k heads, hidden 8 x 2), a data set of n rows and the run's inputs (its
    rows grouped by cluster in chunks of ``chunk``). The target network and pi_L are
    drawn apart from Q and beta."""
    rng = np.random.default_rng(seed)
    policy, q_net, v_net = ep.make_networks(8, 2, k, 2, SCALE)
    init, _ = ep.make_init(ep.Args(), q_net, v_net, 2, 2)
    stacked_init = lambda key: jax.vmap(policy.init, in_axes=(0, None))(jax.random.split(key, k), jnp.zeros((1, 2)))
    beta_shapes = jax.eval_shape(stacked_init, jax.random.key(0))
    shapes = jax.eval_shape(init, jax.random.key(0), beta_shapes)
    draw = lambda tree, s=0.5: jax.tree.map(lambda x: jnp.asarray(rng.normal(0, s, x.shape), x.dtype), tree)
    beta = draw(shapes.pi)
    nets = dict(q=draw(shapes.q), q_target=draw(shapes.q), v=draw(shapes.v), beta=beta,
                pi=jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype), beta))
    total = n
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    data = ep.Data(obs=f32(rng.normal(size=(total, 2))), actions=f32(rng.uniform(-0.2, 0.2, (total, 2))),
                   rewards=f32(rng.normal(-1, 0.5, total)), next_obs=f32(rng.normal(size=(total, 2))),
                   next_actions=jnp.zeros((total, 2)), bootstrap=f32(rng.random(total) < 0.7),
                   timeout_end=jnp.zeros(total, bool), returns=f32(rng.normal(-3, 1, total)))
    assign = rng.choice(k, total, p=np.arange(1, k + 1) / np.arange(1, k + 1).sum()).astype(np.int32)  # unequal
    groups = ep.cluster_chunks(assign[None], k, chunk)
    run = ep.RunInputs(beta=beta, assign=jnp.asarray(assign), next_actions=f32(rng.uniform(-0.2, 0.2, (total, 2))),
                       groups=tuple(jnp.asarray(x[0]) for x in groups))
    return (policy, q_net, v_net), nets, data, run


def _state(nets, tx):
    return ep.TrainState(q=nets["q"], q_target=nets["q_target"], q_opt=tx.init(nets["q"]), v=nets["v"],
                         v_opt=tx.init(nets["v"]), pi=nets["pi"], pi_opt=tx.init(nets["pi"]), q_step=jnp.int32(0))


def _q_np(params, obs, actions):
    """Q(s, a; psi) -> R^K on [s, a / a_max]."""
    return ref.mlp(params["params"], np.concatenate([obs, np.asarray(actions) / np.asarray(SCALE)], 1))


def _rows(values, z):
    return values[np.arange(len(z)), z]


def test_sarsa_step_bootstraps_from_the_target_network_of_the_rows_cluster():
    """One SARSA step: target r + gamma (1 - d) Q(s', a'; psi_bar)_A (Eq. 11), a gradient step on
    [Q(s, a; psi)_A - target]^2, then psi_bar <- (1 - tau_Q) psi_bar + tau_Q psi (Eq. 13, n_Q = 1)."""
    (_, q_net, _), nets, data, run = _problem()
    lr = 0.1
    tx = optax.sgd(lr)
    args = ep.Args(gamma=0.9, q_target_every=1, q_target_rate=0.3, batch_size=32)
    chunk = jax.jit(ep.make_q_chunk(args, q_net, tx, 40, SCALE), static_argnums=4)
    key = jax.random.key(1)
    new, metrics = chunk(_state(nets, tx), key, run, data, 1)

    rows = ref.batch_rows(key, 1, 32, 40)[0]
    z = np.asarray(run.assign)[rows]
    assert set(z) == {0, 1}
    q_bar = ref.to_numpy(nets["q_target"])
    next_q = _q_np(q_bar, np.asarray(data.next_obs)[rows], np.asarray(run.next_actions)[rows])  # [B, K]
    boot = np.asarray(data.bootstrap)[rows]
    assert 0 < boot.sum() < len(rows)  # rows that bootstrap and rows after a terminal
    target = np.asarray(data.rewards)[rows] + 0.9 * boot * _rows(next_q, z)  # Eq. (11)

    def loss(params):
        q_sa = _rows(_q_np(params, np.asarray(data.obs)[rows], np.asarray(data.actions)[rows]), z)
        return np.mean((q_sa - target) ** 2)

    assert float(metrics["charts/q_target_mean"]) == pytest.approx(np.mean(target), rel=1e-5)
    assert float(metrics["losses/q"]) == pytest.approx(loss(ref.to_numpy(nets["q"])), rel=1e-4)
    # The online network bootstraps to something else: the test tells psi from psi_bar, and the heads apart.
    online = _q_np(ref.to_numpy(nets["q"]), np.asarray(data.next_obs)[rows], np.asarray(run.next_actions)[rows])
    assert abs(np.mean(boot * _rows(online, z)) - np.mean(boot * _rows(next_q, z))) > 0.05
    assert abs(np.mean(boot * next_q[:, 0]) - np.mean(boot * _rows(next_q, z))) > 0.05
    ref.assert_gradient_step(loss, nets["q"], new.q, lr)
    # Eq. (13) with tau_Q = 0.3, towards the just-updated psi.
    expected = jax.tree.map(lambda t, p: 0.7 * t + 0.3 * p, q_bar, ref.to_numpy(new.q))
    chex.assert_trees_all_close(ref.to_numpy(new.q_target), expected, rtol=1e-5, atol=1e-6)
    assert int(new.q_step) == 1


def test_target_network_moves_every_n_q_steps_only():
    """n_Q = 2: step 1 leaves psi_bar alone, step 2 moves it by tau_Q towards psi (Eq. 13)."""
    (_, q_net, _), nets, data, run = _problem()
    tx = optax.sgd(0.1)
    args = ep.Args(gamma=0.9, q_target_every=2, q_target_rate=0.3, batch_size=32)
    chunk = jax.jit(ep.make_q_chunk(args, q_net, tx, 40, SCALE), static_argnums=4)
    one, _ = chunk(_state(nets, tx), jax.random.key(2), run, data, 1)
    chex.assert_trees_all_equal(one.q_target, nets["q_target"])
    two, _ = chunk(one, jax.random.key(3), run, data, 1)
    expected = jax.tree.map(lambda t, p: 0.7 * t + 0.3 * p, ref.to_numpy(nets["q_target"]), ref.to_numpy(two.q))
    chex.assert_trees_all_close(ref.to_numpy(two.q_target), expected, rtol=1e-5, atol=1e-6)
    assert int(two.q_step) == 2


def test_v_step_regresses_the_rows_cluster_head_on_the_return():
    """One V step (Eq. 12): [V(s; phi)_A(s,a) - R(s)]^2 on a minibatch, a gradient step."""
    (_, _, v_net), nets, data, run = _problem()
    lr = 0.1
    tx = optax.sgd(lr)
    key = jax.random.key(4)
    new, metrics = jax.jit(ep.make_v_epoch(ep.Args(batch_size=64), v_net, tx, 40))(_state(nets, tx), key, run, data)
    rows = ref.batch_rows(key, 1, 64, 40)[0]
    z = np.asarray(run.assign)[rows]

    def loss(params):
        return np.mean((_rows(ref.mlp(params["params"], np.asarray(data.obs)[rows]), z)
                        - np.asarray(data.returns)[rows]) ** 2)

    assert float(metrics["losses/v"]) == pytest.approx(loss(ref.to_numpy(nets["v"])), rel=1e-4)
    head0 = np.mean((ref.mlp(ref.to_numpy(nets["v"])["params"], np.asarray(data.obs)[rows])[:, 0]
                     - np.asarray(data.returns)[rows]) ** 2)
    assert abs(head0 - float(metrics["losses/v"])) > 0.05  # the heads differ: the row's cluster matters
    ref.assert_gradient_step(loss, nets["v"], new.v, lr)
    chex.assert_trees_all_equal(new.q, nets["q"])


def test_full_batch_ppo_step_uses_each_rows_cluster_and_the_clipped_ratio():
    """One full-batch PPO epoch (Eq. 14) over 40 rows in chunks of 16 of one cluster each: a' ~ beta(.|s, A(s,a)),
    rho = pi_L / beta at a', A = (Q(s, a') - V(s))_A(s,a), surrogate min(rho A, clip(rho, 0.8, 1.2) A); the step is
    a gradient step on minus its mean."""
    (policy, q_net, v_net), nets, data, run = _problem(n=40)
    lr = 1.0
    tx = optax.sgd(lr)
    args = ep.Args(chunk=16, clip=0.2)
    key = jax.random.key(5)
    new, stats = jax.jit(ep.make_ppo_epoch(args, policy, q_net, v_net, tx, 40, K, SCALE))(
        _state(nets, tx), key, run, data)

    noise = np.asarray(jax.random.normal(key, data.actions.shape), np.float64)  # one a' per row and epoch
    obs, z = np.asarray(data.obs), np.asarray(run.assign)
    beta = ref.to_numpy(nets["beta"])

    def head(params, x):  # the (mean, log_std) of each row's own cluster
        out = [ref.gaussian_policy(ref.pick(params, c)["params"], x, SCALE) for c in range(K)]
        return tuple(np.where((z == 0)[:, None], out[0][i], out[1][i]) for i in range(2))

    beta_mean, beta_log_std = head(beta, obs)
    a_new = beta_mean + np.exp(beta_log_std) * noise
    log_beta = ref.log_normal(beta_mean, beta_log_std, a_new)
    q_all = _q_np(ref.to_numpy(nets["q"]), obs, np.clip(a_new, -0.2, 0.2))
    v_all = ref.mlp(ref.to_numpy(nets["v"])["params"], obs)
    adv = _rows(q_all - v_all, z)

    def surrogate(pi):
        ratio = np.exp(ref.log_normal(*head(pi, obs), a_new) - log_beta)
        return np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv), ratio

    surr, ratio = surrogate(ref.to_numpy(nets["pi"]))
    clipped = np.abs(ratio - 1) > 0.2
    assert 3 <= clipped.sum() <= 37  # some rows clipped, most not
    assert float(stats["surrogate"]) == pytest.approx(np.sum(surr), rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(stats["adv_z"], [np.sum(adv * (z == c)) for c in range(K)], rtol=1e-4)
    np.testing.assert_allclose(stats["count_z"], [np.sum((z == c)) for c in range(K)])
    assert float(stats["clipped"]) == clipped.sum()
    assert float(stats["ratio"]) == pytest.approx(np.sum(ratio), rel=1e-5)
    # Head 0 for every row would give another advantage: the case tells the heads apart.
    assert np.abs(adv - (q_all - v_all)[:, 0])[z == 1].max() > 0.1
    ref.assert_gradient_step(lambda pi: -np.sum(surrogate(pi)[0]) / 40, nets["pi"], new.pi, lr)


def test_one_head_per_row_equals_every_head_then_the_rows_own():
    """The full-batch PPO epoch computes each row's own policy head only (rows grouped by cluster, chunks of 16).
    On K = 3 clusters of unequal sizes (part-filled chunks), its surrogate, statistics and gradient equal those of
    every head on every row, then the row's own (stacked_apply, the formulation it replaces), to float rounding:
    only the order of the sums differs."""
    k, n = 3, 100
    (policy, q_net, v_net), nets, data, run = _problem(n=n, seed=3, k=k)
    tx = optax.sgd(1.0)  # the parameter change is minus the gradient
    args = ep.Args(chunk=16, clip=0.2)
    key = jax.random.key(7)
    state = _state(nets, tx)
    new, stats = jax.jit(ep.make_ppo_epoch(args, policy, q_net, v_net, tx, n, k, SCALE))(state, key, run, data)
    assert run.groups[0].shape == (ep.math.ceil(n / 16) + k - 1, 16)

    noise = jax.random.normal(key, data.actions.shape)
    scale = jnp.asarray(SCALE)

    def every_head(pi):
        z = run.assign
        beta_mean, beta_log_std = ep.stacked_apply(policy, run.beta, data.obs, z)
        a_new = beta_mean + jnp.exp(beta_log_std) * noise
        log_beta = ep.gaussian_log_prob(beta_mean, beta_log_std, a_new)
        q = q_net.apply(state.q, jnp.concatenate([data.obs, jnp.clip(a_new, -scale, scale) / scale], 1))
        adv = ep.select(q - v_net.apply(state.v, data.obs), z)
        log_pi = ep.gaussian_log_prob(*ep.stacked_apply(policy, pi, data.obs, z), a_new)
        surrogate = jnp.sum(ep.ppo_surrogate(log_pi, log_beta, adv, args.clip))
        return -surrogate / n, (surrogate, jax.nn.one_hot(z, k).T @ adv)

    grad, (surrogate, adv_z) = jax.grad(every_head, has_aux=True)(state.pi)
    assert float(stats["surrogate"]) == pytest.approx(float(surrogate), rel=1e-5)
    np.testing.assert_allclose(stats["adv_z"], adv_z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["count_z"], [np.sum(np.asarray(run.assign) == c) for c in range(k)])
    step = jax.tree.map(lambda before, after: before - after, state.pi, new.pi)
    for a, b in zip(jax.tree.leaves(step), jax.tree.leaves(grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert all(float(jnp.abs(g[c]).max()) > 0 for g in jax.tree.leaves(grad) for c in range(k))  # every head moves
