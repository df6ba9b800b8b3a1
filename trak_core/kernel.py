"""The kernel ``K = Phi^T Phi + lambda I``: accumulation over row chunks, factorization, solves.

One job: everything about ``K``. Accumulation and solves run in float64 where the namespace has
it. Where it has not (JAX without x64, torch on MPS), they run in float32: the result is then
good to about ``1e-7 * lambda_max / lambda`` relative or better, and a larger ``lambda_reg`` is the remedy.

**Two spaces.** With ``n_train >= k`` the factorized matrix is ``K`` (k x k, "k-space"). With
``n_train < k`` it is the Gram matrix ``G = Phi Phi^T`` (n x n, "n-space"): since
``Phi (Phi^T Phi + lambda I)^{-1} = (Phi Phi^T + lambda I)^{-1} Phi``, scores are
``(G + lambda I)^{-1} (Phi phi(z')^T)``, an ``n x n`` system instead of ``k x k`` (less memory,
``n^2 k`` instead of ``n k^2`` work, and no cancellation). :func:`space_for` is the rule; both
matrices have the same non-zero eigenvalues, so the ``lambda`` rule is unchanged.

``lambda_reg > 0``: Cholesky factor of ``K`` (never an explicit inverse).
``lambda_reg == 0``: the kernel may be singular (it is whenever ``k > n_train``), so the
factor is an eigendecomposition and solves use the minimum-norm (pseudo-inverse) solution,
the limit of the ridge solution as ``lambda -> 0+``; a warning says when ``K`` is rank-deficient.
Triangular solves take the namespace's native routine (``trak_core._delegation.solve_triangular``).
Products and factorizations run at the full precision of their dtype (``_delegation.full_precision``:
JAX on GPUs would multiply float32 in TF32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._delegation import full_precision_products, solve_triangular
from ._namespace import accumulation_dtype, device_of, has_float64
from .errors import TrakTypeError, TrakValueError
from .notices import warn

__all__ = ["KernelFactor", "KERNEL_DTYPES", "AUTO_FLOAT32_MAX_RATIO", "accumulate", "factorize", "solve",
           "check_lambda", "space_for", "gram", "work_dtype", "check_kernel_dtype", "top_eigenvalue"]

KERNEL_DTYPES = ("auto", "float64", "float32")
# kernel_dtype="auto" keeps a float32 kernel only while lambda_max(K) / lambda <= this (the condition number of
# K + lambda I, about): measured on the digits MLP (3 checkpoints, k = 2,048), the float32 kernel's relative score
# error was 6.8e-6 at a ratio of 135 (lambda "auto"), 3.2e-5 at 1,350 and 1.6e-4 at 13,500 (float64 kernel: 3e-7
# to 9e-7)
AUTO_FLOAT32_MAX_RATIO = 1000.0


def check_kernel_dtype(kernel_dtype: Any) -> str:
    """Validate ``TRAK(kernel_dtype=...)`` and return it."""
    if kernel_dtype not in KERNEL_DTYPES:
        raise TrakValueError(f"unknown kernel_dtype {kernel_dtype!r}; choose one of {KERNEL_DTYPES}")
    return kernel_dtype


def work_dtype(xp: Any, device: Any = None, kernel_dtype: str = "float64", features_dtype: Any = None) -> Any:
    """The dtype the kernel is made, factorized and solved in: ``TRAK(kernel_dtype=...)``.

    ``"float64"`` (the reference): float64 where the namespace has it, else float32.
    ``"float32"``: float32, about twice as fast on CPUs (the Gram or ``Phi^T Phi`` product is
    the costly part); scores then agree with float64 ones to about ``1e-7 * lambda_max / lambda`` relative or better.
    ``"auto"``: float32 for features of 32 bits or fewer, else as ``"float64"`` (the estimator then
    remakes a float32 kernel in float64 when ``lambda_max / lambda > AUTO_FLOAT32_MAX_RATIO``, see
    :func:`top_eigenvalue`, and whenever ``lambda_reg == 0``).
    """
    if check_kernel_dtype(kernel_dtype) == "auto":
        kernel_dtype = "float32" if features_dtype is not None and xp.finfo(features_dtype).bits <= 32 else "float64"
    return xp.float32 if kernel_dtype == "float32" else accumulation_dtype(xp, device)


class ZeroKernelError(TrakValueError):
    """The kernel is zero and ``lambda_reg`` is 0: no example can be scored (``factorize``)."""


@dataclass
class KernelFactor:
    """A factorized kernel: ``kind`` is ``"cholesky"`` (lower factor) or ``"eigh"`` (vectors, values).

    Parameters
    ----------
    kind : {"cholesky", "eigh"}
        ``"cholesky"`` for ``lambda_reg > 0``; ``"eigh"`` for ``lambda_reg == 0``, or where Cholesky failed.
    arrays : tuple of array
        ``(lower,)``: the lower Cholesky factor of ``M + lambda I``; or ``(vectors, inverse_values)``: the
        eigenvectors of ``M`` and ``1 / (eigenvalue + lambda)``, 0 for the eigenvalues dropped as below the
        tolerance. ``M`` is the kernel of ``space``.
    lambda_reg : float
        The ridge ``lambda``.
    rank : int
        The size of ``M`` for ``"cholesky"``; for ``"eigh"``, the number of eigenvalues kept.
    space : {"k", "n"}
        ``"k"``: ``M = Phi^T Phi`` (k x k); ``"n"``: ``M = Phi Phi^T`` (n x n); see ``trak_core.kernel``.
    """

    kind: str
    arrays: tuple[Any, ...]
    lambda_reg: float
    rank: int
    space: str = "k"  # "k": of Phi^T Phi (k x k); "n": of Phi Phi^T (n x n), see the module notes


@full_precision_products
def top_eigenvalue(kernel: Any, *, xp: Any, iterations: int = 30) -> float:
    """The largest eigenvalue of the symmetric positive semi-definite ``kernel``, estimated from below by
    power iteration from a fixed start (``iterations`` products with a vector: cheap next to making ``kernel``; on
    the kernel's device, with three reads to the host in all).
    The iteration runs on ``kernel`` divided by its largest entry, so squares of its entries neither overflow nor
    underflow; ``inf`` for a kernel that holds inf or NaN, 0 for a zero kernel."""
    import numpy as np

    scale = float(xp.max(xp.abs(kernel)))
    if not math.isfinite(scale):
        return math.inf
    if scale == 0.0:
        return 0.0
    unit = kernel / scale
    start = np.random.default_rng(0).standard_normal(kernel.shape[0])
    vector = xp.asarray(start / np.linalg.norm(start), dtype=kernel.dtype, device=device_of(kernel))
    value = xp.zeros((), dtype=kernel.dtype, device=device_of(kernel))
    for _ in range(iterations):  # on the device: read once at the end (two reads a step were 60 host syncs)
        image = unit @ vector
        value = xp.sum(vector * image)  # Rayleigh quotient of the current vector
        norm = xp.sqrt(xp.sum(image * image))
        vector = image / xp.where(norm > 0, norm, xp.ones_like(norm))  # a zero image stays zero: the estimate 0
    return scale * max(float(value), float(xp.sum(vector * (unit @ vector))))


def space_for(n_train: int, k: int) -> str:
    """``"n"`` (the Gram matrix ``Phi Phi^T``) when ``n_train < k``, else ``"k"`` (``Phi^T Phi``)."""
    return "n" if n_train < k else "k"


@full_precision_products
def gram(features: Any, *, xp: Any, chunk_rows: int = 4096, dtype: Any = None) -> Any:
    """``Phi Phi^T`` (n x n) in ``dtype`` (default: the accumulation dtype), by blocks of rows."""
    n = features.shape[0]
    blocks = [features[start:min(n, start + chunk_rows), :] for start in range(0, n, chunk_rows)]  # arrays (a store's
    work = accumulation_dtype(xp, device_of(blocks[0])) if dtype is None else dtype                # lazy rows too)
    blocks = [xp.astype(block, work) for block in blocks]
    rows = [xp.concat([a @ xp.matrix_transpose(b) for b in blocks], axis=1) for a in blocks]
    return rows[0] if len(rows) == 1 else xp.concat(rows, axis=0)


def check_lambda(lambda_reg: Any) -> float:
    """Validate an absolute ridge ``lambda_reg >= 0`` and return it as a float."""
    try:
        if isinstance(lambda_reg, bool):  # True is not a ridge
            raise TypeError
        value = float(lambda_reg)
    except (TypeError, ValueError):
        raise TrakTypeError(f"lambda_reg must be a non-negative number, got {lambda_reg!r}") from None
    if not math.isfinite(value) or value < 0:
        raise TrakValueError(f"lambda_reg must be a finite number >= 0, got {lambda_reg!r}")
    return value


@full_precision_products
def accumulate(kernel: Any | None, features: Any, *, xp: Any, dtype: Any = None) -> Any:
    """``kernel + features^T features`` in ``dtype`` (default: the accumulation dtype, float64 where available)."""
    work = accumulation_dtype(xp, device_of(features)) if dtype is None else dtype
    chunk = xp.astype(features, work)
    update = xp.matrix_transpose(chunk) @ chunk
    return update if kernel is None else kernel + update


@full_precision_products
def factorize(kernel: Any, lambda_reg: float, *, xp: Any, space: str = "k", label: str = "") -> KernelFactor:
    """Factorize ``kernel + lambda_reg * I`` (see the module notes for ``lambda_reg == 0``); ``space`` says
    whether ``kernel`` is ``Phi^T Phi`` (``"k"``) or ``Phi Phi^T`` (``"n"``); ``label`` (e.g. ``"checkpoint 2"``)
    begins its warnings and errors, so that they say which of several kernels they are about."""
    k = kernel.shape[0]
    label = f"{label}: " if label else ""
    if lambda_reg > 0:
        eye = xp.eye(k, dtype=kernel.dtype, device=device_of(kernel))
        try:
            lower = xp.linalg.cholesky(kernel + lambda_reg * eye)
        except Exception:  # numpy/torch raise, others give NaN below
            lower = None
        if lower is not None and bool(xp.all(xp.isfinite(lower))):
            return KernelFactor("cholesky", (lower,), lambda_reg, k, space)
    if not bool(xp.all(xp.isfinite(kernel))):  # checked only here: a Cholesky factor that came out finite had none
        raise TrakValueError(f"{label}the kernel holds inf or NaN: the training features' squares overflow "
                             f"{kernel.dtype}, so it cannot be factorized; rescale the model's output (the scores do "
                             "not depend on its scale at lambda_reg='auto')")
    if lambda_reg > 0:
        warn(f"{label}Cholesky factorization of the kernel failed with lambda_reg={lambda_reg}; "
             "using an eigendecomposition instead", RuntimeWarning)
    values, vectors = xp.linalg.eigh(kernel)
    values = values + lambda_reg
    tol = float(xp.max(xp.abs(values))) * k * float(xp.finfo(kernel.dtype).eps)
    keep = values > tol
    rank = int(xp.sum(xp.astype(keep, xp.int32)))  # int32: JAX without x64 has no int64 (and warns)
    if rank == 0:
        small = ""  # a float64 kernel: float32 features' squares cannot underflow it (zero features, then)
        if xp.finfo(kernel.dtype).bits <= 32:  # the remedy for underflow: a float64 kernel, where there is one
            remedy = ("kernel_dtype='float64' keeps them" if has_float64(xp, device_of(kernel)) else
                      "set jax_enable_x64 to keep them" if "jax" in xp.__name__ else
                      "this namespace has no float64: rescale the model's output, the scores do not depend on it")
            small = f", or so small that their squares underflow float32 ({remedy})"
        raise ZeroKernelError(f"{label}the kernel Phi^T Phi is zero: every training feature is zero (all-zero "
                              f"gradients?){small}, so no example can be scored; check the model and the data")
    if rank < k and lambda_reg == 0:
        what = ("Phi^T Phi is rank-deficient (rank {rank} < k = {k}: k exceeds the number of parameters, or the "
                "training features span fewer than k directions)") if space == "k" else \
            "Phi Phi^T is rank-deficient (rank {rank} < n_train = {k}: some training features are linearly dependent)"
        warn(f"{label}the kernel {what.format(rank=rank, k=k)}; with lambda_reg=0 the minimum-norm solution is "
             "used. A positive lambda_reg usually gives better scores", RuntimeWarning)
    inverse_values = xp.where(keep, 1.0 / xp.where(keep, values, xp.ones_like(values)), xp.zeros_like(values))
    return KernelFactor("eigh", (vectors, inverse_values), lambda_reg, rank, space)


@full_precision_products
def quadratic_forms(factor: KernelFactor, rhs: Any, *, xp: Any) -> Any:
    """``x^T (M + lambda I)^{-1} x`` for each column ``x`` of ``rhs`` (shape (m,)): ``|L^{-1} x|^2``, one
    triangular solve where :func:`solve` takes two (minimum-norm when singular, as it is)."""
    rhs = xp.astype(rhs, factor.arrays[0].dtype)
    if factor.kind == "cholesky":
        half = solve_triangular(factor.arrays[0], rhs, transpose=False, xp=xp)
        return xp.sum(half * half, axis=0)
    vectors, inverse_values = factor.arrays
    projected = xp.matrix_transpose(vectors) @ rhs
    return xp.sum(inverse_values[:, None] * projected * projected, axis=0)


@full_precision_products
def solve(factor: KernelFactor, rhs: Any, *, xp: Any) -> Any:
    """``(M + lambda I)^{-1} rhs`` (minimum-norm when singular) for the factorized ``M``: ``Phi^T Phi`` with rhs
    of shape (k, m), or ``Phi Phi^T`` (n-space) with rhs of shape (n, m)."""
    rhs = xp.astype(rhs, factor.arrays[0].dtype)
    if factor.kind == "cholesky":
        lower = factor.arrays[0]
        half = solve_triangular(lower, rhs, transpose=False, xp=xp)
        return solve_triangular(lower, half, transpose=True, xp=xp)
    vectors, inverse_values = factor.arrays
    return vectors @ (inverse_values[:, None] * (xp.matrix_transpose(vectors) @ rhs))
