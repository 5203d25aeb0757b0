"""Stage 1 (empo_cluster.py): the E-step (Eq. 3), the momentum (Eq. 5), the M-step (Eq. 4/6) and the classifier
loss (§3.3) as the jitted training functions run them, against NumPy, with K >= 2, trajectories of different
clusters and mu != 0.5. The losses alone are tested in test_cluster.py; main's use of Eq. 7-9 there too."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest

import empo_cluster as ec

SCALE = (0.2, 0.2)
LENGTHS = [5, 9, 1, 7, 4, 11]  # six trajectories, 37 rows


def _problem(k: int, chunk: int = 10, seed: int = 0):
    """A small data set (padded to whole E-step chunks), K random policies and a classifier."""
    rng = np.random.default_rng(seed)
    n, num_episodes = sum(LENGTHS), len(LENGTHS)
    ids = np.repeat(np.arange(num_episodes), LENGTHS).astype(np.int32)
    obs = rng.normal(size=(n, 2)).astype(np.float32)
    actions = rng.uniform(-0.2, 0.2, size=(n, 2)).astype(np.float32)
    pad = (-n) % chunk
    data = ec.Data(obs=jnp.asarray(np.pad(obs, ((0, pad), (0, 0)))),
                   actions=jnp.asarray(np.pad(actions, ((0, pad), (0, 0)))),
                   episode_ids=jnp.asarray(np.pad(ids, (0, pad), constant_values=num_episodes)))
    args = ec.Args(k=k, momentum=0.7, batch_size=64, hidden_dim=8, hidden_layers=2, estep_chunk=chunk)
    policy, classifier = ec.make_networks(args, 2, SCALE)
    shapes = jax.eval_shape(ec.make_init(args, policy, classifier, 2)[0], jax.random.key(0))
    # Random parameters of init's shapes, drawn with NumPy, large enough that the K policies differ clearly.
    draw = lambda tree: jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.6, s.shape), s.dtype), tree)
    return args, policy, classifier, draw(shapes.policy), draw(shapes.classifier), data, obs, actions, ids


def _np_log_probs(policy_params, obs, actions, k):
    """log beta(a|s; theta_z) for every row and z, [N, K]."""
    return np.stack([ref.log_normal(*ref.gaussian_policy(ref.pick(policy_params, z)["params"], obs, SCALE), actions)
                     for z in range(k)], axis=1)


def _np_posterior(policy_params, obs, actions, ids, k):
    """Eq. (3): per-trajectory sums of log-likelihoods, normalised over z. (log posterior [E, K], sums [E, K])."""
    log_probs = _np_log_probs(policy_params, obs, actions, k)
    sums = np.stack([log_probs[ids == e].sum(0) for e in range(ids.max() + 1)])
    return ref.log_softmax(sums), sums


def test_e_step_pass_over_the_data_set_matches_numpy():
    """make_e_step: chunked forward pass, padding dropped, per-trajectory log-sum-exp over K = 3 clusters."""
    args, policy, _, policy_params, _, data, obs, actions, ids = _problem(k=3)
    log_post, loglik = jax.jit(ec.make_e_step(args, policy, len(LENGTHS)))(policy_params, data)
    ref_log_post, ref_sums = _np_posterior(policy_params, obs, actions, ids, 3)
    np.testing.assert_allclose(loglik, ref_sums, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(log_post, ref_log_post, rtol=1e-4, atol=1e-4)
    # The case is not degenerate: trajectories are assigned to different clusters, some not sure of it.
    posterior = np.exp(ref_log_post)
    assert len(set(posterior.argmax(1))) >= 2 and posterior.max(1).min() < 0.99


def test_em_epoch_momentum_m_step_weights_and_classifier_match_numpy():
    """One EM epoch (Algorithm 1, lines 13-18) with mu = 0.7, K = 2 and one M-step against Q^(k):

    Q^(k) = mu Q^(k-1) + (1 - mu) Q_Theta (Eq. 5), then the M-step of Eq. (6) weighted by Q^(k) of each row's
    trajectory and the classifier's KL step against the same Q^(k) (§3.3); each step is a gradient step.
    """
    args, policy, classifier, policy_params, classifier_params, data, obs, actions, ids = _problem(k=2)
    lr = 0.1
    tx = optax.sgd(lr)
    state = ec.TrainState(policy_params, tx.init(policy_params), classifier_params, tx.init(classifier_params))
    rng = np.random.default_rng(1)
    q_prev = rng.dirichlet(np.ones(2), len(LENGTHS)).astype(np.float32)  # [E, K], not uniform
    n = len(ids)
    e_step = ec.make_e_step(args, policy, len(LENGTHS))
    m_epoch = ec.make_m_epoch(args, policy, classifier, tx, n, train_classifier=True)
    em_epoch = jax.jit(ec.make_em_epoch(args, e_step, m_epoch))
    key = jax.random.key(3)
    new, q, log_post, _, metrics = em_epoch(state, jnp.asarray(q_prev), key, data)

    # Eq. (5), with the posterior of the parameters before the M-step.
    ref_log_post, _ = _np_posterior(policy_params, obs, actions, ids, 2)
    q_ref = 0.7 * q_prev + 0.3 * np.exp(ref_log_post)
    np.testing.assert_allclose(log_post, ref_log_post, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(q, q_ref, atol=1e-5)
    assert np.abs(q_ref - (0.3 * q_prev + 0.7 * np.exp(ref_log_post))).max() > 0.05  # mu and 1 - mu differ here

    # Eq. (6): one M-step (37 rows, B = 64) on rows drawn with replacement, each weighted by its trajectory's Q^(k).
    rows = ref.batch_rows(key, 1, args.batch_size, n)[0]
    weights = q_ref[ids[rows]]  # [B, K]
    assert len(set(ids[rows])) >= 4 and not np.allclose(weights[:, 0], weights[0, 0])

    def m_loss(params):
        return -np.mean(np.sum(weights * _np_log_probs(params, obs[rows], actions[rows], 2), axis=1))

    def c_loss(params):
        log_q = ref.log_softmax(ref.mlp(params["params"], obs[rows]))
        return np.mean(np.sum(weights * (np.log(weights) - log_q), axis=1))  # KL(Q^(k) || q)

    assert float(metrics["losses/m_step"]) == pytest.approx(m_loss(ref.to_numpy(policy_params)), rel=1e-4)
    assert float(metrics["losses/classifier"]) == pytest.approx(c_loss(ref.to_numpy(classifier_params)), rel=1e-4)
    ref.assert_gradient_step(m_loss, policy_params, new.policy, lr)
    ref.assert_gradient_step(c_loss, classifier_params, new.classifier, lr)


def test_m_only_epoch_leaves_the_classifier_alone_and_averages_its_steps():
    """The epochs of heuristics II and III (Eq. 6 against a fixed Q): several steps, the classifier untouched."""
    args, policy, classifier, policy_params, classifier_params, data, obs, actions, ids = _problem(k=2)
    args = dataclasses.replace(args, batch_size=16)  # ceil(37 / 16) = 3 steps
    tx = optax.sgd(0.05)
    state = ec.TrainState(policy_params, tx.init(policy_params), classifier_params, tx.init(classifier_params))
    q = jax.nn.one_hot(jnp.asarray([0, 1, 1, 0, 1, 0]), 2)  # Eq. (8): a split of the six trajectories
    key = jax.random.key(4)
    new, metrics = jax.jit(ec.make_m_epoch(args, policy, classifier, tx, len(ids), train_classifier=False))(
        state, q, key, data)
    chex.assert_trees_all_equal(new.classifier, classifier_params)
    assert set(metrics) == {"losses/m_step"}
    # The logged loss is the mean over the epoch's three steps, each at the parameters of its step: replay them.
    params, losses = ref.to_numpy(policy_params), []
    for rows in ref.batch_rows(key, 3, 16, len(ids)):
        weights = np.asarray(q)[ids[rows]]
        loss = lambda p, rows=rows, w=weights: -np.mean(np.sum(w * _np_log_probs(p, obs[rows], actions[rows], 2), 1))
        losses.append(loss(params))
        grads = _np_grad(loss, params)
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert float(metrics["losses/m_step"]) == pytest.approx(np.mean(losses), rel=1e-4)
    chex.assert_trees_all_close(ref.to_numpy(new.policy), params, rtol=1e-3, atol=1e-5)


def _np_grad(loss, params, eps=1e-6):
    """The gradient of a NumPy loss by central differences, leaf entry by leaf entry (small trees only)."""
    leaves, treedef = jax.tree.flatten(params)
    grads = []
    for i, leaf in enumerate(leaves):
        g = np.zeros_like(leaf)
        for j in np.ndindex(leaf.shape):
            up, down = [x.copy() for x in leaves], [x.copy() for x in leaves]
            up[i][j] += eps
            down[i][j] -= eps
            g[j] = (loss(jax.tree.unflatten(treedef, up)) - loss(jax.tree.unflatten(treedef, down))) / (2 * eps)
        grads.append(g)
    return jax.tree.unflatten(treedef, grads)
