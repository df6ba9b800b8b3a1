"""The linear datamodeling score (LDS) and the random subsets it is measured on.

One job: evaluate scores counterfactually. For each target ``j``, LDS is the Spearman rank
correlation, across subsets ``S_1..S_m`` of the training set, between the predicted output
``sum_{i in S} tau[i, j]`` and the output of a model retrained on ``S`` (Park et al., 2023).
Written over the Array API; ties get average ranks (as ``scipy.stats.spearmanr``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._delegation import full_precision, to_host
from ._namespace import accumulation_dtype, device_of, namespace
from .errors import TrakTypeError, TrakValueError
from .notices import warn

__all__ = ["LDSResult", "lds", "subset_masks", "spearman"]


@dataclass
class LDSResult:
    """LDS over targets: ``mean`` and its standard error ``sem`` over the targets where it is defined;
    ``undefined`` lists the others (``per_target`` NaN there: constant predictions or outputs).

    Parameters
    ----------
    mean : float
        Mean LDS over the targets where it is defined.
    sem : float
        Standard error of ``mean`` (NaN where a single target is defined).
    per_target : numpy.ndarray
        LDS of each target, shape ``(n_targets,)``, float64.
    n_subsets : int
        Subsets (retrained models) the correlations are over.
    undefined : list of int
        Indices of the targets whose LDS is undefined.
    """

    mean: float
    sem: float
    per_target: Any
    n_subsets: int
    undefined: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        kept = len(self.per_target) - len(self.undefined)
        return f"{self.mean:.3f} +- {self.sem:.3f}" + (f" ({kept} of {len(self.per_target)} targets)"
                                                       if self.undefined else "")


def _average_ranks(values: Any, *, xp: Any) -> Any:
    """Ranks 1..n of a 1-D array, ties sharing their average rank, in float64 (float32 where the namespace has no
    float64): ranks in the values' own dtype overflowed float16 and wrapped int8 counts (a flipped sign)."""
    work = accumulation_dtype(xp, device_of(values))
    counts = xp.astype(xp.unique_counts(values).counts, work)  # sorted unique values
    inverse = xp.unique_inverse(values).inverse_indices
    average = xp.cumulative_sum(counts) - (counts - 1.0) / 2.0
    return xp.take(average, xp.reshape(inverse, (-1,)))


