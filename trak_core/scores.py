"""Scores from features: ``tau = (1/C sum_c Phi_c K_c^{-1} phi_c(z')^T) * (1/C sum_c Q_c)``.

One job: the scoring formula of DESIGN.md, per checkpoint and ensembled. Train features are
multiplied in row chunks in the kernel's dtype, so memory stays bounded by the chunk.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from ._delegation import full_precision_products
from ._subnormal_rows import note_rows
from .kernel import KernelFactor, gram, quadratic_forms, solve

__all__ = ["checkpoint_scores", "target_weights", "finish_products", "train_products", "self_scores", "ensemble",
           "Ensemble", "soft_threshold", "normalize_rows", "SCORE_BLOCK_ROWS"]


SCORE_BLOCK_ROWS = 16384  # train rows multiplied at a time (shards of distributed scoring align to it)


def checkpoint_scores(train_features: Any, factor: KernelFactor, target_features: Any, *, xp: Any,
                      chunk_rows: int = SCORE_BLOCK_ROWS) -> Any:
    """``Phi_c K_c^{-1} phi_c(z')^T``, shape (n_train, n_targets), in the kernel's dtype (in n-space:
    ``(G_c + lambda I)^{-1} (Phi_c phi_c(z')^T)``, :mod:`trak_core.kernel`)."""
    products = train_products(train_features, target_weights(factor, target_features, xp=xp), 0,
                              train_features.shape[0], xp=xp, chunk_rows=chunk_rows)
    return solve(factor, products, xp=xp) if factor.space == "n" else products


def target_weights(factor: KernelFactor, target_features: Any, *, xp: Any) -> Any:
    """What the train features multiply, (k, n_targets), in the kernel's dtype: ``K_c^{-1} phi_c(z')^T``,
    or in n-space ``phi_c(z')^T`` itself (the n x n solve comes after the product: :func:`finish_products`)."""
    work = factor.arrays[0].dtype  # the kernel's dtype (``TRAK(kernel_dtype=...)``)
    transposed = xp.matrix_transpose(xp.astype(target_features, work))
    return transposed if factor.space == "n" else solve(factor, transposed, xp=xp)


def finish_products(factor: KernelFactor, products: Any, *, xp: Any) -> Any:
    """Scores from ``Phi_c @ target_weights(...)`` (all rows): the identity in k-space, the solve in n-space."""
    return solve(factor, products, xp=xp) if factor.space == "n" else products


@full_precision_products
def train_products(train_features: Any, weights: Any, start: int, stop: int, *, xp: Any,
                   chunk_rows: int = SCORE_BLOCK_ROWS) -> Any:
    """Rows ``start .. stop-1`` of ``Phi_c @ weights``, in blocks of ``chunk_rows`` aligned to row 0."""
    parts = []
    row = start
    while row < stop:
        end = min(stop, (row // chunk_rows + 1) * chunk_rows)
        parts.append(xp.astype(train_features[row:end, :], weights.dtype) @ weights)
        row = end
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def self_scores(train_features: Any, factor: KernelFactor, *, xp: Any, chunk_rows: int = SCORE_BLOCK_ROWS,
                show: bool | None = False, desc: str = "self-influence") -> Any:
    """``diag(Phi_c K_c^{-1} Phi_c^T)``, shape (n_train,), in the kernel's dtype: each training
    example scored as its own target, without the n_train x n_train matrix (row blocks of ``chunk_rows``; a
    progress bar over them where ``show``)."""
    from ._progress import progress

    if factor.space == "n":  # diag((G + lambda I)^{-1} G)
        g = gram(train_features, xp=xp, chunk_rows=chunk_rows, dtype=factor.arrays[0].dtype)
        return _diagonal(solve(factor, g, xp=xp), xp=xp)
    parts = []
    for start in progress(range(0, train_features.shape[0], chunk_rows), desc=desc, enabled=show):
        rows = train_features[start:min(train_features.shape[0], start + chunk_rows), :]
        parts.append(quadratic_forms(factor, xp.matrix_transpose(rows), xp=xp))  # phi_i K^{-1} phi_i^T: one solve
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def _diagonal(matrix: Any, *, xp: Any) -> Any:
    return xp.linalg.diagonal(matrix) if hasattr(xp, "linalg") else xp.diagonal(matrix)


def normalize_rows(features: Any, *, xp: Any) -> Any:
    """Unit-norm rows (TrackStar-style features); all-zero rows stay zero. Each row is divided by its largest
    magnitude before its squares are summed: float32 squares underflow below about 1e-19 and overflow above about
    1.8e19, and such rows were left as they were (their norm 0) or zeroed (inf). Subnormal rows (below 1.2e-38) are
    noted for ``TRAK``'s warning (:mod:`trak_core._subnormal_rows`): scaled up, their rounding is too."""
    largest = xp.max(xp.abs(features), axis=1, keepdims=True)
    ones = xp.ones_like(largest)
    scaled = features / xp.where(largest > 0, largest, ones)  # JAX without x64 flushes subnormals: 0, never NaN
    norms = xp.sqrt(xp.sum(scaled * scaled, axis=1, keepdims=True))
    note_rows(features, largest, norms, xp=xp)
    return scaled / xp.where(norms > 0, norms, ones)


class Ensemble:
    """:func:`ensemble` as a running sum: checkpoints' scores are added one at a time, so memory holds the sum and
    one checkpoint's block, not every checkpoint's (the same operations in the same order: the same bits)."""

    def __init__(self, out_to_loss: Sequence[Any], *, weighting: str = "uniform") -> None:
        self.out_to_loss, self.weighting = out_to_loss, weighting
        self.total: Any = None
        self.added = 0

    def add(self, scores: Any, *, xp: Any) -> None:
        """Add one checkpoint's scores (n_train, n_targets); ``weighting="normalized"`` scales its columns first."""
        if self.weighting == "normalized":
            norms = xp.sqrt(xp.sum(scores * scores, axis=0, keepdims=True))
            scores = scores / xp.where(norms > 0, norms, xp.ones_like(norms))
        self.total = scores if self.total is None else self.total + scores
        self.added += 1

    def result(self, *, xp: Any) -> Any:
        """The mean of the scores added, each row multiplied by the mean out-to-loss weight."""
        if self.added != len(self.out_to_loss):
            raise RuntimeError(f"internal: {self.added} checkpoints' scores added for {len(self.out_to_loss)} weights")
        weight = self.out_to_loss[0]
        for q in self.out_to_loss[1:]:
            weight = weight + q
        weight = xp.astype(weight, self.total.dtype) / self.added
        return (self.total / self.added) * weight[:, None]


def ensemble(per_checkpoint: Sequence[Any], out_to_loss: Sequence[Any], *, xp: Any,
             weighting: str = "uniform") -> Any:
    """Average per-checkpoint scores and multiply each row by the mean out-to-loss weight.

    ``weighting="normalized"`` first scales each checkpoint's column (target) to unit norm, so
    that no checkpoint dominates a target's ensemble (an option, measured in ``docs/quality.md``).
    ``Ensemble`` is the same as a running sum, one checkpoint at a time.
    """
    running = Ensemble(out_to_loss, weighting=weighting)
    for scores in per_checkpoint:
        running.add(scores, xp=xp)
    return running.result(xp=xp)


def soft_threshold(scores: Any, quantile: float, *, xp: Any) -> Any:
    """Shrink each target's scores towards 0 by the ``quantile`` of their absolute values (TRAK paper, 3.4): the
    quantile interpolated linearly between order statistics (``numpy.quantile``'s default), so a quantile below 1
    always leaves the largest magnitude (when it is unique) above it (rounding to an order statistic zeroed every
    score for ``round(quantile * (n - 1)) == n - 1``)."""
    magnitude = xp.abs(scores)
    n = scores.shape[0]
    ordered = xp.sort(magnitude, axis=0)
    position = min(float(n - 1), max(0.0, quantile * (n - 1)))
    low = int(math.floor(position))
    high, fraction = min(low + 1, n - 1), position - low
    threshold = ordered[low:low + 1, :] + fraction * (ordered[high:high + 1, :] - ordered[low:low + 1, :])
    return xp.sign(scores) * xp.maximum(magnitude - threshold, xp.zeros_like(magnitude))
