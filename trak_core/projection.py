"""The reproducible random projection of TRAK: a pure function of (seed, checkpoint, row, column).

One job: make (blocks of) the p x k projection matrix and apply it, in any Array API namespace.

The matrix of checkpoint ``c`` is ``P_c[a, j] = s(seed, c, a) * R(seed, a, j)`` where

- ``R`` is shared by all checkpoints. Rademacher (default): the 32 bits of the word
  ``w(a, b) = mix(rowkey(a) ^ colkey(b))`` are the signs of columns ``32 b .. 32 b + 31``,
  least significant bit first, bit 0 -> ``+1/sqrt(k)``, bit 1 -> ``-1/sqrt(k)``.
  Gaussian: Box-Muller on two words per column pair ``(2 m, 2 m + 1)``, times ``1/sqrt(k)``.
- ``s(seed, c, a)`` is a row sign (the top bit of another hash stream), so every ``P_c`` is
  itself i.i.d. Rademacher (or Gaussian), checkpoints' projection errors are uncorrelated, and
  only ``R`` is worth caching: the flip is applied to the gradients, O(n p).

Row keys and column keys come from ``trak_core.hashing`` (the hash spec). Because every entry
depends only on its indices, any split of the parameter axis into blocks (``offset``) gives the same
matrix, every namespace and device gives the same Rademacher bits, and nothing needs to be stored.

The code here is Array API only. Where a framework has a faster (or, for torch's hash words, a
necessary) native path, it is one call into ``trak_core._delegation``, which gives the same numbers.
"""
from __future__ import annotations

import math
from typing import Any

import array_api_compat

from . import hashing
from ._cache import ProjectionCache, default_cache, device_cache
from ._delegation import (dense_product, full_precision, in_float64, is_accelerator, make_array, packed_product,
                          packed_words, unpack_signs)
from ._split import PRECISIONS, passes, split_project
from ._namespace import device_of, namespace
from .errors import TrakTypeError, TrakValueError

__all__ = ["KINDS", "PRECISIONS", "projection_matrix", "project", "cached_factors", "ProjectionCache", "default_cache",
           "device_cache", "row_signs", "uses_split"]

KINDS = ("rademacher", "gaussian")
_BLOCK_BYTES = 64 * 2**20  # memory for one generated block when the matrix is not cached


def _check(p: int, k: int, kind: str, offset: int) -> tuple[int, int, int]:
    """``(p, k, offset)`` as Python ints (NumPy integers taken too, bools not), checked."""
    from ._checks import _integer

    if kind not in KINDS:
        raise TrakValueError(f"unknown projection kind {kind!r}; choose one of {KINDS}")
    k_, p_, offset_ = _integer(k), _integer(p), _integer(offset)
    if k_ is None or k_ <= 0:
        raise TrakValueError(f"projection dimension k must be a positive integer, got {k!r}")
    if p_ is None or p_ < 0:
        raise TrakValueError(f"number of rows p must be a non-negative integer, got {p!r}")
    if offset_ is None or offset_ < 0:
        raise TrakValueError(f"offset must be a non-negative integer, got {offset!r}")
    return p_, k_, offset_


def _positive(value: Any) -> bool:
    """Whether ``value`` is an integer above 0 (NumPy's too, not a bool)."""
    from ._checks import _integer

    number = _integer(value)
    return number is not None and number > 0


def _seed_words(seed: int) -> tuple[int, int]:
    return hashing.split64(seed, "seed")


def _words(stream: int, start: int, stop: int, n_cols: int, *, xp: Any, device: Any) -> Any:
    """The (stop - start, n_cols) block of words ``mix(rowkey(a) ^ colkey(b))``."""
    rows = hashing.row_keys(stream, start, stop, xp=xp, device=device)
    col_base = hashing.key(stream, hashing.DOMAIN_COLUMNS)
    cols = xp.arange(n_cols, dtype=hashing.word_dtype(xp), device=device)
    cols = cols ^ hashing.word(col_base, cols, xp=xp)
    cols = hashing.mix(cols, xp=xp)
    return hashing.mix(rows[:, None] ^ cols[None, :], xp=xp)


