"""The Rademacher projection on half-precision matrix units, at float32 or float16 grade.

One job: ``grads @ P`` with ``P``'s signs as exact float16 ``+-1`` and the input split into
float16 parts, each multiplied with float32 accumulation (``trak_core._delegation.half_matmul``:
tensor cores on GPUs).

The signs ``+-1`` are exact in float16, so only the input loses bits. Each row ``x`` (already
flipped by the checkpoint's row signs) is scaled by a power of two ``s`` that brings its largest
magnitude into ``[2**12, 2**15)`` (exact, and far from float16's overflow), then split:

    hi = float16(s x),   lo = float16(s x - hi)          (s x - hi is exact in float32)

``hi`` carries 11 significant bits and ``lo`` the next 11, so ``hi + lo`` keeps about 22 of
float32's 24 (``precision="float32"``, two passes stacked as one ``(2n, p)`` product, so ``P``
is read once); ``hi`` alone is fast_jl's grade (``precision="fast"``, one pass). Then
``out = (hi @ S + lo @ S) / (s sqrt(k))`` with ``S`` the ``+-1`` signs. Elements far below their row's
largest (under ``2**-26`` of it) become float16 subnormals or zero; their share of the row's norm is
below float32's rounding anyway.

torch tensors on CUDA, CuPy arrays and JAX GPU arrays (with CuPy installed) take one Triton kernel for
the whole product when Triton is installed (``trak_core._triton``: the packed bits are unpacked in
registers, never into memory). Other JAX arrays whose dense signs do not fit the cache take one jitted
step per block of rows (unpacking, split and product in one XLA computation:
``trak_core._jax_blocks.split_product``). Elsewhere,
where the signs come from, per block of rows of ``P``: the dense ``+-1`` float16 matrix when it fits
the cache given (on GPUs ``trak_core.projection.device_cache``, 4 GiB unless raised), else its
packed bits (``k / 8`` bytes a row) unpacked block by block, else hashed block by block. The bits
are the reference matrix's (``trak_core.projection.projection_matrix``) in every case.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import array_api_compat

from ._cache import ProjectionCache
from ._delegation import half_matmul, row_max_abs
from ._namespace import device_of, namespace
from .errors import TrakValueError

__all__ = ["PRECISIONS", "split_project", "passes"]

PRECISIONS = ("float32", "fast")
BLOCK_BYTES = 2**30  # float16 signs per block of P (k = 2,048: 262,144 rows)
_TOP_EXPONENT = 13  # rows are scaled so that their largest magnitude lies in [2**12, 2**15)


def passes(precision: str) -> int:
    """Half-precision products per row: 2 for ``"float32"`` (hi and lo), 1 for ``"fast"``."""
    if precision not in PRECISIONS:
        raise TrakValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}: 'float32' (default, "
                             "float32-grade: relative error <= 1e-5) or 'fast' (float16-grade, about 2e-4)")
    return 2 if precision == "float32" else 1


def row_scales(grads: Any, block: int, *, xp: Any) -> Any:
    """Powers of two ``s`` (float32, shape (n,)) with ``s * max|row|`` in ``[2**12, 2**15)`` (1 for zero rows)."""
    n, p = grads.shape
    peak = row_max_abs(grads, xp=xp)  # torch: one pass, no |x| copy
    if peak is None:
        peak = xp.zeros((n,), dtype=xp.float32, device=device_of(grads))
        for start in range(0, p, block):
            part = xp.astype(grads[:, start:min(p, start + block)], xp.float32)
            peak = xp.maximum(peak, xp.max(xp.abs(part), axis=1))
    safe = xp.where(peak > 0, peak, xp.ones_like(peak))
    exponent = xp.clip(_TOP_EXPONENT - xp.floor(xp.log2(safe)), -120.0, 120.0)
    two = xp.asarray(2.0, dtype=xp.float32, device=device_of(grads))
    return xp.pow(two, exponent)


def split_parts(x: Any, n_passes: int, *, xp: Any) -> Any:
    """``float16`` parts of float32 ``x`` (already scaled): ``hi`` or ``[hi; lo]`` stacked along rows."""
    hi = xp.astype(x, xp.float16)
    if n_passes == 1:
        return hi
    lo = xp.astype(x - xp.astype(hi, xp.float32), xp.float16)
    return xp.concat([hi, lo], axis=0)


def _packed_bits(p: int, k: int, *, seed: int, offset: int, xp: Any, device: Any,
                 cache: ProjectionCache) -> Any:
    """The packed sign bits of all ``p`` rows from the cache when they fit, else ``rows(start, stop)``, which
    hashes the bits of rows ``start .. stop-1`` on every call (the bits are the same either way)."""
    from .projection import _rademacher_words

    words_bytes = p * 4 * -(-k // 32)
    if cache.fits(words_bytes):
        return cache.get((xp.__name__, str(device), int(seed), k, offset, p, "words"), words_bytes,
                         lambda: _rademacher_words(offset, offset + p, k, seed, xp=xp, device=device))
    return lambda start, stop: _rademacher_words(offset + start, offset + stop, k, seed, xp=xp, device=device)


def _sign_source(p: int, k: int, *, seed: int, offset: int, xp: Any, device: Any,
                 cache: ProjectionCache) -> Callable[[int, int], Any]:
    """``rows(start, stop)``: rows ``start .. stop-1`` of the shared signs ``+-1`` as float16."""
    from .projection import _rademacher_words, _unpack

    dense_bytes = 2 * p * k
    if cache.fits(dense_bytes):
        dense = cache.get((xp.__name__, str(device), int(seed), k, offset, p, "half-signs"), dense_bytes,
                          lambda: _unpack(_rademacher_words(offset, offset + p, k, seed, xp=xp, device=device), k,
                                          xp=xp, dtype=xp.float16, scale=1.0))
        return lambda start, stop: dense[start:stop, :]
    words = _packed_bits(p, k, seed=seed, offset=offset, xp=xp, device=device, cache=cache)
    block = words if callable(words) else (lambda start, stop: words[start:stop, :])
    return lambda start, stop: _unpack(block(start, stop), k, xp=xp, dtype=xp.float16, scale=1.0)


def _fused(grads: Any, k: int, *, seed: int, offset: int, signs: Any, scales: Any, n_passes: int,
           cache: ProjectionCache, block: int) -> Any | None:
    """The products of all passes summed, (n, k) float32, straight from the packed bits; ``None`` where no such
    path runs (the caller's generic loop then unpacks blocks of ``P`` into memory).

    The Triton kernel (``trak_core._triton``) for torch on CUDA, CuPy, and JAX on GPUs with CuPy installed (not
    without Triton, when turned off, or after it failed). Else JAX, when the dense float16 signs do not fit the
    cache: one jitted step per block of ``block`` rows (``trak_core._jax_blocks.split_product``). The bits come
    from :func:`_packed_bits` (the cache when they fit; else hashed block by block).
    """
    p = grads.shape[1]
    xp, device = namespace(grads), device_of(grads)
    from . import _triton

    if _triton.available(grads):
        words = _packed_bits(p, k, seed=seed, offset=offset, xp=xp, device=device, cache=cache)
        out = _triton_product(grads, words, signs, scales, k, n_passes)
        if out is not None:
            return out
    if array_api_compat.is_jax_array(grads) and not cache.fits(2 * p * k):
        from ._jax_blocks import split_product as jax_split_product

        words = _packed_bits(p, k, seed=seed, offset=offset, xp=xp, device=device, cache=cache)
        return jax_split_product(grads, signs, scales, words, k, n_passes, block)
    return None


def _triton_product(grads: Any, words: Any, signs: Any, scales: Any, k: int, n_passes: int) -> Any | None:
    """The Triton kernel over all rows of ``P`` (``words``: all of them, or ``rows(start, stop)``, taken in blocks
    of ``BLOCK_BYTES / 16`` bytes of words); ``None`` if it failed."""
    from . import _triton

    if not callable(words):
        return _triton.split_product(grads, words, signs, scales, k, n_passes)
    out, p, block = None, grads.shape[1], max(1, BLOCK_BYTES // (2 * k))
    for start in range(0, p, block):
        stop = min(p, start + block)
        part = _triton.split_product(grads[:, start:stop], words(start, stop), signs[start:stop], scales, k, n_passes)
        if part is None:
            return None
        out = part if out is None else out + part
    return out


def split_project(grads: Any, k: int, *, seed: int, checkpoint: int, offset: int = 0, precision: str = "float32",
                  cache: ProjectionCache, block_size: int | None = None) -> Any:
    """``grads @ P_checkpoint`` (Rademacher) on half-precision products; see the module docstring.

    Parameters
    ----------
    grads : array, shape (n, p)
        Floating per-example gradients in any Array API namespace with float16.
    k, seed, checkpoint, offset
        As in ``trak_core.projection_matrix``.
    precision : {"float32", "fast"}
        Two passes (about 22 bits of the input) or one (11 bits).
    cache : ProjectionCache
        Where the row signs and the float16 signs (or their packed bits) are kept.
    block_size : int, optional
        Rows of ``P`` per product (default: 1 GiB of float16 signs).

    Returns
    -------
    array, shape (n, k)
        In the namespace and on the device of ``grads``; float32 for float16 or bfloat16 ``grads``,
        else their dtype.
    """
    from .projection import row_signs

    xp = namespace(grads)
    n_passes = passes(precision)
    if getattr(xp, "float16", None) is None:
        raise TrakValueError(f"the half-precision projection (precision={precision!r}) needs float16, which "
                             f"{xp.__name__} does not have; use precision='float32' or NumPy, torch, JAX or CuPy "
                             "arrays")
    n, p = grads.shape
    device, dtype = device_of(grads), grads.dtype
    block = block_size or max(1, BLOCK_BYTES // (2 * k))
    signs = cache.get((xp.__name__, str(device), "float32", int(seed), "rademacher", k, "signs", int(checkpoint),
                       offset, p), 4 * p, lambda: row_signs(offset, offset + p, seed=seed, checkpoint=checkpoint,
                                                            xp=xp, device=device, dtype=xp.float32))
    scales = row_scales(grads, block, xp=xp)
    out = _fused(grads, k, seed=seed, offset=offset, signs=signs, scales=scales, n_passes=n_passes, cache=cache,
                 block=block)
    if out is None:
        source = _sign_source(p, k, seed=seed, offset=offset, xp=xp, device=device, cache=cache)
        acc = xp.zeros((n_passes * n, k), dtype=xp.float32, device=device)
        for start in range(0, p, block):
            stop = min(p, start + block)
            x = xp.astype(grads[:, start:stop], xp.float32) * signs[None, start:stop] * scales[:, None]
            acc = acc + half_matmul(split_parts(x, n_passes, xp=xp), source(start, stop), xp=xp)
        out = acc if n_passes == 1 else acc[:n, :] + acc[n:, :]
    out = (out / scales[:, None]) * (1.0 / math.sqrt(k))
    return out if xp.finfo(dtype).bits < 32 else xp.astype(out, dtype)  # half inputs: float32 features
