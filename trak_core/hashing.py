"""The counter-based 32-bit hash behind every projection matrix: the specification.

One job: turn integer counters into well-mixed 32-bit words, identically in every namespace and on
every device. Everything a projection matrix holds is a function of these words, so an
implementation that follows this page (a CUDA kernel, another language) reproduces trak-core's
matrices bit for bit; ``backends/trak_cupy/kernel.cu`` does, and the test suites check it.

**Words and the mixer.**
All arithmetic is on unsigned 32-bit words, modulo ``2**32``. The mixer is a xorshift-multiply
finalizer with two odd multipliers below ``2**31`` (so a 32-bit word times a multiplier fits in a
signed 64-bit integer)::

    mix(x):  x ^= x >> 15;  x *= 0x2C1B3C6D;  x ^= x >> 12;  x *= 0x297A2D39;  x ^= x >> 15

It is a bijection on 32-bit words (``mix_scalar`` is the pure-Python reference).

**Keys, streams and counters.**

- ``key(w_1, ..., w_m)``: ``h = GOLDEN (0x9E3779B9)``, then ``h = mix(h ^ w_i)`` for each word.
- 64-bit integers (seeds, checkpoint indices, row counters) enter as two words, low then high
  (``split64``).
- A stream is a key of the seed's two words and a domain constant, so no two uses share words:
  ``key(seed_lo, seed_hi, DOMAIN_RADEMACHER)`` ("RAD0"), ``key(seed_lo, seed_hi, DOMAIN_GAUSSIAN)``
  ("GAU0") and ``key(seed_lo, seed_hi, DOMAIN_SIGN, c_lo, c_hi)`` ("SIGN", checkpoint ``c``);
  ``DOMAIN_COLUMNS`` ("COLS") derives a stream's column base.
- Row key of row ``a`` (a 64-bit counter) in stream ``s``:
  ``rowkey(a) = mix(mix(s ^ lo(a)) ^ hi(a))`` (``row_keys``).
- Column key of word column ``b``: ``colkey(b) = mix(b ^ key(s, DOMAIN_COLUMNS))``.
- Word ``(a, b)``: ``w(a, b) = mix(rowkey(a) ^ colkey(b))``.

**How ``trak_core.projection`` uses the words.**

- Rademacher entry ``(a, j)``: bit ``j % 32`` (least significant first) of ``w(a, j // 32)`` in the
  Rademacher stream; bit 0 is ``+1/sqrt(k)``, bit 1 is ``-1/sqrt(k)``.
- Gaussian entries ``(a, 2 m)`` and ``(a, 2 m + 1)``: ``r cos(t)`` and ``r sin(t)`` times ``1/sqrt(k)``,
  in float64, with ``r = sqrt(-2 log(u1))``, ``t = 2 pi u2``, ``u1 = (w(a, 2 m) + 0.5) / 2**32`` and
  ``u2 = w(a, 2 m + 1) / 2**32`` in the Gaussian stream.
- Row sign of row ``a`` in checkpoint ``c``: the top bit of ``rowkey(a)`` in the sign stream of
  ``(seed, c)``; 0 is ``+1``, 1 is ``-1``.

**Namespaces.**
Namespaces with a working ``uint32`` right shift (NumPy, array-api-strict, JAX, CuPy) compute in
``uint32`` and wrap; torch has no ``uint32`` shift, so it computes in ``int64`` and masks to 32
bits after each multiply (``word_dtype``). Both give the same bits.
"""
from __future__ import annotations

from typing import Any

import array_api_compat

from ._integers import as_integer
from .errors import TrakTypeError, TrakValueError

__all__ = ["MASK32", "MULTIPLIER_1", "MULTIPLIER_2", "GOLDEN", "DOMAIN_RADEMACHER", "DOMAIN_GAUSSIAN", "DOMAIN_SIGN",
           "DOMAIN_COLUMNS", "mix_scalar", "key", "split64", "word_dtype", "mix", "counters", "row_keys", "word"]

MASK32 = 0xFFFFFFFF
MULTIPLIER_1 = 0x2C1B3C6D
MULTIPLIER_2 = 0x297A2D39

# Domain separation constants: one stream per use, so no two uses share words.
DOMAIN_RADEMACHER = 0x52414430  # "RAD0"
DOMAIN_GAUSSIAN = 0x47415530  # "GAU0"
DOMAIN_SIGN = 0x5349474E  # "SIGN"
DOMAIN_COLUMNS = 0x434F4C53  # "COLS"
GOLDEN = 0x9E3779B9


def mix_scalar(x: int) -> int:
    """Mix one 32-bit word (pure Python reference of ``mix``)."""
    x &= MASK32
    x ^= x >> 15
    x = (x * MULTIPLIER_1) & MASK32
    x ^= x >> 12
    x = (x * MULTIPLIER_2) & MASK32
    x ^= x >> 15
    return x


