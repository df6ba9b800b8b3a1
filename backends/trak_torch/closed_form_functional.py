"""The closed form's uses that are not layer calls: functional calls inside modules, and bare parameters.

One job: extend :mod:`trak_torch.closed_form` to vision transformers, ConvNeXts and language models whose
embeddings are subclasses (torchvision's and Hugging Face's ViT and ConvNeXt, ``nn.TransformerEncoder``, Gemma,
OPT).

- ``nn.MultiheadAttention`` uses its projection weights inside ``F.multi_head_attention_forward`` (the packed
  ``in_proj_weight``, or row slices of it for cross-attention, or separate ``q/k/v_proj_weight``, then
  ``out_proj.weight``), not through layer calls that a forward hook sees; a ``LayerNorm`` subclass with its own
  ``forward`` (torchvision's channels-first ``LayerNorm2d``) calls ``F.layer_norm`` itself, and an ``Embedding``
  subclass with its own ``forward`` (Gemma's scaled embedding, OPT's offset positions) ``F.embedding``; a
  ``BatchNorm``/``GroupNorm`` subclass with its own ``forward`` (timm's ``BatchNormAct2d`` and ``GroupNormAct``: the
  norm, then an activation) ``F.batch_norm``/``F.group_norm``. While the closed form runs, calls of
  ``torch.nn.functional.linear``, ``layer_norm``, ``embedding``, ``batch_norm`` and ``group_norm`` with one of those
  weights (located by storage and offset) get a zero perturbation on their output, as a layer's call does; all
  other calls pass through. Attention's calls are sequence-first, ``(T, n, d)``, or ``(T * n, d)`` for the output
  projection; the others are batch-first.
- A bare parameter (not a layer's) that the model broadcasts over the batch is given as ``n`` copies that
  require gradients; the gradient of copy ``i`` is example ``i``'s. The copies replace a leading dimension 1
  (a class token ``(1, 1, d)``, position embeddings ``(1, T, d)``), or come first when the other dimensions
  are singletons (a layer scale ``(C, 1, 1)`` multiplying ``(n, C, H, W)``). A 1-D one (a layer scale ``(d,)``
  on channels-last features or tokens, or reshaped to ``(1, d, 1, 1)`` for channels-first ones; CLIP's class token
  ``(d,)`` expanded to ``(n, 1, d)``) is followed through its products with batch-first tensors, such reshapes and
  its expansion over the batch by a torch function mode (``scaled``), which puts its copies, viewed
  ``(n, 1, ..., d)`` (``(n, d, 1, 1)`` for a reshape), in its place. Other bare parameters send the model to
  ``vmap``.

Both are checked, with the layers, against plain autograd one example at a time on each checkpoint's first
batch (a model that uses them otherwise goes to ``vmap``).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from trak_core.errors import TrakTypeError

__all__ = ["FUNCTION", "functional_kind", "functional_uses", "bare_names", "copies", "intercept", "scaled", "Slice",
           "locate", "slow_path"]

WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")
FUNCTION = {"mha": "linear", "layer_norm_call": "layer_norm", "embedding_call": "embedding",
            "batch_norm_call": "batch_norm", "group_norm_call": "group_norm"}  # what each calls


def functional_kind(module: Any) -> str | None:
    """``"mha"`` for torch's ``nn.MultiheadAttention`` with its own ``forward``; ``"layer_norm_call"`` for a
    ``LayerNorm`` subclass with its own ``forward`` and affine parameters; ``"embedding_call"`` for an ``Embedding``
    subclass with its own ``forward`` (Gemma's scaled embedding, OPT's offset positions); ``"batch_norm_call"`` and
    ``"group_norm_call"`` for ``BatchNorm`` and ``GroupNorm`` subclasses with their own ``forward`` and affine
    parameters (timm's ``BatchNormAct2d``, ``GroupNormAct``); else ``None``."""
    import torch

    nn = torch.nn
    if isinstance(module, nn.MultiheadAttention) and type(module).forward is nn.MultiheadAttention.forward:
        return "mha"
    for base, kind, affine in ((nn.LayerNorm, "layer_norm_call", "elementwise_affine"),
                               (nn.modules.batchnorm._BatchNorm, "batch_norm_call", "affine"),
                               (nn.GroupNorm, "group_norm_call", "affine")):
        if isinstance(module, base) and type(module).forward is not base.forward and getattr(module, affine, False):
            return kind
    if isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward:
        return "embedding_call"
    return None


def functional_uses(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool) -> dict[Any, tuple | None]:
    """The modules of a ``functional_kind`` called on the batch's first example, each with ``(kind, names)``:
    the names of its attributed weights and biases; ``None`` for an attention with attributed ``bias_k``/``bias_v``
    (``(1, 1, d)``, but sequence-first: not broadcast over the batch, so the model goes to ``vmap``)."""
    import torch
    from torch.utils._pytree import tree_map

    from .layers import hooks

    names = {id(tensor): name for name, tensor in prepared.params.items()}
    found: dict[Any, tuple | None] = {}

    def hook(module: Any, args: Any, output: Any) -> None:
        if module in found:
            return
        kind = functional_kind(module)
        tensors = [getattr(module, attr, None) for attr in WEIGHTS] + [module.out_proj.weight, module.out_proj.bias] \
            if kind == "mha" else [module.weight, getattr(module, "bias", None)]
        found[module] = (kind, tuple(names[id(t)] for t in tensors if t is not None and id(t) in names))
        if kind == "mha" and module.bias_k is not None and id(module.bias_k) in names:
            found[module] = None

    modules = [m for m in model.modules() if functional_kind(m)]
    if modules:
        with torch.no_grad(), hooks(modules, hook):
            backend._call(model, {**prepared.params, **prepared.frozen}, tree_map(lambda t: t[:1], inputs),
                          causal=causal)
    return found


def bare_names(prepared: Any, uncovered: set[str]) -> tuple[list[str], list[str]] | None:
    """The uncovered (bare) parameters as ``(copied, scales)``, else ``None``. Copied: broadcast over the batch by
    their shape, a leading 1 (``(1, T, d)``: the copies replace it) or singletons after the first dimension
    (``(C, 1, 1)``: the copies come first). Scales: 1-D ``(d,)``, followed through their products with
    batch-first tensors and their reshapes to channels-first scales (``scaled``). Others (a table ``(T, d)`` the
    model slices) could be indexed along the copies' dimension, which a check on two examples would not see: they go
    to ``vmap``."""
    copied, scales = [], []
    for name in sorted(uncovered):
        shape = tuple(prepared.params[name].shape)
        if len(shape) >= 2 and (shape[0] == 1 or all(size == 1 for size in shape[1:])):
            copied.append(name)
        elif len(shape) == 1:
            scales.append(name)
        else:
            return None
    return copied, scales


def copies(tensor: Any, n: int) -> Any:
    """``n`` copies of a bare parameter that require gradients: in place of a leading 1, else in front."""
    shape = tensor.shape[1:] if tensor.ndim >= 2 and tensor.shape[0] == 1 else tensor.shape
    return tensor.detach().expand(n, *shape).clone().requires_grad_(True)


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


@contextmanager
def scaled(copies: dict[int, tuple[Any, Any]], n: int) -> Iterator[None]:
    """Follow 1-D bare parameters (``id -> (parameter, its n copies (n, d))``) through their products with a
    batch-first tensor ``x`` (``x * scale``, ``scale * x``, ``x.mul_(scale)``; ``x.shape[0] == n``, last dimension
    ``d``: a layer scale, channels-last or on tokens), through their reshapes to a channels-first scale
    (``scale.reshape(1, -1, 1, 1)`` or ``.view(-1, 1, 1)``: timm's ConvNeXt and ``LayerScale2d``; the copies come
    in place of the leading 1, or in front), and through their expansion over the batch
    (``token.expand(n, 1, -1)``: CLIP's class token): the copies, viewed ``(n, 1, ..., d)``, take the parameter's
    place. Reading its shape, dtype or device is allowed; any other use of the parameter raises ``NotPerExample``
    (the model goes to ``vmap``)."""
    import torch
    from torch.overrides import TorchFunctionMode

    from .closed_form import NotPerExample

    products = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul_}
    METADATA = {"__get__", "dim", "size", "numel", "is_floating_point", "element_size", "__len__"}  # reads only

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            hits = [i for i, a in enumerate(args) if id(a) in copies and a is copies[id(a)][0]]
            if getattr(func, "__name__", "") in METADATA or (
                    not hits and not any(id(v) in copies and v is copies[id(v)][0] for v in kwargs.values())):
                return func(*args, **kwargs)
            if func is torch.Tensor.expand and hits == [0] and not kwargs:  # a class token (d,), expanded
                scale, sizes = args[0], args[1:]
                sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
                if len(sizes) >= 2 and sizes[0] == n and sizes[-1] in (-1, scale.shape[0]):
                    view = copies[id(scale)][1].view(n, *[1] * (len(sizes) - 2), scale.shape[0])
                    return view.expand(n, *sizes[1:-1], scale.shape[0])
            if func in (torch.Tensor.reshape, torch.Tensor.view) and hits == [0] and not kwargs:  # (1, d, 1, 1)
                scale, sizes = args[0], args[1:]
                sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
                wide = [i for i, size in enumerate(sizes) if size in (-1, scale.shape[0])]
                if len(sizes) >= 2 and len(wide) == 1 and all(size == 1 for i, size in enumerate(sizes)
                                                              if i != wide[0]):
                    shape = [scale.shape[0] if i == wide[0] else 1 for i in range(len(sizes))]
                    return copies[id(scale)][1].view(n, *(shape[1:] if wide[0] else shape))
            if func in products and len(args) == 2 and not kwargs and hits != [0, 1] \
                    and not (func is torch.Tensor.mul_ and hits == [0]):
                i = hits[0]
                scale, other = args[i], args[1 - i]
                if isinstance(other, torch.Tensor) and other.ndim >= 2 and other.shape[0] == n \
                        and other.shape[-1] == scale.shape[0]:
                    view = copies[id(scale)][1].view(n, *[1] * (other.ndim - 2), scale.shape[0])
                    return func(*((view, other) if i == 0 else (other, view)))
            used = next(a for a in (*args, *kwargs.values()) if id(a) in copies and a is copies[id(a)][0])
            raise NotPerExample(f"a bare parameter {tuple(used.shape)} is used by "
                                f"{getattr(func, '__name__', func)}, not as a scale of a batch-first tensor, "
                                "reshaped to a channels-first scale or expanded over the batch")

    with Mode():
        yield


