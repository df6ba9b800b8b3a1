"""Scores from features: ``tau = (1/C sum_c Phi_c K_c^{-1} phi_c(z')^T) * (1/C sum_c Q_c)``.

One job: the scoring formula of DESIGN.md, per checkpoint and ensembled. Train features are
multiplied in row chunks in the accumulation dtype, so memory stays bounded by the chunk.
"""
from __future__ import annotations

from typing import Any, Sequence

from ._namespace import accumulation_dtype, device_of
from .kernel import KernelFactor, solve

__all__ = ["checkpoint_scores", "ensemble"]


def checkpoint_scores(train_features: Any, factor: KernelFactor, target_features: Any, *, xp: Any,
                      chunk_rows: int = 65536) -> Any:
    """``Phi_c K_c^{-1} phi_c(z')^T``, shape (n_train, n_targets), in the accumulation dtype."""
    work = accumulation_dtype(xp, device_of(train_features))
    weights = solve(factor, xp.matrix_transpose(xp.astype(target_features, work)), xp=xp)  # (k, m)
    n = train_features.shape[0]
    parts = [xp.astype(train_features[start:min(n, start + chunk_rows), :], work) @ weights
             for start in range(0, n, chunk_rows)]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def ensemble(per_checkpoint: Sequence[Any], out_to_loss: Sequence[Any], *, xp: Any) -> Any:
    """Average per-checkpoint scores and multiply each row by the mean out-to-loss weight."""
    count = len(per_checkpoint)
    total = per_checkpoint[0]
    for scores in per_checkpoint[1:]:
        total = total + scores
    weight = out_to_loss[0]
    for q in out_to_loss[1:]:
        weight = weight + q
    weight = xp.astype(weight, total.dtype) / count
    return (total / count) * weight[:, None]
