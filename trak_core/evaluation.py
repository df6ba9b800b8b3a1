"""The linear datamodeling score (LDS) and the random subsets it is measured on.

One job: evaluate scores counterfactually. For each target ``j``, LDS is the Spearman rank
correlation, across subsets ``S_1..S_m`` of the training set, between the predicted output
``sum_{i in S} tau[i, j]`` and the output of a model retrained on ``S`` (Park et al., 2023).
Written over the Array API; ties get average ranks (as ``scipy.stats.spearmanr``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._delegation import full_precision
from ._namespace import accumulation_dtype, device_of, namespace
from .errors import TrakValueError

__all__ = ["LDSResult", "lds", "subset_masks", "spearman"]


@dataclass
class LDSResult:
    """LDS over targets: ``mean`` and its standard error ``sem`` over the targets where it is defined."""

    mean: float
    sem: float
    per_target: Any
    n_subsets: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} +- {self.sem:.3f}"


def _average_ranks(values: Any, *, xp: Any) -> Any:
    """Ranks 1..n of a 1-D array, ties sharing their average rank."""
    counts = xp.astype(xp.unique_counts(values).counts, values.dtype)  # sorted unique values
    inverse = xp.unique_inverse(values).inverse_indices
    average = xp.cumulative_sum(counts) - (counts - 1.0) / 2.0
    return xp.take(average, xp.reshape(inverse, (-1,)))


def spearman(a: Any, b: Any, *, xp: Any) -> float:
    """Spearman rank correlation of two 1-D arrays (NaN when either is constant)."""
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
        Mean and standard error over targets (targets whose correlation is undefined, because
        predictions or outputs are constant, are left out), and the per-target values.
    """
    xp = namespace(scores, masks, outputs)
    n_train, n_targets = scores.shape
    if masks.ndim != 2 or masks.shape[1] != n_train:
        raise TrakValueError(f"masks must have shape (n_subsets, {n_train}) to match scores, got {tuple(masks.shape)}")
    if outputs.shape != (masks.shape[0], n_targets):
        raise TrakValueError(f"outputs must have shape (n_subsets, n_targets) = {(masks.shape[0], n_targets)}, "
                             f"got {tuple(outputs.shape)}")
    if masks.shape[0] < 3:
        raise TrakValueError(f"LDS needs at least 3 subsets to rank, got {masks.shape[0]}")
    work = accumulation_dtype(xp, device_of(scores))
    with full_precision(xp):
        predictions = xp.astype(masks, work) @ xp.astype(scores, work)
    outputs = xp.astype(outputs, work)
    per_target = [spearman(predictions[:, j], outputs[:, j], xp=xp) for j in range(n_targets)]
    values = np.asarray(per_target)
    defined = values[np.isfinite(values)]
    if defined.size == 0:
        raise TrakValueError("LDS is undefined for every target: predictions or outputs are constant across subsets")
    sem = float(defined.std(ddof=1) / math.sqrt(defined.size)) if defined.size > 1 else math.nan
    return LDSResult(float(defined.mean()), sem, values, int(masks.shape[0]))


def subset_masks(n_train: int, n_subsets: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean masks ``(n_subsets, n_train)``, each selecting ``round(fraction * n_train)`` examples at random."""
    if not 0 < fraction < 1:
        raise TrakValueError(f"fraction must be in (0, 1), got {fraction}")
    if n_train < 2 or n_subsets < 1:
        raise TrakValueError(f"need n_train >= 2 and n_subsets >= 1, got {n_train} and {n_subsets}")
    rng = np.random.default_rng(seed)
    size = max(1, round(fraction * n_train))
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, rng.choice(n_train, size=size, replace=False)] = True
    return masks
