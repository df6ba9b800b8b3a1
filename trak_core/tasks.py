"""Model output functions ``f`` and out-to-loss weights ``Q`` (DESIGN.md, the estimator).

One job: given a model's raw outputs (``logits``, shape ``(n, n_outputs)``) and labels, say what
TRAK linearizes (``output``), its derivative with respect to the raw outputs (``output_grad``,
for backends that chain gradients by hand) and the per-example weight ``out_to_loss``.
Backends with automatic differentiation use ``output``; the analytic reference backend uses
``output_grad``. Everything is written over the Array API.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ._namespace import device_of
from .errors import TrakTypeError, TrakValueError

__all__ = ["Task", "Classification", "Regression", "LanguageModeling", "Seq2SeqLanguageModeling", "TokenClassification",
           "CustomTask", "get_task", "task_functions", "task_identity", "TASKS"]


_CUSTOM_HINT = ("Write its model output function with trak_core.CustomTask(output=lambda logits, labels, xp: ..., "
                "out_to_loss=...): output gives one number per example, shape (n,)")


def _classification_labels_message(shape: tuple) -> str:
    """Why labels of ``shape`` are not classification labels, and what to do instead."""
    message = f"classification labels must be 1-D class indices, shape (n,), got shape {shape}"
    if len(shape) == 2 and shape[1] == 1:
        return f"{message}; reshape them to (n,) (labels[:, 0])"
    if len(shape) == 2:
        return (f"{message}: labels of shape (n, C) look like multi-label classification (a 0/1 column per class, "
                "as for problem_type='multi_label_classification'), which is not a built-in task. One-hot labels of "
                f"one class each: pass labels.argmax(-1). Otherwise: {_CUSTOM_HINT}")
    return message


@runtime_checkable
class Task(Protocol):
    """What a task supplies to the estimator."""

    name: str
    logits_ndim: int | None  # 2: (n, n_outputs) outputs; 3: (n, sequence, vocabulary); None: any shape

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        """Raise ``ValueError``/``TypeError`` if ``labels`` do not fit this task (``n_outputs``: the last axis)."""

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The model output function ``f``, shape ``(n,)``."""

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """``d f / d logits``, shape ``(n, n_outputs)``."""

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The out-to-loss weight ``Q``, shape ``(n,)``."""


def _wide_ids(labels: Any, *, xp: Any) -> Any:
    """Integer labels in a signed dtype of 32 bits or more: in uint8, ``arange(300)`` wraps to 0 after 255 and
    ``labels != -100`` is false for 156 (JAX wraps -100 to uint8)."""
    if xp.isdtype(labels.dtype, "signed integer") and xp.iinfo(labels.dtype).bits >= 32:
        return labels
    return xp.astype(labels, xp.int32)


def _one_hot(labels: Any, n_classes: int, like: Any, *, xp: Any) -> Any:
    labels = _wide_ids(labels, xp=xp)
    classes = xp.arange(n_classes, dtype=labels.dtype, device=device_of(labels))
    return xp.astype(labels[:, None] == classes[None, :], like.dtype)


def _at_least_float32(logits: Any, *, xp: Any) -> Any:
    """Half-precision logits as float32 (out-to-loss weights are float32 for half-precision models, as features)."""
    return logits if xp.finfo(logits.dtype).bits >= 32 else xp.astype(logits, xp.float32)


def _binary(logits: Any, *, xp: Any) -> Any:
    """A one-logit binary classifier's logits ``z`` as the two-class logits ``[0, z]``."""
    return xp.concat([xp.zeros_like(logits), logits], axis=1)


