"""Model output functions ``f`` and out-to-loss weights ``Q`` (DESIGN.md, the estimator).

One job: given a model's raw outputs (``logits``, shape ``(n, n_outputs)``) and labels, say what
TRAK linearizes (``output``), its derivative with respect to the raw outputs (``output_grad``,
for backends that chain gradients by hand) and the per-example weight ``out_to_loss``.
Backends with automatic differentiation use ``output``; the analytic reference backend uses
``output_grad``. Everything is written over the Array API.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ._custom_task import CustomTask
from ._namespace import device_of, wide_ids
from ._sequence_tasks import LanguageModeling, Seq2SeqLanguageModeling, TokenClassification
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
        """Raise ``ValueError``/``TypeError`` if ``labels`` do not fit this task.

        Parameters
        ----------
        labels : array
            The batch's labels, rows first.
        n_outputs : int
            The size of the raw outputs' last axis (1 for outputs of shape (n,)).
        xp : namespace
            The Array API namespace of the labels.
        """

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The model output function ``f`` that TRAK linearizes.

        Parameters
        ----------
        logits : array
            Raw outputs: shape (n, n_outputs) if ``logits_ndim`` is 2, (n, sequence, vocabulary) if 3, any if None.
        labels : array
            The batch's labels, rows first.
        xp : namespace
            The Array API namespace of the arrays.

        Returns
        -------
        array, shape (n,)
            ``f`` of each example.
        """

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """``d f / d logits``, for backends that chain gradients by hand.

        Parameters
        ----------
        logits : array
            Raw outputs: shape (n, n_outputs) if ``logits_ndim`` is 2, (n, sequence, vocabulary) if 3, any if None.
        labels : array
            The batch's labels, rows first.
        xp : namespace
            The Array API namespace of the arrays.

        Returns
        -------
        array, shape (n, n_outputs)
            The derivative of each example's ``f`` with respect to its raw outputs.
        """

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The out-to-loss weight ``Q`` of each example.

        Parameters
        ----------
        logits : array
            Raw outputs: shape (n, n_outputs) if ``logits_ndim`` is 2, (n, sequence, vocabulary) if 3, any if None.
        labels : array
            The batch's labels, rows first.
        xp : namespace
            The Array API namespace of the arrays.

        Returns
        -------
        array, shape (n,)
            ``Q`` of each example.
        """


def _one_hot(labels: Any, n_classes: int, like: Any, *, xp: Any) -> Any:
    labels = wide_ids(labels, xp=xp)
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
    ``Q`` assumes plain cross-entropy on hard labels (no label smoothing); for another loss, pass its weight as
    ``CustomTask(output, out_to_loss)``.

    A row whose logits are ``-inf`` for every class but the label's (``p_y = 1`` exactly) has the margin ``+inf``,
    ``Q = 0`` and no gradient (NaN): the estimator refuses it, naming the row and the fix (drop it, or mask with the
    dtype's most negative finite number instead of ``-inf``).
    """

    name = "classification"
    logits_ndim = 2

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        """Raise unless ``labels`` are 1-D integer (or bool) class indices in ``[0, max(2, n_outputs))``
        (``Task.check_labels``)."""
        if labels.ndim != 1:
            raise TrakValueError(_classification_labels_message(tuple(labels.shape)))
        if not xp.isdtype(labels.dtype, ("integral", "bool")):
            hint = ("; labels are class indices (0 or 1 for a binary classifier, one logit or two): cast float 0/1 "
                    "labels, as BCEWithLogitsLoss takes them, to integers (torch: labels.long()); regression targets "
                    "take task='regression'") if xp.isdtype(labels.dtype, "real floating") else ""
            raise TrakTypeError(f"classification labels must be integers, got dtype {labels.dtype}{hint}")
        if n_outputs < 1:
            raise TrakValueError("classification needs at least 1 output (a binary logit) or 2 (classes), "
                                 "the model has 0")
        classes = max(2, n_outputs)
        labels = xp.astype(labels, xp.int32) if xp.isdtype(labels.dtype, "bool") else labels  # int32: JAX x64 off
        if labels.shape[0] and (bool(xp.any(labels < 0)) or bool(xp.any(labels >= classes))):
            lo, hi = int(xp.min(labels)), int(xp.max(labels))
            what = "a binary classifier (one logit)" if n_outputs == 1 else f"a model with {n_outputs} classes"
            ignored = (" (-100, which Hugging Face uses to leave a token out of the loss, leaves nothing out of a "
                       "classification task: drop those examples, or use a sequence task such as "
                       "task='token_classification' for per-token labels)") if bool(xp.any(labels == -100)) else ""
            raise TrakValueError(
                f"labels out of range: found labels in [{lo}, {hi}] but for {what} labels must lie in "
                f"[0, {classes - 1}]{ignored}")

    @staticmethod
    def _two_class(logits: Any, labels: Any, *, xp: Any) -> tuple[Any, Any]:
        if xp.isdtype(labels.dtype, "bool"):
            labels = xp.astype(labels, xp.int32)
        return (_binary(logits, xp=xp) if logits.shape[1] == 1 else logits), labels

    def _others(self, logits: Any, labels: Any, *, xp: Any) -> tuple[Any, Any]:
        """One-hot of the label and the log-softmax-free pieces over the other classes (``top`` 0 where every other
        class is ``-inf``: their weights are then 0, and the margin ``+inf``)."""
        onehot = _one_hot(labels, logits.shape[1], logits, xp=xp)
        minus_inf = xp.asarray(-xp.inf, dtype=logits.dtype, device=device_of(logits))
        masked = xp.where(onehot > 0, minus_inf, logits)
        top = xp.max(masked, axis=1, keepdims=True)
        top = xp.where(top == minus_inf, xp.zeros_like(top), top)  # exp(-inf - -inf) was NaN: a NaN margin
        weights = xp.exp(masked - top)
        return onehot, (top, weights)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The margin ``f = logit_y - logsumexp_{j != y} logit_j`` of each example; returns the margins, in the dtype
        of ``logits`` (``Task.output``)."""
        logits, labels = self._two_class(logits, labels, xp=xp)
        onehot, (top, weights) = self._others(logits, labels, xp=xp)
        logsumexp_others = top[:, 0] + xp.log(xp.sum(weights, axis=1))
        # the label's logit picked, not multiplied out: a class masked with -inf (-inf * 0) would make every margin NaN
        picked = xp.where(onehot > 0, logits, xp.zeros_like(logits))
        return xp.sum(picked, axis=1) - logsumexp_others

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """``d f / d logits``: the one-hot label less the softmax over the other classes; returns the derivative of
        each example's margin (``Task.output_grad``)."""
        one_logit = logits.shape[1] == 1
        logits, labels = self._two_class(logits, labels, xp=xp)
        onehot, (_, weights) = self._others(logits, labels, xp=xp)
        grad = onehot - weights / xp.sum(weights, axis=1, keepdims=True)
        return grad[:, 1:] if one_logit else grad  # d f / d z: only the second of [0, z] is the model's

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """``Q = 1 - p_y``, computed as the other classes' share of the softmax; returns the weights, in the dtype of
        ``logits`` (float32 for half-precision ones) (``Task.out_to_loss``)."""
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
        """Raise unless the model has one output and ``labels`` are real numbers of shape (n,) or (n, 1)
        (``Task.check_labels``)."""
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
        """The prediction ``f``; returns ``logits[:, 0]`` (``Task.output``)."""
        return logits[:, 0]

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """``d f / d logits``: ones; returns ones like ``logits`` (``Task.output_grad``)."""
        return xp.ones_like(logits)

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The residual ``Q = y - prediction``; returns the residuals, in the dtype of ``logits`` (float32 for
        half-precision ones) (``Task.out_to_loss``)."""
        logits = _at_least_float32(logits, xp=xp)  # half-precision residuals of large labels overflow or round
        targets = xp.reshape(xp.astype(labels, logits.dtype), (-1,))
        return targets - logits[:, 0]


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
