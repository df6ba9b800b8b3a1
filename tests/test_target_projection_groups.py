"""``score`` projects target gradients in groups of rows, as ``featurize`` projects training gradients.

Each small target batch used to make (or unpack, or read) the whole projection matrix for each checkpoint: N
batches, N projections per checkpoint. Now the batches' gradients are held until they make a group
(``projection_group_rows`` shared by the checkpoints, at most a score group) and projected together:
ceil(rows / group) projections per checkpoint. Scores against an independent float64 NumPy reference (explicit
projection matrix, kernel and weights) on the NumPy and torch backends; a backend with its own projection and the
factorized projection still project batch by batch; a non-finite batch is still named alone.
"""
import math

import array_api_compat.numpy as npx
import numpy as np
import pytest

import trak_core._checks as checks
import trak_core._featurizer as featurizer
import trak_core._target_projection as target_projection
from trak_core import TRAK, SoftmaxRegression, TrakValueError
from trak_core.backends import numpy_backend
from trak_core.projection import projection_matrix

K = 8
BATCH = 8
N_TARGETS = 200


def _numpy_fitted(checkpoints=2, backend=None):
    rng = np.random.default_rng(0)
    model = SoftmaxRegression(4, 3)
    trak = TRAK(model, proj_dim=K, progress=False, backend=backend)
    x, y = rng.normal(size=(300, 4)), rng.integers(0, 3, 300)
    for c in range(checkpoints):
        trak.featurize(model.init(seed=c), [(x, y)])
    return trak, rng.normal(size=(N_TARGETS, 4)), rng.integers(0, 3, N_TARGETS)


def _batched(x, y, size=BATCH):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _counting(monkeypatch):
    """The rows of each core projection, per checkpoint."""
    calls = {}
    original = featurizer.project

    def counted(grads, k, **options):
        calls.setdefault(options["checkpoint"], []).append(grads.shape[0])
        return original(grads, k, **options)

    monkeypatch.setattr(featurizer, "project", counted)
    return calls


def _group_of(monkeypatch, trak, rows):
    """Training groups of ``rows`` rows (``PROJECTION_GROUP_BYTES`` for them), so score's are ``rows // C``."""
    itemsize = trak.store[0].features.dtype.itemsize
    monkeypatch.setattr(checks, "PROJECTION_GROUP_BYTES", rows * trak.store[0].n_params * itemsize)


def _reference(trak, x, y):
    """Uniform ensemble in float64: mean_c Phi_c (Phi_c^T Phi_c + lambda_c I)^-1 (G_c P_c)^T, times mean_c Q_c,
    the target features from all the targets' gradients at once and an explicit projection matrix."""
    total, weight = 0.0, 0.0
    for c, entry in enumerate(trak.store):
        phi = np.asarray(entry.features, dtype=np.float64)
        grads = trak.backend.gradients(trak.model, entry.prepared, x, y, trak.task)[0]
        grads = np.asarray(grads.detach().cpu() if hasattr(grads, "detach") else grads, dtype=np.float64)
        target = grads @ projection_matrix(entry.n_params, K, seed=trak.seed, checkpoint=entry.index,
                                           kind=trak.proj_type, xp=npx, dtype=npx.float64)
        kernel = phi.T @ phi + trak.lambdas[c] * np.eye(K)
        total = total + phi @ np.linalg.solve(kernel, target.T)
        weight = weight + np.asarray(entry.out_to_loss, dtype=np.float64)
    n = len(trak.store)
    return (total / n) * (weight / n)[:, None]


def _per_batch(monkeypatch, trak, data):
    """Scores with every target batch projected alone (as before): groups of one row."""
    with monkeypatch.context() as m:
        m.setattr(target_projection, "projection_group_rows", lambda *a, **k: 1)
        return trak.score(data)


