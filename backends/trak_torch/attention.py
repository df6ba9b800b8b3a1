"""Attention masks and attention implementations of Hugging Face models in the torch backend.

One job: a dict batch's 2-D padding mask as the additive 4-D mask the backend hands the model
(``attention_bias``), the attention implementation each gradient path runs (``vmap`` needs eager
attention; the closed form runs the model's own, or SDPA), and the hint added to a model's error
when the replaced mask is the likely cause (``note_mask``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

__all__ = ["attention_bias", "attention_for_vmap", "attention_for_closed_form", "note_mask"]


def attention_bias(mask: Any, dtype: Any, *, causal: bool) -> Any:
    """A 2-D padding mask ``(n, T)`` (1 keep, 0 pad) as an additive ``(n, 1, T, T)`` mask in ``dtype``."""
    import torch

    length = mask.shape[-1]
    keep = mask[:, None, None, :].bool()
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()[None, None]
    else:
        keep = keep.expand(-1, 1, length, length)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(keep, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


@contextmanager
def _attention(model: Any, allowed: tuple[str, ...], instead: str) -> Iterator[None]:
    """A Hugging Face model's attention set to ``instead`` for the duration unless it is one of ``allowed``."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before is None or before in allowed:
        yield
        return
    config._attn_implementation = instead
    try:
        yield
    finally:
        config._attn_implementation = before


def attention_for_vmap(model: Any) -> Iterator[None]:
    """Eager attention (vmap-friendly) for the duration, then the model's own again."""
    return _attention(model, ("eager",), "eager")


def attention_for_closed_form(model: Any) -> Iterator[None]:
    """The model's own attention if it is eager or SDPA (which take trak-core's additive 4-D mask), else SDPA."""
    return _attention(model, ("eager", "sdpa"), "sdpa")


def note_mask(exc: BaseException, inputs: Any, mode: str) -> None:
    """Add a hint to a model's error when trak-core had replaced the batch's 2-D ``attention_mask`` (``mode``: the
    backend's ``attention_mask`` setting)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mode != "pass" and getattr(mask, "ndim", 0) == 2 and hasattr(exc, "add_note"):
        exc.add_note("trak-core: the model was called with the batch's 2-D attention_mask turned into an "
                     "additive 4-D mask (TorchBackend(attention_mask='auto')). Models that read the 2-D mask "
                     "themselves (OPT's positions, Bloom's ALiBi) need TorchBackend(attention_mask='pass')")
