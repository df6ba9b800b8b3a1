"""JAX stores reopened or resumed under the other ``jax_enable_x64`` setting: the error names the setting.

With x64 off JAX casts float64 params to float32, so their digest differed from the stored one and the store said
"featurized from other parameters"; in the setting it was featurized in, the store scores as the reference does.
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
import jax.numpy as jnp  # noqa: E402

import trak_core  # noqa: E402
from trak_core.errors import StoreMismatchError  # noqa: E402
from trak_jax import JaxModel  # noqa: E402

LAMBDA = 0.1


def _apply(params, inputs):
    weight, bias = params
    return jnp.tanh(inputs @ weight + bias)


def _data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    checkpoints = [(np.random.default_rng(s).normal(size=(5, 3)), np.random.default_rng(s + 9).normal(size=3))
                   for s in range(2)]  # float64 NumPy leaves: JAX keeps them float64 only with x64 on
    return x, y, checkpoints


def _reference_scores(checkpoints, x, y, xt, yt):
    """Float64 scores by hand: each example's margin gradient by ``jax.grad`` alone, then
    ``mean_c(Phi_c (Phi_c^T Phi_c + lambda I)^-1 Phi_t,c^T) * mean_c(1 - p_y)``."""
    def margin(params, one, label):
        logits = _apply(params, one[None])[0]
        return logits[label] - jax.nn.logsumexp(jnp.where(jnp.arange(3) == label, -jnp.inf, logits))

    def rows(params, xs, ys):
        grads = [jax.grad(margin)(params, jnp.asarray(xs[i]), int(ys[i])) for i in range(len(ys))]
        return np.stack([np.concatenate([np.asarray(g, np.float64).ravel() for g in grad]) for grad in grads])

    total, q = 0.0, 0.0
    with jax.enable_x64(True):
        for params in checkpoints:
            params = tuple(jnp.asarray(a, jnp.float64) for a in params)
            phi, phi_t = rows(params, x, y), rows(params, xt, yt)
            total = total + phi @ np.linalg.solve(phi.T @ phi + LAMBDA * np.eye(phi.shape[1]), phi_t.T)
            p = np.asarray(jax.nn.softmax(_apply(params, jnp.asarray(x)), axis=1), np.float64)
            q = q + 1 - p[np.arange(len(y)), y]
    return total / len(checkpoints) * (q / len(checkpoints))[:, None]


def _write(path, x, y, checkpoints):
    trak = trak_core.TRAK(JaxModel(_apply), proj_dim=None, lambda_reg=LAMBDA, store=path, progress=False)
    for params in checkpoints:
        trak.featurize(params, [(x[:20], y[:20])])


def test_a_float64_store_reopened_or_resumed_with_x64_off_names_the_setting(tmp_path):
    x, y, checkpoints = _data()
    path = tmp_path / "store"
    with jax.enable_x64(True):
        _write(path, x, y, checkpoints)
    with jax.enable_x64(False):
        with pytest.raises(StoreMismatchError, match=r"checkpoint 0 in .*float64.*x64 is off.*"
                                                     r"jax.enable_x64\(True\)") as info:
            trak_core.TRAK.open(path, JaxModel(_apply), checkpoints)
        assert "other parameters" not in str(info.value)
        resumed = trak_core.TRAK(JaxModel(_apply), proj_dim=None, lambda_reg=LAMBDA, store=path, progress=False)
        with pytest.raises(StoreMismatchError, match=r"float64.*x64 is off") as info:
            resumed.featurize(checkpoints[0], [(x[:20], y[:20])])
        assert "other parameters" not in str(info.value)
    with jax.enable_x64(True):  # in its own setting the store is whole, and scores as the reference does
        scores = trak_core.TRAK.open(path, JaxModel(_apply), checkpoints).score([(x[20:], y[20:])])
        assert scores.dtype == jnp.float64
    expected = _reference_scores(checkpoints, x[:20], y[:20], x[20:], y[20:])
    assert np.linalg.norm(np.asarray(scores) - expected) / np.linalg.norm(expected) < 1e-9


def test_a_store_of_cast_params_reopened_with_x64_on_names_the_setting(tmp_path):
    """Featurized with x64 off (float64 params cast to float32): with x64 on the same params stay float64."""
    x, y, checkpoints = _data()
    path = tmp_path / "store"
    with jax.enable_x64(False):
        _write(path, x, y, checkpoints)
    with jax.enable_x64(True):
        with pytest.raises(StoreMismatchError, match=r"float32.*x64 is on.*params are float64.*"
                                                     r"jax.enable_x64\(False\)") as info:
            trak_core.TRAK.open(path, JaxModel(_apply), checkpoints)
        assert "other parameters" not in str(info.value)
        single = [tuple(a.astype(np.float32) for a in params) for params in checkpoints]  # the message's other fix
        cast = np.asarray(trak_core.TRAK.open(path, JaxModel(_apply), single).score([(x[20:], y[20:])]))
    with jax.enable_x64(False):
        scores = trak_core.TRAK.open(path, JaxModel(_apply), checkpoints).score([(x[20:], y[20:])])
        assert scores.dtype == jnp.float32
    expected = _reference_scores(single, x[:20], y[:20], x[20:], y[20:])
    for got in (np.asarray(scores), cast):
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
