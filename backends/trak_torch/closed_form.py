"""Per-example gradients in closed form for models of Linear, Conv1d/Conv2d, Embedding, Conv1D, norm layers and
``nn.MultiheadAttention`` (with bare parameters and functional calls: :mod:`trak_torch.closed_form_functional`).

One job: the ``per_example="auto"`` fast path of :class:`trak_torch.TorchBackend`. When every
attributed parameter is the weight or bias of such a layer, one batched forward and one backward
pass give each call's input ``a_t`` and output gradient ``delta_t`` (zero perturbations added to
the outputs, as :mod:`trak_torch.kronecker` does); a weight's per-example gradient is then
``sum_t delta_t a_t^T`` (a batched matrix product), a bias's ``sum_t delta_t``, an embedding
table's the output gradients added at the looked-up rows. A norm layer (``BatchNorm`` with running
statistics, ``LayerNorm``, ``GroupNorm``, ``RMSNorm`` and Hugging Face's ``*RMSNorm`` classes)
computes ``y = gamma * xhat + beta``, where ``xhat`` is its input normalized without the affine
parameters (recorded during the forward pass, with the buffers the model was called with); its
weight's per-example gradient is ``sum_t delta_t * xhat_t`` over the positions that share a
``gamma``. ``vmap(grad)`` computes the same numbers with an autograd graph per example, several
times slower for small models. The model runs its own attention (SDPA), not the eager attention
that ``vmap`` needs.

The batched backward pass is right only if examples do not interact in the forward pass (true in
eval mode for these layers, norms and attention within an example); each checkpoint's first batch
is checked on its first two examples against plain autograd one example at a time (no
``torch.func``: models with ``autograd.Function``s that ``vmap`` cannot run are covered too), and
the backend falls back to ``vmap`` where they differ, or where a layer call has no row per example
(``NotPerExample``; then or on any later batch). Token-wise layers (linear, Conv1D, embeddings, layer and RMS
norms) may be called on one row per example, on ``(1, T)`` shared by the batch, or on the batch's tokens
flattened example-major (``(n * T, d)``, OPT's).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from .closed_form_functional import FUNCTION, bare_names, copies, functional_uses, intercept, locate, scaled, slow_path
from .closed_form_layers import NORMS, TOKENWISE, check_rms_norm, closed_form_kind, conv_gradient, normalized
from .closed_form_outside import outside_uses
from .closed_form_parametrized import parametrized_weights, to_originals
from .kronecker_plan import find_uses
from .layers import hooks
from .looped import batch_norm_layout
from .outputs import _rows, batch_logits, check_labels, output_logits
from .routing import picked_rows

__all__ = ["covering_uses", "closed_form_gradients", "NotPerExample", "check_tolerance"]


def check_tolerance(dtype: Any, device: Any) -> float:
    """Relative tolerance of the backend's self-checks (a fast path against a reference or the dense gradient on a
    checkpoint's first examples), which look for structure (examples that interact, a weight used outside its
    module: errors of order 1), not rounding. 1e-9 in float64; 1e-4 in float32 on CPUs; 1e-2 in half precision
    and on CUDA, where cuDNN convolutions run in TF32 (10-bit mantissas) by default and each path rounds
    differently."""
    import torch

    bits = torch.finfo(dtype).bits
    if bits == 64:
        return 1e-9
    return 1e-2 if bits < 32 or getattr(device, "type", "cpu") == "cuda" else 1e-4


class NotPerExample(RuntimeError):
    """A layer call does not have one row per example: the closed form does not apply (``vmap`` does)."""


def covering_uses(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool) -> list | None:
    """The uses ``(module, kind, weight, bias)`` of every attributed parameter, else ``None``: layer calls (weights
    and their own biases); modules whose weights are used by functional calls (``kind`` a key of
    ``closed_form_functional.FUNCTION``, ``weight`` their names); bare parameters, given as per-example copies
    (``module=None``, ``kind`` "copies", or "scale" for 1-D ones); other parameters no layer call covers
    (``kind`` "unused": a table whose module is never called, as an untied BART's ``model.shared``), whose
    gradients are zero as long as autograd finds no use of them (``closed_form_gradients`` raises
    ``NotPerExample`` on a batch that uses one: a table the model slices or indexes goes to ``vmap``)."""
    found = {use.module: (use.kind, use.weight, use.bias) for use in
             find_uses(backend, model, prepared, inputs, causal, kind=closed_form_kind, biases=True).values()}
    parametrized = parametrized_weights(model, prepared, closed_form_kind)  # weight_norm'd: the originals
    for module, (weight, _, bias) in parametrized.items():
        found[module] = (closed_form_kind(module), weight, bias)
    functional = functional_uses(backend, model, prepared, inputs, causal)
    if None in functional.values():
        return None
    covered = {name for _, weight, bias in found.values() for name in (weight, bias) if name} \
        | {name for _, originals, _ in parametrized.values() for name in originals}
    biases = [bias for _, _, bias in found.values() if bias]
    weights = {weight for _, weight, _ in found.values()}
    inside = [name for _, names in functional.values() for name in names]
    tied = {name for kind, names in functional.values() if kind == "embedding_call" for name in names} \
        - {weight for kind, weight, _ in found.values() if kind == "embedding"}  # an embedding tied to a head
    lookups = {name for kind, names in functional.values() if kind == "embedding_call" for name in names}
    repeated = {name for name in inside if inside.count(name) > 1} - lookups  # a table looked up by several
    # embedding modules (BART's encoder and decoder share one): each lookup adds to its rows
    if len(set(biases)) != len(biases) or weights & set(biases) or repeated or (covered & set(inside)) - tied:
        return None
    uncovered = set(prepared.params) - covered - set(inside)
    unused = sorted(name for name in uncovered if bare_names(prepared, {name}) is None)  # tables: unused, or vmap
    bare = bare_names(prepared, uncovered - set(unused)) or ([], [])
    return ([(module, *spec) for module, spec in found.items()]
            + [(module, kind, names, None) for module, (kind, names) in functional.items()]
            + [(None, kind, name, None) for kind, names in zip(("copies", "scale"), bare) for name in names]
            + [(None, "unused", name, None) for name in unused])


def closed_form_gradients(backend: Any, model: Any, prepared: Any, uses: list, inputs: Any, labels: Any, task: Any,
                          causal: bool, *, watch_rows: bool = False, rows_seen: list | None = None) -> tuple[Any, Any]:
    """Per-example gradients ``(n, p)`` (``named_parameters`` order) and the logits, from one backward pass.
    ``watch_rows``: raise ``NotPerExample`` for a layer called on rows picked by data (``trak_torch.routing``: a
    mixture of experts; a torch function mode, so only for the checked batch), or for a Hugging Face ``*RMSNorm``
    whose output is not its weight times its input normalized (``check_rms_norm``). ``rows_seen``: a list to append
    ``(weight name, rows per example)`` to for each layer call (``"shared"`` for one row shared by the batch), so
    that runs on two batch sizes can tell a call on the batch from one on rows the batch does not have
    (``closed_form_check``)."""
    import array_api_compat.torch as xp
    import torch

    functional = {module: names for module, kind, names, _ in uses if kind in FUNCTION}
    spec = {module: (kind, weight, bias) for module, kind, weight, bias in uses
            if module is not None and module not in functional}
    calls: list[tuple[Any, Any, Any]] = []  # (a layer module, or (kind, weight slice, bias slice) of a call; a; z)
    n = _rows(inputs)
    copied = {name: copies(prepared.params[name], n) for _, kind, name, _ in uses if kind in ("copies", "scale")}
    unused = {name: prepared.params[name].detach().requires_grad_(True) for _, kind, name, _ in uses
              if kind == "unused"}  # aliases autograd reports a use of
    scales = {id(prepared.params[name]): (prepared.params[name], copied[name]) for _, kind, name, _ in uses
              if kind == "scale"}  # passed as themselves, their copies swapped in by ``scaled``
    tracked: dict[str, dict[int, list[tuple[str, Any]]]] = {function: {} for function in FUNCTION.values()}
    for module, kind, names, _ in uses:  # the weights each intercepted function looks for, by storage
        for name in names if kind in FUNCTION else ():
            tensor = prepared.params[name]
            tracked[FUNCTION[kind]].setdefault(tensor.untyped_storage().data_ptr(), []).append((name, tensor))
    seen: set[str] = set()
    called: list[Any] = []

    def count(name: str, rows: int) -> None:
        if rows_seen is not None:
            rows_seen.append((name, "shared" if rows == 1 and n > 1 else rows / n))

    def hook(module: Any, args: Any, out: Any) -> Any:
        if module in functional:
            called.append(module)
            return None
        if not args or not hasattr(args[0], "detach"):  # called with keywords only, or not on a tensor
            raise NotPerExample(f"{type(module).__name__} is not called on a tensor as its first argument")
        if picked(args[0]):
            raise NotPerExample(f"{type(module).__name__} is called on rows picked from the batch by a mask or an "
                                "index (tokens routed to an expert, unpadded tokens): which example each row is of "
                                "depends on the data")
        kind, a = spec[module][0], args[0].detach()
        with torch.no_grad():  # a norm's input side: normalized now, with the buffers of this call
            a = normalized(module, kind, a) if kind in NORMS and spec[module][1] else a
            if kind == "rmsnorm-hf" and watch_rows:  # taken by its class name: on the checked batch, its output
                check_rms_norm(module, a, out)        # must be weight * xhat (or Gemma's (1 + weight) * xhat)
        rows = out.shape[0] if out.ndim else 0
        if rows == 1 and a.shape[0] == 1 and n > 1:  # a call shared by the batch, such as position embeddings (1, T)
            a = a.expand(n, *a.shape[1:])  # each example's own perturbation; the sum broadcasts as before
        elif rows != n and (not rows or rows % n or a.shape[0] != rows or kind not in TOKENWISE):
            raise NotPerExample(f"{type(module).__name__} is called on {tuple(a.shape)}, not on {n} examples")
        # else one row per example, or the batch's tokens flattened example-major ((n * T, d): OPT's layers)
        z = torch.zeros((n, *out.shape[1:]) if rows in (1, n) else (n, rows // n, *out.shape[1:]), dtype=out.dtype,
                        device=out.device, requires_grad=True)
        calls.append((module, a, z))
        count(spec[module][1] or spec[module][2], rows)
        return out + z.reshape(out.shape) if rows not in (1, n) else out + z

    def record(kind: str, weight: Any, bias: Any, extra: Any = None) -> tuple | None:
        w = locate(weight, tracked[kind])
        if w is None:
            return None
        b = locate(bias, tracked[kind])
        seen.update(part.name for part in (w, b) if part is not None)
        return kind, w, b, extra

    def linear(x: Any, weight: Any, bias: Any, out: Any) -> Any:
        """An attention projection: sequence-first, ``(T, n, d)``, or ``(T * n, d)`` for the output projection."""
        key = record("linear", weight, bias)
        if key is None:
            return out
        if x.ndim not in (2, 3) or (x.ndim == 2 and x.shape[0] % n) or (x.ndim == 3 and x.shape[1] != n) or picked(x):
            raise NotPerExample(f"an attention projection is called on {tuple(x.shape)}, not on {n} examples")
        a = (x if x.ndim == 3 else x.reshape(-1, n, x.shape[-1])).detach().transpose(0, 1)  # (n, T, d)
        z = torch.zeros((n, a.shape[1], out.shape[-1]), dtype=out.dtype, device=out.device, requires_grad=True)
        calls.append((key, a, z))
        count(key[1].name, x.shape[1] if x.ndim == 3 else x.shape[0])
        return out + z.transpose(0, 1).reshape(out.shape)

    def layer_norm(x: Any, shape: Any, weight: Any, bias: Any, eps: float, out: Any) -> Any:
        """A ``LayerNorm`` subclass's own call (batch-first): ``xhat`` as for a LayerNorm layer."""
        key = record("layer_norm", weight, bias)
        if key is None:
            return out
        if out.ndim == 0 or out.shape[0] != n or picked(x):
            raise NotPerExample(f"a layer norm is called on {tuple(x.shape)}, not on {n} examples")
        with torch.no_grad():
            xhat = torch.nn.functional.layer_norm(x.detach(), shape, None, None, eps)
        z = torch.zeros_like(out, requires_grad=True)
        calls.append((key, xhat, z))
        count(key[1].name, out.shape[0])
        return out + z

    def channel_norm(function: str, x: Any, weight: Any, bias: Any, out: Any, xhat: Any) -> Any:
        """A ``BatchNorm``/``GroupNorm`` subclass's own call (batch-first, channels on dim 1): ``xhat()`` as for
        such a layer."""
        key = record(function, weight, bias)
        if key is None:
            return out
        if out.ndim < 2 or out.shape[0] != n or picked(x):
            raise NotPerExample(f"a {function} is called on {tuple(x.shape)}, not on {n} examples")
        with torch.no_grad():
            a = xhat()
        z = torch.zeros_like(out, requires_grad=True)
        calls.append((key, a, z))
        count(key[1].name, out.shape[0])
        return out + z

    def batch_norm(x: Any, mean: Any, var: Any, weight: Any, bias: Any, training: bool, eps: float, out: Any) -> Any:
        if training and locate(weight, tracked["batch_norm"]) is not None:  # batch statistics: examples interact
            raise NotPerExample("a batch norm is called with the batch's statistics (no running statistics)")
        return channel_norm("batch_norm", x, weight, bias, out, lambda: torch.nn.functional.batch_norm(
            x.detach(), mean, var, None, None, False, 0.0, eps))

    def group_norm(x: Any, groups: int, weight: Any, bias: Any, eps: float, out: Any) -> Any:
        return channel_norm("group_norm", x, weight, bias, out,
                            lambda: torch.nn.functional.group_norm(x.detach(), groups, None, None, eps))

    def embedding(ids: Any, weight: Any, padding_idx: Any, max_norm: Any, by_freq: bool, sparse: bool, out: Any) -> Any:
        """An ``Embedding`` subclass's own lookup (batch-first ids, or ``(1, T)`` shared by the batch)."""
        key = record("embedding", weight, None, padding_idx)
        if key is None:
            return out
        if max_norm is not None or by_freq or sparse or ids.ndim == 0 or ids.shape[0] not in (n, 1):
            raise NotPerExample(f"an embedding is looked up on {tuple(ids.shape)} with max_norm={max_norm}, "
                                f"scale_grad_by_freq={by_freq}, sparse={sparse}")
        z = torch.zeros((n, *out.shape[1:]), dtype=out.dtype, device=out.device, requires_grad=True)
        calls.append((key, ids.expand(n, *ids.shape[1:]), z))
        count(key[1].name, ids.shape[0])
        return out + z

    params = {**prepared.params, **{name: copied[name] for name in copied if id(prepared.params[name]) not in scales},
              **unused, **prepared.frozen}
    intercepted = intercept(linear=linear, layer_norm=layer_norm, embedding=embedding, batch_norm=batch_norm,
                            group_norm=group_norm) if functional else nullcontext()  # F untouched without them
    attention = [module for module, kind, _, _ in uses if kind == "mha"]
    followed = scaled(scales, n) if scales else nullcontext()
    originals_of = {module: found for module, found in parametrized_weights(model, prepared, closed_form_kind).items()
                    if module in spec} if any(weight is not None and weight not in prepared.params
                                              for _, weight, _ in spec.values()) else {}  # weight_norm'd layers
    owners: dict[str, list[Any]] = {}  # each layer-taken weight's layers (their calls are the uses the closed form
    if watch_rows:                      # sees), watched on the checked batch for other uses
        for module, (_, weight, bias) in spec.items():
            for name in (*originals_of.get(module, (None, ()))[1], weight, bias):
                if name in prepared.params:
                    owners.setdefault(name, []).append(module)
        for module, names in functional.items():
            for name in names:
                owners.setdefault(name, []).append(module)
    with torch.enable_grad(), hooks(list(spec) + list(functional), hook), slow_path(attention), intercepted, \
            picked_rows(watch_rows, n, inputs) as picked, followed, batch_norm_layout(model), \
            outside_uses(owners, params, watch_rows):  # ``followed``: first
        logits = output_logits(backend._call(model, params, inputs, causal=causal), backend.logits_fn)
        for module in called:
            if not set(functional[module]) <= seen:  # e.g. the fused fast path of nn.MultiheadAttention
                raise NotPerExample(f"{type(module).__name__} did not use its weights through the functions the closed "
                                    "form follows (linear, layer_norm, embedding, batch_norm, group_norm)")
        logits = batch_logits(logits, n, task.logits_ndim)
        check_labels(task, labels, logits)
        value = task.output(logits, labels, xp=xp)
        perturbations = [z for _, _, z in calls] + list(copied.values())
        deltas = torch.autograd.grad(value.sum(), perturbations + list(unused.values()), allow_unused=True)
    used = [name for name, delta in zip(unused, deltas[len(perturbations):]) if delta is not None]
    if used:
        raise NotPerExample(f"{used[0]} {tuple(prepared.params[used[0]].shape)} is used by an operation the closed "
                            "form does not follow (it is not the weight of a supported layer, nor a bare parameter "
                            "broadcast over the batch)")
    grads = torch.empty((n, prepared.n_params), dtype=prepared.dtype, device=prepared.device)
    views, column = {}, 0
    for name, tensor in prepared.params.items():  # each parameter's block of columns, as (n, rows, cols) views
        width = tensor.numel()
        views[name] = grads[:, column:column + width].unflatten(1, (tensor.shape[0], -1) if tensor.ndim > 1 else (-1,))
        column += width
    parametrized = {weight: module for module, (weight, _, _) in originals_of.items()}
    buffers = {weight: torch.zeros((n, *module.weight.shape), dtype=prepared.dtype, device=prepared.device)
               for weight, module in parametrized.items()}  # a weight_norm'd layer's weight gradients, then its
    views.update({weight: buffer.flatten(2) for weight, buffer in buffers.items()})  # originals' (``to_originals``)
    written: set[str] = set()

    def put(name: str, left: Any, right: Any | None = None) -> None:
        """``views[name] (+)= left @ right`` (batched), or ``left`` itself; the product is written in place."""
        view = views[name]
        if right is None:
            value = left
        elif left.shape[2] == 1:  # one position: an outer product, written without a temporary
            if name not in written:
                torch.mul(left, right, out=view)
                written.add(name)
                return
            value = left * right
        else:
            value = torch.bmm(left, right)
        if name in written:
            view.add_(value.reshape(view.shape))
        else:
            view.copy_(value.reshape(view.shape))
            written.add(name)

    def put_rows(part: Any, value: Any) -> None:
        """``value`` for the rows ``part`` of a parameter: ``put`` when they are all of them, else added."""
        if part.start == 0 and part.rows == prepared.params[part.name].shape[0]:
            return put(part.name, value)
        if part.name not in written:
            views[part.name].zero_()
            written.add(part.name)
        views[part.name][:, part.start:part.start + part.rows].add_(value)

    def put_embedding(name: str, ids: Any, delta: Any, padding_idx: int | None) -> None:
        """An embedding table's gradients: the output gradients added at the looked-up rows, in place."""
        d = delta.reshape(n, -1, prepared.params[name].shape[1])
        ids = ids.reshape(n, -1)
        if padding_idx is not None:
            d = d * (ids != padding_idx).to(d.dtype)[..., None]
        view = views[name]  # (n, vocabulary, width)
        if name not in written:
            view.zero_()
            written.add(name)
        examples = torch.arange(n, device=ids.device)[:, None].expand_as(ids)
        view.index_put_((examples, ids), d, accumulate=True)

    for name, delta in zip(copied, deltas[len(calls):]):
        put(name, (torch.zeros_like(copied[name]) if delta is None else delta).reshape(n, -1))
    for (module, a, z), delta in zip(calls, deltas):
        delta = torch.zeros_like(z) if delta is None else delta.detach()
        if isinstance(module, tuple):  # a functional call: (kind, weight slice, bias slice, padding index)
            kind, w, b, padding_idx = module
            if kind == "embedding":
                put_embedding(w.name, a, delta, padding_idx)
                continue
            if kind == "linear":
                put_rows(w, torch.bmm(delta.transpose(1, 2), a))
                d = delta.sum(1)
            else:  # a norm: positions sharing one gamma, on dim 1 (batch and group norms) or trailing
                width = prepared.params[w.name].numel()
                d, xhat = ((delta.reshape(n, width, -1), a.reshape(n, width, -1)) if kind != "layer_norm" else
                           (delta.reshape(n, -1, width).transpose(1, 2), a.reshape(n, -1, width).transpose(1, 2)))
                put_rows(w, (d * xhat).sum(2))
                d = d.sum(2)
            if b is not None:
                put_rows(b, d)
            continue
        kind, weight, bias = spec[module]
        if kind == "conv":
            if weight:  # else a bias alone (BitFit)
                put(weight, *conv_gradient(module, a, delta))
            if bias:
                put(bias, delta.reshape(n, delta.shape[1], -1).sum(2))
        elif kind in NORMS:
            width = prepared.params[weight or bias].numel()  # positions sharing one gamma: dim 1 of (n, C, ...),
            d, xhat = ((delta.reshape(n, width, -1), a.reshape(n, width, -1)) if kind in NORMS[:2] else  # or last
                       (delta.reshape(n, -1, width).transpose(1, 2), a.reshape(n, -1, width).transpose(1, 2)))
            if weight:
                put(weight, (d * xhat).sum(2))
            if bias:
                put(bias, d.sum(2))
        elif kind == "embedding":
            put_embedding(weight, a, delta, module.padding_idx)
        else:
            a3, d = a.reshape(n, -1, a.shape[-1]), delta.reshape(n, -1, delta.shape[-1])
            if weight and kind == "conv1d":
                put(weight, a3.transpose(1, 2), d)
            elif weight:
                put(weight, d.transpose(1, 2), a3)
            if bias:
                put(bias, d.sum(1))
    for weight, module in parametrized.items():
        if weight not in written:  # not called on this batch: its originals' columns are zero
            continue
        originals = {name: prepared.params[name] for name in originals_of[module][1]}
        for name, value in to_originals(module, originals, buffers[weight]).items():
            views[name].copy_(value.reshape(views[name].shape))
            written.add(name)
    for name in set(views) - written - set(buffers):
        views[name].zero_()
    return grads, logits.detach()
