"""The factorized (Kronecker) projection for JAX models: layers found in the jaxpr, perturbed outputs.

One job: the JAX half of ``proj_type="kronecker"`` (:mod:`trak_core.kronecker` is the spec).

**Layers.** The per-example output (one example, ``x[None]``, as in the dense step) is traced with
``jax.make_jaxpr`` and the selected leaves are followed through the jaxpr (and its ``jit`` s). A
leaf is a layer's weight when every use of it is one of: ``dot_general`` of a 2-D leaf (or its
``transpose``) and an activation, one axis contracted each (``x @ W.T``, torch ``(out, in)``: rows
the output's gradient, columns the input; ``x @ W``, Flax or Hugging Face ``Conv1D`` ``(in, out)``:
rows the input, columns the gradient); ``gather`` of whole rows (``E[ids]``: rows the one-hot ids,
columns the gradient); ``conv_general_dilated`` of ``NCHW`` images with an ``OIHW`` kernel (rows
the output channels, columns the patches of ``lax.conv_general_dilated_patches``, channel-major).
A 1-D leaf is a weight's bias (a constant 1 on the input side) when all its uses are ``add`` s,
broadcast along the feature axis, to outputs of that weight's products, directly or after ``add``
s of the same shape (``x + h @ W.T + b``) of single-use values. Every other selected leaf is the
rest: norms' gains, sliced or added tables, other kernel layouts, weights also used another way
(never half-counted), leaves inside ``scan``, ``cond``, ``remat`` or custom derivatives, casts.

**Features.** An interpreter evaluates the jaxpr again, adding a zero ``z`` to each use's output
(before its bias) and recording its input side times that side's factor; ``jax.vmap(jax.grad)``
with respect to the ``z`` and the rest leaves gives the outputs' gradients, multiplied by the
other factor; uses of one weight (tied weights) add up; :func:`trak_core.kronecker.layer_features`
combines the sides. The rest is projected by :func:`trak_core.project` and comes last.

Imports JAX (the backend's methods import this module on first use).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Literal, Var
from trak_core.kronecker import Kronecker, KroneckerPlan, Layer, factor, layer_features, make_plan, rest_seed
from trak_core.projection import project

from .backend import _not_jittable, _pad, _tree_rows, output_logits

__all__ = ["Use", "Analysis", "analyse", "plan", "features"]

_JITS = ("jit", "pjit")
_OTHER = {"rows": "cols", "cols": "rows"}
_XP = array_api_compat.array_namespace(jnp.zeros(1))


@dataclass(frozen=True)
class Use:
    """A layer use: its equation's ``path`` (indices from the top jaxpr down through ``jit`` s), ``kind``
    (``"dot"``, ``"conv"``, ``"gather"``), weight ``leaf`` and ``operand`` position, the activation's
    contracted axis (dot), the output's feature axis and ``aval``, the layer side of the output's
    gradient, and the leaf folded as its bias."""

    path: tuple[int, ...]
    kind: str
    leaf: int
    operand: int
    act_axis: int
    out_axis: int
    delta_side: str
    aval: Any
    bias: int | None = None


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
            if eqn.primitive.name in ("add", "transpose") and self._chain(eqn, views, chain, counts):
                continue
            if not any(views) or self._view(eqn, views, env):
                continue
            if eqn.primitive.name in _JITS:
                sub = eqn.params["jaxpr"].jaxpr
                self.run(sub, {var: view for var, view in zip(sub.invars, views) if view}, path)
                continue
            use = self._use(eqn, views, path)
            if use is None:
                self.other.update(view[0] for view in views if view)
                continue
            if use.kind != "gather":
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
        held = [j for j, view in enumerate(views) if view]
        if len(held) != 1 or views[held[0]][1] != "w":
            return None
        j = held[0]
        leaf, _, transposed = views[j]
        name, shape, params, out = eqn.primitive.name, self.shapes[leaf], eqn.params, eqn.outvars[0].aval
        if name == "dot_general" and len(shape) == 2:
            contracting, batch = params["dimension_numbers"]
            if batch[0] or batch[1] or len(contracting[0]) != 1:
                return None
            w_axis = contracting[j][0] if not transposed else 1 - contracting[j][0]
            return Use(path, "dot", leaf, j, contracting[1 - j][0], out.ndim - 1 if j == 1 else 0,
                       "rows" if w_axis == 1 else "cols", out)
        if transposed:
            return None
        if name == "gather" and len(shape) == 2 and j == 0:
            numbers = params["dimension_numbers"]
            if (tuple(numbers.collapsed_slice_dims), tuple(numbers.start_index_map),
                    tuple(numbers.operand_batching_dims), len(numbers.offset_dims),
                    tuple(params["slice_sizes"])) == ((0,), (0,), (), 1, (1, shape[1])):
                return Use(path, "gather", leaf, 0, -1, numbers.offset_dims[0], "cols", out)
        if name == "conv_general_dilated" and len(shape) == 4 and j == 1:
            numbers, identity = params["dimension_numbers"], (0, 1, 2, 3)
            if (tuple(numbers.lhs_spec), tuple(numbers.rhs_spec), tuple(numbers.out_spec)) == (identity,) * 3 and \
                    params["feature_group_count"] == params["batch_group_count"] == 1:
                return Use(path, "conv", leaf, 1, -1, 1, "rows", out)
        return None

    def finish(self, selected: tuple[int, ...], paths: tuple[str, ...]) -> tuple:
        """``(uses, layers, rest)``: the layer weights' uses (with their folded biases), layers, rest leaves."""
        weights = sorted({use.leaf for use in self.uses} - self.other)
        adds: dict[int, list[int]] = defaultdict(list)  # bias leaf -> the uses it is added to
        for index, leaf in self.biases:
            adds[leaf].append(index)
        candidates: dict[int, list[tuple[int, str]]] = defaultdict(list)  # weight -> [(bias leaf, side)]
        for leaf, indices in adds.items():
            owners = {self.uses[i].leaf for i in indices}
            sides = {_OTHER[self.uses[i].delta_side] for i in indices}
            if leaf not in self.other and len(owners) == len(sides) == 1 and owners <= set(weights):
                candidates[owners.pop()].append((leaf, sides.pop()))
        folded = {weight: found[0] for weight, found in candidates.items() if len(found) == 1}
        bias_at = {index: leaf for index, leaf in self.biases if folded.get(self.uses[index].leaf, (None,))[0] == leaf}
        layers = []
        for weight in weights:
            bias, side = folded.get(weight, (None, None))
            shape = self.shapes[weight]
            layers.append(Layer(paths[weight], shape[0] + (side == "rows"), math.prod(shape[1:]) + (side == "cols"),
                                None if bias is None else paths[bias], side))
        taken = set(weights) | set(bias_at.values())
        return (tuple(dataclasses.replace(use, bias=bias_at.get(i)) for i, use in enumerate(self.uses)
                      if use.leaf in weights), tuple(layers), tuple(i for i in selected if i not in taken))


