"""``TRAK.features`` projects its batches' gradients in groups of rows, as ``score`` projects its targets.

Each small batch used to make (or unpack, or read) the whole projection matrix: N batches, N projections. Now the
batches' gradients are held until they make a group (``projection_group_rows``) and projected together by
``trak_core._target_projection.TargetProjection`` with the one checkpoint: ceil(rows / group) projections. Features
against an independent float64 NumPy reference (every row's gradients at once times an explicit projection matrix) on
the NumPy and torch backends; a backend with its own projection, ``proj_dim=None`` and the factorized projection stay
per batch; the first batch with NaN or inf is still the one named; an empty batch and no batches behave as before.
"""
import math

import array_api_compat.numpy as npx
import numpy as np
import pytest

import trak_core._checks as checks
import trak_core._featurizer as featurizer
from trak_core import TRAK, SoftmaxRegression, TrakValueError
from trak_core.backends import numpy_backend
from trak_core.projection import projection_matrix

K = 8
BATCH = 8
N = 200


def _numpy_fitted(backend=None, **options):
    """Two checkpoints of a float64 softmax regression (15 parameters), and 200 examples to featurize."""
    rng = np.random.default_rng(0)
    model = SoftmaxRegression(4, 3)
    trak = TRAK(model, progress=False, backend=backend, **{"proj_dim": K, **options})
    x, y = rng.normal(size=(100, 4)), rng.integers(0, 3, 100)
    for c in range(2):
        trak.featurize(model.init(seed=c), [(x, y)])
    return trak, rng.normal(size=(N, 4)), rng.integers(0, 3, N)


def _batched(x, y, size=BATCH):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _counting(monkeypatch):
    """The rows of each call of the core's projection, per checkpoint."""
    calls = {}
    original = featurizer.project

    def counted(grads, k, **options):
        calls.setdefault(options["checkpoint"], []).append(grads.shape[0])
        return original(grads, k, **options)

    monkeypatch.setattr(featurizer, "project", counted)
    return calls


def _group_of(monkeypatch, trak, rows):
    """Projection groups of ``rows`` rows (``PROJECTION_GROUP_BYTES`` for them; a power of two)."""
    itemsize = trak.store[0].features.dtype.itemsize
    monkeypatch.setattr(checks, "PROJECTION_GROUP_BYTES", rows * trak.store[0].n_params * itemsize)


def _reference(trak, x, y, checkpoint):
    """float64: every row's gradients at once times an explicit projection matrix, rows normalized where set."""
    entry = trak.store[checkpoint]
    grads = trak.backend.gradients(trak.model, entry.prepared, x, y, trak.task)[0]
    grads = np.asarray(grads.detach().cpu() if hasattr(grads, "detach") else grads, dtype=np.float64)
    features = grads @ projection_matrix(entry.n_params, K, seed=trak.seed, checkpoint=entry.index,
                                         kind=trak.proj_type, xp=npx, dtype=npx.float64)
    if trak.normalize_features:
        features = features / np.linalg.norm(features, axis=1, keepdims=True)
    return features


def _per_batch(trak, data, checkpoint):
    """The features as before: each batch projected alone (a copy of the old ``features`` loop)."""
    entry = trak.store[checkpoint]
    parts = [trak._batch_features(entry.prepared, entry.index, x, y, f"batch {b}")[0] for b, (x, y) in enumerate(data)]
    return np.concatenate([np.asarray(p.detach() if hasattr(p, "detach") else p) for p in parts])


