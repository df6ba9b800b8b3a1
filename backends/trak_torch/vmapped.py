"""Per-example gradients by ``torch.func.vmap(grad)``: the torch backend's general path.

One job: the task output of one example differentiated under ``vmap`` over chunks of the batch, sized from the
free device memory (``backend.chunk_rows``) or ``TorchBackend(chunk_size=...)``, written in place into one
``(n, p)`` matrix.
"""
from __future__ import annotations

from typing import Any

from .attention import attention_for_vmap
from .looped import eval_mode

__all__ = ["vmap_gradients"]


def vmap_gradients(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, causal: bool,
                   attention_dtype: Any) -> tuple[Any, Any]:
    """Per-example gradients ``(n, p)`` and out-to-loss weights, by ``vmap(grad)`` over chunks of examples, in the
    attention ``attention_for_vmap(model, attention_dtype)`` sets (``None``: eager)."""
    import array_api_compat.torch as xp
    import torch
    from torch.func import grad, vmap
    from torch.utils._pytree import tree_map

    from .backend import _free_bytes, _rows, check_labels, chunk_rows
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
