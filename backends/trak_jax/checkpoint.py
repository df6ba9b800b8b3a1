"""Params pytrees as checkpoints: validation, snapshot, and the canonical flattening order.

One job: turn a user's params pytree into a ``JaxCheckpoint``, with the leaves to
differentiate selected.

Parameter order: the leaves of ``jax.tree_util.tree_leaves(params)`` (dict keys sorted, lists and
tuples in order), each flattened row-major; with a selection, the selected leaves in that order.
To match a torch model's gradient vector, write the JAX params in the torch layout and order, e.g.
``[(W1, b1), (W2, b2)]`` with ``W`` of shape ``(out, in)`` (see ``trak_core.testing.cases``).
Leaves are named by their path strings, ``jax.tree_util.keystr(path)``: ``"[0]"``,
``"['dense']['kernel']"``, ``".layers[1].weight"`` (Equinox).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from trak_core.errors import TrakTypeError, TrakValueError, non_finite_parameters


@dataclass
class JaxCheckpoint:
    """A params pytree of JAX arrays on one device, with its structure for comparisons.

    ``selected`` holds the indices (in tree-leaf order) of the leaves that are differentiated; the
    others enter the model as constants, in any dtype (an integer step counter, an RNG count).
    ``paths`` names every leaf; ``dtype`` is the selected leaves' (one dtype), ``dtypes`` every leaf's.
    """

    params: Any
    treedef: Any
    shapes: tuple
    device: Any
    dtype: Any
    paths: tuple = ()
    selected: tuple = ()
    dtypes: tuple = ()

    def __getstate__(self) -> dict:
        """Everything but ``device`` (a JAX ``Device`` does not pickle): the unpickled params say where they are."""
        return {**vars(self), "device": None}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        import jax

        leaves = [leaf for leaf in jax.tree_util.tree_leaves(self.params) if isinstance(leaf, jax.Array)]
        self.device = next(iter(leaves[0].devices())) if leaves else jax.devices()[0]

    @property
    def n_params(self) -> int:
        import math

        return sum(math.prod(self.shapes[i]) for i in self.selected)

    @property
    def structure(self) -> tuple:
        if len(self.selected) == len(self.shapes):
            return (str(self.treedef), self.shapes)
        return (str(self.treedef), self.shapes, tuple(self.paths[i] for i in self.selected))


Selection = Sequence[str] | Callable[[str, Any], bool] | None


def check_selection(params: Any) -> None:
    """Raise unless ``params`` is ``None``, a predicate or a sequence of path strings."""
    if params is None or callable(params):
        return
    if isinstance(params, str):
        raise TrakTypeError(f"params must be a sequence of path strings or a predicate (path, leaf) -> bool, got "
                            f"the string {params!r}; wrap it in a list: params=[{params!r}]")
    if not isinstance(params, Sequence) or not all(isinstance(path, str) for path in params):
        raise TrakTypeError("params must be a sequence of path strings (jax.tree_util.keystr of the params "
                            f"pytree's leaves) or a predicate (path, leaf) -> bool, got {params!r}")


def select_leaves(paths: Sequence[str], leaves: Sequence[Any], params: Selection) -> tuple[int, ...]:
    """Indices of the leaves to differentiate, in tree-leaf order (all of them when ``params`` is ``None``)."""
    if params is None:
        return tuple(range(len(paths)))
    if callable(params):
        chosen = tuple(i for i, (path, leaf) in enumerate(zip(paths, leaves)) if params(path, leaf))
    else:
        unknown = [path for path in params if path not in paths]
        if unknown:
            raise TrakValueError(f"params paths {unknown} are not leaves of the params pytree; its leaves are "
                                 f"{list(paths)} (jax.tree_util.keystr of each leaf's path)")
        wanted = set(params)
        chosen = tuple(i for i, path in enumerate(paths) if path in wanted)
    if not chosen:
        raise TrakValueError(f"params selects no leaf of the params pytree (its leaves are {list(paths)}); "
                             "nothing to differentiate")
    return chosen


def snapshot(checkpoint: Any, params: Selection = None) -> JaxCheckpoint:
    """Validate a params pytree, convert its leaves to JAX arrays (NumPy leaves are copied) and select
    the leaves to differentiate (``params``: path strings or a predicate ``(path, leaf) -> bool``)."""
    import jax
    import jax.numpy as jnp

    if checkpoint is None:
        raise TrakTypeError("the JAX backend needs the checkpoint's params pytree; None is only meaningful for torch")
    leaves, treedef = jax.tree_util.tree_flatten(checkpoint)
    if not leaves:
        raise TrakValueError("the params pytree has no leaves (no parameters)")
    arrays, paths = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(checkpoint)[0]:
        where = jax.tree_util.keystr(path) or "<root>"
        module = type(leaf).__module__.split(".")[0]
        if module == "torch":
            raise TrakTypeError(f"params leaf {where} is a torch tensor: the JAX backend takes JAX or NumPy arrays; "
                                "convert with jnp.asarray(tensor.detach().cpu().numpy()) or use backend='torch'")
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TrakTypeError(f"params leaf {where} is a {type(leaf).__name__}, not an array: the checkpoint must "
                                f"be a pytree of arrays only; {_split_hint(checkpoint)}")
        arrays.append(jnp.asarray(leaf))
        paths.append(jax.tree_util.keystr(path))
    selected = select_leaves(paths, arrays, params)
    for i in selected:
        if not jnp.issubdtype(arrays[i].dtype, jnp.floating):
            raise TrakTypeError(
                f"params leaf {paths[i] or '<root>'} has dtype {arrays[i].dtype}; the parameters to differentiate "
                "must be floating point. Leave it out with JaxBackend(params=...) (a list of the leaves' paths, or "
                "a predicate (path, leaf) -> bool; the others enter the model as constants); for Flax NNX, "
                "featurize (params, rest) of graphdef, params, rest = nnx.split(model, nnx.Param, ...) with "
                "JaxBackend(params=lambda path, leaf: path.startswith(\"[0]\")) (docs/jax.md)")
    finite = [jnp.all(jnp.isfinite(arrays[i])) for i in selected]  # one transfer to the host, not one a leaf
    if not bool(jnp.all(jnp.stack(finite))):
        raise non_finite_parameters([paths[i] or "<root>" for i, ok in zip(selected, finite) if not ok])
    dtypes = {arrays[i].dtype for i in selected}
    if len(dtypes) != 1:
        raise TrakTypeError(f"params leaves mix dtypes {sorted(map(str, dtypes))}; cast them to one dtype")
    devices = {d for a in arrays for d in a.devices()}
    if len(devices) != 1:
        raise TrakValueError(f"params leaves live on several devices {sorted(map(str, devices))}; put them on one")
    tree = jax.tree_util.tree_unflatten(treedef, arrays)
    return JaxCheckpoint(tree, treedef, tuple(tuple(a.shape) for a in arrays), devices.pop(), dtypes.pop(),
                         tuple(paths), selected, tuple(a.dtype for a in arrays))


def _split_hint(checkpoint: Any) -> str:
    """How to take the arrays out of a whole model passed as the checkpoint."""
    bases = {cls.__module__.split(".")[0] for cls in type(checkpoint).__mro__}
    if "equinox" in bases:
        return ("for an Equinox module, split it: params, static = eqx.partition(model, eqx.is_inexact_array), "
                "featurize params with apply = lambda p, x: jax.vmap(eqx.combine(p, static))(x)")
    if "flax" in bases:
        return ("for a Flax NNX module, split it: graphdef, params, rest = nnx.split(model, nnx.Param, ...), "
                "featurize (params, rest) with apply = lambda state, x: nnx.merge(graphdef, *state)(x) and "
                "JaxBackend(params=lambda path, leaf: path.startswith(\"[0]\")) (docs/jax.md)")
    return "split the model into its arrays (the checkpoint) and the rest (closed over by apply)"