class Classification:
    """Classification with the margin ``f = logit_y - logsumexp_{j != y} logit_j`` and ``Q = 1 - p_y``.

    Labels are integers in ``[0, n_classes)``. A binary classifier with one logit ``z`` (output
    ``(n,)`` or ``(n, 1)``, ``BCEWithLogits`` style, labels 0 or 1) is the two-class model with
    logits ``[0, z]``: its margin is the signed logit ``f = (2 y - 1) z`` and ``Q = 1 - sigmoid(f)``.
    """

    name = "classification"
    logits_ndim = 2

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        if labels.ndim != 1:
            raise TrakValueError(_classification_labels_message(tuple(labels.shape)))
        if not xp.isdtype(labels.dtype, ("integral", "bool")):
            raise TrakTypeError(f"classification labels must be integers, got dtype {labels.dtype}")
        if n_outputs < 1:
            raise TrakValueError("classification needs at least 1 output (a binary logit) or 2 (classes), "
                                 "the model has 0")
        classes = max(2, n_outputs)
        labels = xp.astype(labels, xp.int32) if xp.isdtype(labels.dtype, "bool") else labels  # int32: JAX x64 off
        if labels.shape[0] and (bool(xp.any(labels < 0)) or bool(xp.any(labels >= classes))):
            lo, hi = int(xp.min(labels)), int(xp.max(labels))
            what = "a binary classifier (one logit)" if n_outputs == 1 else f"a model with {n_outputs} classes"
            raise TrakValueError(
                f"labels out of range: found labels in [{lo}, {hi}] but for {what} labels must lie in "
                f"[0, {classes - 1}]")

    @staticmethod
    def _two_class(logits: Any, labels: Any, *, xp: Any) -> tuple[Any, Any]:
        if xp.isdtype(labels.dtype, "bool"):
            labels = xp.astype(labels, xp.int32)
        return (_binary(logits, xp=xp) if logits.shape[1] == 1 else logits), labels

    def _others(self, logits: Any, labels: Any, *, xp: Any) -> tuple[Any, Any]:
        """One-hot of the label and the log-softmax-free pieces over the other classes."""
        onehot = _one_hot(labels, logits.shape[1], logits, xp=xp)
        masked = xp.where(onehot > 0, xp.asarray(-xp.inf, dtype=logits.dtype, device=device_of(logits)), logits)
        top = xp.max(masked, axis=1, keepdims=True)
        weights = xp.exp(masked - top)
        return onehot, (top, weights)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        logits, labels = self._two_class(logits, labels, xp=xp)
        onehot, (top, weights) = self._others(logits, labels, xp=xp)
        logsumexp_others = top[:, 0] + xp.log(xp.sum(weights, axis=1))
        return xp.sum(logits * onehot, axis=1) - logsumexp_others

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        one_logit = logits.shape[1] == 1
        logits, labels = self._two_class(logits, labels, xp=xp)
        onehot, (_, weights) = self._others(logits, labels, xp=xp)
        grad = onehot - weights / xp.sum(weights, axis=1, keepdims=True)
        return grad[:, 1:] if one_logit else grad  # d f / d z: only the second of [0, z] is the model's

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        logits, labels = self._two_class(_at_least_float32(logits, xp=xp), labels, xp=xp)
        onehot = _one_hot(labels, logits.shape[1], logits, xp=xp)
        top = xp.max(logits, axis=1, keepdims=True)
        weights = xp.exp(logits - top)
        # 1 - p_y as the other classes' share: no cancellation for confident examples (1 - p_y in float32 is 0 from a
        # margin of about 17, which zeroes their scores; their share stays exact down to the dtype's smallest numbers)
        return xp.sum(weights * (1.0 - onehot), axis=1) / xp.sum(weights, axis=1)


class Regression:
    """Regression on a single output: ``f = prediction`` and ``Q = y - prediction`` (the residual).

    ``Q`` is minus the derivative of the squared loss with respect to the output, as ``1 - p_y``
    is for the logistic loss: removing example ``i`` moves a target's prediction by about
    ``-phi_t^T K^{-1} phi_i (y_i - f_i)``. (With ``Q = 1`` the labels would not enter the
    scores at all, and LDS on the regression task of ``bench/quality`` is about 0.)
    """

    name = "regression"
    logits_ndim = 2

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        if n_outputs != 1:
            raise TrakValueError(f"regression needs a model with exactly 1 output, the model has {n_outputs}: "
                                 f"multi-output regression is not a built-in task. {_CUSTOM_HINT}, or select one "
                                 "output with the backend's logits_fn (torch: TorchBackend(logits_fn=lambda out: "
                                 "out.logits[..., j]))")
        if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
            raise TrakValueError(f"regression labels must have shape (n,) or (n, 1), got {tuple(labels.shape)}")
        if not xp.isdtype(labels.dtype, ("real floating", "integral")):
            raise TrakTypeError(f"regression labels must be real numbers, got dtype {labels.dtype}")

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        return logits[:, 0]

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        return xp.ones_like(logits)

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        logits = _at_least_float32(logits, xp=xp)  # half-precision residuals of large labels overflow or round
        targets = xp.reshape(xp.astype(labels, logits.dtype), (-1,))
        return targets - logits[:, 0]


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
    whose logits at ``t`` predict ``labels[t]``, take :class:`Seq2SeqLanguageModeling` (``"seq2seq"``).
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
        labels = _wide_ids(labels, xp=xp)
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
        scores, targets = logits[:, :length - self.shift, :], _wide_ids(labels[:, self.shift:], xp=xp)
        counted = targets != self.ignore_index
        safe = xp.where(counted, targets, xp.zeros_like(targets))
        flat = xp.reshape(scores, (n * (length - self.shift), vocab))
        ids = xp.reshape(safe, (-1,))
        classification = TASKS["classification"]
        margins = xp.reshape(classification.output(flat, ids, xp=xp), (n, length - self.shift))
        q = xp.reshape(classification.out_to_loss(flat, ids, xp=xp), (n, length - self.shift))
        return margins, q, xp.astype(counted, logits.dtype)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        margins, _, counted = self._margins(logits, labels, xp=xp)
        return xp.sum(margins * counted, axis=1)

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        raise TrakTypeError(f"{self.name} has no hand-written output_grad; use a backend with autodiff "
                            "(torch, jax)")

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        _, q, counted = self._margins(logits, labels, xp=xp)
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


