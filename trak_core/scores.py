"""Scores from features: ``tau = (1/C sum_c Phi_c K_c^{-1} phi_c(z')^T) * (1/C sum_c Q_c)``.

One job: the scoring formula of DESIGN.md, per checkpoint and ensembled. Train features are
multiplied in row chunks in the accumulation dtype, so memory stays bounded by the chunk.
"""
from __future__ import annotations

from typing import Any, Sequence

from ._namespace import accumulation_dtype, device_of
from .kernel import KernelFactor, solve

__all__ = ["checkpoint_scores", "ensemble", "soft_threshold", "normalize_rows"]


def checkpoint_scores(train_features: Any, factor: KernelFactor, target_features: Any, *, xp: Any,
                      chunk_rows: int = 16384) -> Any:
    """``Phi_c K_c^{-1} phi_c(z')^T``, shape (n_train, n_targets), in the accumulation dtype."""
    work = accumulation_dtype(xp, device_of(target_features))
    weights = solve(factor, xp.matrix_transpose(xp.astype(target_features, work)), xp=xp)  # (k, m)
    n = train_features.shape[0]
    parts = [xp.astype(train_features[start:min(n, start + chunk_rows), :], work) @ weights
             for start in range(0, n, chunk_rows)]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def normalize_rows(features: Any, *, xp: Any) -> Any:
    """Unit-norm rows (TrackStar-style features); all-zero rows stay zero."""
    norms = xp.sqrt(xp.sum(features * features, axis=1, keepdims=True))
    return features / xp.where(norms > 0, norms, xp.ones_like(norms))


def ensemble(per_checkpoint: Sequence[Any], out_to_loss: Sequence[Any], *, xp: Any,
             weighting: str = "uniform") -> Any:
    """Average per-checkpoint scores and multiply each row by the mean out-to-loss weight.

    ``weighting="normalized"`` first scales each checkpoint's column (target) to unit norm, so
    that no checkpoint dominates a target's ensemble (an option, measured in ``docs/quality.md``).
    """
    count = len(per_checkpoint)
    total = None
    for scores in per_checkpoint:
        if weighting == "normalized":
            norms = xp.sqrt(xp.sum(scores * scores, axis=0, keepdims=True))
            scores = scores / xp.where(norms > 0, norms, xp.ones_like(norms))
        total = scores if total is None else total + scores
    weight = out_to_loss[0]
    for q in out_to_loss[1:]:
        weight = weight + q
    weight = xp.astype(weight, total.dtype) / count
    return (total / count) * weight[:, None]


def soft_threshold(scores: Any, quantile: float, *, xp: Any) -> Any:
    """Shrink each target's scores towards 0 by the ``quantile`` of their absolute values (TRAK paper, 3.4)."""
    magnitude = xp.abs(scores)
    n = scores.shape[0]
    ordered = xp.sort(magnitude, axis=0)
    position = min(n - 1, max(0, int(round(quantile * (n - 1)))))
    threshold = ordered[position:position + 1, :]
    return xp.sign(scores) * xp.maximum(magnitude - threshold, xp.zeros_like(magnitude))
