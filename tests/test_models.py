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



@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_out_to_loss_of_confident_examples_is_not_rounded_to_zero(dtype):
    """Q = 1 - p_y = sigmoid(-margin) for margins up to 80: 1 - p_y rounded to 0 from a margin of about 17 in float32
    (37 in float64), which zeroed those examples' scores."""
    from scipy.special import expit

    margins = np.array([0.0, 5.0, 17.0, 20.0, 40.0, 80.0])
    logits = np.stack([np.zeros_like(margins), margins, margins - 3.0], axis=1).astype(dtype)  # 3 classes, label 1
    q = Classification().out_to_loss(logits, np.ones(6, dtype=np.int64), xp=npx)
    others = np.logaddexp(0.0, margins - 3.0)  # logsumexp of the other classes' logits [0, margin - 3]
    expected = expit(-(margins - others))
    assert q.dtype == np.dtype(dtype) and np.all(q > 0)
    np.testing.assert_allclose(q, expected, rtol=1e-6 if dtype == "float32" else 1e-13)
    binary = Classification().out_to_loss(margins[:, None].astype(dtype), np.ones(6, dtype=np.int64), xp=npx)
    np.testing.assert_allclose(binary, expit(-margins), rtol=1e-6 if dtype == "float32" else 1e-13)

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