def analyse(backend: Any, apply: Callable, prepared: Any, inputs: Any, labels: Any, task: Any) -> Analysis:
    """The :class:`Analysis` of ``apply`` on the first example of a checked batch (cached on the backend)."""
    first = jax.tree_util.tree_map(lambda value: value[0], (inputs, labels))
    avals = tuple((str(path), value.shape, str(value.dtype)) for path, value in
                  jax.tree_util.tree_flatten_with_path(first)[0])
    key = ("kronecker", apply, task, prepared.structure, str(prepared.dtype), prepared.selected, avals)
    if key not in backend._steps:
        leaves, treedef = jax.tree_util.tree_flatten(prepared.params)

        def output(leaves: list, x: Any, y: Any) -> Any:  # one example's task output, as in the dense step
            one = jax.tree_util.tree_map(lambda value: value[None], x)
            out = output_logits(apply(jax.tree_util.tree_unflatten(treedef, leaves), one), backend.logits_fn)
            out = jnp.reshape(out, (1, -1)) if task.logits_ndim == 2 else out
            return task.output(out, y[None], xp=_XP)[0]

        closed = jax.make_jaxpr(output)(leaves, *first)
        scan = _Scan(prepared.shapes)
        env = {closed.jaxpr.invars[i]: (i, "b", 0) if len(prepared.shapes[i]) == 1 else (i, "w", False)
               for i in prepared.selected}
        scan.run(closed.jaxpr, env, ())
        backend._steps[key] = Analysis(closed, *scan.finish(prepared.selected, prepared.paths), prepared.paths,
                                       prepared.shapes)
    return backend._steps[key]


