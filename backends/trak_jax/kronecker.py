"""The factorized (Kronecker) projection for JAX models: layers found in the jaxpr, perturbed outputs.

One job: the JAX half of ``proj_type="kronecker"`` (:mod:`trak_core.kronecker` is the spec).

**Layers**: :mod:`trak_jax.kronecker_scan`.

**Features.** An interpreter evaluates the jaxpr again, adding a zero ``z`` to each use's output
(before its bias) and recording its input side times that side's factor; ``jax.vmap(jax.grad)``
with respect to the ``z`` and the rest leaves gives the outputs' gradients, multiplied by the
other factor; uses of one weight (tied weights) add up; :func:`trak_core.kronecker.layer_features`
combines the sides. The rest is projected by :func:`trak_core.project` and comes last.

Imports JAX (the backend's methods import this module on first use).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Literal
from trak_core.kronecker import Kronecker, KroneckerPlan, factor, layer_features, rest_seed
from trak_core.projection import project

from .backend import output_logits
from .batch import chunks, crop
from .checks import check_rows_apart, not_jittable, rows_apart, state_note
from .kronecker_scan import OTHER, Analysis, Use, analyse

__all__ = ["Use", "Analysis", "analyse", "plan", "features"]
_XP = array_api_compat.array_namespace(jnp.zeros(1))


def _evaluate(jaxpr: Any, consts: list, args: list, prefix: tuple, inner: set, hook: Callable) -> list:
    """Evaluate ``jaxpr``; ``hook(path, eqn, invals, out)`` replaces the output of each layer use."""
    env = dict(zip(jaxpr.constvars, consts))
    env.update((var, _as_traced(var, value)) for var, value in zip(jaxpr.invars, args))
    for i, eqn in enumerate(jaxpr.eqns):
        path = prefix + (i,)
        invals = [var.val if isinstance(var, Literal) else env[var] for var in eqn.invars]
        if path in inner:
            sub = eqn.params["jaxpr"]
            outs = _evaluate(sub.jaxpr, sub.consts, invals, path, inner, hook)
        else:
            with eqn.ctx.manager:
                bound = eqn.primitive.get_bind_params(eqn.params)  # JAX < 0.9.2: (subfuns, params)
                subfuns, bound = bound if isinstance(bound, tuple) else ((), bound)
                outs = eqn.primitive.bind(*subfuns, *invals, **bound)
            outs = list(outs) if eqn.primitive.multiple_results else [hook(path, eqn, invals, outs)]
        env.update(zip(eqn.outvars, outs))
    return [var.val if isinstance(var, Literal) else env[var] for var in jaxpr.outvars]


def _as_traced(var: Any, value: Any) -> Any:
    """``value`` in the dtype that ``var`` was traced with. The jaxpr was traced from the batch's dtypes as JAX
    canonicalizes them (int32 under x64 off), while the arrays themselves may keep a wider one (int64 labels made
    with x64 on): the dense step's ``jnp`` calls convert them, a re-bound primitive (``lax.eq``) does not."""
    dtype = var.aval.dtype
    return value if value.dtype == dtype else lax.convert_element_type(value, dtype)


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
        axes = list(range(use.act_axis, use.act_axis + use.count))
        value = jnp.moveaxis(invals[1 - use.operand], axes, list(range(-use.count, 0)))
        value = jnp.reshape(value, (-1, math.prod(value.shape[value.ndim - use.count:])))
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

    def traced(params: Any, inputs: Any, labels: Any, factors: tuple) -> tuple[Any, Any, Any, Any]:
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
                side = OTHER[uses[u].delta_side]  # the input's side; it holds the bias, if any
                carries = uses[u].bias is not None and plan.blocks[layer_of[u]].layer.bias_side == side
                sides[u] = _input_side(uses[u], eqn, invals, factors[layer_of[u]][side == "cols"], carries)
                return out + zs[u]

            args = jax.tree_util.tree_leaves((full, x, y))
            value = _evaluate(closed.jaxpr, closed.consts, args, (), inner, hook)[0]
            return value, sides

        gradient = jax.value_and_grad(output, argnums=(0, 1), has_aux=True)
        (alone, sides), (deltas, rest_grads) = jax.vmap(gradient, in_axes=(None, None, 0, 0))(
            zs, [leaves[i] for i in rest], inputs, labels)
        together = task.output(logits, labels, xp=_XP)  # each row's output in the batch (checks.check_rows_apart)
        apart = rows_apart(alone, together, logits)
        n = labels.shape[0]
        parts: list[list[tuple[Any, Any]]] = [[] for _ in plan.blocks]
        for u, use in enumerate(uses):
            axes = list(range(use.out_axis + 1, use.out_axis + 1 + use.out_count))  # (n, ..., features...)
            delta = jnp.moveaxis(deltas[u], axes, list(range(-use.out_count, 0)))  # the output's gradient
            width = math.prod(delta.shape[delta.ndim - use.out_count:])
            delta = jnp.reshape(delta, (n, -1, width)) @ factors[layer_of[u]][use.delta_side == "cols"][:width]
            parts[layer_of[u]].append((delta, sides[u]) if use.delta_side == "rows" else (sides[u], delta))
        blocks = [layer_features(jnp.concatenate([r for r, _ in pairs], axis=1),
                                 jnp.concatenate([c for _, c in pairs], axis=1), block, xp=_XP)
                  for block, pairs in zip(plan.blocks, parts)]
        flat = [jnp.reshape(g, (n, -1)) for g in rest_grads] + [jnp.zeros((n, 0), leaves[0].dtype)]
        return jnp.concatenate(blocks, axis=1), jnp.concatenate(flat, axis=1), out_to_loss, apart

    def step(params: Any, inputs: Any, labels: Any, factors: tuple) -> tuple[Any, Any, Any, Any]:
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
    entry = backend._steps.get_or_make(key, lambda: [_make_step(backend, apply, task, found, plan_),
                                                     [apply, ("kronecker-step", task, repr(plan_)), None], found])
    step, size = entry[0], backend._step_size(entry, n)
    dtype = np.dtype(prepared.dtype)  # factors made by NumPy (the same bits; no small JAX ops to compile)
    dtype = np.dtype(np.float32) if dtype.itemsize < 4 else dtype  # half precision: float32 products and features
    factors = jax.device_put(tuple(
        tuple(factor(d, width, seed=seed, checkpoint=checkpoint, index=block.index, side=side, dtype=dtype)
              for side, d, width in (("rows", block.layer.rows, block.k_rows),
                                     ("cols", block.layer.cols, block.k_cols)))
        for block in plan_.blocks), prepared.device)
    parts, rests, weights, apart = [], [], [], []
    for x, y, rows, padded in chunks(inputs, labels, n, size, backend.batch_size is None):  # padded to a bucket
        try:
            outputs = step(prepared.params, x, y, factors)
        except jax.errors.JAXTypeError as exc:
            raise not_jittable(exc) from None
        except Exception as exc:
            state_note(exc)
            raise
        apart.append(outputs[3])
        out, rest, out_to_loss = crop(outputs[:3], rows, padded)
        parts.append(out)
        rests.append(rest)
        weights.append(out_to_loss)
    check_rows_apart(apart, prepared.dtype)  # once a batch: one read on the host, not one a chunk
    out = jnp.concatenate(parts)
    if plan_.n_rest:
        rest = project(jnp.concatenate(rests), plan_.k_rest, seed=rest_seed(seed), checkpoint=checkpoint)
        out = jnp.concatenate([out, rest], axis=1)
    return out, jnp.concatenate(weights)
