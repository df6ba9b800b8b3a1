"""Whether trak-core's 4-D attention mask keeps a Hugging Face model's outputs, checked on its first batches.

One job. Under ``attention_mask="auto"`` a dict batch's 2-D padding mask becomes an additive 4-D one
(``attention.model_masks``), causal or bidirectional by what the model says of itself. A model that builds its
own mask on other terms (CLIP's text tower: causal, yet neither a decoder nor ``*ForCausalLM``; OWL-ViT's,
GroupViT's, CLIPSeg's alike) computed another function with it: gradients 140% off. Here the model's per-example
outputs under the 4-D mask are compared with its own (the 2-D mask as it is) on the first batch, and on the first
batch with padding; where they differ, or the model raises with the 4-D mask and runs with its own (OPT's
positions, Bloom's ALiBi, XLM's, FlauBERT's, OpenAI-GPT's, LayoutLM's, YOSO's masks: an audit's sweep of 68
families), the model gets its 2-D mask as it is from then on (as ``"pass"``), with a warning.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Mapping

from .attention import attention_for_closed_form, own_mask_models, reads_own_mask
from .looped import eval_mode

__all__ = ["check_replaced_mask"]

log = logging.getLogger("trak_core")

_checked: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()  # model -> "unpadded" or "padded"


def check_replaced_mask(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any) -> None:
    """Compare the task outputs of ``inputs`` under trak-core's 4-D mask and the model's own; adopt the model's own
    mask for ``model`` (``attention.own_mask_models``) where they differ by more than ``sqrt(eps)`` of the dtype,
    relative, and its own outputs are finite. Done once per model, and again on its first batch with padding."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if backend.attention_mask != "auto" or getattr(mask, "ndim", 0) != 2 or reads_own_mask(model):
        return
    import array_api_compat.torch as xp
    import torch

    done = _checked.get(model)
    if done == "padded":  # before reading the mask: no device sync on every batch once done
        return
    padded = bool((mask == 0).any())
    if done == "unpadded" and not padded:
        return
    from .outputs import check_labels

    causal = backend._causal(model)
    with eval_mode(model), attention_for_closed_form(model), torch.no_grad():
        try:
            logits, failed = backend._logits(model, prepared, inputs, task, causal=causal), None
        except Exception as exc:  # a model that cannot take a 4-D mask (OPT's positions, Bloom's ALiBi, XLM's)
            logits, failed = None, exc
        own_mask_models.add(model)
        try:
            own = backend._logits(model, prepared, inputs, task, causal=causal)
        except Exception:  # the model cannot take its own 2-D mask here: trak-core's, as before
            own = None
        finally:
            own_mask_models.discard(model)
        if failed is not None and own is None:
            raise failed
        check_labels(task, labels, own if logits is None else logits)
        theirs = None if own is None else task.output(own, labels, xp=xp)
        ours = None if logits is None else task.output(logits, labels, xp=xp)
    _checked[model] = "padded" if padded else "unpadded"
    if theirs is None:
        return
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if ours is None:
        own_mask_models.add(model)
        log.warning("trak-core: %s raised with trak-core's 4-D attention mask (%s: %s) and runs with its own: its 2-D "
                    "attention_mask is handed over as it is from now on (TorchBackend(attention_mask='pass') says so "
                    "up front)", kind, type(failed).__name__, str(failed).splitlines()[0][:120] if str(failed) else "")
        return
    ours, theirs = ours.double(), theirs.double()
    if not bool(torch.isfinite(theirs).all()):  # the model's own handling gives NaN (fully masked rows): ours
        return
    error = float((ours - theirs).norm() / theirs.norm().clamp_min(torch.finfo(torch.float64).tiny))
    if error > torch.finfo(prepared.dtype).eps ** 0.5:
        own_mask_models.add(model)
        log.warning("trak-core: %s's outputs under trak-core's 4-D attention mask are %.2g off its own (relative): "
                    "it builds its own mask; its 2-D attention_mask is handed over as it is from now on "
                    "(TorchBackend(attention_mask='pass') says so up front)", kind, error)
