"""``TRAK.open`` with the JAX backend takes its features' namespace from the params: it ran one target row through
the model for it, which compiled a one-row step (1.1 s of XLA for a 3-layer Flax MLP on this CPU) that no real
batch used."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")

import trak_core  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import jax_apply  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402


def test_reopening_compiles_only_the_targets_step_and_scores_the_same_bits(tmp_path):
    """Featurized in batches of 16 (the opened backend's step size), 5 targets pad to 8 rows: one compilation
    (it was 2: one row, then 8). The scores are the writing estimator's, bit for bit, and those of an opened
    estimator whose checkpoints were loaded before any target (the path that never ran a row)."""
    x, y = canonical.inputs("mlp", 55, seed=0, dtype="float32")
    train = [(x[i:min(i + 16, 50)], y[i:min(i + 16, 50)]) for i in range(0, 50, 16)]
    params = [canonical.weights("mlp", seed=c, dtype="float32") for c in range(2)]
    model = JaxModel(jax_apply("mlp"))
    written = trak_core.TRAK(model, proj_dim=32, lambda_reg=1.0, backend=JaxBackend(), store=tmp_path / "store",
                             progress=False)
    for checkpoint in params:
        written.featurize(checkpoint, train)
    targets = [(x[50:], y[50:])]
    expected = np.asarray(written.score(targets))
    opened = trak_core.TRAK.open(tmp_path / "store", model, params, backend=JaxBackend(), progress=False)
    assert opened.backend.step_rows == 16 and opened.backend.compilations == 0
    scores = np.asarray(opened.score(targets))
    assert opened.backend.compilations == 1
    assert isinstance(opened.store[0].features[:1], jax.Array) and opened.store[0].features.dtype == np.float32
    np.testing.assert_array_equal(scores, expected)
    loaded_first = trak_core.TRAK.open(tmp_path / "store", model, params, backend=JaxBackend(), progress=False)
    assert loaded_first.lambdas == [1.0, 1.0]  # loads the checkpoints with no target row
    np.testing.assert_array_equal(np.asarray(loaded_first.score(targets)), expected)
