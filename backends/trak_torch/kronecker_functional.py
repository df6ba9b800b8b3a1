"""Factorized features of weights that modules use inside functional calls, not through a layer call.

One job: extend :mod:`trak_torch.kronecker` to ``nn.MultiheadAttention`` (torchvision's ViT,
``nn.TransformerEncoder``: its packed ``in_proj_weight``, the row slices of it that cross-attention uses,
separate ``q/k/v_proj_weight`` and ``out_proj.weight``, all used inside ``F.multi_head_attention_forward``) and to
``Embedding`` subclasses with their own ``forward`` (Gemma's scaled token table, tied to its head; OPT's offset
positions), which call ``F.embedding`` themselves.

How: while a pass runs, ``torch.nn.functional.linear`` and ``embedding`` are routed through handlers
(:func:`trak_torch.closed_form_functional.intercept`) that find the weight of such a module by storage and offset
(a row slice of ``in_proj_weight`` is found with its first row). Each such call is a use of the weight's block,
exactly as a layer call is: its input side is projected with the block's column factor (the rows of the row factor
for a lookup), a zero perturbation is added to its output, and its output gradient is projected with the rows of
the row factor that the slice covers. A bias that is the same rows of a parameter as long as the weight
(``in_proj_bias`` with ``in_proj_weight``) is folded into the block; any other (``in_proj_bias`` with separate
``q/k/v`` weights) goes to the rest. Attention's calls are sequence-first, ``(T, n, d)``, or ``(T * n, d)`` for the
output projection; lookups are batch-first, or ``(1, T)`` shared by the batch. ``nn.MultiheadAttention``'s fused
fast path, which calls no ``linear``, is switched off while a pass runs (:func:`no_fast_path`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

__all__ = ["Functional", "functional", "call_uses", "intercepted", "batch_layout", "no_fast_path"]

FUNCTIONS = {"mha": "linear", "embedding_call": "embedding"}  # the functional kinds a block can come from


class Functional:
    """A checkpoint's weights used inside functional calls, by function and storage, and its attention modules."""

    def __init__(self, tracked: dict[str, dict[int, list[tuple[str, Any]]]], attention: list[Any]) -> None:
        self.tracked, self.attention = tracked, attention

    def __bool__(self) -> bool:
        return any(self.tracked.values())

    def key(self, function: str, weight: Any) -> tuple | None:
        """``(function, name, start, rows)`` of a call's weight when it is (a row slice of) a tracked one."""
        from .closed_form_functional import locate

        if weight is None:
            return None
        part = locate(_unwrapped(weight), self.tracked[function])
        return None if part is None else (function, part.name, part.start, part.rows)


def _unwrapped(tensor: Any) -> Any:
    """The plain tensor under ``torch.func``'s wrappers: under ``vmap(grad)``, even a slice of a plain parameter
    (``in_proj_weight.split``) is wrapped, and a wrapper has no storage to locate."""
    import torch

    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def functional(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool) -> Functional:
    """The weights of the model's ``nn.MultiheadAttention`` and ``Embedding``-subclass modules called on the batch's
    first example (an attention with attributed ``bias_k``/``bias_v`` is left to the rest, as a whole)."""
    from .closed_form_functional import functional_uses

    tracked: dict[str, dict[int, list[tuple[str, Any]]]] = {function: {} for function in FUNCTIONS.values()}
    attention = []
    for module, spec in functional_uses(backend, model, prepared, inputs, causal).items():
        if spec is None or spec[0] not in FUNCTIONS or (spec[0] == "embedding_call" and (
                module.max_norm is not None or module.scale_grad_by_freq or module.sparse)):
            continue  # left to the rest, as a whole
        kind, names = spec
        attention += [module] if kind == "mha" else []
        for name in names:
            tensor = prepared.params[name]
            tracked[FUNCTIONS[kind]].setdefault(tensor.untyped_storage().data_ptr(), []).append((name, tensor))
    return Functional(tracked, attention)


_lock = threading.Lock()
_fast_path: dict[str, Any] = {"users": 0}


