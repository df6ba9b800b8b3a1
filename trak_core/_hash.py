"""The counter-based 32-bit integer hash behind every projection matrix.

One job: turn integer counters into well-mixed 32-bit words, identically in every namespace.

The mixer is a xorshift-multiply finalizer (two odd multipliers below 2**31, so that a
32-bit value times a multiplier fits in a signed 64-bit integer):

    x ^= x >> 15; x *= 0x2C1B3C6D; x ^= x >> 12; x *= 0x297A2D39; x ^= x >> 15   (mod 2**32)

It is a bijection on 32-bit words. Namespaces with a working ``uint32`` right shift
(numpy, array-api-strict, JAX, CuPy) compute in ``uint32`` and wrap; torch has no
``uint32`` shift, so it computes in ``int64`` and masks to 32 bits after each multiply.
Both give the same bits; :func:`mix_scalar` is the pure-Python reference.
"""
from __future__ import annotations

from typing import Any

import array_api_compat

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
    """Mix one 32-bit word (pure Python reference of :func:`mix`)."""
    x &= MASK32
    x ^= x >> 15
    x = (x * MULTIPLIER_1) & MASK32
    x ^= x >> 12
    x = (x * MULTIPLIER_2) & MASK32
    x ^= x >> 15
    return x


def key(*words: int) -> int:
    """Fold 32-bit words into one key: ``h = mix(h ^ w)`` from ``h = GOLDEN``."""
    h = GOLDEN
    for w in words:
        if w < 0 or w > MASK32:
            raise ValueError(f"hash words must be 32-bit unsigned, got {w}")
        h = mix_scalar(h ^ w)
    return h


def split64(value: int, what: str) -> tuple[int, int]:
    """Split a non-negative integer below 2**64 into (low, high) 32-bit words."""
    value = int(value)
    if value < 0 or value >= 2**64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {value}")
    return value & MASK32, value >> 32


def word_dtype(xp: Any) -> Any:
    """The integer dtype the hash runs in for namespace ``xp`` (uint32, or int64 for torch)."""
    return xp.int64 if array_api_compat.is_torch_namespace(xp) else xp.uint32


def mix(x: Any, *, xp: Any) -> Any:
    """Mix an integer array of 32-bit words elementwise (dtype from :func:`word_dtype`)."""
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
    """``mix(mix(stream ^ lo(a)) ^ hi(a))`` for rows ``a`` in ``start .. stop-1``."""
    lo, hi = counters(start, stop, xp=xp, device=device)
    return mix(mix(lo ^ word(stream, lo, xp=xp), xp=xp) ^ hi, xp=xp)


def word(value: int, like: Any, *, xp: Any) -> Any:
    """A 32-bit constant as a 0-d array of ``like``'s dtype (JAX would read a Python int as int32)."""
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))