class CustomTask:
    """A task from user functions: ``output(logits, labels, xp)`` and ``out_to_loss(logits, labels, xp)``.

    Parameters
    ----------
    output : callable
        The model output function ``f``, returning shape ``(n,)``; differentiated by the
        framework backends (torch, JAX), so write it with ``xp`` operations.
    out_to_loss : callable, optional
        The weight ``Q``, shape ``(n,)``; default all ones.
    output_grad : callable, optional
        ``d f / d logits``, shape ``(n, n_outputs)``: needed only by the analytic ``"numpy"`` backend.
    check_labels : callable, optional
        ``(labels, n_outputs, xp) -> None`` raising on labels that do not fit.
    name : str
        A name for logs and errors; part of a store's configuration.
    logits_ndim : int or None
        Dimensions of the model's output with the batch: 2 (default, ``(n, n_outputs)``; a 1-D
        output becomes one column), 3 (sequences), or ``None`` (any, passed as the model gives it).

    Notes
    -----
    The functions are called with ``(logits, labels, xp)`` as positional arguments, on whole batches (and, for
    ``output``, under the backend's per-example transforms: JAX compiles them, with the values they capture).
    Every batch needs labels with one row per example; a task that does not read them (a contrastive score
    computed inside the model) takes any, e.g. ``numpy.zeros(n)``. An on-disk store records what ``output`` and
    ``out_to_loss`` compute (their code, the values they capture, a ``functools.partial``'s arguments, a callable
    object's attributes: ``tasks.task_identity``), so a store is reopened only with a task that computes the same.
    """

    def __init__(self, output: Any, out_to_loss: Any = None, *, output_grad: Any = None,
                 check_labels: Any = None, name: str = "custom", logits_ndim: int | None = 2) -> None:
        self.logits_ndim = logits_ndim
        if not callable(output):
            raise TrakTypeError(f"output must be callable (logits, labels, xp) -> (n,), got {type(output).__name__}")
        self.name, self._output, self._out_to_loss = name, output, out_to_loss
        self._output_grad, self._check_labels = output_grad, check_labels

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        if self._check_labels is not None:
            self._check_labels(labels, n_outputs, xp)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        return self._per_example(self._output(logits, labels, xp), logits, labels, "output", "value")

    def _per_example(self, value: Any, logits: Any, labels: Any, what: str, one: str) -> Any:
        """``value`` when it has one entry per example, else an error naming this task's function ``what``."""
        shape = tuple(getattr(value, "shape", ()))
        rows = [a.shape[0] for a in (labels, logits) if len(getattr(a, "shape", ())) >= 1]  # labels: the batch's rows
        n = rows[0] if rows else None  # both 0-d (a squeezed single example): nothing to compare with
        if n is not None and shape != (n,):
            raise TrakValueError(f"CustomTask {self.name!r}: {what} must return one {one} per example, shape ({n},) "
                                 f"for logits of shape {tuple(logits.shape)}, but returned "
                                 f"{'shape ' + str(shape) if hasattr(value, 'shape') else type(value).__name__}"
                                 + ("; do not sum over the batch" if shape == () else "")
                                 + ("; take [:, 0] of a single column" if shape == (n, 1) else ""))
        return value

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        if self._output_grad is None:
            raise TrakTypeError(f"task {self.name!r} has no output_grad, which the analytic 'numpy' backend needs; "
                                "pass output_grad=... or use a backend with autodiff (torch, jax)")
        return self._output_grad(logits, labels, xp)

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        if self._out_to_loss is None:  # Q = 1 per example (logits (n, ...), or (n,) with logits_ndim=None)
            if logits.ndim == 0:  # a squeezed single example
                return xp.ones_like(logits)
            return xp.ones((logits.shape[0],), dtype=logits.dtype, device=device_of(logits))
        return self._per_example(self._out_to_loss(logits, labels, xp), logits, labels, "out_to_loss", "weight")


TASKS = {"classification": Classification(), "regression": Regression(), "language_modeling": LanguageModeling(),
         "seq2seq": Seq2SeqLanguageModeling(), "token_classification": TokenClassification()}  # stateless, shared


def get_task(task: str | Task) -> Task:
    """Return the task named ``task`` (see ``TASKS``) or ``task`` itself if it is a Task."""
    if isinstance(task, str):
        try:
            return TASKS[task]
        except KeyError:
            raise TrakValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)} or pass a Task "
                                 "object") from None
    if isinstance(task, Task):
        return task
    raise TrakTypeError(f"task must be a name in {sorted(TASKS)} or a Task object, got {type(task).__name__}")


from ._task_identity import task_functions, task_identity  # noqa: E402  (re-exported: a task's identity)