@contextmanager
def no_fast_path(active: bool = True) -> Iterator[None]:
    """``nn.MultiheadAttention`` without its fused fast path (``torch._native_multi_head_attention``, which calls no
    ``linear``), for the duration; reference-counted across threads (the switch is torch's, process-wide; the slow
    path computes the same numbers)."""
    import torch

    if not active:
        yield
        return
    with _lock:
        if _fast_path["users"] == 0:
            _fast_path["before"] = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _fast_path["users"] += 1
    try:
        yield
    finally:
        with _lock:
            _fast_path["users"] -= 1
            if _fast_path["users"] == 0:
                torch.backends.mha.set_fastpath_enabled(_fast_path["before"])


def intercepted(found: Functional | None, on_call: Callable[..., Any]) -> Any:
    """A context in which each ``linear``/``embedding`` call with a tracked weight returns
    ``on_call(key, input, output, extra)`` (``key`` as :meth:`Functional.key`; ``extra``: the call's bias, or its
    ``padding_idx`` counted from the table's start, as ``F.embedding`` normalizes a negative one); a no-op without
    tracked weights."""
    from .closed_form_functional import intercept

    if not found:
        return nullcontext()

    def linear(x: Any, weight: Any, bias: Any, out: Any) -> Any:
        key = found.key("linear", weight)
        return out if key is None else on_call(key, x, out, bias)

    def embedding(ids: Any, weight: Any, padding_idx: Any, max_norm: Any, by_freq: bool, sparse: bool,
                  out: Any) -> Any:
        key = found.key("embedding", weight)
        return out if key is None else on_call(key, ids, out, padding_idx)

    return intercept(linear=linear, embedding=embedding)


def call_uses(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool, found: Functional,
              use: Callable[..., Any]) -> list[Any]:
    """The functional calls with tracked weights on the batch's first example, as ``use(key, kind, weight, bias,
    start, rows, padding_idx)`` (``kronecker.Use``), one per distinct weight slice, in call order."""
    import torch
    from torch.utils._pytree import tree_map

    params = prepared.params
    uses: dict[tuple, Any] = {}

    def record(key: tuple, x: Any, out: Any, extra: Any) -> Any:
        function, name, start, rows = key
        if key in uses:
            return out
        if function == "embedding":
            uses[key] = use(key, "embedding", name, None, start, rows, extra)
            return out
        b = None if extra is None else found.key("linear", extra)  # the bias: folded when it is the same rows
        folded = b is not None and b[2:] == key[2:] and params[b[1]].shape[0] == params[name].shape[0]
        uses[key] = use(key, "linear", name, b[1] if folded else None, start, rows, None)
        return out

    if found:
        with torch.no_grad(), no_fast_path(bool(found.attention)), intercepted(found, record):
            backend._call(model, {**params, **prepared.frozen}, tree_map(lambda t: t[:1], inputs), causal=causal)
    return list(uses.values())


def batch_layout(kind: str, x: Any, out: Any, n: int) -> tuple[Any, Any, Callable[[Any], Any]]:
    """A functional call on ``n`` examples in one batched pass: its input ``(n, ...)`` (ids, or ``(n, T, d)``), a
    zero perturbation ``(n, ...)`` that requires gradients, and how to add it to the call's output. Raises
    ``NotPerExample`` for a call without one row (or one sequence position) per example."""
    import torch

    from .closed_form import NotPerExample

    if kind == "embedding":
        if x.ndim == 0 or x.shape[0] not in (1, n):
            raise NotPerExample(f"a table is looked up on {tuple(x.shape)}, not on {n} examples")
        z = torch.zeros((n, *out.shape[1:]), dtype=out.dtype, device=out.device, requires_grad=True)
        return x.expand(n, *x.shape[1:]), z, lambda o: o + z
    if not ((x.ndim == 3 and x.shape[1] == n) or (x.ndim == 2 and x.shape[0] % n == 0)):
        raise NotPerExample(f"an attention projection is called on {tuple(x.shape)}, not on {n} examples")
    a = (x if x.ndim == 3 else x.reshape(-1, n, x.shape[-1])).transpose(0, 1)  # (n, T, d): sequence-first
    z = torch.zeros((n, a.shape[1], out.shape[-1]), dtype=out.dtype, device=out.device, requires_grad=True)
    return a, z, lambda o: o + z.transpose(0, 1).reshape(o.shape)
