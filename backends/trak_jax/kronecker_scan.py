"""The layers of a JAX model's per-example jaxpr, for the factorized (Kronecker) projection.

One job: find which selected leaves are layer weights (and their folded biases) and how each use of them is laid
out; :mod:`trak_jax.kronecker` computes the features.

The per-example output (one example, ``x[None]``, as in the dense step) is traced with
``jax.make_jaxpr`` and the selected leaves are followed through the jaxpr (and its ``jit`` s). A
leaf is a layer's weight when every use of it is one of: ``dot_general`` of a 2-D leaf (or its
``transpose``) and an activation, one axis contracted each (``x @ W.T``, torch ``(out, in)``: rows
the output's gradient, columns the input; ``x @ W``, Flax or Hugging Face ``Conv1D`` ``(in, out)``:
rows the input, columns the gradient); ``dot_general`` of a leaf of 3 or more dimensions whose
leading axes are contracted with consecutive axes of the activation (Flax's ``DenseGeneral`` in
attention: ``(d, heads, head_dim)``, ``(heads, head_dim, d)``; rows the contracted axes, columns the
others, both row-major); ``gather`` of whole rows (``E[ids]``: rows the one-hot ids,
columns the gradient); ``conv_general_dilated`` of ``NCHW`` images with an ``OIHW`` kernel (rows
the output channels, columns the patches of ``lax.conv_general_dilated_patches``, channel-major).
A 1-D leaf is a weight's bias (a constant 1 on the input side) when all its uses are ``add`` s,
broadcast along the feature axis, to outputs of that weight's products, directly or after ``add``
s of the same shape (``x + h @ W.T + b``) of single-use values. Every other selected leaf is the
rest: norms' gains, sliced or added tables, other kernel layouts, weights also used another way
(never half-counted), leaves inside ``scan``, ``cond``, ``remat`` or custom derivatives, casts to
integers. A cast to another float dtype (a Flax layer's ``dtype=jnp.bfloat16`` compute dtype with
float32 params) is followed: the layer is found and computes its sides in the compute dtype.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import array_api_compat
import jax
import jax.numpy as jnp
from jax.extend.core import Literal, Var
from trak_core.kronecker import Kronecker, KroneckerPlan, Layer, make_plan

from .backend import output_logits

__all__ = ["Use", "Analysis", "analyse", "JITS", "OTHER"]

JITS = ("jit", "pjit")
OTHER = {"rows": "cols", "cols": "rows"}
_XP = array_api_compat.array_namespace(jnp.zeros(1))


@dataclass(frozen=True)
class Use:
    """A layer use: its equation's ``path`` (indices from the top jaxpr down through ``jit`` s), ``kind``
    (``"dot"``, ``"conv"``, ``"gather"``), weight ``leaf`` and ``operand`` position, the activation's first
    contracted axis (dot), the output's first feature axis and ``aval``, the layer side of the output's
    gradient, the leaf folded as its bias, and how many consecutive axes the activation contracts and the
    output's features span (more than one for a kernel of 3 or more dimensions, as Flax's ``DenseGeneral``'s
    in attention: ``(d, heads, head_dim)``, ``(heads, head_dim, d)``)."""

    path: tuple[int, ...]
    kind: str
    leaf: int
    operand: int
    act_axis: int
    out_axis: int
    delta_side: str
    aval: Any
    bias: int | None = None
    count: int = 1
    out_count: int = 1

    @property
    def split(self) -> int:
        """The weight's leading axes that make its layer's rows (the rest make its columns)."""
        return self.count if self.kind == "dot" and self.delta_side == "cols" else 1


@dataclass
class Analysis:
    """A model's per-example jaxpr, its layer uses, layers (in leaf order) and rest leaves."""

    jaxpr: Any
    uses: tuple[Use, ...]
    layers: tuple[Layer, ...]
    rest: tuple[int, ...]
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def plan(self, k: int, options: Kronecker | None) -> KroneckerPlan:
        """:func:`trak_core.kronecker.make_plan` of these layers and rest at ``k``."""
        rest = [(self.paths[i], math.prod(self.shapes[i])) for i in self.rest]
        return make_plan(self.layers, rest, k, options)


