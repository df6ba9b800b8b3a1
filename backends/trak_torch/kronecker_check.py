"""The factorized features of a checkpoint's first example, checked against its dense gradient block by block.

One job: make a weight that :mod:`trak_torch.kronecker` follows only in part (also used outside its module, through
``F.linear`` or a slice it does not see) an error that names it, not a wrong answer. Two checks: the first example's
features against its dense gradient, block by block (rows a batched pass misread, a use outside the module that
is large enough to show); and, on the whole batch, a torch function mode that watches every factorized weight
(:mod:`trak_torch.closed_form_outside`): an op given one while none of its modules runs is a use the factorized
features miss, however small, in whichever example (a use that depends on the data may skip the first).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

from trak_core.errors import TrakValueError, half_precision_hint
from trak_core.notices import warn

__all__ = ["check_once", "check_plan"]


def _dense_block(block: Any, pair: tuple[Any, Any], grad_weight: Any, grad_bias: Any | None, dtype: Any) -> Any:
    """A block's features from one example's dense gradient: ``P_rows^T [W | b] P_cols`` (kept, scaled)."""
    import torch

    g = grad_weight.reshape(grad_weight.shape[0], -1).to(dtype)
    if grad_bias is not None:
        g = torch.cat([g, grad_bias.to(dtype)[None, :]], 0) if block.layer.bias_side == "rows" else \
            torch.cat([g, grad_bias.to(dtype)[:, None]], 1)
    rows, cols = pair
    return (rows.T @ g @ cols).reshape(-1)[:block.k] * (1.0 / math.sqrt(block.k))


def check_plan(backend: Any, model: Any, prepared: Any, state: Any, inputs: Any, labels: Any, task: Any,
               causal: bool, features: Any, lenient: bool = False) -> None:
    """Check the first example's layer features against its dense gradient, block by block (``state``: the
    checkpoint's ``kronecker.Factorized``).

    A weight that is also used outside its module (``F.linear(x, module.weight)`` elsewhere) would be
    counted only in part: this raises a ``TrakValueError`` naming it instead. ``lenient``: a block off by more than
    the rounding allowance is a warning, not an error (half precision under ``vmap``, where both sides are that
    far from the float64 gradient: bfloat16 EfficientNet's squeeze-excitation blocks 5-23%; the watch over the
    batch's ops has found no use outside a module, and ``vmap`` reads no rows wrong); non-finite features are
    always an error. Uses outside a module on any example of the batch: ``watch_outside_uses``, which the caller
    runs first, once (wrong on any path, they are not a reason to take the features again through ``vmap``).
    """
    import torch
    from torch.utils._pytree import tree_map

    from .closed_form import check_tolerance
    from .looped import batch_norm_layout

    names = {name for block in state.plan.blocks for name in (block.layer.name, block.layer.bias) if name}
    params = {name: t.detach().clone().requires_grad_(name in names) for name, t in prepared.params.items()}
    with torch.enable_grad(), batch_norm_layout(model):
        value = backend.example_output(model, prepared, params, tree_map(lambda t: t[:1], inputs), labels[:1], task,
                                       causal)
        chosen = [name for name in params if name in names]
        grads = dict(zip(chosen, torch.autograd.grad(value, [params[name] for name in chosen], allow_unused=True)))
    # the model's precision, not the features' (float32 for a half-precision model): its forward and backward round
    tolerance = check_tolerance(prepared.dtype, prepared.device)
    for block, pair in zip(state.plan.blocks, state.factors):
        layer = block.layer
        weight = grads[layer.name]
        if weight is None:
            weight = torch.zeros_like(prepared.params[layer.name])
        bias = None
        if layer.bias is not None:
            bias = grads[layer.bias] if grads[layer.bias] is not None else torch.zeros_like(prepared.params[layer.bias])
        got = features[0, block.start:block.start + block.k].to(state.dtype)
        if _unchecked(layer.name, torch.cat([weight.reshape(-1), bias.reshape(-1)]) if bias is not None else weight,
                      got, prepared.dtype):
            continue
        dense = _dense_block(block, pair, weight, bias, state.dtype)
        # the terms' size: rounding grows with it when the signed sums cancel (features much smaller than their
        # terms, as with the non-negative inputs of a trained ReLU layer), a missing use does not. Their root sum of
        # squares (how rounding adds up over random signs) with a margin of 10, and never more than their sum of
        # absolute values, which alone grew as the square root of a block's size (x159 for a 512 x 128 table:
        # at half precision's 1e-2, a 62% error passed)
        absolute = _dense_block(block, (pair[0].abs(), pair[1].abs()), weight.abs(),
                                None if bias is None else bias.abs(), state.dtype)
        squares = _dense_block(block, (pair[0].square(), pair[1].square()), weight.to(state.dtype).square(),
                               None if bias is None else bias.to(state.dtype).square(), state.dtype)
        root = math.sqrt(float(squares.clamp(min=0).sum()) / math.sqrt(block.k))
        scale = max(float(torch.linalg.vector_norm(dense)), float(torch.finfo(state.dtype).tiny))
        error = float(torch.linalg.vector_norm(got - dense)) / scale
        terms = min(float(torch.linalg.vector_norm(absolute)), 10.0 * root)
        allowed = tolerance * max(1.0, terms / scale)
        if error > allowed and float(torch.linalg.vector_norm(dense)) > 0 and math.isfinite(error) and lenient:
            warn(f"proj_type='kronecker': in {prepared.dtype}, the first example's features of layer "
                 f"{layer.name!r} are {error:.2e} from its {prepared.dtype} gradient's projection (more than "
                 f"the {allowed:.1e} rounding allows; no use of it outside its module was seen): half "
                 "precision's rounding and underflow, which both sides carry, can be that large; a float32 "
                 "model checks this exactly", RuntimeWarning)
            return
        if error > allowed and float(torch.linalg.vector_norm(dense)) > 0 or not math.isfinite(error):
            raise TrakValueError(f"proj_type='kronecker': the features of layer {layer.name!r} differ from its "
                                 f"gradient's projection (relative error {error:.2e}, rounding allows {allowed:.1e}): "
                                 "the weight is probably also used outside its module (e.g. through F.linear or a "
                                 "slice), or the layer runs inside torch.utils.checkpoint (gradient checkpointing "
                                 "written in forward), whose recomputation the factorized path cannot follow. Leave "
                                 "the weight out with the backend's params=, call the layer without checkpoint for "
                                 "attribution, or use proj_type='rademacher'")


class NotFiniteGradient(TrakValueError):
    """The first example's own gradient is not finite: no path gives finite features, so none is tried."""


def _unchecked(layer: str, dense: Any, got: Any, dtype: Any) -> bool:
    """Whether the block of ``layer`` cannot be checked: its dense gradient ``dense`` (in the model's ``dtype``)
    holds NaN or inf. In float16, where the factorized features ``got`` (made in float32 from the layer's inputs
    and output gradients) are finite, a warning says so (float16's range, not the features, failed); otherwise
    the error names the gradient (its NaN made the comparison's error NaN, blamed on a use outside the module)."""
    import torch

    if bool(torch.isfinite(dense).all()):
        return False
    info = torch.finfo(dtype)
    hint = half_precision_hint(dtype, info)
    if hint and bool(torch.isfinite(got).all()):
        warn(f"proj_type='kronecker': the first example's {dtype} gradient of layer {layer!r} overflows {dtype} "
             f"(largest finite value {float(info.max):.5g}), so its factorized features, made in float32, could not "
             "be checked against it; uses of the weight outside its module were still watched for. A float32 model "
             "checks this", RuntimeWarning)
        return True
    raise NotFiniteGradient(f"proj_type='kronecker': the first example's gradient of layer {layer!r} holds NaN or "
                            f"inf; check the inputs (NaN/inf values) and the checkpoint's weights{hint}")


def watch_outside_uses(backend: Any, model: Any, prepared: Any, state: Any, inputs: Any, causal: bool) -> None:
    """Run the batch's forward under a watch over every factorized weight and bias: an op given one while none of
    the modules whose calls are its block's uses runs (``h @ embed.weight.T`` beside the lookup) raises a
    ``TrakValueError`` naming it."""
    import torch

    from .closed_form import NotPerExample
    from .closed_form_outside import outside_uses
    from .kronecker_functional import no_fast_path

    attention = list(state.functional.attention) if state.functional else []
    owners: dict[str, list[Any]] = {}
    for use in state.uses:
        modules = [use.module] if not use.function else _owners(model, use.weight, attention)
        for name in (use.weight, use.bias):
            if name:
                owners.setdefault(name, []).extend(modules)
    params = {**prepared.params, **prepared.frozen}
    try:
        with torch.no_grad(), no_fast_path(bool(attention)), \
                outside_uses(owners, params, who="the factorized projection"):
            backend._call(model, params, inputs, causal=causal)
    except NotPerExample as exc:
        raise TrakValueError(f"proj_type='kronecker': {exc} (on the checkpoint's first batch): its features would "
                             "miss that part of its gradient. Leave it out with the backend's params=, or use "
                             "proj_type='rademacher'") from None


def _owners(model: Any, name: str, attention: list[Any]) -> list[Any]:
    """The modules whose calls use the parameter ``name`` through a function: every module that holds it (an
    ``Embedding`` subclass calling ``F.embedding``, BART's encoder and decoder tables tied to ``model.shared``, an
    ``nn.MultiheadAttention``'s ``in_proj_weight``) and, for an attention's ``out_proj``, that attention, whose
    ``forward`` uses it."""
    path, _, attribute = name.rpartition(".")
    try:
        holder = model.get_submodule(path)
    except AttributeError:
        return []
    tensor = holder._parameters.get(attribute)
    found = [module for module in model.modules()
             if tensor is not None and any(value is tensor for value in module._parameters.values())] or [holder]
    parent = path.rpartition(".")[0]
    try:
        outer = model.get_submodule(parent) if path else None
    except AttributeError:
        outer = None
    if outer is not None and any(outer is known for known in attention):
        found.append(outer)
    return found


def check_once(backend: Any, model: Any, prepared: Any, state: Any, inputs: Any, labels: Any, task: Any,
               causal: bool, features: Any, run: Callable[[], Any]) -> Any:
    """A checkpoint's first factorized batch checked against its dense gradient; its features, maybe recomputed.

    Uses outside a module are looked for first (wrong on any path), then ``check_plan`` runs under the
    attention of the path the features took. A batched pass that misread a layer's rows (positions
    without a batch dimension) switches the checkpoint to vmap: ``run`` computes the features again and
    they are checked again. ``state.checked`` is set once the path is chosen (after a first batch of one
    example, computed alone, it is chosen on the next batch and checked there).
    """
    import torch

    from .attention import attention_for_closed_form, attention_for_vmap

    batched = state.batched is not False  # None: a first batch of one example, computed alone
    path = (lambda: attention_for_closed_form(model)) if batched else \
        (lambda: attention_for_vmap(model, prepared.dtype))  # the attention of the features' path
    half = torch.finfo(prepared.dtype).bits < 32  # rounding as large as a missing use: warned of
    with path():
        watch_outside_uses(backend, model, prepared, state, inputs, causal)
    try:
        with path():
            check_plan(backend, model, prepared, state, inputs, labels, task, causal, features,
                       lenient=half and not batched)
    except TrakValueError as exc:
        if not state.batched or isinstance(exc, NotFiniteGradient):
            raise
        logging.getLogger("trak_core").info("torch backend: factorized features through vmap: the batched pass's "
                                            "differ from the dense gradient's (%s)", exc)
        state.batched = False
        features = run()
        with attention_for_vmap(model, prepared.dtype):
            check_plan(backend, model, prepared, state, inputs, labels, task, causal, features, lenient=half)
    state.checked = state.batched is not None
    return features
