"""Attention masks and attention implementations of Hugging Face models in the torch backend.

One job: a dict batch's 2-D padding masks as the additive 4-D masks the backend hands the model
(``attention_bias``, ``model_masks``), the attention implementation each gradient path runs (``vmap`` needs eager
attention, or a float64 model's own SDPA; the closed form runs the model's own, or SDPA), and the hint added to a
model's error when the replaced mask is the likely cause (``note_mask``).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, ContextManager, Iterator, Mapping

__all__ = ["attention_bias", "model_masks", "uncounted_pad_predictions", "causal_model", "hugging_face_model",
           "attention_for_vmap", "attention_for_closed_form", "note_mask", "vmap_keeps_sdpa"]


def attention_bias(mask: Any, dtype: Any, *, causal: bool, keys_only: bool = False, window: int | None = None) -> Any:
    """A 2-D padding mask ``(n, T)`` (1 keep, 0 pad) as an additive ``(n, 1, T, T)`` mask in ``dtype``; with
    ``keys_only``, ``(n, 1, 1, T)``: one row for every query, as cross-attention needs (its queries are the
    decoder's positions, not the encoder's). ``window``: a causal sliding window, query ``i`` sees keys
    ``i - window < j <= i`` (Hugging Face's). A query that would see no key (left padding under a causal mask)
    sees itself: a fully masked row is NaN or implementation-dependent (eager and SDPA differ), and its output
    reaches nothing counted (``uncounted_pad_predictions``)."""
    import torch

    length = mask.shape[-1]
    keep = mask[:, None, None, :].bool()
    if causal:
        positions = torch.arange(length, device=mask.device)
        allowed = positions[None, :] <= positions[:, None]
        if window is not None:
            allowed = allowed & (positions[:, None] - positions[None, :] < window)
        keep = keep & allowed[None, None]
    elif not keys_only:
        keep = keep.expand(-1, 1, length, length)
    if not keys_only:
        keep = keep | (~keep.any(dim=-1, keepdim=True) & torch.eye(length, dtype=torch.bool, device=mask.device))
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(keep, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


_ALTERNATING = ("gemma2", "gemma3", "gemma3_text", "cohere2")  # sliding and full layers alternate


# Hugging Face model types that read a batch's 2-D attention_mask themselves (relative positions, their own sparse
# or segment attention, or a mask over raw audio samples that their feature encoder downsamples: turned into an
# (n, 1, L, L) mask it would take n L^2 numbers): "auto" hands them the 2-D mask as it is, as "pass" does
OWN_MASK = frozenset({"deberta", "deberta-v2", "xlnet", "longformer", "funnel", "esm", "wav2vec2", "hubert", "wavlm",
                      "clip", "clip_text_model",  # causal text towers that build their own causal mask:
                      "owlvit", "owlvit_text_model", "owlv2", "owlv2_text_model", "groupvit", "groupvit_text_model",
                      "clipseg", "clipseg_text_model", "xclip", "xclip_text_model",  # others: mask_check finds them
                      "sew", "sew-d", "unispeech", "unispeech-sat", "data2vec-audio", "wav2vec2-conformer",
                      "wav2vec2-bert"})


own_mask_models: "weakref.WeakSet[Any]" = weakref.WeakSet()  # models whose outputs the 4-D mask changed
# (``mask_check.check_replaced_mask``): they get their 2-D mask as it is from then on


def reads_own_mask(model: Any) -> bool:
    """Whether ``model`` gets its 2-D ``attention_mask`` as it is under ``attention_mask="auto"``: it is not a
    Hugging Face model and holds none (a user's module reads its own mask; an additive 4-D one crashed a masked
    mean pooling), the Hugging Face model is of a type in ``OWN_MASK``, or its outputs under the 4-D mask were
    found to differ from its own (``own_mask_models``)."""
    if model in own_mask_models:
        return True
    model_type = getattr(getattr(hugging_face_model(model), "config", None), "model_type", None)
    return model_type is None or model_type in OWN_MASK


def hugging_face_model(model: Any) -> Any:
    """``model`` if it has a Hugging Face ``config``, else its first submodule that has one (a model held by a
    user's wrapper or by ``peft.get_peft_model``), else ``model``."""
    if getattr(getattr(model, "config", None), "model_type", None) is not None:
        return model
    for module in _modules(model):
        if getattr(getattr(module, "config", None), "model_type", None) is not None:
            return module
    return model


def bidirectional_model(model: Any) -> bool:
    """Whether ``model`` is, or holds, a Hugging Face model known to attend both ways: a ``*ForTokenClassification``
    or ``*ForMaskedLM``, or one whose transformers attention modules set ``is_causal = False`` (BERT, RoBERTa,
    ELECTRA, DistilBERT). Models that say nothing either way (BLOOM, MPT, Mamba) are not."""
    if any(cls.__name__.endswith(("ForTokenClassification", "ForMaskedLM"))
           for cls in type(hugging_face_model(model)).__mro__):
        return True
    return any(getattr(module, "is_causal", None) is False and type(module).__module__.startswith("transformers.")
               for module in _modules(model))


def causal_model(model: Any) -> bool:
    """Whether ``model`` is, or holds, a Hugging Face decoder-only model whose attention is causal: a
    ``*ForCausalLM``/``*LMHeadModel``, a config with ``is_decoder``, or attention modules of transformers with
    ``is_causal`` set (Llama's, GPT-2's, Mistral's, also under ``*ForSequenceClassification``); wrappers included (a
    ``PeftModel`` made without ``task_type``, a user's module). An encoder-decoder model (T5, BART) is not: its
    encoder's mask is bidirectional and its decoder makes its own causal mask."""
    for module in _modules(model):  # pre-order: an encoder-decoder model comes before its decoder stack
        config = getattr(module, "config", None)
        if getattr(config, "is_encoder_decoder", False) is True:
            return False
        if bool(getattr(config, "is_decoder", False)) or any(  # the class or one it derives from (a user's subclass)
                cls.__name__.endswith(("ForCausalLM", "LMHeadModel")) for cls in type(module).__mro__):
            return True
        if getattr(module, "is_causal", None) is True and type(module).__module__.startswith("transformers."):
            return True
    return False


def _layer_masks(model: Any, causal: bool) -> dict[str, int | None] | None:
    """The mask each kind of attention layer of a Hugging Face model needs, as ``{layer type: window}``; ``None``
    for one causal or bidirectional mask without a window (every other model)."""
    from trak_core.errors import TrakValueError

    config = getattr(hugging_face_model(model), "config", None)
    if getattr(config, "model_type", None) is None:  # a model's own config, not Hugging Face's: no windows read
        return None
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    types = getattr(config, "layer_types", None)
    kinds = set(types) if isinstance(types, (list, tuple)) and types else None
    if kinds is None and window is not None and getattr(config, "model_type", "") in _ALTERNATING:
        raise TrakValueError(f"this {config.model_type} config has a sliding window but no layer_types (an older "
                             "transformers): which layers slide is not known here. Upgrade transformers, or pass "
                             "TorchBackend(attention_mask='pass')")
    if kinds is not None and not kinds <= {"full_attention", "sliding_attention"}:
        raise TrakValueError(f"the model's layers use attention kinds {sorted(kinds)}; trak-core builds masks for "
                             "'full_attention' and 'sliding_attention' only: pass TorchBackend(attention_mask='pass')")
    sliding = window is not None and (kinds is None or "sliding_attention" in kinds)
    if not sliding:
        return None
    if not causal:
        raise TrakValueError("the model has sliding-window attention and its 2-D attention_mask was to become a "
                             "bidirectional mask, which trak-core does not build with windows: for a decoder-only "
                             "model pass TorchBackend(attention_mask='causal'), else "
                             "TorchBackend(attention_mask='pass')")
    if kinds is None:  # every layer slides (Mistral): one mask, which the model uses as it is
        return {"": int(window)}
    return {kind: int(window) if kind == "sliding_attention" else None for kind in kinds}


def model_masks(kwargs: dict, dtype: Any, *, causal: bool, encoder_decoder: bool, model: Any = None) -> dict:
    """A dict batch's 2-D ``attention_mask`` as an additive 4-D one: causal or bidirectional (``causal``); for an
    encoder-decoder model it is the encoder's padding, read by the encoder's self-attention and the decoder's
    cross-attention alike, so keys only. A ``decoder_attention_mask`` is handed over as it is (the model makes it
    causal, and ``vmap`` follows that). A model with sliding-window layers (Mistral, Gemma 2, Qwen2 with
    ``use_sliding_window``) gets windowed masks: one for a model whose layers all slide, else one per layer type
    (``{"full_attention": ..., "sliding_attention": ...}``, which such models take as they are)."""
    mask = kwargs.get("attention_mask")
    if getattr(mask, "ndim", 0) != 2:
        return kwargs
    if encoder_decoder:
        return {**kwargs, "attention_mask": attention_bias(mask, dtype, causal=False, keys_only=True)}
    layers = _layer_masks(model, causal)
    if layers is None:
        return {**kwargs, "attention_mask": attention_bias(mask, dtype, causal=causal)}
    masks = {kind: attention_bias(mask, dtype, causal=True, window=window) for kind, window in layers.items()}
    return {**kwargs, "attention_mask": masks[""] if "" in masks else masks}


def uncounted_pad_predictions(inputs: Any, labels: Any, shift: int) -> Any:
    """``labels`` with ``-100`` where the position that predicts them is padding before the first real token (left
    padding): the first real token is "predicted" there by the last pad, a query that attends to no context (its
    output is NaN or implementation-dependent); Hugging Face's loss counts it, trak-core does not. Padding after
    the last real token (right padding) sees the sequence, and its labels count as in the model's loss."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if shift != 1 or getattr(mask, "ndim", 0) != 2 or getattr(labels, "ndim", 0) != 2 or \
            labels.shape != mask.shape or labels.is_floating_point():
        return labels
    import torch

    leading = mask.cumsum(dim=1) == 0  # padding before the first real token: a query that sees no key
    return torch.cat([labels[:, :1], labels[:, 1:].masked_fill(leading[:, :-1], -100)], dim=1)  # no device sync


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


def attention_for_vmap(model: Any, dtype: Any = None) -> ContextManager[None]:
    """Eager attention (vmap-friendly) for the duration, then the model's own again. A float64 model keeps SDPA
    if it is its own: Hugging Face's eager attention takes its softmax in float32 (float64 gradients of Llama,
    Mistral, Qwen2, Phi, GPT-NeoX 3e-8 to 7e-8 off, and NaN for OPT's own left-padding masks), and SDPA in float64
    runs PyTorch's math kernel, which vmap batches."""
    import torch

    return _attention(model, ("eager", "sdpa") if dtype == torch.float64 else ("eager",), "eager")


def vmap_keeps_sdpa(model: Any, dtype: Any) -> bool:
    """Whether ``attention_for_vmap(model, dtype)`` leaves some (sub-)model in SDPA (a float64 model whose own is)."""
    import torch

    return dtype == torch.float64 and any(getattr(getattr(module, "config", None), "_attn_implementation", None)
                                          == "sdpa" for module in _modules(model))


def attention_for_closed_form(model: Any) -> ContextManager[None]:
    """The model's own attention if it is eager or SDPA (which take trak-core's additive 4-D mask), else SDPA."""
    return _attention(model, ("eager", "sdpa"), "sdpa")


def note_mask(exc: BaseException, inputs: Any, mode: str, model: Any = None, as_is: Any = None) -> None:
    """Add a hint to a model's error when trak-core had replaced the batch's 2-D ``attention_mask`` (``mode``: the
    backend's ``attention_mask`` setting), unless ``as_is()`` (the same call with the 2-D mask as it is) fails too:
    then the error is the model's own (CodeGen's rotary size), not the mask's."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if mode != "pass" and getattr(mask, "ndim", 0) == 2 and hasattr(exc, "add_note") and \
            not (mode == "auto" and reads_own_mask(model)) and "without overflow" not in str(exc):  # a dtype's
        if as_is is not None:
            try:
                import torch

                with torch.no_grad():
                    as_is()
            except Exception:
                return
        exc.add_note("trak-core: the model was called with the batch's 2-D attention_mask turned into an "
                     "additive 4-D mask (TorchBackend(attention_mask='auto')). Models that read the 2-D mask "
                     "themselves (OPT's positions, Bloom's ALiBi) need TorchBackend(attention_mask='pass')")
