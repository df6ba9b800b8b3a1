"""Batches on the device: conversion, row checks, padding to the step's sizes and cropping its outputs.

One job: get a user's batch in and the step's outputs out with as few small XLA compilations as
possible. Every eager JAX operation compiles once per new shape (a few per batch size, each up to
seconds on a large model's host), so NumPy batches are cast on the host and put on the device
without an XLA program, and padding and cropping are one jitted function each.
"""
from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Iterator

from trak_core.errors import StoreMismatchError, TrakTypeError, TrakValueError

__all__ = ["bucket", "check_stored_x64", "check_x64", "chunks", "crop", "device_batch", "x64_enabled"]


def x64_enabled() -> bool:
    """Whether JAX has float64 here (``jax_enable_x64``, globally or in a ``jax.enable_x64`` context)."""
    import jax
    import numpy as np

    return jax.dtypes.canonicalize_dtype(np.float64) == np.float64


def check_x64(dtype: Any) -> None:
    """Raise when float64 params (prepared with x64 on) are used where x64 is off.

    JAX would compute in float32 and the features would be float32: scores of float32 target
    features against float64 training features, silently at float32 accuracy.
    """
    import numpy as np

    if np.dtype(dtype) == np.float64 and not x64_enabled():
        raise TrakValueError(
            "the checkpoint's params are float64 (featurized with jax_enable_x64 on) but x64 is off here, so JAX "
            "would compute these features in float32 and the scores would silently lose float64 accuracy; score "
            "(and call features) in the same x64 setting you featurized in: inside the same `with "
            "jax.enable_x64(True):` block, or with jax.config.update('jax_enable_x64', True) at the start")


def check_stored_x64(dtype: Any, stored: str) -> None:
    """Raise when a store's features (of ``stored`` dtype) were made in the other x64 setting than this process's.

    With x64 off JAX casts float64 params to float32, so their digest differs from the stored one and the store
    would report other parameters; this names the setting instead. ``dtype``: the params' dtype here.
    """
    import numpy as np

    if np.dtype(stored) == np.float64 and not x64_enabled():
        raise StoreMismatchError(
            "the store holds this checkpoint's features in float64 (featurized with jax_enable_x64 on), but x64 is "
            "off here, so JAX casts float64 params to float32 and would compute float32 features; reopen or resume "
            "the store in the x64 setting it was featurized in: jax.config.update('jax_enable_x64', True) at the "
            "start, or inside `with jax.enable_x64(True):` (nothing was overwritten)")
    if np.dtype(stored) == np.float32 and np.dtype(dtype) == np.float64 and x64_enabled():
        raise StoreMismatchError(
            "the store holds this checkpoint's features in float32, but x64 is on here and these params are float64, "
            "which would give float64 features: the store was featurized with jax_enable_x64 off (JAX cast the "
            "float64 params to float32) or from float32 params; reopen or resume it in that setting: x64 off "
            "(jax.config.update('jax_enable_x64', False) at the start, or inside `with jax.enable_x64(False):`), "
            "or pass the float32 params (nothing was overwritten)")


