"""The PyTorch backend object: ownership, checkpoints, per-example gradients, projection.

Per-example gradients are ``vmap(grad(f))`` over chunks of a batch with ``torch.func``,
where ``f`` is the task output of one example computed with ``functional_call``; parameters
outside ``params`` and buffers enter as constants (never differentiated). The model runs in
eval mode (BatchNorm uses its running statistics, dropout is off) and its mode is restored after.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from .checkpoint import TorchCheckpoint, select_names, snapshot

__all__ = ["TorchBackend"]


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


CPU_CHUNK_BYTES = 256 * 2**20  # per-example gradients per vmap call on CPUs
GPU_CHUNK_BYTES = 6 * 2**30  # at most, on GPUs (ResNet-18: 144 examples of 11.2M float32 gradients)
GPU_CHUNK_SHARE = 8  # and at most 1/8 of the device's free memory


def chunk_rows(n_params: int, itemsize: int, free_bytes: int | None) -> int:
    """Examples per ``vmap`` call: the gradients of a chunk take at most ``CPU_CHUNK_BYTES`` on CPUs
    (``free_bytes`` is ``None``), and on GPUs ``min(GPU_CHUNK_BYTES, free_bytes / GPU_CHUNK_SHARE)``; 1 to 256."""
    budget = CPU_CHUNK_BYTES if free_bytes is None else min(GPU_CHUNK_BYTES, free_bytes // GPU_CHUNK_SHARE)
    return max(1, min(256, budget // (itemsize * max(1, n_params))))


def _free_bytes(device: Any) -> int | None:
    """Free memory of a CUDA device (``None`` on CPUs)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    return int(torch.cuda.mem_get_info(device)[0])


class TorchBackend:
    """Per-example gradients for ``torch.nn.Module`` models.

    Parameters
    ----------
    params : sequence of str or callable, optional
        Parameters to attribute through: names from ``model.named_parameters()`` or a predicate
        ``(name, tensor) -> bool``. Default: all. The gradient vector follows
        ``named_parameters()`` order, each tensor flattened row-major.
    chunk_size : int, optional
        Examples per ``vmap`` call (memory stays ``O(chunk_size * p)``). Default (:func:`chunk_rows`):
        on CPUs as many as fit in 256 MiB of gradients; on GPUs as many as fit in an eighth of
        the device's free memory, at most 6 GiB of gradients; at most 256 either way.
    """

    name = "torch"
    framework = "torch"
    extra = "torch"
    can_gradients = True
    has_fused_projection = False  # project() is the core's (tensor cores on CUDA: trak_core._split)

    def __init__(self, params: Sequence[str] | Callable[[str, Any], bool] | None = None,
                 chunk_size: int | None = None) -> None:
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.params, self.chunk_size = params, chunk_size

    def owns(self, model: Any) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(model, torch.nn.Module)

    def prepare(self, model: Any, checkpoint: Any) -> TorchCheckpoint:
        import torch

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        return snapshot(model, checkpoint, select_names(model, self.params))

    def n_params(self, prepared: TorchCheckpoint) -> int:
        return prepared.n_params

    def _check_batch(self, prepared: TorchCheckpoint, inputs: Any, labels: Any) -> None:
        import torch

        for what, tensor in (("inputs", inputs), ("labels", labels)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"the torch backend needs {what} as torch tensors, got {type(tensor).__name__}")
            if tensor.device != prepared.device:
                raise ValueError(f"{what} are on {tensor.device} but the model is on {prepared.device}; "
                                 f"move the batch to the model's device (tensor.to({str(prepared.device)!r}))")

    def _logits(self, model: Any, prepared: TorchCheckpoint, inputs: Any) -> Any:
        from torch.func import functional_call

        logits = functional_call(model, {**prepared.params, **prepared.frozen}, (inputs,))
        if logits.ndim == 1:
            logits = logits[:, None]
        if logits.ndim != 2 or logits.shape[0] != inputs.shape[0]:
            raise ValueError(f"the model's output must have shape (batch, n_outputs), got {tuple(logits.shape)} "
                             f"for a batch of {inputs.shape[0]}; make forward() return one row per example")
        return logits

    def gradients(self, model: Any, prepared: TorchCheckpoint, inputs: Any, labels: Any,
                  task: Any) -> tuple[Any, Any]:
        import array_api_compat.torch as xp
        import torch
        from torch.func import functional_call, grad, vmap

        self._check_batch(prepared, inputs, labels)
        with _eval_mode(model):
            with torch.no_grad():
                logits = self._logits(model, prepared, inputs)
            task.check_labels(labels, logits.shape[1], xp=xp)
            out_to_loss = task.out_to_loss(logits, labels, xp=xp)

            def output(params: dict, x: Any, y: Any) -> Any:
                out = functional_call(model, {**params, **prepared.frozen}, (x[None],))
                return task.output(out.reshape(1, -1), y[None], xp=xp)[0]

            per_example = vmap(grad(output), in_dims=(None, 0, 0))
            n = inputs.shape[0]
            dtype = next(iter(prepared.params.values())).dtype if prepared.params else torch.float32
            chunk = self.chunk_size or chunk_rows(prepared.n_params, torch.finfo(dtype).bits // 8,
                                                  _free_bytes(prepared.device))
            if n <= chunk:  # one chunk: concatenate its parameters once
                g = per_example(prepared.params, inputs, labels)
                return torch.cat([g[name].reshape(n, -1) for name in prepared.params], dim=1), out_to_loss
            grads = torch.empty((n, prepared.n_params), dtype=dtype, device=prepared.device)
            for start in range(0, n, chunk):  # each chunk is written into place: no second copy of the batch
                stop = min(n, start + chunk)
                g = per_example(prepared.params, inputs[start:stop], labels[start:stop])
                column = 0
                for name in prepared.params:
                    width = g[name][0].numel()
                    grads[start:stop, column:column + width] = g[name].reshape(stop - start, -1)
                    column += width
                del g
        return grads, out_to_loss

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """:func:`trak_core.project`: on CUDA, float16 tensor-core products of a split input (``precision``)."""
        from trak_core.projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)
