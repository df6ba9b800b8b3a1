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


class TorchBackend:
    """Per-example gradients for ``torch.nn.Module`` models.

    Parameters
    ----------
    params : sequence of str or callable, optional
        Parameters to attribute through: names from ``model.named_parameters()`` or a predicate
        ``(name, tensor) -> bool``. Default: all. The gradient vector follows
        ``named_parameters()`` order, each tensor flattened row-major.
    chunk_size : int, optional
        Examples per ``vmap`` call (memory stays ``O(chunk_size * p)``). Default: as many as fit
        in about 256 MiB of gradients, at most 256.
    """

    name = "torch"
    framework = "torch"
    extra = "torch"
    can_gradients = True
    has_fused_projection = True  # on CUDA with CuPy installed; elsewhere project() is the core's

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
            chunk = self.chunk_size or max(1, min(256, (256 * 2**20) // (4 * max(1, prepared.n_params))))
            parts = []
            for start in range(0, inputs.shape[0], chunk):
                g = per_example(prepared.params, inputs[start:start + chunk], labels[start:start + chunk])
                parts.append(torch.cat([g[name].reshape(g[name].shape[0], -1) for name in prepared.params], dim=1))
        return torch.cat(parts, dim=0), out_to_loss

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str) -> Any:
        """``trak_core.project``; on CUDA (with CuPy) the fused kernel of ``trak_cupy``, through DLPack."""
        from trak_core.projection import project

        if grads.is_cuda and kind == "rademacher" and _cupy_ready():
            import cupy
            import torch
            from trak_cupy.projection import fused_project, supports

            shared = cupy.from_dlpack(grads.detach().contiguous())
            if supports(shared, kind):
                with cupy.cuda.Device(grads.device.index or 0):
                    out = fused_project(shared, k, seed=seed, checkpoint=checkpoint)
                return torch.from_dlpack(out).to(grads.dtype)
        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind)


def _cupy_ready() -> bool:
    import importlib.util

    return importlib.util.find_spec("cupy") is not None and importlib.util.find_spec("trak_cupy") is not None
