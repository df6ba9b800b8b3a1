"""Per-example gradients by ``torch.func.vmap(grad)``: the torch backend's general path.

One job: the task output of one example differentiated under ``vmap`` over chunks of the batch, sized from the
free device memory (``chunk_rows``) or ``TorchBackend(chunk_size=...)``, written in place into one
``(n, p)`` matrix.
"""
from __future__ import annotations

from typing import Any

from .attention import attention_for_vmap
from .looped import eval_mode

__all__ = ["vmap_gradients", "vmap_in_attention", "eager_error", "chunk_rows"]

CPU_CHUNK_BYTES = 256 * 2**20  # per-example gradients per vmap call on CPUs
GPU_CHUNK_BYTES = 6 * 2**30  # at most, on GPUs (ResNet-18: 144 examples of 11.2M float32 gradients)
GPU_CHUNK_SHARE = 8  # and at most 1/8 of the device's free memory


def chunk_rows(n_params: int, itemsize: int, free_bytes: int | None) -> int:
    """Examples per ``vmap`` call: the gradients of a chunk take at most ``CPU_CHUNK_BYTES`` on CPUs
    (``free_bytes`` is ``None``), and on GPUs ``min(GPU_CHUNK_BYTES, free_bytes / GPU_CHUNK_SHARE)``; 1 to 256."""
    budget = CPU_CHUNK_BYTES if free_bytes is None else min(GPU_CHUNK_BYTES, free_bytes // GPU_CHUNK_SHARE)
    return max(1, min(256, budget // (itemsize * max(1, n_params))))


def _free_bytes(device: Any) -> int | None:
    """Free memory of a CUDA device (``None`` on CPUs): what the driver has free, plus what torch's caching allocator
    holds reserved but unused (the driver counts it as taken; an earlier batch's freed gradients stay there)."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    import torch

    cached = int(torch.cuda.memory_reserved(device)) - int(torch.cuda.memory_allocated(device))
    return int(torch.cuda.mem_get_info(device)[0]) + max(0, cached)


def vmap_gradients(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, causal: bool,
                   attention_dtype: Any) -> tuple[Any, Any]:
    """Per-example gradients ``(n, p)`` and out-to-loss weights, by ``vmap(grad)`` over chunks of examples, in the
    attention ``attention_for_vmap(model, attention_dtype)`` sets (``None``: eager)."""
    import array_api_compat.torch as xp
    import torch
    from torch.func import grad, vmap
    from torch.utils._pytree import tree_map

    from .outputs import _rows, check_labels
    from .transforms import for_transforms

    with eval_mode(model), attention_for_vmap(model, attention_dtype), for_transforms(model):  # no grad hooks
        with torch.no_grad():
            logits = backend._logits(model, prepared, inputs, task, causal=causal)
        check_labels(task, labels, logits)
        out_to_loss = task.out_to_loss(logits, labels, xp=xp)

        def output(params: dict, x: Any, y: Any) -> Any:
            return backend.example_output(model, prepared, params, tree_map(lambda t: t[None], x), y[None], task,
                                          causal)

        per_example = vmap(grad(output), in_dims=(None, 0, 0))
        n = _rows(inputs)
        dtype = next(iter(prepared.params.values())).dtype if prepared.params else torch.float32
        chunk = backend.chunk_size or chunk_rows(prepared.n_params, torch.finfo(dtype).bits // 8,
                                                 _free_bytes(prepared.device))
        if n <= chunk:  # one chunk: concatenate its parameters once
            g = per_example(prepared.params, inputs, labels)
            return torch.cat([g[name].reshape(n, -1) for name in prepared.params], dim=1), out_to_loss
        grads = torch.empty((n, prepared.n_params), dtype=dtype, device=prepared.device)
        for start in range(0, n, chunk):  # each chunk is written into place: no second copy of the batch
            stop = min(n, start + chunk)
            g = per_example(prepared.params, tree_map(lambda t: t[start:stop], inputs), labels[start:stop])
            column = 0
            for name in prepared.params:
                width = g[name][0].numel()
                grads[start:stop, column:column + width] = g[name].reshape(stop - start, -1)
                column += width
            del g
    return grads, out_to_loss


def vmap_in_attention(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any,
                      causal: bool) -> tuple[Any, Any]:
    """``vmap_gradients`` in the attention that gives the model's gradients: a float64 model in its own SDPA (eager
    attention's softmax is float32), and in eager attention from the first batch whose SDPA ``vmap`` cannot follow
    (T5's and BART's branch on the mask's values) on, where eager attention gives its SDPA's gradients
    (``eager_error``); else a ``RuntimeError`` that sends the checkpoint to the one-example loop, in SDPA."""
    from .attention import vmap_keeps_sdpa
    from .closed_form import check_tolerance

    if prepared.__dict__.get("_eager_vmap"):
        return vmap_gradients(backend, model, prepared, inputs, labels, task, causal, None)
    try:
        return vmap_gradients(backend, model, prepared, inputs, labels, task, causal, prepared.dtype)
    except (RuntimeError, NotImplementedError) as exc:
        if not vmap_keeps_sdpa(model, prepared.dtype):
            raise
        grads, out_to_loss = vmap_gradients(backend, model, prepared, inputs, labels, task, causal, None)
        error = eager_error(backend, model, prepared, inputs, labels, task, causal, grads, out_to_loss)
        if not error <= check_tolerance(prepared.dtype, prepared.device):  # 1e-9: T5's, BART's pass (1e-11); a
            # float32 softmax in the eager code (OPT's: 1e-8) sends the checkpoint to the loop, in SDPA
            raise RuntimeError(f"eager attention is {error:.1g} off SDPA in float64 (a float32 softmax), and vmap "
                               f"cannot follow SDPA ({str(exc).splitlines()[0][:80]})") from exc
        prepared.__dict__["_eager_vmap"] = True  # only once eager attention took the batch SDPA could not
        return grads, out_to_loss


def eager_error(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, causal: bool,
                grads: Any, out_to_loss: Any) -> float:
    """How far a float64 model's gradients under ``vmap`` in eager attention (``grads``, ``out_to_loss``) are from
    its own: the first example's against plain autograd in the model's SDPA, relative; ``inf`` where they are not
    finite (eager attention's float32 softmax gives NaN for left padding's fully masked rows)."""
    import torch
    from torch.utils._pytree import tree_map

    from .looped import looped_gradients

    if not (bool(torch.isfinite(grads).all()) and bool(torch.isfinite(out_to_loss).all())):
        return float("inf")
    with eval_mode(model), attention_for_vmap(model, prepared.dtype):  # float64: the model's SDPA
        one = looped_gradients(backend, model, prepared, tree_map(lambda t: t[:1], inputs), labels[:1], task, causal)
    return float((grads[:1] - one).norm() / one.norm().clamp_min(torch.finfo(one.dtype).tiny))
