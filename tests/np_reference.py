"""Plain NumPy references for the equation tests: float64 forward passes of the project's networks, the
minibatch rows a jitted step draws, and a finite-difference check that a training step is a gradient step.

Nothing here calls the project's code: the equation tests compare the production functions and jitted
training steps against these.
"""

import hashlib

import jax
import numpy as np

LOG_STD_MIN, LOG_STD_MAX = -5.0, 0.0  # the policies' log-std range (interpretation 2 of stage 1)


def to_numpy(tree):
    """Every leaf as a float64 NumPy array (the structure is kept)."""
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def mlp(params, x):
    """A flax MLP of Dense_0 .. Dense_L: ReLU after every layer but the last, a linear output."""
    names = sorted(params, key=lambda name: int(name.rsplit("_", 1)[1]))
    x = np.asarray(x, np.float64)
    for i, name in enumerate(names):
        x = x @ np.asarray(params[name]["kernel"], np.float64) + np.asarray(params[name]["bias"], np.float64)
        if i + 1 < len(names):
            x = np.maximum(x, 0.0)
    return x


def gaussian_policy(params, obs, action_scale):
    """(mean, log_std) of the Gaussian policy: mean = a_max tanh(.), log-std squashed into [-5, 0]."""
    out = mlp(params["MLP_0"], obs)
    act_dim = out.shape[-1] // 2
    mean = np.asarray(action_scale, np.float64) * np.tanh(out[..., :act_dim])
    log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (np.tanh(out[..., act_dim:]) + 1.0)
    return mean, log_std


def log_normal(mean, log_std, action):
    """log N(action; mean, exp(log_std)^2) summed over the last axis."""
    z = (np.asarray(action, np.float64) - mean) / np.exp(log_std)
    return np.sum(-0.5 * z * z - log_std - 0.5 * np.log(2.0 * np.pi), axis=-1)


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def pick(tree, i):
    """The i-th entry of a tree stacked on a leading axis."""
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def batch_rows(key, steps: int, batch: int, num_rows: int):
    """The rows each step of a scanned chunk draws: step keys split from the chunk's key, B rows uniform with
    replacement from each. Returns [steps, B] int."""
    keys = jax.random.split(key, steps)
    return np.stack([np.asarray(jax.random.randint(k, (batch,), 0, num_rows)) for k in keys])


def _dot(a, b):
    return sum(float(np.sum(np.asarray(x, np.float64) * np.asarray(y, np.float64)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _axpy(alpha, x, y):
    return jax.tree.map(lambda u, v: alpha * np.asarray(u, np.float64) + np.asarray(v, np.float64), x, y)


def assert_gradient_step(loss, before, after, lr: float, seed: int = 0, directions: int = 3, eps: float = 1e-6,
                         rtol: float = 2e-3):
    """``after = before - lr * grad loss(before)``, checked with central finite differences of the NumPy loss.

    loss(params) -> float runs in float64. Along the step itself and along ``directions`` random unit
    directions d, (loss(before + eps d) - loss(before - eps d)) / (2 eps) must equal -(after - before) . d / lr
    within rtol of the step's size. A step of another loss, of the opposite sign or at other parameters fails.
    """
    before, after = to_numpy(before), to_numpy(after)
    step = _axpy(-1.0, before, after)  # after - before = -lr g
    size = np.sqrt(_dot(step, step)) / lr  # |g|
    assert size > 0, "the step did not move the parameters"
    rng = np.random.default_rng(seed)
    dirs = [jax.tree.map(lambda x: x / (size * lr), step)]
    for _ in range(directions):
        d = jax.tree.map(lambda x: rng.normal(size=np.shape(x)), before)
        dirs.append(jax.tree.map(lambda x, n=np.sqrt(_dot(d, d)): x / n, d))
    for i, d in enumerate(dirs):
        slope = (loss(_axpy(eps, d, before)) - loss(_axpy(-eps, d, before))) / (2 * eps)
        predicted = -_dot(step, d) / lr
        assert abs(slope - predicted) <= rtol * size, (i, slope, predicted, size)


def sha256_file(path) -> str:
    """The sha256 of a file's bytes: what a later stage records in ``inputs`` for the file it read."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
