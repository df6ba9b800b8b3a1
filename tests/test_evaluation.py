"""LDS against scipy.stats.spearmanr, and the subset masks."""
import numpy as np
import pytest
from scipy.stats import spearmanr

import trak_core


def _reference(scores, masks, outputs):
    return np.array([spearmanr(masks.astype(float) @ scores[:, j], outputs[:, j])[0] for j in range(scores.shape[1])])


def test_lds_equals_scipy(xp, rng):
    scores, masks = rng.normal(size=(60, 5)), trak_core.subset_masks(60, 40, seed=2)
    outputs = rng.normal(size=(40, 5)) + (masks.astype(float) @ scores) * 0.3
    outputs[:10, 1] = 0.5  # ties get average ranks
    reference = _reference(scores, masks, outputs)
    result = trak_core.lds(xp.asarray(scores), xp.asarray(masks), xp.asarray(outputs))
    np.testing.assert_allclose(result.per_target, reference, rtol=0, atol=1e-12)
    assert abs(result.mean - reference.mean()) < 1e-12
    assert abs(result.sem - reference.std(ddof=1) / np.sqrt(5)) < 1e-12


def test_lds_with_torch_tensors(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    scores, masks, outputs = rng.normal(size=(30, 3)), trak_core.subset_masks(30, 20, seed=1), rng.normal(size=(20, 3))
    result = trak_core.lds(torch.tensor(scores), torch.tensor(masks), torch.tensor(outputs))
    np.testing.assert_allclose(result.per_target, _reference(scores, masks, outputs), atol=1e-12)


def test_perfect_linear_datamodel_scores_one(rng):
    scores, masks = rng.normal(size=(50, 4)), trak_core.subset_masks(50, 25, seed=0)
    outputs = np.exp(masks.astype(float) @ scores)  # a monotone function of the prediction
    assert trak_core.lds(scores, masks, outputs).mean == pytest.approx(1.0, abs=1e-12)


def test_constant_target_is_left_out_and_bad_shapes(rng):
    scores, masks = rng.normal(size=(20, 3)), trak_core.subset_masks(20, 10, seed=0)
    outputs = rng.normal(size=(10, 3))
    outputs[:, 2] = 1.0
    result = trak_core.lds(scores, masks, outputs)
    assert np.isnan(result.per_target[2]) and np.isfinite(result.mean)
    assert result.mean == pytest.approx(_reference(scores, masks, outputs)[:2].mean(), abs=1e-12)
    with pytest.raises(ValueError, match="masks must have shape"):
        trak_core.lds(scores, masks[:, :5], outputs)
    with pytest.raises(ValueError, match="outputs must have shape"):
        trak_core.lds(scores, masks, outputs[:, :2])


def test_subset_masks():
    masks = trak_core.subset_masks(101, 50, fraction=0.5, seed=3)
    assert masks.shape == (50, 101) and masks.dtype == bool
    assert np.all(masks.sum(1) == 50)  # round(50.5) = 50
    assert np.array_equal(masks, trak_core.subset_masks(101, 50, fraction=0.5, seed=3))
    assert 0.4 < masks.mean(0).min() or masks.mean(0).max() < 0.8  # every example used about half the time
    with pytest.raises(ValueError, match="fraction"):
        trak_core.subset_masks(10, 5, fraction=1.0)