def test_small_target_batches_are_projected_in_groups_per_checkpoint(monkeypatch):
    """25 batches of 8 targets, 2 checkpoints, training groups of 64 rows: groups of 32 target rows, 7 projections
    per checkpoint (ceil(200 / 32)), not 25; the last group the 8 rows left at the end of the score group."""
    trak, xt, yt = _numpy_fitted()
    _group_of(monkeypatch, trak, 64)
    calls = _counting(monkeypatch)
    scores = trak.score(_batched(xt, yt))
    group = 64 // 2
    assert set(calls) == {0, 1}
    for rows in calls.values():
        assert len(rows) == math.ceil(N_TARGETS / group) == 7
        assert rows == [group] * 6 + [N_TARGETS - 6 * group]
    expected = _reference(trak, xt, yt)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_groups_end_with_each_score_group_and_a_wide_batch_goes_alone(monkeypatch):
    """Score groups of 40 targets: every score group's held rows are projected before its pass; a batch as wide as
    a projection group is projected alone, after the rows held before it."""
    import trak_core._target_groups as groups

    trak, xt, yt = _numpy_fitted()
    monkeypatch.setattr(groups, "SCORE_GROUP_BYTES", 8 * 300 * 40)  # groups of 40 targets (n_train = 300)
    _group_of(monkeypatch, trak, 64)
    calls = _counting(monkeypatch)
    data = _batched(xt[:48], yt[:48]) + [(xt[48:], yt[48:])]  # 6 batches of 8, then one of 152
    scores = trak.score(data)
    # score group 1: batches 0-4 (40 rows; projection groups of 32: 4 batches, then 1 at the group's end);
    # score group 2: batch 5 held (8 rows), the wide batch flushes it and goes alone (152 >= 32)
    assert calls[0] == calls[1] == [32, 8, 8, 152]
    np.testing.assert_allclose(scores, _per_batch(monkeypatch, trak, data), rtol=1e-12, atol=0)
    expected = _reference(trak, xt, yt)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


def test_float64_scores_equal_batch_by_batch_projection(monkeypatch):
    """The NumPy backend in float64, default group size (all 200 targets in one group per checkpoint): scores
    within 1e-12 of each batch projected alone (not bit-identical: the product has another row count)."""
    trak, xt, yt = _numpy_fitted(checkpoints=3)
    calls = _counting(monkeypatch)
    data = _batched(xt, yt)
    scores = trak.score(data)
    assert calls == {0: [N_TARGETS], 1: [N_TARGETS], 2: [N_TARGETS]}
    before = _per_batch(monkeypatch, trak, data)
    scale = np.abs(before).max()
    np.testing.assert_allclose(scores, before, rtol=1e-12, atol=1e-12 * scale)


class OwnProjection(numpy_backend.ArrayAPIBackend):
    """A backend with its own projection (``has_fused_projection``): it projects each batch, as before."""

    has_fused_projection = True
    calls = []

    def project(self, grads, k, **options):
        OwnProjection.calls.append((options["checkpoint"], grads.shape[0]))
        return super().project(grads, k, **options)