def _evaluate(jaxpr: Any, consts: list, args: list, prefix: tuple, inner: set, hook: Callable) -> list:
    """Evaluate ``jaxpr``; ``hook(path, eqn, invals, out)`` replaces the output of each layer use."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for i, eqn in enumerate(jaxpr.eqns):
        path = prefix + (i,)
        invals = [var.val if isinstance(var, Literal) else env[var] for var in eqn.invars]
        if path in inner:
            sub = eqn.params["jaxpr"]
            outs = _evaluate(sub.jaxpr, sub.consts, invals, path, inner, hook)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = list(outs) if eqn.primitive.multiple_results else [hook(path, eqn, invals, outs)]
        env.update(zip(eqn.outvars, outs))
    return [var.val if isinstance(var, Literal) else env[var] for var in jaxpr.outvars]


def _input_side(use: Use, eqn: Any, invals: list, side: Any, bias: bool) -> Any:
    """A use's input side ``(T, k)`` times its factor ``side`` (the one-hot rows of a gather)."""
    params = eqn.params
    if use.kind == "gather":  # the factor's rows of the ids (not its bias row: clipped ids stay in the table)
        side = side[:invals[0].shape[0]]
        rows = lax.gather(side, invals[1], params["dimension_numbers"], (1, side.shape[1]),
                          indices_are_sorted=params["indices_are_sorted"], unique_indices=params["unique_indices"],
                          mode=params["mode"], fill_value=0)
        return jnp.reshape(jnp.moveaxis(rows, use.out_axis, -1), (-1, side.shape[1]))
    if use.kind == "conv":
        value = lax.conv_general_dilated_patches(
            invals[0], invals[1].shape[2:], params["window_strides"], params["padding"], params["lhs_dilation"],
            params["rhs_dilation"], precision=lax.Precision.HIGHEST)
        value = jnp.moveaxis(value, 1, -1)
    else:
        value = jnp.moveaxis(invals[1 - use.operand], use.act_axis, -1)
    value = jnp.reshape(value, (-1, value.shape[-1]))
    out = value @ side[:value.shape[1]]
    return out + side[value.shape[1]] if bias else out


def _make_step(backend: Any, apply: Callable, task: Any, found: Analysis, plan: KroneckerPlan) -> Callable:
    """The jitted ``(params, inputs, labels, factors) -> (layer features, rest gradients, out_to_loss)``."""
    closed, uses = found.jaxpr, found.uses
    at = {use.path: u for u, use in enumerate(uses)}
    inner = {use.path[:d] for use in uses for d in range(1, len(use.path))}
    block_of = {block.layer.name: b for b, block in enumerate(plan.blocks)}
    layer_of = [block_of[found.paths[use.leaf]] for use in uses]
    rest = tuple(i for i in found.rest if found.paths[i] in set(plan.rest))

    def traced(params: Any, inputs: Any, labels: Any, factors: tuple) -> tuple[Any, Any, Any]:
        logits = output_logits(apply(params, inputs), backend.logits_fn)
        if task.logits_ndim == 2 and logits.ndim == 1:
            logits = logits[:, None]
        out_to_loss = task.out_to_loss(logits, labels, xp=_XP)
        leaves = jax.tree_util.tree_leaves(params)
        zs = [jnp.zeros(use.aval.shape, use.aval.dtype) for use in uses]

        def output(zs: list, chosen: list, x: Any, y: Any) -> tuple[Any, list]:
            full = list(leaves)
            for i, leaf in zip(rest, chosen):
                full[i] = leaf
            sides = [None] * len(uses)

            def hook(path: tuple, eqn: Any, invals: list, out: Any) -> Any:
                u = at.get(path)
                if u is None:
                    return out
                side = _OTHER[uses[u].delta_side]  # the input's side; it holds the bias, if any
                carries = uses[u].bias is not None and plan.blocks[layer_of[u]].layer.bias_side == side
                sides[u] = _input_side(uses[u], eqn, invals, factors[layer_of[u]][side == "cols"], carries)
                return out + zs[u]

            args = jax.tree_util.tree_leaves((full, x, y))
            value = _evaluate(closed.jaxpr, closed.consts, args, (), inner, hook)[0]
            return value, sides

        gradient = jax.grad(output, argnums=(0, 1), has_aux=True)
        (deltas, rest_grads), sides = jax.vmap(gradient, in_axes=(None, None, 0, 0))(
            zs, [leaves[i] for i in rest], inputs, labels)
        n = labels.shape[0]
        parts: list[list[tuple[Any, Any]]] = [[] for _ in plan.blocks]
        for u, use in enumerate(uses):
            delta = jnp.moveaxis(deltas[u], use.out_axis + 1, -1)  # (n, ..., features): the output's gradient
            width = delta.shape[-1]
            delta = jnp.reshape(delta, (n, -1, width)) @ factors[layer_of[u]][use.delta_side == "cols"][:width]
            parts[layer_of[u]].append((delta, sides[u]) if use.delta_side == "rows" else (sides[u], delta))
        blocks = [layer_features(jnp.concatenate([r for r, _ in pairs], axis=1),
                                 jnp.concatenate([c for _, c in pairs], axis=1), block, xp=_XP)
                  for block, pairs in zip(plan.blocks, parts)]
        flat = [jnp.reshape(g, (n, -1)) for g in rest_grads] + [jnp.zeros((n, 0), leaves[0].dtype)]
        return jnp.concatenate(blocks, axis=1), jnp.concatenate(flat, axis=1), out_to_loss

    def step(params: Any, inputs: Any, labels: Any, factors: tuple) -> tuple[Any, Any, Any]:
        backend.compilations += 1  # runs only while tracing
        precision = backend.matmul_precision
        with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
            return traced(params, inputs, labels, factors)

    return jax.jit(step)


