"""LDS against scipy.stats.spearmanr, and the subset masks."""
import numpy as np
import pytest
from scipy.stats import binom, spearmanr

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


def test_lds_reads_numpy_masks_and_outputs_into_the_scores_library(rng):
    """torch scores with subset_masks' NumPy masks and plain-list outputs (as docs/torch.md's excerpt passes them)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    scores, masks, outputs = rng.normal(size=(30, 3)), trak_core.subset_masks(30, 20, seed=1), rng.normal(size=(20, 3))
    result = trak_core.lds(torch.tensor(scores), masks, outputs.tolist())
    np.testing.assert_allclose(result.per_target, _reference(scores, masks, outputs), atol=1e-12)


def test_non_finite_outputs_or_scores_are_named(rng):
    """A diverged retrained model (NaN outputs) is an error naming its subset, not ranked as a value (one NaN row
    moved LDS from 0.971 to 0.939 before); NaN scores name their targets."""
    scores, masks = rng.normal(size=(50, 4)), trak_core.subset_masks(50, 20, seed=0)
    outputs = masks @ scores + 0.5 * rng.normal(size=(20, 4))
    outputs[3, :] = np.nan
    outputs[7, 1] = np.inf
    with pytest.raises(ValueError, match=r"outputs have NaN or infinite values for subsets .* \[3, 7\]; leave"):
        trak_core.lds(scores, masks, outputs)
    kept = np.delete(np.arange(20), [3, 7])
    assert trak_core.lds(scores, masks[kept], outputs[kept]).mean == pytest.approx(
        _reference(scores, masks[kept], outputs[kept]).mean(), abs=1e-12)
    scores[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"scores have NaN or infinite values for targets \[2\]"):
        trak_core.lds(scores, masks[kept], outputs[kept])


def test_perfect_linear_datamodel_scores_one(rng):
    scores, masks = rng.normal(size=(50, 4)), trak_core.subset_masks(50, 25, seed=0)
    outputs = np.exp(masks.astype(float) @ scores)  # a monotone function of the prediction
    assert trak_core.lds(scores, masks, outputs).mean == pytest.approx(1.0, abs=1e-12)


def test_constant_target_is_left_out_and_bad_shapes(rng):
    scores, masks = rng.normal(size=(20, 3)), trak_core.subset_masks(20, 10, seed=0)
    outputs = rng.normal(size=(10, 3))
    outputs[:, 2] = 1.0
    with pytest.warns(RuntimeWarning, match=r"LDS is undefined for targets \[2\] \(1 of 3\).*over the other 2"):
        result = trak_core.lds(scores, masks, outputs)
    assert result.undefined == [2] and str(result).endswith("(2 of 3 targets)")
    assert np.isnan(result.per_target[2]) and np.isfinite(result.mean)
    assert result.mean == pytest.approx(_reference(scores, masks, outputs)[:2].mean(), abs=1e-12)
    with pytest.raises(ValueError, match="masks must have shape"):
        trak_core.lds(scores, masks[:, :5], outputs)
    with pytest.raises(ValueError, match="outputs must have shape"):
        trak_core.lds(scores, masks, outputs[:, :2])


def _outside_binomial_bound(masks, fraction, alpha=1e-3):
    """Examples whose inclusion count is outside the two-sided binomial interval of level ``1 - alpha``
    (Bonferroni over examples): each of the ``n_subsets`` masks holds ``round(fraction * n_train)``
    examples, so each example is in each mask with probability ``round(fraction * n_train) / n_train``."""
    n_subsets, n_train = masks.shape
    probability = round(fraction * n_train) / n_train
    low, high = binom.interval(1 - alpha / n_train, n_subsets, probability)
    counts = masks.sum(0)
    return np.flatnonzero((counts < low) | (counts > high))


def test_subset_masks():
    masks = trak_core.subset_masks(101, 50, fraction=0.5, seed=3)
    assert masks.shape == (50, 101) and masks.dtype == bool
    assert np.all(masks.sum(1) == 50)  # round(50.5) = 50
    assert np.array_equal(masks, trak_core.subset_masks(101, 50, fraction=0.5, seed=3))
    assert not np.array_equal(masks, trak_core.subset_masks(101, 50, fraction=0.5, seed=4))
    with pytest.raises(ValueError, match="fraction"):
        trak_core.subset_masks(10, 5, fraction=1.0)


@pytest.mark.parametrize("n_train,fraction", [(101, 0.5), (60, 0.3)])
def test_every_example_is_included_at_the_requested_rate(n_train, fraction):
    masks = trak_core.subset_masks(n_train, 400, fraction=fraction, seed=3)
    assert np.all(masks.sum(1) == round(fraction * n_train))
    assert _outside_binomial_bound(masks, fraction).tolist() == []
    assert len({row.tobytes() for row in masks}) == 400  # no subset repeats (chance: far below 1e-20)


def test_inclusion_check_rejects_a_sampler_that_skips_an_example():
    """The check above fails for samplers that are wrong in the ways that matter for LDS."""
    rng = np.random.default_rng(0)
    n_train, size = 101, 50
    skips_first = np.zeros((400, n_train), dtype=bool)  # never picks example 0; the rest look fine
    for row in skips_first:
        row[1 + rng.choice(n_train - 1, size=size, replace=False)] = True
    assert _outside_binomial_bound(skips_first, 0.5).tolist() == [0]
    favours_first = np.zeros((400, n_train), dtype=bool)  # examples 0-9 drawn with three times the weight
    weights = np.where(np.arange(n_train) < 10, 3.0, 1.0)
    for row in favours_first:
        row[rng.choice(n_train, size=size, replace=False, p=weights / weights.sum())] = True
    assert set(range(10)) <= set(_outside_binomial_bound(favours_first, 0.5).tolist())


def test_a_method_that_gives_up_on_a_target_is_told(rng):
    """All-zero scores for a target leave it out of the mean: that is said, and listed (an audit raised a method's
    LDS from 0.620 to 0.734 by zeroing its 10 worst targets' scores, silently)."""
    scores, masks = rng.normal(size=(40, 4)), trak_core.subset_masks(40, 12, seed=0)
    outputs = masks.astype(float) @ scores + rng.normal(size=(12, 4))
    scores[:, [0, 3]] = 0.0
    with pytest.warns(RuntimeWarning, match=r"targets \[0, 3\] \(2 of 4\)"):
        result = trak_core.lds(scores, masks, outputs)
    assert result.undefined == [0, 3]
    assert result.mean == pytest.approx(_reference(scores, masks, outputs)[[1, 2]].mean(), abs=1e-12)


def test_nan_masks_and_one_dimensional_scores_are_errors(rng):
    scores, masks = rng.normal(size=(20, 3)), trak_core.subset_masks(20, 10, seed=0).astype(float)
    outputs = masks @ scores
    masks[4, 7] = np.nan  # was ranked as a value: LDS 0.690 -> 0.706 in the audit
    with pytest.raises(ValueError, match=r"masks have NaN or infinite values for subsets \[4\].*booleans or 0/1"):
        trak_core.lds(scores, masks, outputs)
    with pytest.raises(ValueError, match=r"scores must have shape \(n_train, n_targets\), got \(20,\).*\[:, None\]"):
        trak_core.lds(scores[:, 0], masks, outputs[:, 0])


def test_spearman_is_nan_where_an_input_is_nan():
    import array_api_compat.numpy as xp

    from trak_core.evaluation import spearman

    a, b = np.array([1.0, np.nan, 3.0, 4.0, 5.0]), np.arange(5.0)
    assert np.isnan(spearmanr(a, b)[0])  # the reference
    assert np.isnan(spearman(a, b, xp=xp))  # was 0.4: NaN ranked as the largest value


def test_a_fraction_that_keeps_every_example_is_an_error():
    with pytest.raises(ValueError, match=r"fraction=0.95 of n_train=10 rounds to 10 examples: every subset"):
        trak_core.subset_masks(10, 20, fraction=0.95)
    assert trak_core.subset_masks(10, 20, fraction=0.9).sum(1).tolist() == [9] * 20
    with pytest.raises(ValueError, match=r"keeps at most 999 examples \(fraction \* n_train < 999.5\)"):
        trak_core.subset_masks(1000, 5, fraction=0.9996)


def test_a_soft_threshold_near_one_keeps_the_largest_scores(rng):
    from trak_core.scores import soft_threshold
    import array_api_compat.numpy as xp

    scores = rng.normal(size=(200, 6))
    shrunk = soft_threshold(scores, 0.999, xp=xp)
    threshold = np.quantile(np.abs(scores), 0.999, axis=0)  # numpy's linear interpolation: the reference
    np.testing.assert_allclose(shrunk, np.sign(scores) * np.maximum(np.abs(scores) - threshold, 0), rtol=1e-12)
    assert np.all(np.count_nonzero(shrunk, axis=0) == 1)  # was 0: round(0.999 * 199) = 199, the maximum itself


@pytest.mark.parametrize("dtype, n", [(np.float16, 50), (np.float16, 300), (np.int8, 600), (np.uint8, 600),
                                      (np.float32, 3000)])
def test_spearman_of_narrow_dtypes_equals_scipy(dtype, n):
    """Ranks were computed in the values' dtype: float16 rank sums overflowed (0.0 or NaN against scipy's 0.87) and
    int8 tie counts wrapped (-0.65 against +0.65)."""
    import array_api_compat.numpy as xp

    from trak_core.evaluation import spearman

    rng = np.random.default_rng(n)
    a = rng.normal(size=n)
    b = a + rng.normal(size=n) * 0.5
    if np.dtype(dtype).kind in "iu":
        a, b = np.digitize(a, [-0.5, 0.5]).astype(dtype), np.digitize(b, [-0.5, 0.5]).astype(dtype)  # 3 values, ties
    else:
        a, b = a.astype(dtype), b.astype(dtype)
    assert abs(spearman(a, b, xp=xp) - spearmanr(a, b).statistic) < 1e-12


def test_bfloat16_outputs_from_another_library_are_read_as_numbers(rng):
    """torch bfloat16 outputs or masks with NumPy scores were read as their bytes: twice the columns, an error."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    scores, masks = rng.normal(size=(30, 4)), trak_core.subset_masks(30, 12, seed=3)
    outputs = torch.tensor(rng.normal(size=(12, 4)) + masks.astype(float) @ scores, dtype=torch.bfloat16)
    reference = _reference(scores, masks, outputs.double().numpy())
    result = trak_core.lds(scores, torch.tensor(masks, dtype=torch.bfloat16), outputs)
    np.testing.assert_allclose(result.per_target, reference, atol=1e-12)


def test_index_lists_and_transposed_scores_are_told_apart(rng):
    scores = rng.normal(size=(50, 7))
    masks = trak_core.subset_masks(50, 20, seed=0)
    outputs = rng.normal(size=(20, 7))
    indices = np.stack([np.flatnonzero(m)[:25] for m in masks])  # (20, 25) index lists
    with pytest.raises(trak_core.TrakValueError, match=r"not lists of indices: mask = numpy.zeros"):
        trak_core.lds(scores, indices, outputs)
    with pytest.raises(trak_core.TrakValueError, match=r"cannot be read as an array.*not lists of indices"):
        trak_core.lds(scores, [list(range(5)), list(range(7)), list(range(3))], outputs[:3])
    with pytest.raises(trak_core.TrakValueError, match=r"scores may be transposed"):
        trak_core.lds(scores.T.copy(), masks, outputs)


@pytest.mark.parametrize("kwargs, said", [(dict(n_train=10.0, n_subsets=3), "n_train must be an integer"),
                                          (dict(n_train=10, n_subsets=3, seed=-1), "seed must be a non-negative"),
                                          (dict(n_train=10, n_subsets="3"), "n_subsets must be an integer")])
def test_subset_masks_arguments_are_checked(kwargs, said):
    with pytest.raises(trak_core.TrakValueError, match=said):
        trak_core.subset_masks(**kwargs)
    assert trak_core.subset_masks(np.int64(10), np.int32(3), seed=np.uint8(1)).shape == (3, 10)


def test_lds_of_no_targets_or_no_training_examples_says_so(rng):
    """Zero targets (or zero training examples) were reported as 'undefined for every target: predictions or outputs
    are constant across subsets', which sends the user looking for constant outputs."""
    masks = trak_core.subset_masks(10, 6, seed=0)
    with pytest.raises(ValueError, match=r"scores have shape \(10, 0\): LDS needs at least one target \(column\)"):
        trak_core.lds(np.zeros((10, 0)), masks, np.zeros((6, 0)))
    with pytest.raises(ValueError, match=r"scores have shape \(0, 2\): LDS needs at least one training example"):
        trak_core.lds(np.zeros((0, 2)), np.zeros((6, 0), bool), rng.normal(size=(6, 2)))
    scores, outputs = rng.normal(size=(10, 1)), rng.normal(size=(6, 1))  # one target still works: scipy's value
    assert trak_core.lds(scores, masks, outputs).mean == pytest.approx(_reference(scores, masks, outputs)[0], abs=1e-12)


@pytest.mark.parametrize("fraction", ["0.5", None, [0.5]])
def test_a_fraction_that_is_not_a_number_is_named(fraction):
    """fraction='0.5' or None raised Python's own "'<' not supported between instances of 'int' and 'str'"."""
    with pytest.raises(TypeError, match=r"fraction must be a number in \(0, 1\), got "):
        trak_core.subset_masks(10, 3, fraction=fraction)


def test_subset_masks_hold_at_least_one_example_and_take_numpy_fractions():
    """The summary said ``round(fraction * n_train)`` examples; a fraction that rounds to 0 holds 1 (as the Returns
    section says). NumPy scalars and 0-d arrays are numbers."""
    assert trak_core.subset_masks(100, 5, fraction=0.001, seed=1).sum(1).tolist() == [1] * 5  # round(0.1) = 0
    for fraction in (np.float32(0.3), np.array(0.3)):
        np.testing.assert_array_equal(trak_core.subset_masks(20, 4, fraction=fraction, seed=2),
                                      trak_core.subset_masks(20, 4, fraction=0.3, seed=2))


@pytest.mark.parametrize("which", ["outputs", "scores"])
def test_outputs_or_scores_that_are_not_numbers_are_named(which, rng):
    """An object array (a subset's output missing: None) or strings raised NumPy's own "ufunc 'isfinite' not
    supported for the input types"; the numbers themselves, as floats, give scipy's value."""
    scores, masks = rng.normal(size=(20, 3)), trak_core.subset_masks(20, 8, seed=0)
    outputs = masks @ scores + rng.normal(size=(8, 3))
    given = {"scores": scores, "outputs": outputs}
    given[which] = given[which].astype(object)
    given[which][1, 2] = None
    with pytest.raises(trak_core.TrakTypeError, match=rf"{which} have dtype object, not numbers; .*numpy.asarray"):
        trak_core.lds(given["scores"], masks, given["outputs"])
    with pytest.raises(trak_core.TrakTypeError, match=rf"{which} have dtype <U\d+, not numbers"):
        trak_core.lds(*[np.asarray(v).astype(str) if k == which else v for k, v in
                        (("scores", scores), ("masks", masks), ("outputs", outputs))])
    result = trak_core.lds(scores.astype(object).astype(float), masks, outputs.astype(object).astype(float))
    np.testing.assert_allclose(result.per_target, _reference(scores, masks, outputs), rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["scores", "masks", "outputs", "all"])
def test_lds_reads_a_numpy_matrix_as_its_array(which, rng):
    """``np.matrix`` scores kept their columns 2-D and LDS failed inside spearman ("1-D arrays ... shapes (40, 1)
    and (40,)"), naming neither the input nor the fix: a matrix is now read as the array it holds."""
    scores, masks, outputs = rng.normal(size=(30, 4)), trak_core.subset_masks(30, 40, seed=3), rng.normal(size=(40, 4))
    given = {name: np.asmatrix(value) if which in (name, "all") else value
             for name, value in (("scores", scores), ("masks", masks), ("outputs", outputs))}
    result = trak_core.lds(given["scores"], given["masks"], given["outputs"])
    np.testing.assert_allclose(result.per_target, _reference(scores, masks, outputs), rtol=0, atol=1e-12)
    assert type(result.per_target) is np.ndarray and result.per_target.shape == (4,)
