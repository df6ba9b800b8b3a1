"""Rows chosen by data: the tokens a mixture of experts routes to an expert, or unpadded tokens.

One job: tell the closed form (:mod:`trak_torch.closed_form`) that a layer is called on rows picked from a batch
tensor by a mask or an index (``hidden[route]``, ``hidden[None, top_x]``, ``hidden.index_select(0, idx)``,
``hidden.masked_select(mask)``), or on values computed from such rows. The closed form takes a layer's rows to be
one per example, or each example's tokens one after the other; picked rows are neither, and their number per
example depends on the data (an expert gets 2 tokens of one example and 4 of the next), so a call on them sends the
checkpoint to ``vmap`` (``NotPerExample``), even when the count happens to divide by the batch size. Watched on the
batch the closed form is checked on (a model that routes tokens does so on every batch), not on later ones.

Not picked by data: integers, slices and ``None`` s on the first dimension, rows taken in order by an index that
``torch.arange`` made in the forward (also viewed as ``(n, 1, 1)``: CLIP's end-of-text token
``hidden[torch.arange(n), eos]``, Hugging Face's padding masks ``mask[batch_idx, kv_idx]``), and lookups in a
parameter or a buffer (a position table indexed by positions). An index computed otherwise is a pick even where it
equals ``arange``, as a router's does in a batch whose tokens all go to one expert first.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["picked_rows"]


def _first_index(index: Any) -> Any:
    """What ``tensor[index]`` indexes the first dimension with (``None`` s add dimensions and are skipped)."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if part is not None:
            return part
    return None


@contextmanager
def picked_rows(watch: bool = True, rows: int | None = None, inputs: Any = None) -> Iterator[Any]:
    """While active, ``picked(tensor) -> bool``: whether ``tensor`` holds rows picked by data from a tensor computed
    from the batch ``inputs`` (or anything computed from such rows: slices, splits, activations). Lookups in
    tensors not computed from the batch (parameters, buffers, position tables built in the forward) are not picks.
    ``rows``: the batch's examples: rows picked by a boolean mask over ``(examples, tokens)`` and regrouped into one
    row per example (``hidden[eos_mask].view(n, -1, d)``, BART's classification head) are the examples' again.
    ``watch=False``: nothing is watched (every op of the forward passes through a torch function mode while
    watching: 15-25% of a small model's closed-form step on a CPU)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    if not watch:
        yield lambda tensor: False
        return

    derived = {id(t): t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}  # computed from the batch
    marked: dict[int, tuple[Any, bool]] = {}  # id -> (the tensor, kept alive: its id is not reused; grouped by
    ranges: dict[int, Any] = {}  # example), and storage address -> torch.arange's outputs and their casts
    selections = {torch.Tensor.__getitem__, torch.index_select, torch.Tensor.index_select, torch.masked_select,
                  torch.Tensor.masked_select, torch.gather, torch.Tensor.gather, torch.take_along_dim,
                  torch.Tensor.take_along_dim, torch.take, torch.Tensor.take}
    casts = {torch.Tensor.to, torch.Tensor.long, torch.Tensor.int, torch.Tensor.type, torch.Tensor.contiguous,
             torch.Tensor.clone}
    reshapes = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
                torch.Tensor.unflatten}

    def picked(tensor: Any) -> bool:
        return bool(marked) and id(tensor) in marked

    def from_range(index: Any) -> bool:
        return index.untyped_storage().data_ptr() in ranges

    def tensors(args: tuple, kwargs: dict) -> list:
        found = []
        for value in (*args, *kwargs.values()):
            for item in (value if isinstance(value, (list, tuple)) else (value,)):
                if isinstance(item, torch.Tensor):
                    found.append(item)
        return found

    def pick(func: Any, args: tuple, kwargs: dict) -> bool | None:
        """``None``: not rows picked from a batch tensor; else whether the picks come grouped by example."""
        source = args[0] if args else kwargs.get("input")
        if not isinstance(source, torch.Tensor) or source.ndim == 0 or id(source) not in derived:
            return None
        if func in (torch.masked_select, torch.Tensor.masked_select, torch.take, torch.Tensor.take):
            return False
        if func is not torch.Tensor.__getitem__:  # index_select, gather, take_along_dim: along dim 0 only
            dim = args[1] if len(args) > 1 and not isinstance(args[1], torch.Tensor) else kwargs.get("dim", 0)
            index = args[2] if len(args) > 2 else kwargs.get("index", args[1] if len(args) > 1 else None)
            if dim not in (0, -source.ndim) or (isinstance(index, torch.Tensor) and from_range(index)):
                return None
            return False
        index = _first_index(args[1] if len(args) > 1 else None)
        if isinstance(index, (list, tuple)):
            try:
                index = torch.as_tensor(index)
            except (TypeError, ValueError, RuntimeError):
                return False
        if not isinstance(index, torch.Tensor):
            return None  # an integer, a slice, an Ellipsis
        if index.dtype == torch.bool:  # tokens by a mask; grouped when the mask is over (examples, tokens)
            return index.ndim >= 2 and index.shape[0] == source.shape[0] == rows
        if index.ndim == 0 or index.shape[0] != source.shape[0] or not from_range(index):
            return False  # an index computed from the data equals arange in some batches (all tokens to one expert)
        order = torch.arange(source.shape[0], device=index.device, dtype=index.dtype)
        return None if bool(torch.all(index == order.view(-1, *[1] * (index.ndim - 1)))) else False

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            outs = [o for o in (out if isinstance(out, (list, tuple)) else (out,)) if isinstance(o, torch.Tensor)]
            if not outs:
                return out
            if func is torch.arange or (func in casts and args and isinstance(args[0], torch.Tensor)
                                        and from_range(args[0])):
                ranges[out.untyped_storage().data_ptr()] = out
                return out
            ins = tensors(args, kwargs)
            if any(id(t) in derived for t in ins):
                derived.update((id(o), o) for o in outs)
            if func in selections and isinstance(out, torch.Tensor):
                grouped = pick(func, args, kwargs)
                if grouped is not None:  # picked again from picked rows: not grouped any more
                    marked[id(out)] = (out, grouped and not picked(args[0] if args else None))
                    return out
            hit = next((t for t in ins if picked(t)), None)
            if hit is not None:  # anything computed from picked rows: slices, splits, casts, activations, products
                grouped = marked[id(hit)][1]
                for o in outs:
                    if func in reshapes and grouped and o.ndim and o.shape[0] == rows and o.numel() == hit.numel():
                        continue  # regrouped one row per example: the examples' rows again
                    marked[id(o)] = (o, grouped and o.ndim > 0 and hit.ndim > 0 and o.shape[0] == hit.shape[0])
            return out

    with Mode():
        yield picked
