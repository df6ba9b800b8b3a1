"""Encoder-decoder language models (T5, BART, Marian) in the torch backend.

One job: what an encoder-decoder model needs beyond a decoder-only one. Its decoder's inputs are the labels
shifted right (Hugging Face's convention: a collator puts the targets under ``labels``, the model makes
``decoder_input_ids`` from them); its logits at position ``t`` predict ``labels[t]``, so it takes
``task="seq2seq"``, not ``"language_modeling"`` (which shifts the labels by one position, as causal models
need); its masks are made in :func:`trak_torch.attention.model_masks`.
"""
from __future__ import annotations

from typing import Any, Mapping

from trak_core.errors import TrakValueError

from .attention import bidirectional_model

__all__ = ["is_encoder_decoder", "check_task", "with_decoder_inputs"]

DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def is_encoder_decoder(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face encoder-decoder model (``config.is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def check_task(model: Any, task: Any, causal: bool = True) -> None:
    """Refuse a language-modeling task that does not fit a Hugging Face model: the causal task (labels shifted
    by one position) on an encoder-decoder model, or on a model that is not ``causal`` and is known to attend both
    ways (BERT, a ``*ForTokenClassification``: ``attention.bidirectional_model``); or ``"seq2seq"`` on a Hugging
    Face model that is not an encoder-decoder model (its logits at ``t`` predict token ``t + 1``)."""
    name = getattr(task, "name", None)
    config = getattr(model, "config", None)
    if name == "language_modeling" and is_encoder_decoder(model):
        raise TrakValueError(f"task 'language_modeling' shifts the labels by one position (a causal model's logits "
                             f"at t predict token t + 1), but {type(model).__name__} is an encoder-decoder model, "
                             "whose logits at t predict labels[t]: use task='seq2seq'")
    if name == "language_modeling" and not causal and bidirectional_model(model):
        raise TrakValueError(f"task 'language_modeling' shifts the labels by one position (a causal model's logits "
                             f"at t predict token t + 1), but {type(model).__name__} is not a causal model (its "
                             "attention is bidirectional): for labels at the logits' own positions (token "
                             "classification: tagging, NER) use task='token_classification'; if the model is causal "
                             "after all, pass TorchBackend(attention_mask='causal')")
    if name == "seq2seq" and hasattr(config, "is_encoder_decoder") and not is_encoder_decoder(model):
        raise TrakValueError(f"task 'seq2seq' is for encoder-decoder models (config.is_encoder_decoder), and "
                             f"{type(model).__name__} is not one; a causal language model takes "
                             "task='language_modeling'")


def with_decoder_inputs(model: Any, inputs: Any, labels: Any, task: Any = None) -> Any:
    """``inputs`` with ``decoder_input_ids`` made from ``labels`` by the model
    (``prepare_decoder_input_ids_from_labels``: shifted right, the start token first, ``-100`` as padding) when
    ``model`` is an encoder-decoder model, the dict batch has no decoder inputs and the labels are token sequences
    ``(n, T)``; otherwise ``inputs`` (labels ``(n,)`` of a classifier: the model makes its own decoder inputs, and
    ``task="seq2seq"`` with such labels is an error)."""
    if not isinstance(inputs, Mapping) or not is_encoder_decoder(model) or any(k in inputs for k in DECODER_INPUTS):
        return inputs
    if getattr(labels, "ndim", 0) != 2 or labels.is_floating_point() or getattr(task, "name", None) == \
            "token_classification":  # not target token sequences (a classifier's labels, per-token classes)
        if getattr(task, "name", None) == "seq2seq":
            raise TrakValueError(f"an encoder-decoder model's labels must be (n, target length) token ids, from "
                                 f"which its decoder_input_ids are made; got shape "
                                 f"{tuple(getattr(labels, 'shape', ()))}")
        return inputs  # a classifier on an encoder-decoder model (BART's makes its decoder inputs from input_ids)
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:
        raise TrakValueError(f"{type(model).__name__} is an encoder-decoder model without "
                             "prepare_decoder_input_ids_from_labels; put the decoder's inputs in the batch as "
                             "'decoder_input_ids' (the labels shifted right, the decoder start token first)")
    return {**inputs, "decoder_input_ids": prepare(labels=labels)}