def plan(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, *, k: int,
         options: Kronecker | None) -> KroneckerPlan:
    """The plan of ``model`` at ``k`` (:meth:`trak_jax.JaxBackend.factorized_plan`)."""
    inputs, labels, _ = backend._check_batch(model, prepared, inputs, labels, task)
    return analyse(backend, backend._apply(model), prepared, inputs, labels, task).plan(k, options)


def features(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, *, k: int, seed: int,
             checkpoint: int, options: Kronecker | None) -> tuple[Any, Any]:
    """Features ``(n, k)`` and out-to-loss weights ``(n,)`` (:meth:`trak_jax.JaxBackend.factorized_features`)."""
    inputs, labels, n = backend._check_batch(model, prepared, inputs, labels, task)
    apply = backend._apply(model)
    found = analyse(backend, apply, prepared, inputs, labels, task)
    plan_ = found.plan(k, options)
    key = ("kronecker-step", apply, task, id(found), repr(plan_))
    if key not in backend._steps:
        backend._steps[key] = [_make_step(backend, apply, task, found, plan_), backend.batch_size, found]
    entry = backend._steps[key]
    step, size = entry[0], entry[1] or n
    entry[1] = size
    dtype = np.dtype(prepared.dtype)  # factors made by NumPy (the same bits; no small JAX ops to compile)
    factors = jax.device_put(tuple(
        tuple(factor(d, width, seed=seed, checkpoint=checkpoint, index=block.index, side=side, dtype=dtype)
              for side, d, width in (("rows", block.layer.rows, block.k_rows),
                                     ("cols", block.layer.cols, block.k_cols)))
        for block in plan_.blocks), prepared.device)
    parts, rests, weights = [], [], []
    for start in range(0, n, size):
        x, y = _tree_rows(inputs, start, start + size), labels[start:start + size]
        rows = y.shape[0]
        if rows < size:  # pad with copies of the first row: same shapes, no recompilation
            x, y = jax.tree_util.tree_map(lambda value: _pad(value, size), x), _pad(y, size)
        try:
            out, rest, out_to_loss = step(prepared.params, x, y, factors)
        except jax.errors.JAXTypeError as exc:
            raise _not_jittable(exc) from None
        parts.append(out[:rows])
        rests.append(rest[:rows])
        weights.append(out_to_loss[:rows])
    out = jnp.concatenate(parts)
    if plan_.n_rest:
        rest = project(jnp.concatenate(rests), plan_.k_rest, seed=rest_seed(seed), checkpoint=checkpoint)
        out = jnp.concatenate([out, rest], axis=1)
    return out, jnp.concatenate(weights)
