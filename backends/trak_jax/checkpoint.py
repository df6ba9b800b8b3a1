"""Params pytrees as checkpoints: validation, snapshot, and the canonical flattening order.

One job: turn a user's params pytree into a :class:`JaxCheckpoint`.

Parameter order: the leaves of ``jax.tree_util.tree_leaves(params)`` (dict keys sorted, lists and
tuples in order), each flattened row-major. To match a torch model's gradient vector, write the
JAX params in the torch layout and order, e.g. ``[(W1, b1), (W2, b2)]`` with ``W`` of shape
``(out, in)`` (see ``trak_core.testing.torch_to_jax``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trak_core.errors import TrakTypeError, TrakValueError


@dataclass
class JaxCheckpoint:
    """A params pytree of JAX arrays on one device, with its structure for comparisons."""

    params: Any
    treedef: Any
    shapes: tuple
    device: Any
    dtype: Any

    @property
    def n_params(self) -> int:
        import math

        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def structure(self) -> tuple:
        return (str(self.treedef), self.shapes)


def snapshot(checkpoint: Any) -> JaxCheckpoint:
    """Validate a params pytree and convert its leaves to JAX arrays (NumPy leaves are copied)."""
    import jax
    import jax.numpy as jnp

    if checkpoint is None:
        raise TrakTypeError("the JAX backend needs the checkpoint's params pytree; None is only meaningful for torch")
    leaves, treedef = jax.tree_util.tree_flatten(checkpoint)
    if not leaves:
        raise TrakValueError("the params pytree has no leaves (no parameters)")
    arrays = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(checkpoint)[0]:
        where = jax.tree_util.keystr(path) or "<root>"
        module = type(leaf).__module__.split(".")[0]
        if module == "torch":
            raise TrakTypeError(f"params leaf {where} is a torch tensor: the JAX backend takes JAX or NumPy arrays; "
                            "convert with jnp.asarray(tensor.detach().cpu().numpy()) or use backend='torch'")
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TrakTypeError(f"params leaf {where} is a {type(leaf).__name__}, not an array")
        array = jnp.asarray(leaf)
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TrakTypeError(f"params leaf {where} has dtype {array.dtype}; parameters must be floating point")
        arrays.append(array)
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1:
        raise TrakTypeError(f"params leaves mix dtypes {sorted(map(str, dtypes))}; cast them to one dtype")
    devices = {d for a in arrays for d in a.devices()}
    if len(devices) != 1:
        raise TrakValueError(f"params leaves live on several devices {sorted(map(str, devices))}; put them on one")
    params = jax.tree_util.tree_unflatten(treedef, arrays)
    return JaxCheckpoint(params, treedef, tuple(tuple(a.shape) for a in arrays), devices.pop(), arrays[0].dtype)
