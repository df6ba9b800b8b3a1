"""Hand-written per-example gradients and task functions against finite differences and scipy."""
import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from trak_core import MLP, Classification, Regression, SoftmaxRegression
from trak_core.backends.numpy_backend import backend

import array_api_compat.numpy as npx

MODELS = [SoftmaxRegression(5, 4), MLP(5, 6, 4, activation="tanh"), MLP(5, 6, 4, activation="relu")]


def _finite_difference(model, theta, x, label, task, h=1e-5):
    """Central differences of the task output of one example with respect to every parameter."""
    def f(t):
        logits = model.logits(model.params(t), x[None, :])
        return float(task.output(logits, np.array([label]), xp=npx)[0])
    grad = np.empty_like(theta)
    for j in range(theta.size):
        step = np.zeros_like(theta)
        step[j] = h
        grad[j] = (f(theta + step) - f(theta - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("model", MODELS, ids=lambda m: f"{type(m).__name__}-{getattr(m, 'activation', '')}")
def test_per_example_gradients_match_finite_differences(model, rng):
    theta = model.init(seed=1)
    x = rng.normal(size=(4, 5))
    y = np.array([0, 3, 1, 3])
    task = Classification()
    grads, _ = backend.gradients(model, backend.prepare(model, theta), x, y, task)
    assert grads.shape == (4, model.n_params)
    for i in range(4):
        fd = _finite_difference(model, theta, x[i], y[i], task)
        np.testing.assert_allclose(grads[i], fd, rtol=1e-6, atol=1e-8)


def test_regression_gradients_match_finite_differences(rng):
    model = MLP(3, 4, 1)
    theta = model.init(seed=2)
    x = rng.normal(size=(3, 3))
    task = Regression()
    labels = np.array([0.5, -1.0, 2.0])
    grads, q = backend.gradients(model, backend.prepare(model, theta), x, labels, task)
    prediction = model.logits(model.params(theta), x)[:, 0]
    np.testing.assert_allclose(q, labels - prediction, rtol=1e-12)  # Q = y - f, minus d(squared loss)/df
    for i in range(3):
        np.testing.assert_allclose(grads[i], _finite_difference(model, theta, x[i], labels[i], task), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("model", MODELS[:2], ids=["softmax", "mlp"])
def test_batch_grad_is_sum_of_per_example(model, rng):
    params = model.params(model.init(seed=3))
    x, d = rng.normal(size=(6, 5)), rng.normal(size=(6, 4))
    np.testing.assert_allclose(model.batch_grad(params, x, d), model.per_example_grads(params, x, d).sum(0),
                               rtol=1e-12, atol=1e-12)


def test_margin_and_out_to_loss_against_scipy(rng):
    logits, labels = rng.normal(size=(8, 5)) * 3, rng.integers(0, 5, 8)
    task = Classification()
    others = [np.delete(logits[i], labels[i]) for i in range(8)]
    margin = np.array([logits[i, labels[i]] - logsumexp(others[i]) for i in range(8)])
    np.testing.assert_allclose(task.output(logits, labels, xp=npx), margin, rtol=1e-12)
    q = 1 - softmax(logits, axis=1)[np.arange(8), labels]
    np.testing.assert_allclose(task.out_to_loss(logits, labels, xp=npx), q, rtol=1e-12)


def test_gradients_same_on_array_api_strict(rng):
    xs = pytest.importorskip("array_api_strict")
    model = MLP(5, 6, 4)
    theta = model.init(seed=4)
    x, y = rng.normal(size=(5, 5)), rng.integers(0, 4, 5)
    ref, ref_q = backend.gradients(model, backend.prepare(model, theta), x, y, Classification())
    out, q = backend.gradients(model, backend.prepare(model, xs.asarray(theta)), xs.asarray(x),
                               xs.asarray(y), Classification())
    assert type(out).__module__.startswith("array_api_strict")
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(q), ref_q, rtol=1e-12)


def test_flat_and_named_checkpoints_agree():
    model = MLP(3, 2, 2)
    theta = model.init(seed=0)
    named = model.params(theta)
    assert list(named) == ["hidden.weight", "hidden.bias", "output.weight", "output.bias"]
    np.testing.assert_array_equal(model.flatten(named), theta)
    np.testing.assert_array_equal(named["hidden.weight"].ravel(), theta[:6])
    with pytest.raises(ValueError, match="shape"):
        model.params({**named, "output.bias": np.zeros(3)})
    with pytest.raises(ValueError, match="missing"):
        model.params({"hidden.weight": named["hidden.weight"]})
