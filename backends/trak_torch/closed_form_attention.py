"""The closed form's uses that are not layer calls: torch's ``nn.MultiheadAttention`` and batch-broadcast parameters.

One job: extend :mod:`trak_torch.closed_form` to vision transformers (torchvision's ViT, Hugging Face's ViT/DeiT,
models built on ``nn.TransformerEncoder``).

- ``nn.MultiheadAttention`` uses its projection weights inside ``F.multi_head_attention_forward`` (the packed
  ``in_proj_weight``, or slices of it for cross-attention, or separate ``q/k/v_proj_weight``, then
  ``out_proj.weight``), not through layer calls that a forward hook sees. While the closed form runs, calls of
  ``torch.nn.functional.linear`` with one of those weights (or a row slice of it: located by storage and
  offset) get a zero perturbation on their output, as a layer's call does; all other calls pass through.
  Those calls are sequence-first, ``(T, n, d)``, or ``(T * n, d)`` for the output projection.
- A parameter whose first dimension is 1 and that is not a layer's (a class token ``(1, 1, d)``, position
  embeddings ``(1, T, d)``) is broadcast over the batch by the model. It is given as ``n`` copies ``(n, ...)``
  that require gradients; the gradient of copy ``i`` is example ``i``'s.

Both are checked, with the layers, against plain autograd one example at a time on each checkpoint's first
batch (a model that uses them otherwise goes to ``vmap``).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["attention_kind", "attention_uses", "broadcast_names", "intercept_linear", "Slice", "locate", "slow_path"]

WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")


def attention_kind(module: Any) -> str | None:
    """``"mha"`` for torch's ``nn.MultiheadAttention`` with its own ``forward``, else ``None``."""
    import torch

    mha = torch.nn.MultiheadAttention
    return "mha" if isinstance(module, mha) and type(module).forward is mha.forward else None


def attention_uses(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool) -> dict[Any, tuple | None]:
    """The ``nn.MultiheadAttention`` modules called on the batch's first example, each with the names of its
    attributed projection weights and biases; ``None`` for one with attributed ``bias_k``/``bias_v``."""
    import torch
    from torch.utils._pytree import tree_map

    from .kronecker import _hooks

    names = {id(tensor): name for name, tensor in prepared.params.items()}
    found: dict[Any, tuple | None] = {}

    def hook(module: Any, args: Any, output: Any) -> None:
        if module not in found:
            tensors = [getattr(module, attr, None) for attr in WEIGHTS]
            tensors += [module.out_proj.weight, module.out_proj.bias]
            found[module] = tuple(names[id(t)] for t in tensors if t is not None and id(t) in names)
            if module.bias_k is not None and id(module.bias_k) in names:  # (1, 1, d) but sequence-first: not
                found[module] = None  # batch-broadcast; the model goes to vmap

    modules = [m for m in model.modules() if attention_kind(m)]
    if modules:
        with torch.no_grad(), _hooks(modules, hook):
            backend._call(model, {**prepared.params, **prepared.frozen}, tree_map(lambda t: t[:1], inputs),
                          causal=causal)
    return found


def broadcast_names(prepared: Any, uncovered: set[str]) -> list[str] | None:
    """The uncovered parameters, when each is batch-broadcast (``ndim >= 2``, first dimension 1), else ``None``."""
    names = sorted(uncovered)
    ok = all(prepared.params[name].ndim >= 2 and prepared.params[name].shape[0] == 1 for name in names)
    return names if ok else None


class Slice:
    """Rows ``[start, start + rows)`` of the parameter ``name``: what one ``linear`` call uses of it."""

    __slots__ = ("name", "start", "rows")

    def __init__(self, name: str, start: int, rows: int) -> None:
        self.name, self.start, self.rows = name, start, rows


def locate(tensor: Any, tracked: dict[int, list[tuple[str, Any]]]) -> Slice | None:
    """The tracked parameter whose row slice ``tensor`` is (same storage, same strides, whole rows), else ``None``."""
    if tensor is None:
        return None
    for name, whole in tracked.get(tensor.untyped_storage().data_ptr(), ()):
        offset = tensor.storage_offset() - whole.storage_offset()
        step = whole.stride(0)
        if (tensor.ndim != whole.ndim or tensor.shape[1:] != whole.shape[1:] or tensor.stride() != whole.stride()
                or offset < 0 or offset % step):
            continue
        start = offset // step
        if start + tensor.shape[0] <= whole.shape[0]:
            return Slice(name, start, int(tensor.shape[0]))
    return None


@contextmanager
def slow_path(modules: list[Any]) -> Iterator[None]:
    """Keep ``nn.MultiheadAttention`` off its fused fast path (``torch._native_multi_head_attention``, which calls
    no ``linear``), taken when nothing it gets requires gradients: a query that does not is given as a leaf that
    does (the same values; ``key``/``value`` that are the query stay the same tensor)."""
    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        query = args[0] if args else kwargs.get("query")
        if query is None or query.requires_grad or not query.is_floating_point():
            return None
        leaf = query.detach().requires_grad_(True)
        return (tuple(leaf if a is query else a for a in args),
                {key: leaf if value is query else value for key, value in kwargs.items()})

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_state = threading.local()
_lock = threading.Lock()
_installed: list[Any] = []  # [the original linear, the number of active users], while the wrapper is installed


def _linear(input: Any, weight: Any, bias: Any = None) -> Any:
    original = _installed[0]
    on_call = getattr(_state, "on_call", None)
    out = original(input, weight, bias)
    return out if on_call is None else on_call(input, weight, bias, out)


@contextmanager
def intercept_linear(on_call: Callable[[Any, Any, Any, Any], Any]) -> Iterator[None]:
    """Route this thread's ``torch.nn.functional.linear`` calls through ``on_call(input, weight, bias, out)``
    (which returns the output to use), for the duration; other threads' calls pass through unchanged."""
    import torch.nn.functional as F

    with _lock:
        if not _installed:
            _installed[:] = [F.linear, 0]
            F.linear = _linear
        _installed[1] += 1
    previous, _state.on_call = getattr(_state, "on_call", None), on_call
    try:
        yield
    finally:
        _state.on_call = previous
        with _lock:
            _installed[1] -= 1
            if _installed[1] == 0:
                F.linear = _installed[0]
                _installed.clear()
