"""The built-in tasks over sequences: causal language modeling, sequence-to-sequence and token classification.

One job: TRAK's margin and out-to-loss weight summed (averaged) over a sequence's counted positions, logits of
shape ``(n, sequence, vocabulary)``. Re-exported by ``trak_core.tasks``.
"""
from __future__ import annotations

from typing import Any

from ._namespace import wide_ids
from .errors import TrakTypeError, TrakValueError

__all__ = ["LanguageModeling", "Seq2SeqLanguageModeling", "TokenClassification"]


class LanguageModeling:
    """Causal language modeling: TRAK's margin summed over a sequence's predicted tokens.

    The model's output is ``(n, T, V)`` logits; labels are ``(n, T)`` token ids in Hugging Face's
    convention: the same positions as the inputs (the task shifts them: the logits at position ``t``
    predict token ``t + 1``), and ``-100`` marks positions that are not predicted (padding, prompts).
    With ``m_{t}`` the classification margin of token ``t + 1`` under the logits at ``t``
    (``logit_y - logsumexp_{j != y} logit_j``) and ``S`` the counted positions,

        f = sum_{t in S} m_t,        Q = mean_{t in S} (1 - p_t),   p_t = softmax(logits_t)_y.

    ``Q`` is the average of the per-token weights, exact when they are equal (see docs/estimator.md).
    A sequence with no counted token has ``f = 0`` and ``Q = 0``. Encoder-decoder models (T5, BART),
    whose logits at ``t`` predict ``labels[t]``, take ``Seq2SeqLanguageModeling`` (``"seq2seq"``).
    """

    name = "language_modeling"
    logits_ndim = 3
    ignore_index = -100
    shift = 1  # the logits at t predict labels[t + shift]

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        if labels.ndim != 2:
            raise TrakValueError(f"{self.name} labels must be (n, sequence length) token ids, got shape "
                                 f"{tuple(labels.shape)}")
        if not xp.isdtype(labels.dtype, "integral"):
            raise TrakTypeError(f"{self.name} labels must be integer token ids, got dtype {labels.dtype}")
        labels = wide_ids(labels, xp=xp)
        counted = labels != self.ignore_index
        if bool(xp.any(counted & ((labels < 0) | (labels >= n_outputs)))):
            what = "the classes" if self.name == "token_classification" else "the vocabulary"
            raise TrakValueError(f"{self.name} labels out of range: they must lie in [0, {n_outputs - 1}] ({what}) "
                                 f"or be {self.ignore_index} (not predicted)")

    def _margins(self, logits: Any, labels: Any, *, xp: Any) -> tuple[Any, Any, Any]:
        """Per-position margins ``(n, T - shift)``, probabilities of the label and the counted-position mask."""
        if logits.ndim != 3:
            raise TrakValueError(f"{self.name} needs (n, sequence length, vocabulary) logits, got shape "
                                 f"{tuple(logits.shape)}")
        n, length, vocab = logits.shape
        if labels.ndim != 2 or labels.shape[1] != length:
            what = ("the input length: labels are at the logits' own positions" if self.name == "token_classification"
                    else "the decoder's length: labels are the target sequence, the logits at t predict labels[t]"
                    if self.shift == 0 else "the input length: labels take the inputs' positions, and the task "
                    "shifts them")
            raise TrakValueError(f"{self.name} labels have shape {tuple(labels.shape)} but the logits have "
                                 f"{length} positions; labels must be (n, {length}), {what}")
        scores, targets = logits[:, :length - self.shift, :], wide_ids(labels[:, self.shift:], xp=xp)
        counted = targets != self.ignore_index
        safe = xp.where(counted, targets, xp.zeros_like(targets))
        flat = xp.reshape(scores, (n * (length - self.shift), vocab))
        ids = xp.reshape(safe, (-1,))
        from .tasks import TASKS  # the shared Classification (tasks.py imports this module)

        classification = TASKS["classification"]
        margins = xp.reshape(classification.output(flat, ids, xp=xp), (n, length - self.shift))
        q = xp.reshape(classification.out_to_loss(flat, ids, xp=xp), (n, length - self.shift))
        return margins, q, xp.astype(counted, logits.dtype)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        margins, _, counted = self._margins(logits, labels, xp=xp)
        # picked, not multiplied: an uncounted position's stand-in label 0 may be a token masked with -inf (-inf * 0)
        return xp.sum(xp.where(counted > 0, margins, xp.zeros_like(margins)), axis=1)

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        raise TrakTypeError(f"{self.name} has no hand-written output_grad; use a backend with autodiff "
                            "(torch, jax)")

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        _, q, counted = self._margins(logits, labels, xp=xp)
        counted = xp.astype(counted, q.dtype)  # q's float32 for half-precision logits: bfloat16 counts round from 257
        total = xp.sum(counted, axis=1)
        return xp.sum(q * counted, axis=1) / xp.where(total > 0, total, xp.ones_like(total))


class Seq2SeqLanguageModeling(LanguageModeling):
    """Sequence-to-sequence language modeling (encoder-decoder models: T5, BART, Marian): TRAK's margin summed
    over the target sequence's tokens.

    The model's output is the decoder's ``(n, T, V)`` logits; labels are the ``(n, T)`` target token ids in
    Hugging Face's convention: the logits at position ``t`` predict ``labels[t]`` (no shift: the decoder's inputs
    are the labels shifted right, which the torch backend makes with the model's
    ``prepare_decoder_input_ids_from_labels`` when a dict batch has no ``decoder_input_ids``), and ``-100``
    marks positions that are not predicted (padding). With ``m_t`` the classification margin of ``labels[t]``
    under the logits at ``t`` and ``S`` the counted positions,

        f = sum_{t in S} m_t,        Q = mean_{t in S} (1 - p_t),   p_t = softmax(logits_t)_{labels[t]}.
    """

    name = "seq2seq"
    shift = 0


class TokenClassification(LanguageModeling):
    """Token classification (tagging, named entities; ``*ForTokenClassification``): TRAK's margin summed over a
    sequence's labelled tokens.

    The model's output is ``(n, T, C)`` logits, one row of class scores per token; labels are ``(n, T)`` class
    indices at the same positions (no shift), ``-100`` where a token is not labelled (padding, special tokens,
    word pieces after the first). With ``m_t`` the classification margin of ``labels[t]`` under the logits at
    ``t`` and ``S`` the labelled positions,

        f = sum_{t in S} m_t,        Q = mean_{t in S} (1 - p_t),   p_t = softmax(logits_t)_{labels[t]}.
    """

    name = "token_classification"
    shift = 0