def _rademacher_words(start: int, stop: int, k: int, seed: int, *, xp: Any, device: Any) -> Any:
    """Packed signs of rows ``start .. stop-1``: shape (rows, ceil(k / 32)), 32 columns a word (32-bit words)."""
    stream = hashing.key(*_seed_words(seed), hashing.DOMAIN_RADEMACHER)
    n_words = -(-k // 32)
    return packed_words(lambda xp_, device_: _words(stream, start, stop, n_words, xp=xp_, device=device_),
                        xp=xp, device=device)


def _unpack(words: Any, k: int, *, xp: Any, dtype: Any, scale: float | None = None) -> Any:
    """Signs ``+-scale`` (default ``1/sqrt(k)``) from packed words: bit ``t`` of word ``b`` is column ``32 b + t``."""
    scale = 1.0 / math.sqrt(k) if scale is None else scale
    signs = unpack_signs(words, k, scale, xp=xp, dtype=dtype)  # native byte-wise paths: the same bits
    return _unpack_bits(words, k, scale, xp=xp, dtype=dtype) if signs is None else signs


def _unpack_bits(words: Any, k: int, scale: float, *, xp: Any, dtype: Any) -> Any:
    """The generic ``_unpack``: shift and mask each of a word's 32 bits."""
    shifts = xp.arange(32, dtype=words.dtype, device=device_of(words))
    bits = (words[:, :, None] >> shifts) & 1
    bits = xp.reshape(bits, (words.shape[0], words.shape[1] * 32))[:, :k]
    positive = xp.asarray(scale, dtype=dtype, device=device_of(words))
    return xp.where(bits == 0, positive, -positive)


def _rademacher(start: int, stop: int, k: int, seed: int, *, xp: Any, device: Any, dtype: Any) -> Any:
    return _unpack(_rademacher_words(start, stop, k, seed, xp=xp, device=device), k, xp=xp, dtype=dtype)


def _gaussian(start: int, stop: int, k: int, seed: int, *, xp: Any, device: Any, dtype: Any) -> Any:
    return in_float64(lambda xp_, device_: _box_muller(start, stop, k, seed, xp=xp_, device=device_),
                      xp=xp, device=device, dtype=dtype)


def _box_muller(start: int, stop: int, k: int, seed: int, *, xp: Any, device: Any) -> Any:
    """Gaussian rows ``start .. stop-1`` of ``R`` in float64 (``xp`` must have float64)."""
    stream = hashing.key(*_seed_words(seed), hashing.DOMAIN_GAUSSIAN)
    n_pairs = -(-k // 2)
    words = _words(stream, start, stop, 2 * n_pairs, xp=xp, device=device)
    work = xp.float64
    u1 = (xp.astype(words[:, 0::2], work) + 0.5) * (2.0**-32)  # in (0, 1): log is finite
    u2 = xp.astype(words[:, 1::2], work) * (2.0**-32)
    radius = xp.sqrt(-2.0 * xp.log(u1))
    angle = (2.0 * math.pi) * u2
    z = xp.stack([radius * xp.cos(angle), radius * xp.sin(angle)], axis=-1)
    return xp.reshape(z, (stop - start, 2 * n_pairs))[:, :k] * (1.0 / math.sqrt(k))


def _shared(start: int, stop: int, k: int, seed: int, kind: str, *, xp: Any, device: Any, dtype: Any) -> Any:
    """Rows ``start .. stop-1`` of the checkpoint-independent matrix ``R``."""
    make = _rademacher if kind == "rademacher" else _gaussian
    return make_array(lambda xp_, device_, dtype_: make(start, stop, k, seed, xp=xp_, device=device_, dtype=dtype_),
                      xp=xp, device=device, dtype=dtype, transcendental=kind == "gaussian")


def row_signs(start: int, stop: int, *, seed: int, checkpoint: int, xp: Any, device: Any = None,
              dtype: Any = None) -> Any:
    """The per-row signs ``s(seed, checkpoint, a)`` for rows ``start .. stop-1`` (+1 or -1)."""
    dtype = xp.float32 if dtype is None else dtype
    stream = hashing.key(*_seed_words(seed), hashing.DOMAIN_SIGN, *hashing.split64(checkpoint, "checkpoint"))

    def make(xp: Any, device: Any, dtype: Any) -> Any:
        top = hashing.row_keys(stream, start, stop, xp=xp, device=device) >> 31
        one = xp.asarray(1.0, dtype=dtype, device=device)
        return xp.where(top == 0, one, -one)

    return make_array(make, xp=xp, device=device, dtype=dtype)


def projection_matrix(p: int, k: int, *, seed: int = 0, checkpoint: int = 0, kind: str = "rademacher",
                      offset: int = 0, xp: Any = None, device: Any = None, dtype: Any = None) -> Any:
    """Rows ``offset .. offset + p`` of checkpoint ``checkpoint``'s p x k projection matrix.

    Parameters
    ----------
    p, k : int
        Number of rows (parameters) to return and the projection dimension.
    seed, checkpoint : int
        Non-negative integers below ``2**64``; the matrix is a pure function of them.
    kind : {"rademacher", "gaussian"}
        Entries ``+-1/sqrt(k)`` (bit-identical in every namespace) or ``N(0, 1/k)``.
    offset : int
        Index of the first row, so blocks of the parameter axis can be made separately.
    xp : namespace, optional
        Any Array API namespace; NumPy when omitted.
    device, dtype : optional
        Where and in which floating dtype to make the matrix (default float32).

    Returns
    -------
    array
        Shape ``(p, k)``.

    Notes
    -----
    Gaussian entries go through ``log``, ``sqrt``, ``cos`` and ``sin`` in float64 where the
    namespace has it, so they agree across namespaces to a few ulp, not bit for bit.
    """
    p, k, offset = _check(p, k, kind, offset)
    if xp is None:
        import array_api_compat.numpy as xp
    else:
        xp = array_api_compat.array_namespace(xp.empty(0))
    dtype = xp.float32 if dtype is None else dtype
    if not xp.isdtype(dtype, "real floating"):
        raise TrakTypeError(f"projection_matrix makes a floating matrix (entries +-1/sqrt(k)); got dtype {dtype}")
    signs = row_signs(offset, offset + p, seed=seed, checkpoint=checkpoint, xp=xp, device=device, dtype=dtype)
    return signs[:, None] * _shared(offset, offset + p, k, seed, kind, xp=xp, device=device, dtype=dtype)


def uses_split(grads: Any, kind: str, precision: str) -> bool:
    """Whether ``project`` takes the half-precision path (``trak_core._split``) for ``grads``.

    ``precision="fast"`` always does (Rademacher only); ``"float32"`` does on GPUs for float32,
    float16 and bfloat16 input, where half-precision matrix units are several times faster than
    float32 ones. Everywhere else the product is a plain float32 (or float64) one.
    """
    passes(precision)  # validates
    if precision == "fast":
        if kind != "rademacher":
            raise TrakValueError("precision='fast' needs proj_type='rademacher' (Gaussian entries are not exact in "
                                 "float16); use precision='float32' for Gaussian projections")
        return True
    return kind == "rademacher" and is_accelerator(grads) and str(grads.dtype).split(".")[-1] in (
        "float32", "float16", "bfloat16")


def project(grads: Any, k: int, *, seed: int = 0, checkpoint: int = 0, kind: str = "rademacher",
            offset: int = 0, block_size: int | None = None, cache: ProjectionCache | None = None,
            precision: str = "float32") -> Any:
    """Project per-example gradients: ``grads @ P`` for rows ``offset .. offset + p`` of ``P``.

    Parameters
    ----------
    grads : array, shape (n, p)
        Per-example gradients (rows) of a floating dtype, in any Array API namespace.
    k : int
        Projection dimension.
    seed, checkpoint, kind, offset
        As in ``projection_matrix``.
    block_size : int, optional
        Rows of ``P`` generated at a time when the matrix is not cached (default: about 64 MiB
        of matrix per block). Memory stays bounded for any p.
    cache : ProjectionCache, optional
        Defaults to ``trak_core.projection.default_cache`` (512 MiB). The whole shared matrix
        is kept when it fits; otherwise, for Rademacher, its packed bits (k/8 bytes a row) are
        kept and unpacked block by block; otherwise blocks are generated on every call.
        ``ProjectionCache(0)`` disables caching. On GPUs (the half-precision path) the default
        is ``device_cache`` instead (4 GiB).
    precision : {"float32", "fast"}
        ``"float32"`` (default): float32-grade results (relative error against a float64 product
        within twice that of a float32 matmul, and below 1e-5); on GPUs computed as two float16
        products on tensor cores (``trak_core._split``), elsewhere as a float32 product.
        ``"fast"``: one float16 product, relative error about 2e-4 (the grade of traker's fast_jl);
        Rademacher only. On a CPU it is not faster, only the same numbers as on a GPU.

    Returns
    -------
    array, shape (n, k)
        In the namespace and on the device of ``grads``; in its dtype, except that float16 and
        bfloat16 gradients (half-precision models) give float32 features: their products and sums
        are float32 (or better) either way.
    """
    xp = namespace(grads)
    if grads.ndim != 2:
        raise TrakValueError(f"grads must be 2-D (n_examples, n_params), got shape {tuple(grads.shape)}")
    n, p = grads.shape
    p, k, offset = _check(p, k, kind, offset)
    if block_size is not None and not _positive(block_size):  # a negative one made no block: zeros, unsaid
        raise TrakValueError(f"block_size must be a positive integer (rows of the projection matrix made at a time) "
                             f"or None for the default, got {block_size!r}")
    if not xp.isdtype(grads.dtype, "real floating"):
        raise TrakTypeError(f"grads must have a real floating dtype, got {grads.dtype}")
    if cache is not None and not isinstance(cache, ProjectionCache):  # was an AttributeError in cached_factors
        raise TrakTypeError(f"cache must be a ProjectionCache or None for the default, got {type(cache).__name__}: "
                            "pass e.g. trak_core.ProjectionCache(max_bytes), or ProjectionCache(0) for no caching")
    if xp.finfo(grads.dtype).bits < 32 and not uses_split(grads, kind, precision):
        grads = xp.astype(grads, xp.float32)  # half-precision gradients: float32 products, float32 features
    device, dtype = device_of(grads), grads.dtype
    if uses_split(grads, kind, precision):
        return split_project(grads, k, seed=seed, checkpoint=checkpoint, offset=offset, precision=precision,
                             cache=(device_cache if is_accelerator(grads) else default_cache) if cache is None
                             else cache, block_size=block_size)
    with full_precision(xp):  # JAX on GPUs: float32 (or Gaussian float32) products without TF32
        signs, shared, packed = cached_factors(p, k, seed=seed, checkpoint=checkpoint, kind=kind, offset=offset,
                                               xp=xp, device=device, dtype=dtype, cache=cache,
                                               dense=block_size is None)
        block = block_size or max(1, _BLOCK_BYTES // (k * (xp.finfo(dtype).bits // 8)))
        if packed is not None:
            native = packed_product(grads, signs, packed, k, block, xp=xp)  # torch: in-cache blocks; JAX: jitted
            if native is not None:
                return native
        if shared is not None:
            native = dense_product(grads, signs, shared, xp=xp)  # torch CPU: no flipped copy of grads
            if native is not None:
                return native
        flipped = grads * signs
        if shared is not None:
            return flipped @ shared
        out = xp.zeros((n, k), dtype=dtype, device=device)
        for start in range(0, p, block):
            stop = min(p, start + block)
            if packed is not None:
                shared = _unpack(packed[start:stop, :], k, xp=xp, dtype=dtype)
            else:
                shared = _shared(offset + start, offset + stop, k, seed, kind, xp=xp, device=device, dtype=dtype)
            out = out + flipped[:, start:stop] @ shared
        return out


def dense_fits(p: int, k: int, itemsize: int, cache: ProjectionCache | None = None) -> bool:
    """Whether the dense shared matrix is cached: it must fit together with the row signs it is used
    with (a matrix that fits only alone would evict, and be evicted by, the signs on every call)."""
    return (default_cache if cache is None else cache).fits(p * (k + 1) * itemsize)


def cached_factors(p: int, k: int, *, seed: int, checkpoint: int, kind: str, offset: int, xp: Any, device: Any,
                   dtype: Any, cache: ProjectionCache | None = None, dense: bool = True) -> tuple[Any, Any, Any]:
    """The pieces of ``P_checkpoint`` from the cache: ``(signs, shared, packed)``.

    ``signs`` (p,) always; ``shared`` is the dense ``R`` (p, k) when it fits the cache budget (and
    ``dense``), else ``None``; ``packed`` holds Rademacher bits (p, ceil(k/32)) when ``shared`` is
    ``None`` and they fit, else ``None``. Backends that fuse projection into a compiled step
    (JAX) take these as inputs.
    """
    cache = default_cache if cache is None else cache
    itemsize = xp.finfo(dtype).bits // 8
    ident = (xp.__name__, str(device), str(dtype), int(seed), kind, k)
    signs = cache.get(ident + ("signs", int(checkpoint), offset, p), p * itemsize, lambda: row_signs(
        offset, offset + p, seed=seed, checkpoint=checkpoint, xp=xp, device=device, dtype=dtype))
    if dense and dense_fits(p, k, itemsize, cache):
        shared = cache.get(ident + ("shared", offset, p), p * k * itemsize, lambda: _shared(
            offset, offset + p, k, seed, kind, xp=xp, device=device, dtype=dtype))
        return signs, shared, None
    words_bytes = p * 4 * -(-k // 32)
    if kind == "rademacher" and cache.fits(words_bytes + p * itemsize):  # the bits fit: keep them, unpack per block
        packed = cache.get(ident[:2] + ("words", int(seed), k, offset, p), words_bytes,
                           lambda: _rademacher_words(offset, offset + p, k, seed, xp=xp, device=device))
        return signs, None, packed
    return signs, None, None
