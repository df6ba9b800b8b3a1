"""An estimator pickles (multiprocessing, caching a fitted object) and the copy scores as the original, with an
in-memory or on-disk store, on torch and JAX. It failed on a lambda held by on-disk checkpoints and on a JAX
Device held by JAX checkpoints."""
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402


def _round_trip(trak, targets):
    expected = trak.score([targets])
    copy = pickle.loads(pickle.dumps(trak))
    return expected, copy.score([targets]), copy


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_a_torch_estimator_pickles_and_scores_the_same(tmp_path, on_disk):
    pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x, y = torch.randn(60, 5), torch.randint(0, 3, (60,))
    trak = trak_core.TRAK(model, proj_dim=16, store=tmp_path / "store" if on_disk else None, progress=False)
    for state in _states(model):
        trak.featurize(state, [(x[:30], y[:30]), (x[30:], y[30:])])
    expected, scores, copy = _round_trip(trak, (x[:4], y[:4]))
    assert torch.equal(scores, expected) and copy.n_checkpoints == 2
    if on_disk:  # a reopened store too, after its first score
        opened = trak_core.TRAK.open(tmp_path / "store", model, _states(model), progress=False)
        expected, scores, _ = _round_trip(opened, (x[:4], y[:4]))
        assert torch.equal(scores, expected)


def _states(model):
    states = []
    for seed in range(2):
        torch.manual_seed(seed)
        states.append({k: torch.randn_like(v) for k, v in model.state_dict().items()})
    return states


def _apply(params, inputs):  # module level: pickled by reference
    import jax.numpy as jnp

    (w1, b1), (w2, b2) = params
    return jnp.tanh(inputs @ w1.T + b1) @ w2.T + b2


def test_a_jax_estimator_pickles_and_scores_the_same():
    pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    from trak_jax import JaxModel

    rng = np.random.default_rng(0)
    params = [(rng.normal(size=(8, 5)).astype(np.float32), np.zeros(8, np.float32)),
              (rng.normal(size=(3, 8)).astype(np.float32), np.zeros(3, np.float32))]
    x, y = rng.normal(size=(30, 5)).astype(np.float32), rng.integers(0, 3, 30)
    trak = trak_core.TRAK(JaxModel(_apply), proj_dim=16, progress=False)
    trak.featurize(params, [(x, y)])
    expected, scores, copy = _round_trip(trak, (x[:4], y[:4]))
    # the copy's backend compiles its step afresh, at the targets' batch size: float32 rounding apart
    np.testing.assert_allclose(np.asarray(scores), np.asarray(expected), rtol=1e-5, atol=1e-7)
    assert copy.store[0].prepared.device == trak.store[0].prepared.device
