"""Targets whose scores are subnormal in the features' dtype: a warning per ``score`` call.

One job: the check of ``TRAK.score``'s targets. A target's scores are proportional to its own features
(``Phi K^{-1} phi(z')``): a target whose features are tiny among the training features' (subnormal, below 1.2e-38 in
float32: a gradient of about 0) has a column of scores tinier still, of which the features' dtype (the scores' dtype,
and a float32 kernel's) keeps only the bits above the spacing of subnormals (1.4e-45): 7e-3 to 2e-2 relative at
features of 1e-40, and from about 1e-42 on nothing (the column is 0 or a few values), so the target ranks the
training examples at random. Training rows' own subnormal features cost nothing that matters
(``trak_core._subnormal_rows``: their scores are as tiny as they are); a target's are its whole column. Where every
feature is subnormal the scores are of the usual size (``featurize`` warns of the features' rounding), and where
``normalize_features`` scales the targets to unit norm ``trak_core._subnormal_rows`` warns of the rounding the rows
kept. A target whose features underflowed to 0 (JAX without x64 flushes subnormals on CPU) cannot be told from a
zero gradient, and is not counted.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from ._namespace import device_of
from .notices import warn

__all__ = ["SubnormalTargets"]


class SubnormalTargets:
    """Count, over one ``score`` call, the targets whose features (at any checkpoint) or scores are subnormal.

    Parameters
    ----------
    entries : sequence of CheckpointEntry
        The checkpoints scored: their features' dtype (the scores'), width, parameters and kernels' dtype.
    proj_dim : int or None
        The projection's dimension; ``None``: the features are the gradients.
    """

    def __init__(self, entries: Sequence[Any], proj_dim: int | None) -> None:
        self.dtype = entries[0].features.dtype
        n_params, width = entries[0].n_params, entries[0].features.shape[1]
        self.targets, self.subnormal, self.lost = 0, 0, False
        self.terms = n_params if proj_dim is not None and proj_dim < n_params else 1  # a projected feature's products
        self.smallest_rms = self.smallest_column = math.inf
        self.normal = self.spacing = 0.0
        # a kernel in the features' dtype: each score's k products, after a solve of k (or n < k), rounded there too
        in_dtype = any(entry.factor.arrays[0].dtype == self.dtype for entry in entries)
        self.products = 2 * width if in_dtype else 1

    def note(self, features: Any, block: Any, *, xp: Any) -> None:
        """Note a group of targets: ``features``, one ``(targets, k)`` array per checkpoint (as scored), and
        ``block``, their scores ``(n_train, targets)`` in the features' dtype (as returned). A target counts where
        its column is subnormal, or 0 from subnormal features (its products or the cast underflowed); subnormal
        features whose column is normal (every feature subnormal: ``featurize`` warned) do not."""
        info = xp.finfo(self.dtype)
        self.normal = float(info.smallest_normal)
        self.spacing = self.normal * float(info.eps)  # the spacing of subnormals
        largest = xp.max(block, axis=0)  # one pass, no block-sized temporary: the negative scores only where it is
        if bool(xp.any(largest < self.normal)):  # below normal (rare: a second pass)
            largest = xp.maximum(largest, -xp.min(block, axis=0))
        flagged = (largest > 0) & (largest < self.normal)  # a column of a few bits
        if bool(xp.any(flagged)):  # their RMS, from those columns only
            columns = xp.nonzero(flagged)[0]
            self.smallest_column = min(self.smallest_column, float(xp.min(_rms(xp.take(block, columns, axis=1),
                                                                               axis=0, xp=xp)[0])))
        zero = largest == 0
        for phi in features:
            phi_rms, phi_largest = _rms(phi, axis=1, xp=xp)
            tiny = xp.asarray((phi_largest > 0) & (phi_largest < self.normal), device=device_of(block))
            tiny = tiny & (flagged | zero)
            if bool(xp.any(tiny)):
                self.smallest_rms = min(self.smallest_rms, _smallest(xp.asarray(phi_rms, device=device_of(block)),
                                                                     tiny, xp=xp))
                self.lost = self.lost or bool(xp.any(tiny & zero))
                flagged = flagged | tiny
        self.targets += block.shape[1]
        self.subnormal += int(xp.sum(xp.astype(flagged, xp.int32)))

    def warn(self) -> None:
        """Warn once if any target noted was subnormal: how many, and the error of their scores: the features' (twice
        the spacing of subnormals over the smallest such target's RMS, times sqrt(n_params) when projected, as for
        normalized training rows) plus the scores' own (twice the spacing times sqrt(2 k: the products each score
        sums and the solve before them) over the smallest such column's RMS; the spacing alone where only the cast to
        the features' dtype rounds them); 1 where a target's scores are all 0. Measured: 1.4x to 13x the error of the
        targets' scores against float64 (``tests/test_subnormal_rows.py``)."""
        if not self.subnormal:
            return
        features = 2 * self.spacing * math.sqrt(self.terms) / self.smallest_rms
        scores = (2 * math.sqrt(self.products) if self.products > 1 else 1) * self.spacing / self.smallest_column
        error = 1.0 if self.lost else min(1.0, features + scores)
        warn(f"score: {self.subnormal} of {self.targets} targets have features or scores that are subnormal in "
             f"{self.dtype} (below {self.normal:.3g}: gradients of about 0 among the training examples'): they kept "
             f"only the bits above the spacing of subnormals, {self.spacing:.2g}, so their scores may be off by up to "
             f"about {error:.1e} relative and rank the training examples wrongly (ties, or all 0). Use "
             "normalize_features=True (every target's column then has the same scale) or a float64 model (scaling "
             "the model's output scales the training features too: the scores do not change)", RuntimeWarning)


def _rms(values: Any, *, axis: int, xp: Any) -> tuple[Any, Any]:
    """The RMS and the largest magnitude of ``values`` along ``axis``, the RMS from the values over the largest (as
    ``normalize_rows`` takes norms: float32 squares of subnormals are 0)."""
    largest = xp.max(xp.abs(values), axis=axis, keepdims=True)
    scaled = values / xp.where(largest > 0, largest, xp.ones_like(largest))
    rms = largest * xp.sqrt(xp.mean(scaled * scaled, axis=axis, keepdims=True))
    return xp.reshape(rms, (-1,)), xp.reshape(largest, (-1,))


def _smallest(values: Any, where: Any, *, xp: Any) -> float:
    """The smallest of ``values`` where ``where`` holds (at least one does)."""
    return float(xp.min(xp.where(where, values, xp.full_like(values, math.inf))))