_state = threading.local()
_lock = threading.Lock()
_installed: dict[str, Any] = {}  # the original functions (kept after: a late call still finds them), users


def _original(name: str, args: tuple) -> tuple[Any, Callable[..., Any] | None]:
    """The original function's output on ``args``, and this thread's handler for it; ``None`` for a call made while
    one is running (``F.layer_norm`` and ``F.embedding`` dispatch to themselves again under a torch function mode,
    such as ``scaled``'s), so a call is followed once."""
    if getattr(_state, "running", False):
        return _installed[name](*args), None
    _state.running = True
    try:
        out = _installed[name](*args)
    finally:
        _state.running = False
    return out, getattr(_state, name, None)


def _linear(input: Any, weight: Any, bias: Any = None) -> Any:
    out, on_call = _original("linear", (input, weight, bias))
    return out if on_call is None else on_call(input, weight, bias, out)


def _layer_norm(input: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    out, on_call = _original("layer_norm", (input, normalized_shape, weight, bias, eps))
    return out if on_call is None else on_call(input, normalized_shape, weight, bias, eps, out)


def _embedding(input: Any, weight: Any, padding_idx: Any = None, max_norm: Any = None, norm_type: float = 2.0,
               scale_grad_by_freq: bool = False, sparse: bool = False) -> Any:
    out, on_call = _original("embedding", (input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                                           sparse))
    if on_call is None:
        return out
    return on_call(input, weight, _padding_row(padding_idx, weight), max_norm, scale_grad_by_freq, sparse, out)


def _padding_row(padding_idx: Any, weight: Any) -> Any:
    """The row that ``F.embedding`` keeps out of the gradient: a negative ``padding_idx`` counts from the end
    (``-1`` is the last row, as torch normalizes it), so handlers can compare it with the ids."""
    return padding_idx + weight.shape[0] if padding_idx is not None and padding_idx < 0 else padding_idx


def _batch_norm(input: Any, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Any:
    out, on_call = _original("batch_norm", (input, running_mean, running_var, weight, bias, training, momentum, eps))
    return out if on_call is None else on_call(input, running_mean, running_var, weight, bias, training, eps, out)


def _group_norm(input: Any, num_groups: int, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
    out, on_call = _original("group_norm", (input, num_groups, weight, bias, eps))
    return out if on_call is None else on_call(input, num_groups, weight, bias, eps, out)


WRAPPERS = {"linear": _linear, "layer_norm": _layer_norm, "embedding": _embedding, "batch_norm": _batch_norm,
            "group_norm": _group_norm}


@contextmanager
def intercept(**handlers: Callable[..., Any] | None) -> Iterator[None]:
    """Route this thread's calls of ``torch.nn.functional.linear``, ``layer_norm``, ``embedding``, ``batch_norm``
    and ``group_norm`` through the handler of that name (keywords), called with the function's arguments and then
    its output, and returning the output to use: ``linear(input, weight, bias, out)``, ``layer_norm(input,
    normalized_shape, weight, bias, eps, out)``, ``embedding(input, weight, padding_idx, max_norm,
    scale_grad_by_freq, sparse, out)`` (``padding_idx`` as the row it keeps out of the gradient: a negative one
    counted from the end), ``batch_norm(input, running_mean, running_var, weight, bias, training, eps, out)``,
    ``group_norm(input, num_groups, weight, bias, eps, out)``; for the duration. Other threads' calls, and calls
    without a handler, pass through unchanged."""
    import torch.nn.functional as F

    if set(handlers) - set(WRAPPERS):
        raise TrakTypeError(f"intercept() takes handlers for {sorted(WRAPPERS)}, got {sorted(handlers)}")
    with _lock:
        if not _installed.get("users"):
            _installed.update({name: getattr(F, name) for name in WRAPPERS}, users=0)
            for name, wrapper in WRAPPERS.items():
                setattr(F, name, wrapper)
        _installed["users"] += 1
    previous = {name: getattr(_state, name, None) for name in WRAPPERS}
    for name in WRAPPERS:
        setattr(_state, name, handlers.get(name))
    try:
        yield
    finally:
        for name, handler in previous.items():
            setattr(_state, name, handler)
        with _lock:
            _installed["users"] -= 1
            if _installed["users"] == 0:
                for name in WRAPPERS:
                    setattr(F, name, _installed[name])
