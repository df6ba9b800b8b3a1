"""The block loops of the uncached Rademacher projection for JAX arrays, jitted.

One job: ``flipped @ unpack(packed)`` block by block with one compiled step per block size, in
float32/64 (``packed_product``) or as the float16 split of ``trak_core._split`` (``split_product``).
Eager JAX dispatches every slice, shift and comparison as its own computation (several ms each
on a CPU), which made this loop 3.4x slower than torch's; the jitted step slices with
``dynamic_slice`` (the start is traced, so every full block reuses one compilation) and unpacks the
32 signs of each word exactly as ``trak_core.projection._unpack`` does (same bits). Inside one step
XLA fuses the unpacking with its consumers, so the shifted int32 bits are never written to memory.
Reached through ``trak_core._delegation.packed_product`` and ``trak_core._split``.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

__all__ = ["packed_product", "split_product"]


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


@functools.lru_cache(maxsize=64)
def _split_step(k: int, rows: int, n_passes: int) -> Any:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def step(acc: Any, grads: Any, signs: Any, scales: Any, words: Any, start: Any, word_start: Any) -> Any:
        x = jax.lax.dynamic_slice_in_dim(grads, start, rows, axis=1).astype(jnp.float32)
        x = x * jax.lax.dynamic_slice_in_dim(signs, start, rows)[None, :] * scales[:, None]  # exact
        w = jax.lax.dynamic_slice_in_dim(words, word_start, rows, axis=0)
        bits = ((w[:, :, None] >> jnp.arange(32, dtype=w.dtype)) & 1).reshape(rows, w.shape[1] * 32)[:, :k]
        plus_minus = jnp.where(bits == 0, jnp.float16(1), jnp.float16(-1))
        hi = x.astype(jnp.float16)
        parts = hi if n_passes == 1 else jnp.concatenate([hi, (x - hi.astype(jnp.float32)).astype(jnp.float16)])
        product = jax.lax.dot_general(parts, plus_minus, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        n = grads.shape[0]
        return acc + (product if n_passes == 1 else product[:n] + product[n:])

    return step


def split_product(grads: Any, signs: Any, scales: Any, words: Any | Callable[[int, int], Any], k: int, n_passes: int,
                  block: int) -> Any:
    """The float16 split product of ``trak_core._split`` summed over passes, (n, k) float32, ``block`` rows of
    ``P`` a step: ``words`` is the packed bits of all ``p`` rows, or ``words(start, stop)`` makes a block's."""
    import jax.numpy as jnp

    n, p = grads.shape
    acc = jnp.zeros((n, k), dtype=jnp.float32, device=grads.device)
    for start in range(0, p, block):
        rows = min(block, p - start)
        if callable(words):
            acc = _split_step(k, rows, n_passes)(acc, grads, signs, scales, words(start, start + rows), start, 0)
        else:
            acc = _split_step(k, rows, n_passes)(acc, grads, signs, scales, words, start, start)
    return acc