def spearman(a: Any, b: Any, *, xp: Any) -> float:
    """Spearman rank correlation of two 1-D arrays of one length (NaN when either is constant or holds a NaN, as
    ``scipy.stats.spearmanr``).

    Parameters
    ----------
    a, b : array, shape (n,)
        The two samples, paired by position.
    xp : namespace
        Their array namespace.

    Returns
    -------
    float
        The correlation of their average ranks (ties share their average rank).

    Raises
    ------
    TrakValueError
        When ``a`` or ``b`` is not 1-D, or their lengths differ (a length-1 array was broadcast to a constant: NaN;
        2-D arrays were flattened and ranked as one sample).
    """
    if a.ndim != 1 or b.ndim != 1 or a.shape[0] != b.shape[0]:
        raise TrakValueError(f"spearman needs two 1-D arrays of one length, got shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
    if xp.isdtype(a.dtype, "real floating") and bool(xp.any(xp.isnan(a))) or \
            xp.isdtype(b.dtype, "real floating") and bool(xp.any(xp.isnan(b))):
        return math.nan  # unique() would rank NaN as a value
    ra, rb = _average_ranks(a, xp=xp), _average_ranks(b, xp=xp)
    ra, rb = ra - xp.mean(ra), rb - xp.mean(rb)
    denominator = float(xp.sqrt(xp.sum(ra * ra) * xp.sum(rb * rb)))
    return float(xp.sum(ra * rb)) / denominator if denominator > 0 else math.nan


def lds(scores: Any, masks: Any, outputs: Any) -> LDSResult:
    """Linear datamodeling score of ``scores`` against retrained models.

    Parameters
    ----------
    scores : array, shape (n_train, n_targets)
        Attribution scores.
    masks : array, shape (n_subsets, n_train)
        Which training examples each retrained model saw (boolean or 0/1).
    outputs : array, shape (n_subsets, n_targets)
        The retrained models' outputs (e.g. margins) on the targets.

    Returns
    -------
    LDSResult
        Mean and standard error over targets, and the per-target values. Targets whose correlation is
        undefined (predictions or outputs constant across subsets, e.g. all-zero scores) are left out
        of the mean, listed in ``undefined``, and a ``RuntimeWarning`` says so: a method that gives up
        on hard targets would otherwise be graded on the easy ones only (compare methods on the targets
        defined for all of them).

    Raises
    ------
    TrakValueError
        On shapes that do not match, fewer than 3 subsets, NaN or infinite scores, masks or outputs
        (a retrained model that diverged), or masks with values other than 0 and 1 (counts: pass
        ``counts > 0``): the message names the subsets or targets. Also when the LDS is undefined for every
        target.
    TrakTypeError
        On complex scores, masks or outputs, on ones that are not numbers (strings, an object array), or on inputs that
        are not arrays (a list).

    Notes
    -----
    ``masks`` and ``outputs`` may come from another array library than ``scores`` (NumPy masks from
    ``subset_masks`` with torch scores): they are read into the scores' namespace and device. A ``numpy.matrix``
    is read as the 2-D array it holds (``numpy.asarray``).
    """
    scores, masks, outputs = (_no_matrix(values) for values in (scores, masks, outputs))
    xp = namespace(scores)
    masks, outputs = _like(masks, scores, "masks", xp=xp), _like(outputs, scores, "outputs", xp=xp)
    if scores.ndim != 2:
        raise TrakValueError(f"scores must have shape (n_train, n_targets), got {tuple(scores.shape)}; for one "
                             "target, pass scores[:, None] and outputs[:, None]")
    n_train, n_targets = scores.shape
    if masks.ndim != 2 or masks.shape[1] != n_train:
        hint = ""
        if masks.ndim == 2 and masks.shape[1] == n_targets != n_train:
            hint = f"; scores may be transposed: pass them as (n_train, n_targets), here ({n_targets}, {n_train})?"
        elif not xp.isdtype(masks.dtype, "bool"):
            hint = ("; masks are booleans (or 0/1) with one column per training example, not lists of indices: "
                    "mask = numpy.zeros((n_subsets, n_train), bool); mask[s, indices[s]] = True for each subset s")
        raise TrakValueError(f"masks must have shape (n_subsets, {n_train}) to match scores, got "
                             f"{tuple(masks.shape)}{hint}")
    if outputs.shape != (masks.shape[0], n_targets):
        raise TrakValueError(f"outputs must have shape (n_subsets, n_targets) = {(masks.shape[0], n_targets)}, "
                             f"got {tuple(outputs.shape)}")
    if masks.shape[0] < 3:
        raise TrakValueError(f"LDS needs at least 3 subsets to rank, got {masks.shape[0]}")
    if n_targets == 0 or n_train == 0:  # was "undefined for every target: ... constant across subsets"
        raise TrakValueError(f"scores have shape {(n_train, n_targets)}: LDS needs at least one "
                             f"{'target (column)' if n_targets == 0 else 'training example (row)'}")
    for name, values in (("scores", scores), ("outputs", outputs), ("masks", masks)):
        if xp.isdtype(values.dtype, "complex floating"):  # was cast to real with only NumPy's ComplexWarning
            raise TrakTypeError(f"{name} are complex ({values.dtype}); LDS ranks real numbers: pass real {name}, "
                                f"e.g. {name}.real if the imaginary part is meant to be dropped")
        # strings, Python objects: were NumPy's own "ufunc 'isfinite' not supported for the input types"
        if not xp.isdtype(values.dtype, ("bool", "integral", "real floating")):
            raise TrakTypeError(f"{name} have dtype {values.dtype}, not numbers; LDS ranks real numbers: pass a "
                                f"numeric array, e.g. numpy.asarray({name}, dtype=float) (an object array that holds "
                                "None for a subset or target: leave that subset or target out first)")
    checked = [("outputs", outputs, 1, "subsets (retrained models)"), ("scores", scores, 0, "targets")]
    if xp.isdtype(masks.dtype, "real floating"):
        checked.append(("masks", masks, 1, "subsets"))
    for name, values, axis, what in checked:
        finite = xp.all(xp.isfinite(values), axis=axis)
        bad = np.asarray([] if bool(xp.all(finite)) else [i for i in range(finite.shape[0]) if not bool(finite[i])])
        if bad.size:
            raise TrakValueError(f"{name} have NaN or infinite values for {what} {bad[:10].tolist()}"
                                 f"{' ...' if bad.size > 10 else ''}; "
                                 + {"outputs": "leave those subsets out (their rows of masks and outputs): a "
                                               "retrained model that diverged ranks as noise",
                                    "masks": "masks say which examples each retrained model saw: pass them as "
                                             "booleans or 0/1",
                                    "scores": "score them again"}[name])
    if not xp.isdtype(masks.dtype, "bool"):  # 0/1 counts: a 3 weighted that example three times, unsaid
        binary = xp.all((masks == 0) | (masks == 1), axis=1)
        if not bool(xp.all(binary)):
            bad = [i for i in range(binary.shape[0]) if not bool(binary[i])]
            raise TrakValueError(f"masks have values other than 0 and 1 for subsets {bad[:10]}"
                                 f"{' ...' if len(bad) > 10 else ''}; masks say which examples each retrained model "
                                 "saw, not how often: pass them as booleans or 0/1, e.g. counts > 0")
    work = accumulation_dtype(xp, device_of(scores))
    predictions = _predictions(scores, xp.astype(masks, work), xp=xp)
    outputs = xp.astype(outputs, work)
    per_target = [spearman(predictions[:, j], outputs[:, j], xp=xp) for j in range(n_targets)]
    values = np.asarray(per_target)
    defined = values[np.isfinite(values)]
    if defined.size == 0:
        raise TrakValueError("LDS is undefined for every target: predictions or outputs are constant across subsets")
    undefined = [j for j in range(n_targets) if not np.isfinite(values[j])]
    if undefined:
        warn(f"LDS is undefined for targets {undefined[:10]}{' ...' if len(undefined) > 10 else ''} "
             f"({len(undefined)} of {n_targets}): their predictions (e.g. all-zero scores) or outputs are "
             f"constant across subsets; the mean is over the other {defined.size}. Compare methods on the "
             "targets defined for all of them (LDSResult.undefined)", RuntimeWarning)
    sem = float(defined.std(ddof=1) / math.sqrt(defined.size)) if defined.size > 1 else math.nan
    return LDSResult(float(defined.mean()), sem, values, int(masks.shape[0]), undefined)


#: bytes of ``scores`` columns, in the accumulation dtype, that ``lds`` predicts from at a time: whole float64 copies of
#: the scores took 4.2x a float32 score matrix at the peak (2 GB of scores: 8.5 GB more)
PREDICTION_BLOCK_BYTES = 64 * 2**20


def _predictions(scores: Any, weights: Any, *, xp: Any) -> Any:
    """``weights @ scores`` in ``weights``' dtype, ``(n_subsets, n_targets)``, computed over blocks of target columns
    of about ``PREDICTION_BLOCK_BYTES``.

    Each block is summed as ``weights @ (block - row 0) + counts * row 0``: the same sum, but a target whose scores are
    all equal gets exactly equal predictions for equal-sized subsets (undefined LDS), not rounding noise ranked as
    signal.
    """
    n_train, n_targets = scores.shape
    width = max(1, PREDICTION_BLOCK_BYTES // max(1, n_train * 8))
    counts, parts = xp.sum(weights, axis=1, keepdims=True), []
    for start in range(0, n_targets, width):
        values = xp.astype(scores[:, start:min(start + width, n_targets)], weights.dtype)
        reference = values[0:1, :]
        with full_precision(xp):
            parts.append(weights @ (values - reference) + counts * reference)
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)


def _no_matrix(values: Any) -> Any:
    """A ``numpy.matrix`` as the plain 2-D array it holds (its columns stayed 2-D: spearman refused "(n, 1)"),
    anything else as it is."""
    return np.asarray(values) if isinstance(values, np.matrix) else values


def _like(values: Any, scores: Any, name: str, *, xp: Any) -> Any:
    """``values`` in the namespace and on the device of ``scores``."""
    import array_api_compat

    try:
        if array_api_compat.array_namespace(values) is xp:
            return values
    except TypeError:  # not an array: a list of lists
        pass
    if array_api_compat.is_torch_array(values) and (str(values.dtype) == "torch.bfloat16"
                                                    or str(values.dtype).startswith("torch.float8")):
        values = values.float()  # NumPy has no bfloat16: its bytes would be read as twice as many uint8 columns
    try:
        return xp.asarray(to_host(values), device=device_of(scores))
    except ValueError as exc:  # ragged lists
        raise TrakValueError(f"{name} cannot be read as an array ({exc}); pass a 2-D array: "
                             + ("masks are booleans (n_subsets, n_train), one column per training example, not "
                                "lists of indices" if name == "masks" else "outputs (n_subsets, n_targets)")) from None
    except (TypeError, RuntimeError) as exc:
        raise TrakTypeError(f"{name} ({type(values).__module__}) cannot be read into the scores' array library "
                            f"({type(scores).__module__}) here ({exc}); convert them to one library first, e.g. "
                            "scores.cpu().numpy()") from None


def subset_masks(n_train: int, n_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean masks ``(n_subsets, n_train)``, each selecting ``max(1, round(fraction * n_train))`` examples at
    random.

    Parameters
    ----------
    n_train : int
        Number of training examples, at least 2.
    n_subsets : int
        Number of masks (retrained models), at least 1.
    fraction : float
        Share of the training set each subset holds, in ``(0, 1)``; ``round(fraction * n_train)`` must be below
        ``n_train``.
    seed : int
        Seed of ``numpy.random.default_rng``, non-negative.

    Returns
    -------
    numpy.ndarray
        Booleans, shape ``(n_subsets, n_train)``; each row holds ``max(1, round(fraction * n_train))`` True
        entries, drawn without replacement independently of the other rows.
    """
    from ._checks import _integer

    for name, value in (("n_train", n_train), ("n_subsets", n_subsets), ("seed", seed)):
        if _integer(value) is None or (name == "seed" and _integer(value) < 0):
            raise TrakValueError(f"{name} must be {'a non-negative' if name == 'seed' else 'an'} integer, got "
                                 f"{value!r}")
    n_train, n_subsets = _integer(n_train), _integer(n_subsets)
    try:
        inside = bool(0 < fraction < 1)
    except TypeError:  # "0.5" or None: a raw TypeError from the comparison before
        raise TrakTypeError(f"fraction must be a number in (0, 1), got {fraction!r}") from None
    if not inside:
        raise TrakValueError(f"fraction must be in (0, 1), got {fraction}")
    if n_train < 2 or n_subsets < 1:
        raise TrakValueError(f"need n_train >= 2 and n_subsets >= 1, got {n_train} and {n_subsets}")
    rng = np.random.default_rng(seed)
    size = max(1, round(fraction * n_train))
    if size >= n_train:
        raise TrakValueError(f"fraction={fraction} of n_train={n_train} rounds to {size} examples: every subset "
                             f"would hold the whole training set, and LDS could not rank them; choose a fraction that "
                             f"keeps at most {n_train - 1} examples (fraction * n_train < {n_train - 0.5})")
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size=size, replace=False)] = True
    return masks
