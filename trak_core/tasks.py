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

__all__ = ["Task", "Classification", "Regression", "CustomTask", "get_task", "TASKS"]


@runtime_checkable
class Task(Protocol):
    """What a task supplies to the estimator."""

    name: str

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        """Raise ``ValueError``/``TypeError`` if ``labels`` do not fit this task."""

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The model output function ``f``, shape ``(n,)``."""

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """``d f / d logits``, shape ``(n, n_outputs)``."""

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The out-to-loss weight ``Q``, shape ``(n,)``."""


def _one_hot(labels: Any, n_classes: int, like: Any, *, xp: Any) -> Any:
    classes = xp.arange(n_classes, dtype=labels.dtype, device=device_of(labels))
    return xp.astype(labels[:, None] == classes[None, :], like.dtype)


class Classification:
    """Classification with the margin ``f = logit_y - logsumexp_{j != y} logit_j`` and ``Q = 1 - p_y``.

    Labels are integers in ``[0, n_classes)``; at least two classes are needed.
    """

    name = "classification"

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        if labels.ndim != 1:
            raise TrakValueError(f"classification labels must be 1-D, got shape {tuple(labels.shape)}")
        if not xp.isdtype(labels.dtype, "integral"):
            raise TrakTypeError(f"classification labels must be integers, got dtype {labels.dtype}")
        if n_outputs < 2:
            raise TrakValueError(f"classification needs at least 2 outputs (classes), the model has {n_outputs}")
        if labels.shape[0] and (bool(xp.any(labels < 0)) or bool(xp.any(labels >= n_outputs))):
            lo, hi = int(xp.min(labels)), int(xp.max(labels))
            raise TrakValueError(
                f"labels out of range: found labels in [{lo}, {hi}] but the model has {n_outputs} "
                f"classes, so labels must lie in [0, {n_outputs - 1}]")

    def _others(self, logits: Any, labels: Any, *, xp: Any) -> tuple[Any, Any]:
        """One-hot of the label and the log-softmax-free pieces over the other classes."""
        onehot = _one_hot(labels, logits.shape[1], logits, xp=xp)
        masked = xp.where(onehot > 0, xp.asarray(-xp.inf, dtype=logits.dtype, device=device_of(logits)), logits)
        top = xp.max(masked, axis=1, keepdims=True)
        weights = xp.exp(masked - top)
        return onehot, (top, weights)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        onehot, (top, weights) = self._others(logits, labels, xp=xp)
        logsumexp_others = top[:, 0] + xp.log(xp.sum(weights, axis=1))
        return xp.sum(logits * onehot, axis=1) - logsumexp_others

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        onehot, (_, weights) = self._others(logits, labels, xp=xp)
        return onehot - weights / xp.sum(weights, axis=1, keepdims=True)

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        onehot = _one_hot(labels, logits.shape[1], logits, xp=xp)
        top = xp.max(logits, axis=1, keepdims=True)
        weights = xp.exp(logits - top)
        p_label = xp.sum(weights * onehot, axis=1) / xp.sum(weights, axis=1)
        return 1.0 - p_label


class Regression:
    """Regression on a single output: ``f = prediction`` and ``Q = y - prediction`` (the residual).

    ``Q`` is minus the derivative of the squared loss with respect to the output, as ``1 - p_y``
    is for the logistic loss: removing example ``i`` moves a target's prediction by about
    ``-phi_t^T K^{-1} phi_i (y_i - f_i)``. (With ``Q = 1`` the labels would not enter the
    scores at all, and LDS on the regression task of ``bench/quality`` is about 0.)
    """

    name = "regression"

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        if n_outputs != 1:
            raise TrakValueError(f"regression needs a model with exactly 1 output, the model has {n_outputs}")
        if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
            raise TrakValueError(f"regression labels must have shape (n,) or (n, 1), got {tuple(labels.shape)}")
        if not xp.isdtype(labels.dtype, ("real floating", "integral")):
            raise TrakTypeError(f"regression labels must be real numbers, got dtype {labels.dtype}")

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        return logits[:, 0]

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        return xp.ones_like(logits)

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        targets = xp.reshape(xp.astype(labels, logits.dtype), (-1,))
        return targets - logits[:, 0]


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
        A name for logs.
    """

    def __init__(self, output: Any, out_to_loss: Any = None, *, output_grad: Any = None,
                 check_labels: Any = None, name: str = "custom") -> None:
        if not callable(output):
            raise TrakTypeError(f"output must be callable (logits, labels, xp) -> (n,), got {type(output).__name__}")
        self.name, self._output, self._out_to_loss = name, output, out_to_loss
        self._output_grad, self._check_labels = output_grad, check_labels

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        if self._check_labels is not None:
            self._check_labels(labels, n_outputs, xp)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        return self._output(logits, labels, xp)

    def output_grad(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        if self._output_grad is None:
            raise TrakTypeError(f"task {self.name!r} has no output_grad, which the analytic 'numpy' backend needs; "
                            "pass output_grad=... or use a backend with autodiff (torch, jax)")
        return self._output_grad(logits, labels, xp)

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        if self._out_to_loss is None:
            return xp.ones_like(logits[:, 0])
        return self._out_to_loss(logits, labels, xp)


TASKS = {"classification": Classification(), "regression": Regression()}  # stateless: shared instances


def get_task(task: str | Task) -> Task:
    """Return the task named ``task`` (see :data:`TASKS`) or ``task`` itself if it is a Task."""
    if isinstance(task, str):
        try:
            return TASKS[task]
        except KeyError:
            raise TrakValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)} or pass a Task object") from None
    if isinstance(task, Task):
        return task
    raise TrakTypeError(f"task must be a name in {sorted(TASKS)} or a Task object, got {type(task).__name__}")
