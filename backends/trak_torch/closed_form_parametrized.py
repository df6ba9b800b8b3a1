"""The closed form's layers whose weight is a parametrization of the attributed parameters (``weight_norm``).

One job: let :mod:`trak_torch.closed_form` follow a ``Linear`` or ``Conv1d``/``Conv2d`` whose ``weight`` is computed by
``torch.nn.utils.parametrize`` from its ``parametrizations.weight.original*`` parameters (the positional convolution
of Wav2Vec2, HuBERT, SEW and their kin is ``weight_norm``'d). The layer's per-example weight gradients come out of
the closed form as for any layer, in a buffer of the weight's shape (under a name of its own, ``<module>.weight``, not
a parameter's); the parametrization's vector-Jacobian product at the checkpoint's parameters, batched over the
examples, maps them to the originals'. Without this, the originals are no layer's weights, the closed form is refused,
and these models took ``vmap``, which cannot run their in-place masking, so one example at a time (6-10x slower).
"""
from __future__ import annotations

import warnings
from typing import Any

__all__ = ["parametrized_weights", "to_originals"]


def parametrized_weights(model: Any, prepared: Any, kind: Any) -> dict[Any, tuple[str, tuple[str, ...], str | None]]:
    """``module -> (weight name, original names, bias name or None)`` for the modules of a closed-form ``kind``
    (``"linear"``, ``"conv"``) whose ``weight`` is parametrized from attributed parameters only (all of its originals
    attributed); the bias if it is attributed."""
    from torch.nn.utils import parametrize

    found = {}
    for prefix, module in model.named_modules():
        if kind(module) not in ("linear", "conv") or not parametrize.is_parametrized(module, "weight"):
            continue
        dot = f"{prefix}." if prefix else ""
        originals = tuple(f"{dot}parametrizations.weight.{name}"
                          for name, _ in module.parametrizations.weight.named_parameters())
        if originals and all(name in prepared.params for name in originals):
            bias = f"{dot}bias" if f"{dot}bias" in prepared.params else None
            found[module] = (f"{dot}weight", originals, bias)
    return found


def to_originals(module: Any, originals: dict[str, Any], weight_grads: Any) -> dict[str, Any]:
    """The originals' per-example gradients ``name -> (n, *shape)`` from the weight's ``(n, *weight.shape)``: the
    parametrization's vector-Jacobian product at ``originals`` (``name -> tensor``, the checkpoint's values), batched
    over the examples (one at a time where ``vmap`` cannot take the parametrization)."""
    import torch
    from torch.func import functional_call, vjp, vmap

    parametrization = module.parametrizations.weight
    keys = [name.rsplit(".", 1)[1] for name in originals]
    values = [tensor.detach() for tensor in originals.values()]

    def weight(*tensors: Any) -> Any:
        return functional_call(parametrization, dict(zip(keys, tensors)), ())

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # vmap's batching fallback
        _, pullback = vjp(weight, *values)  # (weight_norm's backward): still one call for the batch
        try:
            grads = vmap(pullback)(weight_grads)
        except (RuntimeError, NotImplementedError):
            rows = [pullback(row) for row in weight_grads]
            grads = tuple(torch.stack(parts) for parts in zip(*rows))
    return dict(zip(originals, grads))
