"""Models whose examples interact in eval mode, found once per checkpoint; their outputs taken one example at a time.

One job. Per-example gradients take each example alone (``vmap``, the one-example loop; the closed form is checked
against them), but the out-to-loss weights ``Q`` came from the batch's forward: in a model whose examples see each
other in eval mode (``BatchNorm(track_running_stats=False)`` normalizes with the batch's statistics) ``Q`` depended
on how the data was batched (1.4% off the one-example definition, scores 1% off, at batches of 2 to 8). The first
batch of two or more examples shows it (its first two rows together and alone); such a checkpoint's outputs are
taken one example at a time from then on, with a warning.
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["check_interaction", "one_by_one"]

log = logging.getLogger("trak_core")


def _row(inputs: Any, i: int) -> Any:
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t[i:i + 1], inputs)


def one_by_one(call: Any, inputs: Any, n: int) -> Any:
    """``call(rows)`` on each example alone, outputs joined along the first axis (pytrees of tensors joined leaf by
    leaf: a model's output object or dict)."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    outputs = [tree_flatten(call(_row(inputs, i))) for i in range(n)]
    spec = outputs[0][1]
    joined = [(torch.cat(leaves) if leaves[0].ndim else torch.stack(leaves))  # 0-d: a squeezed row of one
              if isinstance(leaves[0], torch.Tensor) else leaves[0] for leaves in zip(*(out[0] for out in outputs))]
    return tree_unflatten(joined, spec)


def check_interaction(logits_of: Any, prepared: Any, inputs: Any, n: int) -> None:
    """Once per checkpoint, on its first batch of two or more: ``logits_of(rows)`` of the first two examples together
    and each alone; where they differ by more than the backend's self-check tolerance (``closed_form.check_tolerance``:
    1e-2 on CUDA, whose TF32 convolutions may take another algorithm for one example than for two), it is marked
    (``prepared._interacting``) and its outputs are taken one example at a time from then on."""
    import torch
    from torch.utils._pytree import tree_map

    from .closed_form import check_tolerance

    state = prepared.__dict__
    if "_interacting" in state or n < 2:
        return
    state["_interacting"] = False
    try:
        with torch.no_grad():
            together = logits_of(tree_map(lambda t: t[:2], inputs)).double().reshape(-1)
            alone = torch.cat([logits_of(_row(inputs, i)).double().reshape(-1) for i in range(2)])
    except Exception:  # an example alone that the model cannot take: no check (the batch itself ran)
        return
    if together.shape != alone.shape:
        return
    finite = torch.isfinite(together) & torch.isfinite(alone)
    error = float((together - alone)[finite].norm() / alone[finite].norm().clamp_min(torch.finfo(torch.float64).tiny))
    tolerance = check_tolerance(prepared.dtype, prepared.device)
    if error > tolerance:
        with torch.no_grad():  # the same rows again: a model that draws random numbers differs from itself, which
            again = logits_of(tree_map(lambda t: t[:2], inputs)).double().reshape(-1)  # is refused elsewhere
        if float((again - together)[finite].norm() / together[finite].norm().clamp_min(1e-300)) > tolerance:
            return  # (looped.py: "draws random numbers in eval mode"), not taken for examples that interact
        state["_interacting"] = True
        log.warning("trak-core: the model's outputs for two examples together are %.2g off their outputs alone "
                    "(relative): its examples interact in eval mode (BatchNorm with track_running_stats=False?). "
                    "Gradients are of each example alone; its outputs and out-to-loss weights are now taken one "
                    "example at a time too (slower)", error)
