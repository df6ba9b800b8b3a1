"""A task from user functions: ``trak_core.CustomTask``.

One job: wrap a user's model output function and out-to-loss weight, checking what they return per example.
Re-exported by ``trak_core.tasks``.
"""
from __future__ import annotations

from typing import Any

from ._integers import as_integer
from ._namespace import device_of
from .errors import TrakTypeError, TrakValueError

__all__ = ["CustomTask"]


class CustomTask:
    """A task from user functions: ``output(logits, labels, xp)`` and ``out_to_loss(logits, labels, xp)``.

    Parameters
    ----------
    output : callable
        The model output function ``f``, returning real floating values of shape ``(n,)``; differentiated by the
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
        ndim = None if logits_ndim is None else as_integer(logits_ndim)
        if logits_ndim is not None and ndim is None:
            raise TrakTypeError(f"logits_ndim must be 2, 3 or None, got {logits_ndim!r} of type "
                                f"{type(logits_ndim).__name__}")
        if ndim is not None and ndim not in (2, 3):
            raise TrakValueError(f"logits_ndim must be 2 (outputs (n, n_outputs)), 3 ((n, sequence, vocabulary)) or "
                                 f"None (any shape, passed as the model gives it), got {logits_ndim!r}")
        self.logits_ndim = ndim
        if not callable(output):
            raise TrakTypeError(f"output must be callable (logits, labels, xp) -> (n,), got {type(output).__name__}")
        self.name, self._output, self._out_to_loss = name, output, out_to_loss
        self._output_grad, self._check_labels = output_grad, check_labels
        self._dtype_checked = False  # output's dtype is checked on the first call only

    def check_labels(self, labels: Any, n_outputs: int, *, xp: Any) -> None:
        """The ``check_labels`` function given, if any (none: every label passes) (``Task.check_labels``)."""
        if self._check_labels is not None:
            self._check_labels(labels, n_outputs, xp)

    def output(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The ``output`` function given, checked to return one value per example; returns what ``output(logits,
        labels, xp)`` returned (``Task.output``); on the first call, also checked to be of a real floating dtype.

        Raises
        ------
        TrakValueError
            When ``output`` does not return one value per example.
        TrakTypeError
            When ``output`` returns values that are not real floating (integers from ``argmax``, booleans): their
            gradients are zero or undefined.
        """
        value = self._per_example(self._output(logits, labels, xp), logits, labels, "output", "value")
        if not self._dtype_checked:  # an argmax was featurized to all-zero gradients: a ZeroKernelError at the kernel
            dtype = getattr(value, "dtype", None)
            if dtype is not None and not xp.isdtype(dtype, "real floating"):
                raise TrakTypeError(f"CustomTask {self.name!r}: output must return real floating values, but returned "
                                    f"dtype {dtype}: output is differentiated, so it must be a differentiable "
                                    "floating-point function of the model's outputs (e.g. a margin or a "
                                    "log-probability, not an argmax or a comparison)")
            self._dtype_checked = True
        return value

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
        """The ``output_grad`` function given (a ``TrakTypeError`` without one); returns what ``output_grad(logits,
        labels, xp)`` returned, ``d f / d logits`` (``Task.output_grad``)."""
        if self._output_grad is None:
            raise TrakTypeError(f"task {self.name!r} has no output_grad, which the analytic 'numpy' backend needs; "
                                "pass output_grad=... or use a backend with autodiff (torch, jax)")
        return self._output_grad(logits, labels, xp)

    def out_to_loss(self, logits: Any, labels: Any, *, xp: Any) -> Any:
        """The ``out_to_loss`` function given, checked to return one weight per example; ones without one; returns the
        weights ``Q`` (ones in the dtype of ``logits`` by default) (``Task.out_to_loss``)."""
        if self._out_to_loss is None:  # Q = 1 per example (logits (n, ...), or (n,) with logits_ndim=None)
            if logits.ndim == 0:  # a squeezed single example
                return xp.ones_like(logits)
            return xp.ones((logits.shape[0],), dtype=logits.dtype, device=device_of(logits))
        return self._per_example(self._out_to_loss(logits, labels, xp), logits, labels, "out_to_loss", "weight")