class _Scan:
    """Follows the selected leaves through a jaxpr and records their layer uses and bias adds."""

    def __init__(self, shapes: tuple) -> None:
        self.shapes = shapes
        self.uses: list[Use] = []
        self.other: set[int] = set()  # leaves used some other way
        self.biases: list[tuple[int, int]] = []  # (use index, bias leaf) of each bias add

    def run(self, jaxpr: Any, env: dict, prefix: tuple[int, ...]) -> None:
        """Scan ``jaxpr``; ``env``: var -> view ``(leaf, "w", transposed)`` or ``(leaf, "b", axis)`` (a bias)."""
        counts = Counter(var for eqn in jaxpr.eqns for var in eqn.invars if isinstance(var, Var))
        counts.update(var for var in jaxpr.outvars if isinstance(var, Var))
        self.other.update(env[var][0] for var in jaxpr.outvars if isinstance(var, Var) and var in env)
        chain: dict[Any, tuple[int, int]] = {}  # a use's output, or a single-use sum or transpose of it -> (use, axis)
        for i, eqn in enumerate(jaxpr.eqns):
            path = prefix + (i,)
            views = [env.get(var) if isinstance(var, Var) else None for var in eqn.invars]
            if eqn.primitive.name in ("add", "transpose", "squeeze", "reshape") and \
                    self._chain(eqn, views, chain, counts):
                continue
            if not any(views) or self._view(eqn, views, env):
                continue
            if eqn.primitive.name in JITS:
                sub = eqn.params["jaxpr"].jaxpr
                self.run(sub, {var: view for var, view in zip(sub.invars, views) if view}, path)
                continue
            use = self._use(eqn, views, path)
            if use is None:
                self.other.update(view[0] for view in views if view)
                continue
            if use.kind != "gather" and use.out_count == 1:  # a bias add follows one feature axis
                chain[eqn.outvars[0]] = (len(self.uses), use.out_axis)
            self.uses.append(use)

    def _chain(self, eqn: Any, views: list, chain: dict, counts: Counter) -> bool:
        """Follow a use's output through a ``transpose`` or an ``add``; ``True`` when the add is the use's bias."""
        out = eqn.outvars[0]
        if eqn.primitive.name == "transpose":
            var = eqn.invars[0]
            if isinstance(var, Var) and var in chain and counts[var] == 1:
                index, axis = chain[var]
                chain[out] = (index, list(eqn.params["permutation"]).index(axis))
            return False
        if eqn.primitive.name in ("squeeze", "reshape"):  # axes of 1 dropped or added (Equinox's per-example layers)
            var = eqn.invars[0]
            if isinstance(var, Var) and var in chain and counts[var] == 1:
                index, axis = chain[var]
                before, after = var.aval.shape, out.aval.shape
                wide_in = [d for d, size in enumerate(before) if size != 1]
                wide_out = [d for d, size in enumerate(after) if size != 1]
                if axis in wide_in and [before[d] for d in wide_in] == [after[d] for d in wide_out]:
                    chain[out] = (index, wide_out[wide_in.index(axis)])
            return False
        for a in (0, 1):
            var, view = eqn.invars[a], views[1 - a]
            if views[a] or isinstance(var, Literal) or var not in chain or counts[var] != 1 or \
                    var.aval.shape != out.aval.shape:
                continue
            index, axis = chain[var]
            if view is None:
                chain[out] = (index, axis)
                return False
            if view[1] == "b" and view[2] == axis and eqn.invars[1 - a].aval.shape[axis] == out.aval.shape[axis]:
                self.biases.append((index, view[0]))
                return True
        return False

    @staticmethod
    def _view(eqn: Any, views: list, env: dict) -> bool:
        """Record the view an equation makes of a leaf (a transposed weight, a broadcast bias)."""
        name, view, out = eqn.primitive.name, views[0], eqn.outvars[0]
        if view is None or len(views) != 1:
            return False
        leaf, kind, flag = view
        shape = eqn.invars[0].aval.shape
        if name == "convert_element_type" and jnp.issubdtype(eqn.params["new_dtype"], jnp.floating):
            env[out] = view  # a float cast (Flax's dtype=jnp.bfloat16 with float32 params): the gradient with
            return True  # respect to the cast leaf is the leaf's, rounded
        if kind == "w":
            if name == "transpose" and len(shape) == 2 and tuple(eqn.params["permutation"]) == (1, 0):
                env[out] = (leaf, "w", not flag)
                return True
            return False
        axis = None
        if name == "broadcast_in_dim":
            axis = eqn.params["broadcast_dimensions"][flag]
        elif name == "squeeze" and flag not in eqn.params["dimensions"]:
            axis = flag - sum(d < flag for d in eqn.params["dimensions"])
        elif name == "reshape" and math.prod(shape) == shape[flag] > 1:
            sizes = [d for d, size in enumerate(out.aval.shape) if size != 1]
            axis = sizes[0] if len(sizes) == 1 else None
        if axis is None:
            return False
        env[out] = (leaf, "b", axis)
        return True

    def _use(self, eqn: Any, views: list, path: tuple[int, ...]) -> Use | None:
        """The layer use an equation makes of a weight, or ``None`` (another use)."""
        views = [(view[0], "w", False) if view and view[1] == "b" and len(self.shapes[view[0]]) >= 3 and
                 tuple(getattr(var, "aval", None).shape) == tuple(self.shapes[view[0]]) else view
                 for view, var in zip(views, eqn.invars)]  # a leaf taken for a bias (1, C, 1, 1) that is a kernel
        held = [j for j, view in enumerate(views) if view]
        if len(held) != 1 or views[held[0]][1] != "w":
            return None
        j = held[0]
        leaf, _, transposed = views[j]
        name, shape, params, out = eqn.primitive.name, self.shapes[leaf], eqn.params, eqn.outvars[0].aval
        if name == "dot_general" and len(shape) >= 2:
            contracting, batch = params["dimension_numbers"]
            if batch[0] or batch[1]:
                return None
            if len(shape) == 2 and len(contracting[0]) == 1:
                w_axis = contracting[j][0] if not transposed else 1 - contracting[j][0]
                return Use(path, "dot", leaf, j, contracting[1 - j][0], out.ndim - 1 if j == 1 else 0,
                           "rows" if w_axis == 1 else "cols", out)
            pairs = sorted(zip(contracting[j], contracting[1 - j]))  # (weight axis, activation axis), any order
            count, first = len(pairs), pairs[0][1]  # (in..., out...): the weight's leading axes contracted
            if transposed or count >= len(shape) or pairs != [(i, first + i) for i in range(count)]:
                return None
            free = len(shape) - count
            return Use(path, "dot", leaf, j, first, out.ndim - free if j == 1 else 0, "cols", out, count=count,
                       out_count=free)
        if transposed:
            return None
        if name == "gather" and len(shape) == 2 and j == 0:
            numbers = params["dimension_numbers"]
            form = (tuple(numbers.collapsed_slice_dims), tuple(numbers.start_index_map),
                    tuple(numbers.operand_batching_dims), len(numbers.offset_dims), tuple(params["slice_sizes"]))
            # whole rows: E[ids]; or, looked up a token at a time under vmap (eqx.nn.Embedding), a (1, d) slice at a
            # (row, column) start, the column necessarily 0 since the slice is as wide as the table
            if form in (((0,), (0,), (), 1, (1, shape[1])), ((), (0, 1), (), 2, (1, shape[1]))):
                return Use(path, "gather", leaf, 0, -1, numbers.offset_dims[-1], "cols", out)
        if name == "conv_general_dilated" and len(shape) == 4 and j == 1:
            numbers, identity = params["dimension_numbers"], (0, 1, 2, 3)
            if (tuple(numbers.lhs_spec), tuple(numbers.rhs_spec), tuple(numbers.out_spec)) == (identity,) * 3 and \
                    params["feature_group_count"] == params["batch_group_count"] == 1:
                return Use(path, "conv", leaf, 1, -1, 1, "rows", out)
        return None

    def finish(self, selected: tuple[int, ...], paths: tuple[str, ...]) -> tuple:
        """``(uses, layers, rest)``: the layer weights' uses (with their folded biases), layers, rest leaves."""
        splits: dict[int, set[int]] = defaultdict(set)
        for use in self.uses:
            splits[use.leaf].add(use.split)
        mixed = {leaf for leaf, split in splits.items() if len(split) > 1}  # uses that disagree on the rows
        weights = sorted({use.leaf for use in self.uses} - self.other - mixed)
        adds: dict[int, list[int]] = defaultdict(list)  # bias leaf -> the uses it is added to
        for index, leaf in self.biases:
            adds[leaf].append(index)
        candidates: dict[int, list[tuple[int, str]]] = defaultdict(list)  # weight -> [(bias leaf, side)]
        for leaf, indices in adds.items():
            owners = {self.uses[i].leaf for i in indices}
            sides = {OTHER[self.uses[i].delta_side] for i in indices}
            if leaf not in self.other and len(owners) == len(sides) == 1 and owners <= set(weights):
                candidates[owners.pop()].append((leaf, sides.pop()))
        folded = {weight: found[0] for weight, found in candidates.items() if len(found) == 1}
        bias_at = {index: leaf for index, leaf in self.biases if folded.get(self.uses[index].leaf, (None,))[0] == leaf}
        layers = []
        for weight in weights:
            bias, side = folded.get(weight, (None, None))
            shape, split = self.shapes[weight], splits[weight].pop()
            layers.append(Layer(paths[weight], math.prod(shape[:split]) + (side == "rows"),
                                math.prod(shape[split:]) + (side == "cols"), None if bias is None else paths[bias],
                                side))
        taken = set(weights) | set(bias_at.values())
        return (tuple(dataclasses.replace(use, bias=bias_at.get(i)) for i, use in enumerate(self.uses)
                      if use.leaf in weights), tuple(layers), tuple(i for i in selected if i not in taken))


