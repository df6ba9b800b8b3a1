"""The kernel ``K = Phi^T Phi + lambda I``: accumulation over row chunks, factorization, solves.

One job: everything about ``K``. Accumulation and solves run in float64 where the namespace has
it. Where it has not (JAX without x64, torch on MPS), they run in float32: the result is then
good to about ``1e-7 * cond(K)`` relative, and a larger ``lambda_reg`` is the remedy.

``lambda_reg > 0``: Cholesky factor of ``K`` (never an explicit inverse).
``lambda_reg == 0``: the kernel may be singular (it is whenever ``k > n_train``), so the
factor is an eigendecomposition and solves use the minimum-norm (pseudo-inverse) solution,
the limit of the ridge solution as ``lambda -> 0+``; a warning says when ``K`` is rank-deficient.
Triangular solves take the namespace's native routine (``trak_core._delegation.solve_triangular``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from ._delegation import solve_triangular
from ._namespace import accumulation_dtype, device_of
from .errors import TrakTypeError, TrakValueError

__all__ = ["KernelFactor", "accumulate", "factorize", "solve", "check_lambda"]


@dataclass
class KernelFactor:
    """A factorized kernel: ``kind`` is ``"cholesky"`` (lower factor) or ``"eigh"`` (vectors, values)."""

    kind: str
    arrays: tuple[Any, ...]
    lambda_reg: float
    rank: int


def check_lambda(lambda_reg: Any) -> float:
    """Validate an absolute ridge ``lambda_reg >= 0`` and return it as a float."""
    try:
        value = float(lambda_reg)
    except (TypeError, ValueError):
        raise TrakTypeError(f"lambda_reg must be a non-negative number, got {lambda_reg!r}") from None
    if not math.isfinite(value) or value < 0:
        raise TrakValueError(f"lambda_reg must be a finite number >= 0, got {lambda_reg!r}")
    return value


def accumulate(kernel: Any | None, features: Any, *, xp: Any) -> Any:
    """``kernel + features^T features`` in the accumulation dtype (float64 where available)."""
    work = accumulation_dtype(xp, device_of(features))
    chunk = xp.astype(features, work)
    update = xp.matrix_transpose(chunk) @ chunk
    return update if kernel is None else kernel + update


def factorize(kernel: Any, lambda_reg: float, *, xp: Any) -> KernelFactor:
    """Factorize ``kernel + lambda_reg * I`` (see the module notes for ``lambda_reg == 0``)."""
    k = kernel.shape[0]
    if lambda_reg > 0:
        eye = xp.eye(k, dtype=kernel.dtype, device=device_of(kernel))
        try:
            lower = xp.linalg.cholesky(kernel + lambda_reg * eye)
        except Exception:  # numpy/torch raise, others give NaN below
            lower = None
        if lower is not None and bool(xp.all(xp.isfinite(lower))):
            return KernelFactor("cholesky", (lower,), lambda_reg, k)
        warnings.warn(f"Cholesky factorization of the kernel failed with lambda_reg={lambda_reg}; "
                      "using an eigendecomposition instead", RuntimeWarning, stacklevel=3)
    values, vectors = xp.linalg.eigh(kernel)
    values = values + lambda_reg
    tol = float(xp.max(xp.abs(values))) * k * float(xp.finfo(kernel.dtype).eps)
    keep = values > tol
    rank = int(xp.sum(xp.astype(keep, xp.int64)))
    if rank == 0:
        raise TrakValueError("the kernel Phi^T Phi is zero: every training feature is zero (all-zero "
                             "gradients?), so no example can be scored; check the model and the data")
    if rank < k and lambda_reg == 0:
        warnings.warn(f"the kernel Phi^T Phi is rank-deficient (rank {rank} < k = {k}, as when k > "
                      "n_train); with lambda_reg=0 the minimum-norm solution is used. A positive "
                      "lambda_reg usually gives better scores", RuntimeWarning, stacklevel=3)
    inverse_values = xp.where(keep, 1.0 / xp.where(keep, values, xp.ones_like(values)), xp.zeros_like(values))
    return KernelFactor("eigh", (vectors, inverse_values), lambda_reg, rank)


def solve(factor: KernelFactor, rhs: Any, *, xp: Any) -> Any:
    """``(Phi^T Phi + lambda I)^{-1} rhs`` (minimum-norm when singular), rhs of shape (k, m)."""
    rhs = xp.astype(rhs, factor.arrays[0].dtype)
    if factor.kind == "cholesky":
        lower = factor.arrays[0]
        half = solve_triangular(lower, rhs, transpose=False, xp=xp)
        return solve_triangular(lower, half, transpose=True, xp=xp)
    vectors, inverse_values = factor.arrays
    return vectors @ (inverse_values[:, None] * (xp.matrix_transpose(vectors) @ rhs))
