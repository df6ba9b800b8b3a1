"""What the torch backend reads off a model's forward: the logits tensor, the labels checked against it, the rows.

One job, shared by the gradient paths (closed form, vmap, loop, factorized). Like every module of the backend it
imports no framework at module level.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from trak_core.outputs import select_logits

__all__ = ["output_logits", "batch_logits", "check_labels"]


_LOGITS_FN_HINT = "pass logits_fn (model output -> logits tensor) to the backend: TorchBackend(logits_fn=...)"


def output_logits(output: Any, logits_fn: Callable[[Any], Any] | None = None) -> Any:
    """The logits tensor in what a model's ``forward`` returned (``trak_core.outputs.select_logits``)."""
    import torch

    return select_logits(output, logits_fn, is_array=lambda value: isinstance(value, torch.Tensor),
                         hint=_LOGITS_FN_HINT, array="tensor")


def batch_logits(logits: Any, n: int, ndim: int | None) -> Any:
    """The logits of a batch of ``n`` examples as ``(n, n_outputs)`` where the task reads 2-D outputs (``ndim == 2``).

    Parameters
    ----------
    logits : torch.Tensor
        What ``output_logits`` found in ``forward``'s output for the batch.
    n : int
        Examples in the batch.
    ndim : int or None
        The task's ``logits_ndim``.

    Returns
    -------
    torch.Tensor
        A 1-D output ``(n,)`` (a one-logit head) as a column ``(n, 1)``; for a batch of one, an output whose batch
        axis was squeezed away (``.squeeze()`` makes ``(1, 1)`` 0-d and ``(1, C)`` ``(C,)``) as one row ``(1, C)``,
        as one example's output is read on the per-example paths (``reshape(1, -1)``). Anything else as it is, for
        the callers' shape checks.
    """
    if ndim != 2 or logits.ndim > 1:
        return logits
    if n == 1:
        return logits.reshape(1, -1)
    return logits[:, None] if logits.ndim == 1 else logits


def check_labels(task: Any, labels: Any, logits: Any) -> None:
    """``task.check_labels`` with the number of outputs: the last axis of ``logits`` (1 for a 1-D output)."""
    import array_api_compat.torch as xp

    task.check_labels(labels, logits.shape[-1] if logits.ndim > 1 else 1, xp=xp)


def _rows(inputs: Any) -> int:
    return int(next(iter(inputs.values())).shape[0]) if isinstance(inputs, Mapping) else int(inputs.shape[0])
