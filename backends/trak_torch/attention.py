"""Attention masks and attention implementations of Hugging Face models in the torch backend.

One job: a dict batch's 2-D padding masks as the additive 4-D masks the backend hands the model
(``attention_bias``, ``model_masks``), the attention implementation each gradient path runs (``vmap`` needs eager
attention; the closed form runs the model's own, or SDPA), and the hint added to a model's error
when the replaced mask is the likely cause (``note_mask``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

__all__ = ["attention_bias", "model_masks", "attention_for_vmap", "attention_for_closed_form", "note_mask"]


def attention_bias(mask: Any, dtype: Any, *, causal: bool, keys_only: bool = False) -> Any:
    """A 2-D padding mask ``(n, T)`` (1 keep, 0 pad) as an additive ``(n, 1, T, T)`` mask in ``dtype``; with
    ``keys_only``, ``(n, 1, 1, T)``: one row for every query, as cross-attention needs (its queries are the
    decoder's positions, not the encoder's)."""
    import torch

    length = mask.shape[-1]
    keep = mask[:, None, None, :].bool()
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()[None, None]
    elif not keys_only:
        keep = keep.expand(-1, 1, length, length)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(keep, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def model_masks(kwargs: dict, dtype: Any, *, causal: bool, encoder_decoder: bool) -> dict:
    """A dict batch's 2-D ``attention_mask`` as an additive 4-D one: causal or bidirectional (``causal``); for an
    encoder-decoder model it is the encoder's padding, read by the encoder's self-attention and the decoder's
    cross-attention alike, so keys only. A ``decoder_attention_mask`` is handed over as it is (the model makes it
    causal, and ``vmap`` follows that)."""
    mask = kwargs.get("attention_mask")
    if getattr(mask, "ndim", 0) != 2:
        return kwargs
    return {**kwargs, "attention_mask": attention_bias(mask, dtype, causal=causal and not encoder_decoder,
                                                      keys_only=encoder_decoder)}


@contextmanager
def _attention(model: Any, allowed: tuple[str, ...], instead: str) -> Iterator[None]:
    """A Hugging Face model's attention set to ``instead`` for the duration unless it is one of ``allowed``: in its
    config and in every sub-model's (T5's encoder and decoder, CLIP's towers each read their own copy)."""
    configs = {id(config): config for config in (getattr(module, "config", None) for module in _modules(model))
               if getattr(config, "_attn_implementation", None) is not None}
    changed = [(config, config._attn_implementation) for config in configs.values()
               if config._attn_implementation not in allowed]
    for config, _ in changed:
        config._attn_implementation = instead
    try:
        yield
    finally:
        for config, before in changed:
            config._attn_implementation = before


def _modules(model: Any) -> list[Any]:
    modules = getattr(model, "modules", None)
    return list(modules()) if callable(modules) else [model]


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
