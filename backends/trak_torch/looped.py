"""Plain autograd one example at a time: the closed form's reference, and the path for models ``vmap`` cannot batch.

One job: per-example gradients without ``torch.func`` (recurrent kernels such as ``nn.GRU``, sparse embedding
gradients, ``torch.utils.checkpoint`` with saved-tensor hooks), the mode switch every gradient path runs under,
and the decision to fall back to this path when ``vmap`` fails.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from trak_core.errors import TrakValueError
from trak_core.notices import warn

from .transforms import checkpointing_off

__all__ = ["eval_mode", "batch_norm_layout", "looped_gradients", "refuse_to_loop", "vmap_cannot_batch"]


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` as gradients are taken: in eval mode, and embeddings with ``sparse=True`` giving dense gradients
    (the same values; sparse ones cannot be reshaped or batched by ``vmap``). Every submodule's own ``training``
    flag is restored after (``model.train(flag)`` would set all of them to the top module's: a BatchNorm frozen
    in ``eval()`` inside a training model), and so are the ``sparse`` flags. Eval-mode attention-bias caches are
    bypassed for the duration (``_Uncached``), and gradient checkpointing is off (``checkpointing_off``: timm checks
    its flag in eval mode too)."""
    import torch

    modules = list(model.modules())  # one walk of the tree, parents before their children, for every list here
    modes = [(module, module.training) for module in modules]
    sparse = [module for module in modules
              if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse]
    cached = [(module, module.attention_bias_cache) for module in modules
              if isinstance(getattr(module, "attention_bias_cache", None), dict)]
    model.eval()
    try:
        for module in sparse:
            module.sparse = False
        for module, _ in cached:
            module.attention_bias_cache = _Uncached()
        with checkpointing_off(model, modules):
            yield
    finally:
        for module, cache in cached:
            module.attention_bias_cache = cache
        model.train(modes[0][1])  # through train(), so overrides run (a LoRA layer unmerging its weight)
        for module, training in modes[1:]:
            if module.training != training:  # a submodule of another mode: it and its children, through train()
                module.train(training)
        for module in sparse:
            module.sparse = True


class _Uncached(dict):
    """An eval-mode cache that never holds: LeViT's (and timm's LeViT, TinyViT, EfficientFormer) attention layers
    keep ``attention_biases[:, idxs]`` in ``attention_bias_cache`` in eval mode, made from the first checkpoint's
    parameters outside any gradient: those biases' gradients were 0 and later checkpoints ran with the first one's
    biases. Under ``eval_mode`` each call makes them from the parameters it is given; the user's cache is put back
    after (timm's ``train()``, which ``eval_mode`` calls to restore the modes, then empties it: it is remade from the
    parameters on the next eval-mode forward)."""

    def __contains__(self, key: object) -> bool:
        return False


@contextmanager
def batch_norm_layout(model: Any) -> Iterator[None]:
    """For the duration, the gradient reaching each BatchNorm's output is laid out as its input is.

    PyTorch's CPU backward of an eval-mode ``BatchNorm2d`` on a batch of one example, whose output is read as tokens
    (``.flatten(2).transpose(1, 2)``: LeViT's, CvT's patch embeddings), gets an output gradient whose strides look
    channels-last and takes them for it: its input and parameter gradients came out wrong (1.5e-2 off finite
    differences on LeViT, 1.4e-4 on CvT; O(1) in a small model), where a batch of two, ``vmap`` and finite
    differences agree. Every path that runs plain autograd on one example (the loop, the closed form's check, a batch
    of one) runs under this."""
    import torch

    def layout(module: Any, inputs: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs:
            return
        given = inputs[0]
        form = torch.contiguous_format
        if not given.is_contiguous() and given.ndim in (4, 5):
            last = torch.channels_last if given.ndim == 4 else torch.channels_last_3d
            form = last if given.is_contiguous(memory_format=last) else form
        output.register_hook(lambda grad: grad.contiguous(memory_format=form))

    handles = [module.register_forward_hook(layout) for module in model.modules()
               if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def looped_gradients(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any,
                     causal: bool) -> Any:
    """Per-example gradients ``(n, p)`` by plain autograd, one example at a time (no ``torch.func``, so models
    with ``autograd.Function``s or kernels that ``vmap`` cannot run work too); sparse gradients made dense."""
    import torch
    from torch.utils._pytree import tree_map

    params = {name: tensor.detach().requires_grad_(True) for name, tensor in prepared.params.items()}
    from .outputs import _rows

    buffers = {name for name, _ in model.named_buffers()}  # buffers only: a frozen max_norm table is renormalized
    versions = {name: tensor._version for name, tensor in prepared.frozen.items() if name in buffers}  # in place
    rows = []
    for i in range(_rows(inputs)):
        with torch.enable_grad(), batch_norm_layout(model):
            value = backend.example_output(model, prepared, params, tree_map(lambda t: t[i:i + 1], inputs),
                                           labels[i:i + 1], task, causal)
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True) if value.requires_grad \
                else (None,) * len(params)  # no parameter used: zero gradients
        changed = [name for name, version in versions.items() if prepared.frozen[name]._version != version]
        if changed:  # vmap refuses such a forward ("captured"); one at a time, each example saw another model
            raise TrakValueError(f"the model's forward changed {changed[:3]} in place (a buffer updated in eval "
                                 f"mode): {_NOT_VMAP['captured'].split(', so ')[1]}")
        rows.append(torch.cat([(torch.zeros_like(t) if g is None else g.to_dense() if g.is_sparse else g).reshape(-1)
                               for g, t in zip(grads, params.values())]))
    return torch.stack(rows)


_NOT_VMAP = {  # errors from vmap that a plain-autograd loop would hide, not cure: what each means
    "randomness": "the model draws random numbers in eval mode (F.dropout(x, p) without training=self.training?), "
                  "so its gradients would be noise: make its forward deterministic in eval mode",
    "captured": "the model's forward changes a tensor it holds (a buffer updated in place), so each example would "
                "see another model: keep the forward free of in-place updates in eval mode",
    "out of memory": "memory ran out: pass a smaller TorchBackend(chunk_size=...) (examples per vmap call)",
    "can't allocate memory": "memory ran out: pass a smaller TorchBackend(chunk_size=...) (examples per vmap call)",
}


def refuse_to_loop(exc: Exception, chunk_size: int | None) -> None:
    """Re-raise ``exc`` (with a note saying what to do) when looping one example at a time would hide it."""
    text = str(exc).lower()
    for key, advice in _NOT_VMAP.items():
        if key in text:
            exc.add_note(f"trak-core: {advice}" + (f" (now {chunk_size})" if "chunk_size" in advice and chunk_size
                                                    else ""))
            raise exc


def vmap_cannot_batch(prepared: Any, exc: Exception) -> None:
    """Record that ``vmap`` failed on this checkpoint's model, and say once that gradients now loop."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    prepared.__dict__["_looped"] = first
    warn(f"torch.func.vmap cannot take this model's per-example gradients ({type(exc).__name__}: "
         f"{first[:200]}); they are taken one example at a time with plain autograd instead (the same "
         "numbers, slower). TorchBackend(per_example='loop') chooses this from the start", RuntimeWarning)
