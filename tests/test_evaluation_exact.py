"""LDS of a target whose scores are all equal, and spearman's shapes: numbers that rounding or broadcasting made up."""
import warnings

import numpy as np
import pytest

import trak_core
from trak_core.evaluation import spearman


def test_equal_scores_give_an_undefined_target_not_rounding_noise(xp, rng):
    """Every subset of ``subset_masks`` holds 500 examples, so a target whose 1,000 scores are all 0.1 is predicted
    0.1 * 500 on every subset: its LDS is undefined. ``masks @ scores`` summed 0.1 in different orders, the
    predictions differed by 1.4e-14, and their ranks gave LDS 0.359 (audit), counted in the mean without a word."""
    masks = trak_core.subset_masks(1000, 64, seed=0)
    outputs = rng.normal(size=(64, 2))
    scores = np.stack([np.full(1000, 0.1), rng.normal(size=1000)], axis=1)
    with pytest.warns(RuntimeWarning, match=r"LDS is undefined for targets \[0\] \(1 of 2\)"):
        result = trak_core.lds(xp.asarray(scores), xp.asarray(masks), xp.asarray(outputs))
    assert result.undefined == [0] and np.isnan(result.per_target[0])
    from scipy.stats import spearmanr

    reference = spearmanr(masks.astype(float) @ scores[:, 1], outputs[:, 1])[0]
    assert result.mean == pytest.approx(reference, abs=1e-12)


def test_equal_scores_with_subsets_of_different_sizes_rank_by_size(rng):
    """Equal scores still predict ``count * score``: with subsets of different sizes the LDS is defined."""
    masks = rng.random((20, 30)) < 0.5
    outputs = masks.sum(1, keepdims=True).astype(float) + rng.normal(size=(20, 1)) * 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = trak_core.lds(np.full((30, 1), 0.1), masks, outputs)
    from scipy.stats import spearmanr

    assert result.mean == pytest.approx(spearmanr(masks.sum(1), outputs[:, 0])[0], abs=1e-12)


@pytest.mark.parametrize("a, b", [(np.array([1.0]), np.array([3.0, 1.0, 2.0])),  # was NaN (broadcast)
                                  (np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])),  # was numpy's error
                                  (np.ones((3, 2)), np.ones((3, 2)))])  # was flattened into one sample
def test_spearman_refuses_arrays_that_are_not_paired_samples(a, b):
    import array_api_compat.numpy as xp

    with pytest.raises(trak_core.TrakValueError, match="two 1-D arrays of one length, got shapes"):
        spearman(a, b, xp=xp)


def test_predictions_are_made_in_blocks_of_targets_within_a_bound_on_memory(monkeypatch):
    """Whole float64 copies of the scores (``astype``, then ``- row 0``) took 4.2x a float32 score matrix at the peak
    (80 MB of scores: 339 MB more); in blocks of columns, the peak stays below the scores' own size, and every block
    gives scipy's value."""
    import tracemalloc

    from scipy.stats import spearmanr

    from trak_core import evaluation

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2000, 400)).astype(np.float32)
    masks = trak_core.subset_masks(2000, 16, seed=0)
    outputs = masks @ scores.astype(np.float64) * 0.1 + rng.normal(size=(16, 400))
    monkeypatch.setattr(evaluation, "PREDICTION_BLOCK_BYTES", 2000 * 8 * 48, raising=False)  # blocks of 48 columns
    tracemalloc.start()
    try:
        result = trak_core.lds(scores, masks, outputs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < scores.nbytes, f"peak {peak / scores.nbytes:.2f}x the scores"
    predictions = masks.astype(np.float64) @ scores.astype(np.float64)
    reference = [spearmanr(predictions[:, j], outputs[:, j])[0] for j in range(400)]
    np.testing.assert_allclose(result.per_target, reference, rtol=0, atol=1e-12)