def test_a_backend_with_its_own_projection_projects_batch_by_batch(monkeypatch):
    trak, xt, yt = _numpy_fitted(backend=OwnProjection())
    OwnProjection.calls.clear()
    calls = _counting(monkeypatch)
    scores = trak.score(_batched(xt, yt))
    assert not calls  # the core's projection is not used
    assert sorted(OwnProjection.calls) == sorted([(c, BATCH) for c in (0, 1)] * (N_TARGETS // BATCH))
    expected = _reference(trak, xt, yt)
    np.testing.assert_allclose(scores, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())


class NaNGradients(numpy_backend.ArrayAPIBackend):
    """The reference backend, with a NaN gradient entry where an input row starts with 1234.5 (finite weights)."""

    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        grads = grads.copy()
        grads[inputs[:, 0] == 1234.5, 0] = np.nan
        return grads, q


def test_a_non_finite_target_batch_is_named_alone(monkeypatch):
    """Batch 3 of a group of 25 has a NaN gradient: the error names it and its checkpoint, as before."""
    trak, xt, yt = _numpy_fitted(backend=NaNGradients())
    xt = xt.copy()
    xt[3 * BATCH + 2, 0] = 1234.5
    with pytest.raises(TrakValueError, match=r"^targets batch 3, checkpoint 0: the per-example gradients"):
        trak.score(_batched(xt, yt))


class CheckpointFaults(numpy_backend.ArrayAPIBackend):
    """The reference backend, with a NaN gradient at checkpoint 0 where an input row starts with 999.5, at
    checkpoint 1 where one starts with 1234.5, and an error of the model's own where one starts with -777.5."""

    def prepare(self, model, checkpoint):
        prepared = super().prepare(model, checkpoint)
        self.order = {**getattr(self, "order", {}), id(prepared): len(getattr(self, "order", {}))}
        return prepared

    def gradients(self, model, prepared, inputs, labels, task):
        if np.any(inputs[:, 0] == -777.5):
            raise RuntimeError("the model failed on this batch")
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        grads = grads.copy()
        grads[inputs[:, 0] == (999.5, 1234.5)[self.order[id(prepared)]], 0] = np.nan
        return grads, q


@pytest.mark.parametrize("later", ["nan-at-checkpoint-0", "model-error"])
def test_the_first_bad_batch_is_named_whatever_follows_in_its_group(monkeypatch, later):
    """Batch 3 has a NaN gradient at checkpoint 1; batch 5, in the same projection group, has one at checkpoint 0
    (or makes the model fail). Each batch projected alone named batch 3, checkpoint 1; projected as a group, the
    group of checkpoint 0 was checked first and named batch 5 (or batch 5's error hid batch 3): each batch's
    gradients are checked when they are held now."""
    trak, xt, yt = _numpy_fitted(backend=CheckpointFaults())
    _group_of(monkeypatch, trak, 128)  # projection groups of 64 target rows: batches 0 to 7
    xt = xt.copy()
    xt[3 * BATCH + 2, 0] = 1234.5
    xt[5 * BATCH + 1, 0] = 999.5 if later == "nan-at-checkpoint-0" else -777.5
    with pytest.raises(TrakValueError, match=r"^targets batch 3, checkpoint 1: the per-example gradients"):
        trak.score(_batched(xt, yt))


def test_held_gradients_fill_one_buffer_per_checkpoint(monkeypatch):
    """Three batches of 8 held for a group of 32 rows: each checkpoint's are rows 0 to 23 of one (32, p) buffer (no
    list joined at the group's end, which held them twice), equal to the gradients of the 24 targets at once."""
    trak, xt, yt = _numpy_fitted()
    _group_of(monkeypatch, trak, 64)
    held = target_projection.TargetProjection(trak, list(trak.store), limit=1000)
    assert all(held.featurize(xt[i:i + 8], yt[i:i + 8], i // 8) is None for i in (0, 8, 16))
    for entry, buffer in zip(trak.store, held.held):
        expected = trak.backend.gradients(trak.model, entry.prepared, xt[:24], yt[:24], trak.task)[0]
        assert buffer.shape == (32, entry.n_params)
        np.testing.assert_allclose(buffer[:24], expected, rtol=1e-12, atol=0)
    features = held.flush()
    assert held.held == [None, None] and [f.shape for f in features] == [(24, K), (24, K)]


torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")


def _torch_fitted(checkpoints=2, proj_type="rademacher"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(300, 6), torch.randint(0, 4, (300,))
    trak = TRAK(model, proj_dim=K, proj_type=proj_type, progress=False)
    for c in range(checkpoints):
        torch.manual_seed(c + 1)
        state = {name: torch.randn_like(v) * 0.5 for name, v in model.state_dict().items()}
        trak.featurize(state, [(x, y)])
    return trak, torch.randn(N_TARGETS, 6), torch.randint(0, 4, (N_TARGETS,))


def test_torch_scores_in_groups_equal_the_reference_and_batch_by_batch(monkeypatch):
    trak, xt, yt = _torch_fitted()
    assert not trak.backend.has_fused_projection
    _group_of(monkeypatch, trak, 64)
    calls = _counting(monkeypatch)
    data = _batched(xt, yt)
    scores = trak.score(data)
    assert calls[0] == calls[1] == [32] * 6 + [8]
    before = _per_batch(monkeypatch, trak, data).numpy()
    scores = scores.numpy()
    np.testing.assert_allclose(scores, before, rtol=0, atol=1e-6 * np.abs(before).max())
    expected = _reference(trak, xt, yt)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_torch_kronecker_projects_batch_by_batch(monkeypatch):
    """The factorized projection is the backend's, per batch: the core's projection is not called."""
    trak, xt, yt = _torch_fitted(proj_type="kronecker")
    calls = _counting(monkeypatch)
    scores = trak.score(_batched(xt, yt))
    assert not calls and scores.shape == (300, N_TARGETS)
