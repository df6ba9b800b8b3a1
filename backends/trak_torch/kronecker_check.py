"""The factorized features of a checkpoint's first example, checked against its dense gradient block by block.

One job: make a weight that :mod:`trak_torch.kronecker` follows only in part (also used outside its module, through
``F.linear`` or a slice it does not see) an error that names it, not a wrong answer.
"""
from __future__ import annotations

import math
from typing import Any

from trak_core.errors import TrakValueError

__all__ = ["check_plan"]


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
               causal: bool, features: Any) -> None:
    """Check the first example's layer features against its dense gradient, block by block (``state``: the
    checkpoint's ``kronecker.Factorized``).

    A weight that is also used outside its module (``F.linear(x, module.weight)`` elsewhere) would be
    counted only in part: this raises a ``TrakValueError`` naming it instead.
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
        dense = _dense_block(block, pair, weight, bias, state.dtype)
        # the same sums of absolute values: rounding grows with them when the signed sums cancel (features much
        # smaller than their terms, as with the non-negative inputs of a trained ReLU layer), a missing use does not
        magnitude = _dense_block(block, (pair[0].abs(), pair[1].abs()), weight.abs(),
                                 None if bias is None else bias.abs(), state.dtype)
        got = features[0, block.start:block.start + block.k].to(state.dtype)
        scale = max(float(torch.linalg.vector_norm(dense)), float(torch.finfo(state.dtype).tiny))
        error = float(torch.linalg.vector_norm(got - dense)) / scale
        allowed = tolerance * max(1.0, float(torch.linalg.vector_norm(magnitude)) / scale)
        if error > allowed and float(torch.linalg.vector_norm(dense)) > 0 or not math.isfinite(error):
            raise TrakValueError(f"proj_type='kronecker': the features of layer {layer.name!r} differ from its "
                                 f"gradient's projection (relative error {error:.2e}, rounding allows {allowed:.1e}): "
                                 "the weight is probably also used outside its module (e.g. through F.linear or a "
                                 "slice). Leave it out with the backend's params=, or use proj_type='rademacher'")