def _initial_view(leaf: int, shape: tuple) -> tuple:
    """A leaf's view before any equation: a bias ``(leaf, "b", axis)`` when it is 1-D, or of three or more axes
    with one that is not 1 (Equinox's ``Conv2d`` bias ``(O, 1, 1)``); else a weight ``(leaf, "w", False)``."""
    if len(shape) == 1:
        return (leaf, "b", 0)
    wide = [axis for axis, size in enumerate(shape) if size != 1]
    return (leaf, "b", wide[0]) if len(shape) >= 3 and len(wide) == 1 else (leaf, "w", False)


def analyse(backend: Any, apply: Callable, prepared: Any, inputs: Any, labels: Any, task: Any) -> Analysis:
    """The :class:`Analysis` of ``apply`` on the first example of a checked batch (cached on the backend)."""
    avals = tuple((str(path), value.shape[1:], str(value.dtype)) for path, value in  # one example's (no slicing:
                  jax.tree_util.tree_flatten_with_path((inputs, labels))[0])  # no XLA program per batch shape)
    key = ("kronecker", apply, task, prepared.structure, str(prepared.dtype), prepared.selected, avals)
    return backend._steps.get_or_make(key, lambda: _analysis(backend, apply, prepared, inputs, labels, task))


def _analysis(backend: Any, apply: Callable, prepared: Any, inputs: Any, labels: Any, task: Any) -> Analysis:
    """The :class:`Analysis` of ``analyse``, made."""
    first = jax.tree_util.tree_map(lambda value: jax.ShapeDtypeStruct(value.shape[1:], value.dtype),
                                   (inputs, labels))
    leaves, treedef = jax.tree_util.tree_flatten(prepared.params)

    def output(leaves: list, x: Any, y: Any) -> Any:  # one example's task output, as in the dense step
        one = jax.tree_util.tree_map(lambda value: value[None], x)
        out = output_logits(apply(jax.tree_util.tree_unflatten(treedef, leaves), one), backend.logits_fn)
        out = jnp.reshape(out, (1, -1)) if task.logits_ndim == 2 else out
        return task.output(out, y[None], xp=_XP)[0]

    closed = jax.make_jaxpr(output)(leaves, *first)
    scan = _Scan(prepared.shapes)
    env = {closed.jaxpr.invars[i]: _initial_view(i, prepared.shapes[i]) for i in prepared.selected}
    scan.run(closed.jaxpr, env, ())
    return Analysis(closed, *scan.finish(prepared.selected, prepared.paths), prepared.paths, prepared.shapes)
