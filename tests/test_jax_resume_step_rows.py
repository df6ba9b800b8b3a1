"""A JAX store resumed by the same calls in a new process (``TRAK(store=...).featurize`` again, not ``TRAK.open``)
pads its batches to the sizes of the process that began the store: its first recomputed batch (300 rows, where
the training data's first had 1,000) fixed the step's size, and 339 rows from row 4,096 and the scores differed
(3.3e-7 relative)."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")

import trak_core  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402


def _apply(params, inputs):
    (w1, b1), (w2, b2) = params
    return jax.numpy.tanh(inputs @ w1.T + b1) @ w2.T + b2


def test_a_resumed_jax_store_gives_the_uninterrupted_bits(tmp_path):
    rng = np.random.default_rng(1)
    params = [(rng.normal(size=(48, 32)).astype(np.float32) / 4, rng.normal(size=48).astype(np.float32)),
              (rng.normal(size=(10, 48)).astype(np.float32) / 4, rng.normal(size=10).astype(np.float32))]
    x, y = rng.normal(size=(4600, 32)).astype(np.float32), rng.integers(0, 10, 4600)
    edges = [0, 1000] + list(range(1300, 4600, 300)) + [4600]
    batches = [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    one = trak_core.TRAK(JaxModel(_apply), proj_dim=64, backend=JaxBackend(), progress=False)
    one.featurize(params, batches)

    def interrupted():  # stops after the first 4,096-row chunk is stored
        for i, batch in enumerate(batches):
            if i == 12:
                raise KeyboardInterrupt
            yield batch

    first = trak_core.TRAK(JaxModel(_apply), proj_dim=64, store=tmp_path / "store", backend=JaxBackend(),
                           progress=False)
    with pytest.raises(KeyboardInterrupt):
        first.featurize(params, interrupted())
    resumed = trak_core.TRAK(JaxModel(_apply), proj_dim=64, store=tmp_path / "store", backend=JaxBackend(),
                             progress=False)  # a new process's backend: no step sizes yet
    resumed.featurize(params, batches)
    assert np.array_equal(np.asarray(resumed.store[0].features[0:4600]), np.asarray(one.store[0].features))
    targets = [(x[:6], y[:6])]
    assert np.array_equal(np.asarray(resumed.score(targets)), np.asarray(one.score(targets)))
