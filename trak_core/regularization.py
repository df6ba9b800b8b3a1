"""Choosing the ridge ``lambda`` of ``K = Phi^T Phi + lambda I`` from the training features alone.

One job: the ``lambda_reg="auto"`` rule. With ``k > n_train`` the kernel ``Phi^T Phi`` is
singular and ``lambda = 0`` gives noise; too large a ``lambda`` turns TRAK into a gradient dot
product. The rule scales with the spectrum of the kernel, so it is invariant to the scale of the
model's outputs and to ``k``:

    lambda = AUTO_ALPHA * trace(Phi^T Phi) / k          (AUTO_ALPHA times the mean eigenvalue)

``AUTO_ALPHA`` was chosen by measurement on the LDS task suite (``bench/quality``; the table and
the other rules tried are in ``docs/quality.md``). It costs one trace: nothing next to featurizing.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AUTO_ALPHA", "RULES", "choose_lambda"]

AUTO_ALPHA = 0.1


def _mean_eigenvalue(kernel: Any, n_train: int, *, xp: Any) -> float:
    return float(xp.sum(xp.linalg.diagonal(kernel))) / kernel.shape[0]


def _mean_nonzero_eigenvalue(kernel: Any, n_train: int, *, xp: Any) -> float:
    return float(xp.sum(xp.linalg.diagonal(kernel))) / min(n_train, kernel.shape[0])


def _top_weighted_eigenvalue(kernel: Any, n_train: int, *, xp: Any) -> float:
    """``sum s_i^2 / sum s_i = ||K||_F^2 / trace(K)``: an average weighted towards the top of the spectrum."""
    trace = float(xp.sum(xp.linalg.diagonal(kernel)))
    return float(xp.sum(kernel * kernel)) / trace if trace > 0 else 0.0


RULES = {"mean": _mean_eigenvalue, "mean_nonzero": _mean_nonzero_eigenvalue, "top_weighted": _top_weighted_eigenvalue}


def choose_lambda(kernel: Any, n_train: int, *, xp: Any, alpha: float = AUTO_ALPHA, rule: str = "mean") -> float:
    """``alpha`` times the spectral scale ``rule`` of ``kernel = Phi^T Phi`` (0 for an all-zero kernel)."""
    if rule not in RULES:
        raise ValueError(f"unknown lambda rule {rule!r}; choose one of {sorted(RULES)}")
    return alpha * RULES[rule](kernel, n_train, xp=xp)