def _to_device(value: Any, what: str, device: Any) -> Any:
    """``value`` as a JAX array on ``device`` in JAX's dtype for it (float32 for float64 with x64 off)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    if type(value).__module__.split(".")[0] == "torch":
        raise TrakTypeError(f"{what} are torch tensors: the JAX backend takes JAX or NumPy arrays; convert "
                            "with jnp.asarray(tensor.cpu().numpy()) or use backend='torch'")
    array = None
    if isinstance(value, np.ndarray) and value.dtype.kind not in "OSUMm":  # cast on the host: no XLA program
        try:
            array = jax.device_put(value.astype(jax.dtypes.canonicalize_dtype(value.dtype), copy=False), device)
        except TypeError:  # a dtype JAX has no arrays of: jnp.asarray's error below
            pass
    elif isinstance(value, jax.Array):
        array = jax.device_put(value, device)
    if array is None:
        try:
            array = jax.device_put(jnp.asarray(value), device)
        except TypeError as exc:
            if isinstance(value, np.ndarray):  # an array JAX has no dtype for: strings, objects, datetimes
                hint = _numeric_hint(what, value.dtype)
                raise TrakTypeError(f"{what} have the NumPy dtype {value.dtype}, which JAX has no arrays of (JAX "
                                    f"arrays hold numbers and booleans only); {hint}") from None
            raise TrakTypeError(f"{what} must be a JAX or NumPy array, got {type(value).__name__} "
                                f"({str(exc).splitlines()[0]})") from None
    if array.ndim == 0:
        raise TrakValueError(f"{what} must have one row per example, got a scalar")
    return array


def _numeric_hint(what: str, dtype: Any) -> str:
    """How to make numbers of an array of ``dtype`` that JAX cannot hold."""
    if dtype.kind in "US" and what == "labels":
        return ("map the class names to integer ids, one mapping for every batch and the targets, e.g. "
                "classes = np.unique(train_labels), then labels = np.searchsorted(classes, labels)")
    if dtype.kind in "US":
        return "encode the strings as numbers first (a tokenizer's input_ids for text)"
    if dtype.kind == "O":
        return f"make {what} one array of a numeric dtype (rows of one length, e.g. np.stack(rows))"
    return f"convert {what} to a numeric dtype first"


def device_batch(inputs: Any, labels: Any, device: Any) -> tuple[Any, Any, int]:
    """``(inputs, labels, n)``: the batch's arrays (a dict batch's too) on ``device``, with one row per example."""
    if isinstance(inputs, Mapping):
        if not inputs:
            raise TrakValueError("the dict batch has no inputs (only the labels); apply needs at least one array")
        named = [(f"inputs[{key!r}]", value) for key, value in inputs.items()]
    else:
        named = [("inputs", inputs)]
    named.append(("labels", labels))
    arrays = [_to_device(value, what, device) for what, value in named]
    n = arrays[0].shape[0]  # rows: the first array's
    for (what, _), array in zip(named, arrays):
        if array.shape[0] != n:
            raise TrakValueError(f"{what} has {array.shape[0]} rows but {named[0][0]} has {n}; every array of "
                                 "a batch needs one row per example")
    *values, labels = arrays
    return (dict(zip(inputs, values)) if isinstance(inputs, Mapping) else values[0]), labels, n


@lru_cache(maxsize=None)
def _jitted() -> tuple[Any, Any]:
    """``(take, crop)``: jitted row selection with padding, and row cropping, of whole pytrees."""
    import jax
    import jax.numpy as jnp

    def take(tree: Any, start: Any, rows: int, size: int) -> Any:
        """Rows ``start .. start + rows - 1`` of every array, padded with copies of its first row to ``size``."""
        def one(value: Any) -> Any:
            part = jax.lax.dynamic_slice_in_dim(value, start, rows)
            if rows == size:
                return part
            return jnp.concatenate([part, jnp.repeat(part[:1], size - rows, axis=0)])
        return jax.tree_util.tree_map(one, tree)

    def cut(tree: Any, rows: int) -> Any:
        return jax.tree_util.tree_map(lambda value: value[:rows], tree)

    return jax.jit(take, static_argnums=(2, 3)), jax.jit(cut, static_argnums=1)


def bucket(rows: int, size: int) -> int:
    """The padded size of a chunk of ``rows`` rows (``1 <= rows <= size``) for a step of ``size`` rows.

    The smallest of ``size``, ``ceil(size / 2)``, ``ceil(size / 4)``, ... and ``1`` that holds ``rows``: a short
    chunk is padded to less than twice its rows (never to more than ``size``), and a step compiles at most
    ``ceil(log2(size)) + 1`` sizes, each only when a chunk needs it. The sizes depend on ``size`` alone, so a
    row's bits do not depend on which batches came before it.

    Parameters
    ----------
    rows : int
        Rows of the chunk.
    size : int
        The step's size (the first batch's rows, or ``JaxBackend.step_rows``).

    Returns
    -------
    int
        The bucket size, ``rows <= bucket <= size``.
    """
    padded = size
    while padded > 1 and -(-padded // 2) >= rows:
        padded = -(-padded // 2)
    return padded


def chunks(inputs: Any, labels: Any, n: int, size: int, buckets: bool = True) -> Iterator[tuple[Any, Any, int, int]]:
    """``(inputs, labels, rows, padded)``: chunks of ``size`` rows, the last padded to ``padded`` rows.

    ``padded`` is ``bucket(rows, size)`` (``size`` itself when ``buckets`` is false: one compiled size), the
    padding copies of the chunk's first row. A batch that needs no padding and no split passes through
    untouched; otherwise each chunk is one jitted call, compiled once per (batch shapes, rows, padded) rather
    than once per array and operation.
    """
    last = n - (n - 1) // size * size  # rows of the last chunk
    padded = bucket(last, size) if buckets else size
    if n <= size and padded == n:
        yield inputs, labels, n, n
        return
    take = _jitted()[0]
    for start in range(0, n, size):
        rows = min(size, n - start)
        pad = size if rows == size else padded
        x, y = take((inputs, labels), start, rows, pad)
        yield x, y, rows, pad


def crop(outputs: tuple, rows: int, padded: int) -> tuple:
    """The first ``rows`` rows of every array of ``outputs`` (a step's outputs on a chunk padded to ``padded``)."""
    return outputs if rows == padded else _jitted()[1](outputs, rows)
