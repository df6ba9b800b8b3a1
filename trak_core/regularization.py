"""Choosing the ridge ``lambda`` of ``K = Phi^T Phi + lambda I`` from the training features alone.

One job: the ``lambda_reg="auto"`` rule. With ``k > n_train`` the kernel ``Phi^T Phi`` is
singular and ``lambda = 0`` gives noise; too large a ``lambda`` turns TRAK into a (Q-weighted)
gradient dot product. The rule scales ``lambda`` with the spectrum of the kernel, so it does not
depend on the scale of the model's outputs:

    lambda = AUTO_ALPHA * trace(Phi^T Phi) / min(n_train, n_params, k)

that is, ``AUTO_ALPHA`` times the mean of the eigenvalues that can be non-zero (the rank of
``Phi^T Phi`` is at most ``min(n_train, n_params, k)``). ``AUTO_RULE`` and ``AUTO_ALPHA`` were chosen
by measurement on the LDS task suite (``bench/quality/select_lambda.py``; the candidate rules and the
table are in ``docs/quality.md``). The cost is one trace of a k x k matrix.
"""
from __future__ import annotations

import math
from typing import Any

from .errors import TrakValueError

__all__ = ["AUTO_ALPHA", "AUTO_RULE", "RULES", "choose_lambda"]

AUTO_RULE = "mean_rank"
AUTO_ALPHA = 1.0


def _trace(kernel: Any, *, xp: Any) -> float:
    """``trace(kernel)`` as a Python float. A float32 kernel whose diagonal fits float32 can still have a trace that
    does not (k entries of 1e37): the sum then overflowed to inf, and ``lambda_reg="auto"`` became inf. It is then
    summed again scaled by its largest entry, so the float is finite wherever the entries are."""
    import numpy as np

    diagonal = xp.linalg.diagonal(kernel)
    with np.errstate(over="ignore"):  # NumPy would warn of the overflow this handles
        trace = float(xp.sum(diagonal))
    if math.isinf(trace):  # the sum overflowed the kernel's dtype (an inf entry stays inf: largest is inf then)
        largest = float(xp.max(diagonal))
        if math.isfinite(largest) and largest > 0:
            trace = largest * float(xp.sum(diagonal / largest))
    return trace


def _mean(kernel: Any, n_train: int, n_params: int, *, xp: Any, dim: int | None = None) -> float:
    """Mean eigenvalue ``trace / k``."""
    return _trace(kernel, xp=xp) / (kernel.shape[0] if dim is None else dim)


def _mean_rank(kernel: Any, n_train: int, n_params: int, *, xp: Any, dim: int | None = None) -> float:
    """Mean of the eigenvalues that can be non-zero: ``trace / min(n, p, k)``."""
    return _trace(kernel, xp=xp) / max(1, min(n_train, n_params, kernel.shape[0] if dim is None else dim))


def _top_weighted(kernel: Any, n_train: int, n_params: int, *, xp: Any, dim: int | None = None) -> float:
    """``sum s_i^2 / sum s_i = ||K||_F^2 / trace(K)``: a mean weighted towards the top of the spectrum."""
    trace = _trace(kernel, xp=xp)
    return float(xp.sum(kernel * kernel)) / trace if trace > 0 else 0.0


RULES = {"mean": _mean, "mean_rank": _mean_rank, "top_weighted": _top_weighted}


def choose_lambda(kernel: Any, n_train: int, *, n_params: int, xp: Any, alpha: float = AUTO_ALPHA,
                  rule: str = AUTO_RULE, dim: int | None = None) -> float:
    """``alpha`` times the spectral scale ``rule`` of ``kernel = Phi^T Phi`` (0 for an all-zero kernel).

    ``kernel`` may also be the Gram matrix ``Phi Phi^T`` (same non-zero eigenvalues): pass the feature
    dimension ``k`` as ``dim`` then (default: ``kernel.shape[0]``).
    """
    if rule not in RULES:
        raise TrakValueError(f"unknown lambda rule {rule!r}; choose one of {sorted(RULES)}")
    return alpha * RULES[rule](kernel, n_train, n_params, xp=xp, dim=dim)
