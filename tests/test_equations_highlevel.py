"""Stage 3 (empo_highlevel.py): the jitted IQL step (l_H^(Q) with the n-step target, l_H^(V) with the expectile
loss) and the final policy (ID(s), pi_H, pi) against NumPy, on K >= 2 clusters with rows of each, bootstrapping
rows, a target network that differs from the online one and tau != 0.5. The loss functions and the n-step
target alone are tested in test_highlevel.py."""

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest

import empo_highlevel as eh

SCALE = (0.2, 0.2)


def _draw(rng, tree, s=0.5):
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, s, x.shape), x.dtype), tree)


def test_iql_step_matches_numpy():
    """One simultaneous step: Q_H(s)_A regressed on y = sum_j gamma^j r + gamma^m V_H(s_{t+m}) (the current phi_H),
    V_H(s) on the tau-expectile of Q_H(s; psi_bar_H)_A; both gradients at the parameters before the step."""
    rng = np.random.default_rng(0)
    n, k, tau = 40, 2, 0.8
    nets = eh.make_networks(8, 2, k, 2, SCALE)
    args = eh.Args(batch_size=32, expectile=tau, target_every=1000)
    init, _ = eh.make_init(args, nets, 2)
    shapes = jax.eval_shape(init, jax.random.key(0))
    qh, qh_target, vh = _draw(rng, shapes.qh), _draw(rng, shapes.qh), _draw(rng, shapes.vh)
    lr = 0.1
    tx = optax.sgd(lr)
    state = eh.TrainState(qh=qh, qh_target=qh_target, qh_opt=tx.init(qh), vh=vh, vh_opt=tx.init(vh),
                          step=jnp.int32(0))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    data = eh.Data(obs=f32(rng.normal(size=(n, 2))), reward_sum=f32(rng.normal(-2, 1, n)),
                   discount=f32(np.where(rng.random(n) < 0.3, 0.0, rng.choice([0.9, 0.81, 0.729], n))),
                   bootstrap_obs=f32(rng.normal(size=(n, 2))))
    assign = jnp.asarray(rng.integers(0, k, n), jnp.int32)
    key = jax.random.key(1)
    new, metrics = jax.jit(eh.make_train_chunk(args, nets, tx, n), static_argnums=4)(state, key, assign, data, 1)

    rows = ref.batch_rows(key, 1, 32, n)[0]
    z = np.asarray(assign)[rows]
    obs = np.asarray(data.obs)[rows]
    select = lambda values: values[np.arange(len(z)), z]
    v_next = ref.mlp(ref.to_numpy(vh)["params"], np.asarray(data.bootstrap_obs)[rows])[:, 0]
    y = np.asarray(data.reward_sum)[rows] + np.asarray(data.discount)[rows] * v_next  # the n-step target
    q_bar = select(ref.mlp(ref.to_numpy(qh_target)["params"], obs))

    def q_loss(params):
        return np.mean((select(ref.mlp(params["params"], obs)) - y) ** 2)

    def v_loss(params):
        u = q_bar - ref.mlp(params["params"], obs)[:, 0]
        return np.mean(np.where(u >= 0, tau, 1 - tau) * u * u)  # L_2^tau

    assert set(z) == {0, 1} and 0 < np.sum(np.asarray(data.discount)[rows] == 0) < len(rows)
    assert float(metrics["losses/q_h"]) == pytest.approx(q_loss(ref.to_numpy(qh)), rel=1e-4)
    assert float(metrics["losses/v_h"]) == pytest.approx(v_loss(ref.to_numpy(vh)), rel=1e-4)
    # The case tells psi_bar_H from psi_H, tau from 1 - tau and V_H from Q_H in the target, far outside rel=1e-4.
    v_s = ref.mlp(ref.to_numpy(vh)["params"], obs)[:, 0]
    q_online, u = select(ref.mlp(ref.to_numpy(qh)["params"], obs)), q_bar - v_s
    y_with_q = np.asarray(data.reward_sum)[rows] + np.asarray(data.discount)[rows] * select(
        ref.mlp(ref.to_numpy(qh_target)["params"], np.asarray(data.bootstrap_obs)[rows]))
    differs = lambda a, b: abs(a - b) > 0.01 * abs(b)
    assert differs(np.mean((q_online - v_s) ** 2), np.mean(u * u))
    assert differs(np.mean(np.where(u >= 0, 1 - tau, tau) * u * u), v_loss(ref.to_numpy(vh)))
    assert differs(np.mean((q_online - y_with_q) ** 2), q_loss(ref.to_numpy(qh)))
    ref.assert_gradient_step(q_loss, qh, new.qh, lr)
    ref.assert_gradient_step(v_loss, vh, new.vh, lr)


def test_final_policy_matches_numpy():
    """pi(.|s) = pi_L(.|s, pi_H(s)), pi_H(s) = argmax_{z in ID(s)} Q_H(s, z), ID(s) = {z : q(z|s) >= max q / b},
    with K = 3: the classifier's softmax, the filter, the masked argmax and the chosen policy's mean.

    Linear networks set by hand (no hidden layer) make the case cover what matters: logits (2x, -2x, 0) keep one
    cluster in ID(s) far from x = 0 and all three near it; Q_H = (y, -y, 0.5) prefers each cluster somewhere.
    """
    rng = np.random.default_rng(2)
    k, b = 3, 5.0
    nets = eh.make_networks(8, 0, k, 2, SCALE)
    dense = lambda kernel, bias: {"params": {"Dense_0": {"kernel": jnp.asarray(kernel, jnp.float32),
                                                         "bias": jnp.asarray(bias, jnp.float32)}}}
    classifier = dense([[2.0, -2.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0, 0.0])
    qh = dense([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]], [0.0, 0.0, 0.5])
    pi_shapes = jax.eval_shape(lambda key: jax.vmap(nets["policy"].init, in_axes=(0, None))(
        jax.random.split(key, k), jnp.zeros((1, 2))), jax.random.key(0))
    run = eh.RunParams(classifier=classifier, qh=qh, pi=_draw(rng, pi_shapes, 1.0))
    obs = rng.uniform(-3, 3, size=(300, 2)).astype(np.float32)
    actions, chosen = jax.jit(lambda o: eh.final_action(nets, run, o, None, b, False))(jnp.asarray(obs))

    probs = np.exp(ref.log_softmax(ref.mlp(ref.to_numpy(classifier)["params"], obs)))  # q(z|s)
    in_dist = probs >= probs.max(1, keepdims=True) / b  # ID(s)
    q_h = ref.mlp(ref.to_numpy(qh)["params"], obs)
    z = np.argmax(np.where(in_dist, q_h, -np.inf), axis=1)  # pi_H(s)
    means = np.stack([ref.gaussian_policy(ref.pick(ref.to_numpy(run.pi), c)["params"], obs, SCALE)[0]
                      for c in range(k)])  # [K, B, act_dim]
    np.testing.assert_array_equal(chosen, z)
    np.testing.assert_allclose(actions, means[z, np.arange(len(z))], rtol=1e-5, atol=1e-6)
    # Every cluster is chosen somewhere, the filter overrides Q_H on some states and Q_H overrides the
    # classifier's favourite on others; the policies' means differ, so a wrong z moves the action.
    assert set(z) == {0, 1, 2}
    assert np.sum(z != q_h.argmax(1)) >= 10 and np.sum(z != probs.argmax(1)) >= 10
    assert np.abs(means[0] - means[1]).mean() > 0.02 and np.abs(means[1] - means[2]).mean() > 0.02