def key(*words: int) -> int:
    """Fold 32-bit words into one key: ``h = mix(h ^ w)`` for each word, from ``h = GOLDEN``.

    Parameters
    ----------
    *words : int
        Unsigned 32-bit words (a seed's two words, a domain constant, ...).

    Returns
    -------
    int
        The key, a 32-bit word.

    Raises
    ------
    TrakValueError
        If a word is not in ``[0, 2**32)`` (a ``ValueError``).
    TrakTypeError
        If a word is not an integer (a ``TypeError``).
    """
    h = GOLDEN
    for w in words:
        word = as_integer(w)  # a NumPy integer as a Python int: no fixed-width arithmetic (overflow warnings)
        if word is None:
            raise TrakTypeError(f"hash words must be 32-bit unsigned integers, got {w!r} of type {type(w).__name__}")
        w = word
        if w < 0 or w > MASK32:
            raise TrakValueError(f"hash words must be 32-bit unsigned, got {w}")
        h = mix_scalar(h ^ w)
    return h


def split64(value: int, what: str) -> tuple[int, int]:
    """Split a non-negative integer below ``2**64`` into its (low, high) 32-bit words.

    Parameters
    ----------
    value : int
        A seed, checkpoint index or counter.
    what : str
        Its name, for the error message.

    Returns
    -------
    tuple of int
        ``(value & 0xFFFFFFFF, value >> 32)``.

    Raises
    ------
    TrakValueError
        If ``value`` is not an integer (a bool, a float such as ``1.5``), is negative, or is not below ``2**64``
        (a ``ValueError``).
    """
    number = as_integer(value)  # ints, NumPy integers; not 1.5
    if number is None or number < 0 or number >= 2**64:
        raise TrakValueError(f"{what} must be an integer in [0, 2**64), got {value!r}")
    value = number
    return value & MASK32, value >> 32


def word_dtype(xp: Any) -> Any:
    """The integer dtype the hash runs in for namespace ``xp`` (uint32, or int64 for torch)."""
    return xp.int64 if array_api_compat.is_torch_namespace(xp) else xp.uint32


def mix(x: Any, *, xp: Any) -> Any:
    """Mix an integer array of 32-bit words elementwise: ``mix_scalar`` on arrays.

    Parameters
    ----------
    x : array
        Words in ``word_dtype`` of ``xp`` (``uint32`` wraps; ``int64`` is masked to 32 bits).
    xp : namespace
        The Array API namespace of ``x``.

    Returns
    -------
    array
        The mixed words, same dtype and shape.
    """
    masked = x.dtype != xp.uint32
    x = x ^ (x >> 15)
    x = x * MULTIPLIER_1
    if masked:
        x = x & MASK32
    x = x ^ (x >> 12)
    x = x * MULTIPLIER_2
    if masked:
        x = x & MASK32
    return x ^ (x >> 15)


def counters(start: int, stop: int, *, xp: Any, device: Any) -> tuple[Any, Any]:
    """Low and high 32-bit words of the counters ``start .. stop-1`` as word arrays.

    Made piece by piece between multiples of 2**32, with 32-bit arithmetic only (JAX without
    x64 has no int64).
    """
    dtype = word_dtype(xp)
    los, his, a = [], [], start
    while a < stop:
        b = min(stop, ((a >> 32) + 1) << 32)
        lo = xp.arange(b - a, dtype=dtype, device=device)
        if a & MASK32:
            lo = lo + xp.asarray(a & MASK32, dtype=dtype, device=device)
        los.append(lo)
        his.append(xp.full((b - a,), a >> 32, dtype=dtype, device=device))
        a = b
    if len(los) == 1:
        return los[0], his[0]
    if not los:
        empty = xp.zeros((0,), dtype=dtype, device=device)
        return empty, empty
    return xp.concat(los), xp.concat(his)


def row_keys(stream: int, start: int, stop: int, *, xp: Any, device: Any) -> Any:
    """Row keys ``mix(mix(stream ^ lo(a)) ^ hi(a))`` for rows ``a`` in ``start .. stop-1``.

    Parameters
    ----------
    stream : int
        The stream's key (``key``).
    start, stop : int
        Row counters, ``0 <= start <= stop <= 2**64``.
    xp : namespace
        Where to compute.
    device : device
        Where to make the array.

    Returns
    -------
    array, shape (stop - start,)
        Words in ``word_dtype`` of ``xp``.
    """
    lo, hi = counters(start, stop, xp=xp, device=device)
    return mix(mix(lo ^ word(stream, lo, xp=xp), xp=xp) ^ hi, xp=xp)


def word(value: int, like: Any, *, xp: Any) -> Any:
    """A 32-bit constant as a 0-d array of ``like``'s dtype (JAX would read a Python int as int32)."""
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))
