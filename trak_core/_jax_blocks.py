"""The block loop of the uncached Rademacher projection for JAX arrays, jitted.

One job: ``flipped @ unpack(packed)`` block by block with one compiled step per block size.
Eager JAX dispatches every slice, shift and comparison as its own computation (several ms each
on a CPU), which made this loop 3.4x slower than torch's; the jitted step slices with
``dynamic_slice`` (the start is traced, so every full block reuses one compilation) and unpacks the
32 signs of each word exactly as ``trak_core.projection._unpack`` does (same bits). Reached only
through ``trak_core._delegation.packed_product``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

__all__ = ["packed_product"]


@functools.lru_cache(maxsize=64)
def _step(k: int, rows: int) -> Any:
    import jax
    import jax.numpy as jnp

    scale = 1.0 / math.sqrt(k)

    @jax.jit
    def step(out: Any, flipped: Any, packed: Any, start: Any) -> Any:
        grads = jax.lax.dynamic_slice_in_dim(flipped, start, rows, axis=1)
        words = jax.lax.dynamic_slice_in_dim(packed, start, rows, axis=0)
        bits = (words[:, :, None] >> jnp.arange(32, dtype=words.dtype)) & 1
        bits = bits.reshape(rows, words.shape[1] * 32)[:, :k]
        signs = jnp.where(bits == 0, jnp.asarray(scale, grads.dtype), jnp.asarray(-scale, grads.dtype))
        return out + grads @ signs

    return step


def packed_product(flipped: Any, packed: Any, k: int, block: int) -> Any:
    """``flipped @ R`` for ``R`` given as packed sign words (p, ceil(k/32)), ``block`` rows of R at a time."""
    import jax.numpy as jnp

    n, p = flipped.shape
    out = jnp.zeros((n, k), dtype=flipped.dtype, device=flipped.device)
    for start in range(0, p, block):
        rows = min(block, p - start)
        out = _step(k, rows)(out, flipped, packed, start)
    return out