def test_small_batches_are_projected_in_groups(monkeypatch):
    """25 batches of 8 rows, groups of 64: 4 projections (ceil(200 / 64)), not 25, the last one the 8 rows held at
    the end; the features those of every row at once, in float64 (within 1e-12 of the old per-batch features)."""
    trak, x, y = _numpy_fitted()
    _group_of(monkeypatch, trak, 64)
    calls = _counting(monkeypatch)
    features = trak.features(_batched(x, y), checkpoint=1)
    assert calls == {1: [64, 64, 64, 8]} and len(calls[1]) == math.ceil(N / 64) < N // BATCH
    assert isinstance(features, np.ndarray) and features.dtype == np.float64 and features.shape == (N, K)
    expected = _reference(trak, x, y, 1)
    np.testing.assert_allclose(features, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    calls.clear()
    before = _per_batch(trak, _batched(x, y), 1)
    assert len(calls[1]) == N // BATCH  # the old loop: one projection a batch
    np.testing.assert_allclose(features, before, rtol=1e-12, atol=1e-14 * np.abs(before).max())


def test_default_groups_hold_every_row_of_a_small_model(monkeypatch):
    """The default group (4,096 rows of 15 parameters): one projection for 200 rows in batches of 8, 30 and 2; a
    batch as wide as a group is projected alone, after the rows held before it."""
    trak, x, y = _numpy_fitted()
    calls = _counting(monkeypatch)
    data = _batched(x[:120], y[:120], 8) + _batched(x[120:180], y[120:180], 30) + _batched(x[180:], y[180:], 2)
    features = trak.features(data, checkpoint=0)
    assert calls == {0: [N]}
    expected = _reference(trak, x, y, 0)
    np.testing.assert_allclose(features, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    _group_of(monkeypatch, trak, 32)
    calls.clear()
    features = trak.features(_batched(x[:16], y[:16]) + [(x[16:], y[16:])], checkpoint=0)  # 8, 8, then 184
    assert calls == {0: [16, 184]}
    np.testing.assert_allclose(features, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_normalized_features_in_groups(monkeypatch):
    """normalize_features: each row of a group has unit norm, the reference's rows normalized."""
    trak, x, y = _numpy_fitted(normalize_features=True)
    _group_of(monkeypatch, trak, 64)
    features = trak.features(_batched(x, y), checkpoint=0)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(features, _reference(trak, x, y, 0), rtol=1e-10, atol=1e-12)


class OwnProjection(numpy_backend.ArrayAPIBackend):
    """A backend with its own projection (``has_fused_projection``): it projects each batch, as before."""

    has_fused_projection = True
    calls = []

    def project(self, grads, k, **options):
        OwnProjection.calls.append(grads.shape[0])
        return super().project(grads, k, **options)


def test_a_backend_with_its_own_projection_and_no_projection_stay_per_batch(monkeypatch):
    trak, x, y = _numpy_fitted(backend=OwnProjection())
    OwnProjection.calls.clear()
    calls = _counting(monkeypatch)
    features = trak.features(_batched(x, y), checkpoint=0)
    assert not calls and OwnProjection.calls == [BATCH] * (N // BATCH)
    expected = _reference(trak, x, y, 0)
    np.testing.assert_allclose(features, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    plain, x, y = _numpy_fitted(proj_dim=None)  # the gradients are the features
    gradients = plain.features(_batched(x, y), checkpoint=0)
    assert not calls
    entry = plain.store[0]
    expected = plain.backend.gradients(plain.model, entry.prepared, x, y, plain.task)[0]
    np.testing.assert_allclose(gradients, expected, rtol=1e-12, atol=0)


class Faults(numpy_backend.ArrayAPIBackend):
    """The reference backend, with a NaN gradient where an input row starts with 1234.5, gradients that project to
    inf (see ``_overflowing``) where one starts with 555.5, and an error of the model's own where one starts with
    -777.5."""

    def gradients(self, model, prepared, inputs, labels, task):
        if np.any(inputs[:, 0] == -777.5):
            raise RuntimeError("the model failed on this batch")
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        grads = grads.copy()
        grads[inputs[:, 0] == 1234.5, 0] = np.nan
        grads[inputs[:, 0] == 555.5, 0] = 555.5
        return grads, q


def _overflowing(monkeypatch):
    """The core's projection, with inf features for rows whose first gradient is 555.5 (finite gradients whose
    projection overflows)."""
    original = featurizer.project

    def project(grads, k, **options):
        features = original(grads, k, **options).copy()
        features[grads[:, 0] == 555.5, :] = np.inf
        return features

    monkeypatch.setattr(featurizer, "project", project)


@pytest.mark.parametrize("later", ["nan", "overflow", "model-error"])
def test_the_first_bad_batch_is_named_whatever_follows_in_its_group(monkeypatch, later):
    """Batch 3 has a NaN gradient; batch 5, in the same group of 64 rows, has another, or projects to inf, or makes
    the model fail: batch 3 is named, as when each batch was projected alone."""
    trak, x, y = _numpy_fitted(backend=Faults())
    _group_of(monkeypatch, trak, 64)
    _overflowing(monkeypatch)
    x = x.copy()
    x[3 * BATCH + 2, 0] = 1234.5
    x[5 * BATCH + 1, 0] = {"nan": 1234.5, "overflow": 555.5, "model-error": -777.5}[later]
    with pytest.raises(TrakValueError, match=r"^batch 3: the per-example gradients .*contain NaN or inf"):
        trak.features(_batched(x, y), checkpoint=0)


def test_a_batch_whose_features_overflow_is_named_alone(monkeypatch):
    """Finite gradients whose projection is inf (batch 4, then batch 6) in a group of batches 0 to 7: the group's
    check fails and the first such batch is named by itself, not the group."""
    trak, x, y = _numpy_fitted(backend=Faults())
    _group_of(monkeypatch, trak, 64)
    _overflowing(monkeypatch)
    x = x.copy()
    x[4 * BATCH, 0] = x[6 * BATCH + 7, 0] = 555.5
    with pytest.raises(TrakValueError, match=r"^batch 4: the per-example gradients \(seen through their projected"):
        trak.features(_batched(x, y), checkpoint=0)


def test_empty_data_and_empty_batches_as_before(monkeypatch):
    """No batches: the error as before; an empty batch among others adds no row; only empty batches: ``(0, k)``."""
    trak, x, y = _numpy_fitted()
    _group_of(monkeypatch, trak, 64)
    with pytest.raises(TrakValueError, match=r"^features: data yielded no batches"):
        trak.features(iter([]), checkpoint=0)
    data = _batched(x[:40], y[:40]) + [(x[:0], y[:0])] + _batched(x[40:], y[40:])
    features = trak.features(data, checkpoint=0)
    expected = _reference(trak, x, y, 0)
    np.testing.assert_allclose(features, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    assert trak.features([(x[:0], y[:0])] * 2, checkpoint=0).shape == (0, K)


torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")


def _torch_fitted(proj_type="rademacher"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(100, 6), torch.randint(0, 4, (100,))
    trak = TRAK(model, proj_dim=K, proj_type=proj_type, progress=False)
    trak.featurize(None, [(x, y)])
    return trak, torch.randn(N, 6), torch.randint(0, 4, (N,))


def test_torch_features_in_groups_equal_the_reference_and_batch_by_batch(monkeypatch):
    trak, x, y = _torch_fitted()
    assert not trak.backend.has_fused_projection
    _group_of(monkeypatch, trak, 64)
    calls = _counting(monkeypatch)
    data = _batched(x, y)
    features = trak.features(data)
    assert calls == {0: [64, 64, 64, 8]}
    assert isinstance(features, torch.Tensor) and features.dtype == torch.float32 and features.shape == (N, K)
    got = features.numpy().astype(np.float64)
    expected = _reference(trak, x, y, 0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    before = _per_batch(trak, data, 0)
    np.testing.assert_allclose(got, before, rtol=0, atol=1e-6 * np.abs(before).max())


def test_torch_kronecker_projects_batch_by_batch(monkeypatch):
    """The factorized projection is the backend's, per batch: the core's projection is not called."""
    trak, x, y = _torch_fitted(proj_type="kronecker")
    calls = _counting(monkeypatch)
    features = trak.features(_batched(x, y))
    assert not calls and features.shape == (N, K)
    whole = trak.features([(x, y)]).numpy()  # every row in one batch: the same features, whatever the batches
    np.testing.assert_allclose(features.numpy(), whole, rtol=0, atol=1e-6 * np.abs(whole).max())
