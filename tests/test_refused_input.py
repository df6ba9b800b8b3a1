"""Bad input that was taken without a word: an infinite weight in a NumPy or JAX checkpoint, a block size of the
projection of 0 or less, an analytic model of no (or negative) size. Each is now an error naming it."""
import numpy as np
import pytest

import trak_core
from trak_core import MLP, TRAK, SoftmaxRegression, TrakValueError


def _diverged(checkpoint: np.ndarray) -> np.ndarray:
    """``checkpoint`` with its first weight (``hidden.weight[0, 0]``) infinite: tanh saturates there, so the
    gradients, out-to-loss weights and scores stay finite and nothing downstream notices."""
    bad = checkpoint.copy()
    bad[0] = np.inf
    return bad


def test_numpy_backend_refuses_a_checkpoint_with_an_infinite_weight(rng):
    """The torch backend refused non-finite parameters; the numpy backend scored them (finite, wrong numbers)."""
    model = MLP(8, 6, 3)
    x, y = rng.normal(size=(30, 8)), rng.integers(0, 3, 30)
    trak = TRAK(model, proj_dim=16, progress=False)
    with pytest.raises(TrakValueError, match=r"parameters contain NaN or inf: \['hidden\.weight'\].*diverged"):
        trak.featurize(_diverged(model.init(seed=0)), [(x, y)])
    assert trak.n_checkpoints == 0
    trak.featurize(model.init(seed=0), [(x, y)])  # a finite checkpoint afterwards is featurized as usual
    assert np.isfinite(trak.score([(x[:4], y[:4])])).all()


def test_jax_backend_refuses_a_checkpoint_with_an_infinite_weight(rng):
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed: the jax backend is not exercised")
    from trak_jax import JaxModel

    def apply(params, inputs):
        (w1, b1), (w2, b2) = params
        return jnp.tanh(inputs @ w1.T + b1) @ w2.T + b2

    flat = MLP(8, 6, 3).init(seed=0, dtype="float32")
    params = MLP(8, 6, 3).params(_diverged(flat))
    tree = ((params["hidden.weight"], params["hidden.bias"]), (params["output.weight"], params["output.bias"]))
    x, y = rng.normal(size=(30, 8)).astype(np.float32), rng.integers(0, 3, 30)
    trak = TRAK(JaxModel(apply), proj_dim=16, progress=False)
    with pytest.raises(TrakValueError, match=r"parameters contain NaN or inf: \['\[0\]\[0\]'\].*diverged"):
        trak.featurize(tree, [(x, y)])
    assert trak.n_checkpoints == 0


@pytest.mark.parametrize("block_size", [0, -2, 2.5, True])
def test_project_refuses_a_block_size_that_is_not_a_positive_integer(block_size, rng):
    """A negative block size made no block at all: ``project`` returned zeros."""
    grads = rng.normal(size=(4, 10)).astype(np.float32)
    with pytest.raises(TrakValueError, match=r"block_size must be a positive integer .* got"):
        trak_core.project(grads, 8, block_size=block_size)
    dense = grads.astype(np.float64) @ trak_core.projection_matrix(10, 8, dtype=np.float64)
    np.testing.assert_allclose(trak_core.project(grads, 8, block_size=3), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make,name", [(lambda: MLP(8, -1, 3), "n_hidden"), (lambda: MLP(0, 6, 3), "n_features"),
                                       (lambda: MLP(8, 6, 2.5), "n_classes"),
                                       (lambda: SoftmaxRegression(8, 0), "n_classes"),
                                       (lambda: SoftmaxRegression(True, 3), "n_features")])
def test_analytic_models_refuse_sizes_that_are_not_positive_integers(make, name):
    """``MLP(8, -1, 3)`` had -9 parameters and ``MLP(0, 6, 3).init()`` divided by zero."""
    with pytest.raises(TrakValueError, match=rf"{name} must be a positive integer, got"):
        make()
    assert MLP(np.int64(8), 6, 1).n_params == 8 * 6 + 6 + 6 + 1  # NumPy integers and one output are sizes
