"""Factorized (``proj_type="kronecker"``) features of torch models, without per-example gradients of layers.

One job: find a model's factorizable layers and compute their projected per-example gradients from
what flows through them (``trak_core.kronecker`` is the specification).

How: forward hooks on ``Linear``, ``Conv2d`` and ``Conv1d`` (``groups=1``, zero padding), ``Embedding`` (no
``max_norm``) and Hugging Face's ``Conv1D`` modules project each call's input side with the
layer's factor and add a zero perturbation ``z`` to its output. ``torch.func.vmap(grad)`` of the
task output with respect to the perturbations (and to the remaining parameters, which are
projected densely) gives each example's output gradients ``delta``, which are projected with the
other factor; a layer's features are ``sum_t (P_rows^T u_t)(P_cols^T v_t)^T``. Nothing of size
``p`` is formed per example: memory is that of the activations and their gradients.

A module counts when it is called with an attributed weight (tied weights: each use adds to the
same block). So do the ``F.linear`` and ``F.embedding`` calls of ``nn.MultiheadAttention`` and of ``Embedding``
subclasses with their own ``forward`` (:mod:`trak_torch.kronecker_functional`). Parameters used any other way are
in the rest. On the first example of a checkpoint's
first batch, the features are checked against the dense per-example gradient of the layers
(``kronecker_check.check_plan``), so a weight also used outside its module is an error, not a wrong answer.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

from trak_core.errors import TrakValueError
from trak_core.kronecker import Kronecker, KroneckerPlan, Layer, factor, make_plan, rest_seed

from .kronecker_rest import RestPass, check, rest_plan
from .kronecker_sides import input_side, output_side, rows_first
from .layers import computes_linear, hooks, kronecker_kind, layer_kind
from .looped import batch_norm_layout
from .transforms import for_transforms

__all__ = ["Factorized", "find_uses", "discover", "factorized_state", "batch_features"]

log = logging.getLogger("trak_core")
CHUNK_BYTES = 512 * 2**20  # per vmap call: output gradients, perturbations and projected sides


@dataclass
class Use:
    """One module whose calls feed a layer: its kind, the layer's block and whether its bias is folded. For a
    functional call (:mod:`trak_torch.kronecker_functional`), ``module`` is its key ``(function, weight, start,
    rows)``: the call uses rows ``[start, start + rows)`` of the weight."""

    module: Any
    kind: str
    weight: str
    bias: str | None
    start: int = 0
    rows: int | None = None
    padding_idx: int | None = None
    function: bool = False

    def row_factor(self, rows: Any) -> Any:
        """The rows of a block's row factor that this use's calls reach."""
        return rows if self.rows is None else rows[self.start:self.start + self.rows]


@dataclass
class Factorized:
    """A checkpoint's plan, its uses and factors (on the model's device, in the projection dtype)."""

    plan: KroneckerPlan
    uses: list[Use]
    factors: list[tuple[Any, Any]]
    dtype: Any
    checked: bool = False
    batched: bool | None = None  # one batched backward pass instead of vmap (examples independent; no rest, or
    # a rest of norms and bare parameters: kronecker_rest)
    functional: Any = None  # kronecker_functional.Functional: weights used inside functional calls
    rest: Any = None  # the rest as a TorchCheckpoint of its own (the reference of kronecker_rest.check)
    rest_plan: Any = None  # kronecker_rest.RestPlan: the rest in the batched pass


def _layer(kind: str, weight: Any, bias: bool, name: str, bias_name: str | None) -> Layer:
    rows, cols = int(weight.shape[0]), int(weight[0].numel())
    if kind == "conv1d":
        return Layer(name, rows + bias, cols, bias_name, "rows" if bias else None)
    return Layer(name, rows, cols + bias, bias_name, "cols" if bias else None)


def find_uses(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool,
              kind: Callable[[Any], str | None] = kronecker_kind, *, biases: bool = False) -> dict[Any, Use]:
    """The modules of a ``kind`` (default: the factorizable layers) called with an attributed weight on the batch's
    first example, in call order; with ``biases``, also those called with an attributed bias alone (``weight``
    ``None``: BitFit, the closed form)."""
    import torch
    from torch.utils._pytree import tree_map

    names = {id(tensor): name for name, tensor in prepared.params.items()}
    found: dict[Any, Use] = {}

    def hook(module: Any, args: Any, output: Any) -> None:
        weight, bias = names.get(id(module.weight)), names.get(id(getattr(module, "bias", None)))
        if module in found or (weight is None and not (biases and bias is not None)):
            return
        if kind is kronecker_kind and not layer_kind(module, own_forward=True) \
                and not computes_linear(module, args, output):
            return  # a Linear subclass that computes something else: its weight goes to the rest
        found[module] = Use(module, kind(module), weight, bias)

    candidates = [m for m in model.modules() if kind(m) is not None]
    with torch.no_grad(), hooks(candidates, hook):
        backend._call(model, {**prepared.params, **prepared.frozen}, tree_map(lambda t: t[:1], inputs), causal=causal)
    return found


def discover(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool,
             options: Kronecker, k: int) -> tuple[KroneckerPlan, list[Use], Any]:
    """The plan of ``model``: the supported modules called with attributed weights on one example, and the
    functional calls of ``nn.MultiheadAttention`` and ``Embedding`` subclasses (``kronecker_functional``)."""
    from .kronecker_functional import call_uses, functional

    found: dict[Any, Use] = dict(find_uses(backend, model, prepared, inputs, causal))
    inside = functional(backend, model, prepared, inputs, causal)
    for use in call_uses(backend, model, prepared, inputs, causal, inside,
                         lambda key, *spec: Use(key, *spec, function=True)):
        found[use.module] = use
    by_weight: dict[str, list[Use]] = {}
    for use in found.values():
        by_weight.setdefault(use.weight, []).append(use)
    layers, folded, shared = {}, set(), _shared_biases(by_weight)
    for weight, uses in by_weight.items():
        orientation = {"conv1d" if u.kind == "conv1d" else "rows-out" for u in uses}
        if len(orientation) > 1:
            raise TrakValueError(f"weight {weight!r} is used by a Conv1D and by another layer type; factorize it "
                                 "densely: leave it out of the layers with proj_type='rademacher'")
        biases = [u.bias for u in uses if u.bias is not None and u.bias not in shared]
        bias = biases[0] if biases else None
        for u in uses:  # a use with another bias leaves that bias to the rest
            u.bias = u.bias if u.bias == bias else None
        if bias is not None:
            folded.add(bias)
        layers[weight] = _layer(uses[0].kind, prepared.params[weight], bias is not None, weight, bias)
    used_biases = {u.bias for u in found.values()} - {None}
    clash = used_biases & set(layers)
    if clash:
        raise TrakValueError(f"parameters {sorted(clash)} are both a layer's weight and another layer's bias")
    ordered = [layers[name] for name in prepared.params if name in layers]
    rest = [(name, int(t.numel())) for name, t in prepared.params.items() if name not in layers and name not in folded]
    plan = make_plan(ordered, rest, k, options)
    index = {block.layer.name: block.index for block in plan.blocks}
    uses = sorted(found.values(), key=lambda u: index[u.weight])
    return plan, uses, inside


def _shared_biases(by_weight: dict[str, list[Use]]) -> set[str]:
    """The biases that layers of different weights add (one ``bias`` Parameter assigned to two ``Linear``s): their
    gradient sums those layers' output gradients, which no one block sees, so they go to the rest (densely
    projected) instead of being folded into a block."""
    owners: dict[str, set[str]] = {}
    for weight, uses in by_weight.items():
        for use in uses:
            if use.bias is not None:
                owners.setdefault(use.bias, set()).add(weight)
    return {bias for bias, weights in owners.items() if len(weights) > 1}


def factorized_state(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool, *, k: int, seed: int,
                     checkpoint: int, options: Kronecker) -> Factorized:
    """The cached ``Factorized`` of ``prepared`` (made on its first batch)."""
    import torch

    key = (k, seed, checkpoint, options)
    cache = prepared.__dict__.setdefault("_kronecker", {})
    if key not in cache:
        plan, uses, inside = discover(backend, model, prepared, inputs, causal, options, k)
        dtype = prepared.dtype if torch.finfo(prepared.dtype).bits >= 32 else torch.float32
        factors = []
        for block in plan.blocks:
            made = [torch.as_tensor(factor(d, kk, seed=seed, checkpoint=checkpoint, index=block.index, side=side,
                                           dtype="float64")).to(device=prepared.device, dtype=dtype)
                    for d, kk, side in ((block.layer.rows, block.k_rows, "rows"),
                                        (block.layer.cols, block.k_cols, "cols"))]
            factors.append((made[0], made[1]))
        cache[key] = Factorized(plan, uses, factors, dtype, functional=inside)
    return cache[key]


def batch_features(backend: Any, model: Any, prepared: Any, state: Factorized, inputs: Any, labels: Any, task: Any,
                   causal: bool, *, seed: int, checkpoint: int, chunk: int | None = None,
                   attention: tuple[Callable[[], Any], Callable[[], Any]] = (nullcontext, nullcontext)) -> Any:
    """Features ``(n, k)`` of a checked batch (the backend computes ``out_to_loss`` on its own); ``attention``: the
    contexts of the ``vmap`` pass and of the batched pass (a Hugging Face model's attention implementation)."""
    import torch
    from torch.func import grad, vmap
    from torch.utils._pytree import tree_map

    from trak_core.projection import project

    from .backend import _rows, output_logits
    from .closed_form import check_tolerance
    from .kronecker_functional import batch_layout, intercepted, no_fast_path

    plan, uses, dtype, inside = state.plan, state.uses, state.dtype, state.functional
    modules = [use.module for use in uses if not use.function]
    by_module = {use.module: (use, plan.block(use.weight), state.factors[plan.block(use.weight).index])
                 for use in uses}
    shapes: list[tuple[Any, tuple]] = []  # per call on one example: its module (or key) and its output shape; not
    # always (1, ...): attention's calls are sequence-first, OPT's layers take tokens flattened, (T, d)

    def record(module: Any, args: Any, output: Any) -> None:
        shapes.append((module, tuple(output.shape)))

    def record_call(key: tuple, x: Any, out: Any, extra: Any) -> Any:
        shapes.append((key, tuple(out.shape)))
        return out

    def slow() -> Any:  # nn.MultiheadAttention calls its weights through linear only off its fused fast path
        return no_fast_path(bool(inside is not None and inside.attention))

    def known(key: Any) -> tuple:
        if key not in by_module:
            raise TrakValueError(f"proj_type='kronecker': {key[0]}() is called with rows {key[2]} to "
                                 f"{key[2] + key[3]} of {key[1]!r}, which the batch's first example did not use; "
                                 "use proj_type='rademacher'")
        return by_module[key]

    n = _rows(inputs)
    with torch.no_grad(), hooks(modules, record), intercepted(inside, record_call), slow(), attention[0]():
        backend._call(model, {**prepared.params, **prepared.frozen}, tree_map(lambda t: t[:1], inputs), causal=causal)
    import array_api_compat.torch as xp

    rest = {name: prepared.params[name] for name in plan.rest}
    layers = {name: t for name, t in prepared.params.items() if name not in rest}

    def output(zs: list, rest_params: dict, x: Any, y: Any) -> tuple[Any, list]:
        sides, count = [], [0]

        def hook(module: Any, args: Any, out: Any) -> Any:
            i = count[0]
            count[0] += 1
            use, block, pair = by_module[module]
            sides.append(input_side(use, block, pair, args[0], dtype))
            return out + zs[i]

        def call(key: tuple, x: Any, out: Any, extra: Any) -> Any:  # under vmap: every row, the example's
            use, block, pair = known(key)
            sides.append(input_side(use, block, pair, x, dtype))
            count[0] += 1
            return out + zs[count[0] - 1]

        one = tree_map(lambda t: t[None], x)
        with hooks(modules, hook), intercepted(inside, call), slow():
            out = output_logits(backend._call(model, {**layers, **rest_params, **prepared.frozen}, one,
                                              causal=causal), backend.logits_fn)
        if count[0] != len(shapes):
            raise TrakValueError(f"proj_type='kronecker': the model made {count[0]} layer calls on one example under "
                                 f"torch.func and {len(shapes)} without; use proj_type='rademacher'")
        out = out.reshape(1, -1) if task.logits_ndim == 2 else out
        return task.output(out, y[None], xp=xp)[0], sides

    per_call = sum(math.prod(shape) for _, shape in shapes) + plan.n_rest  # output gradients, rest gradients
    per_example = 4 * torch.finfo(prepared.dtype).bits // 8 * max(1, per_call)  # x4: activations kept for backward
    size = chunk or max(1, min(256, CHUNK_BYTES // per_example))
    step = vmap(grad(output, argnums=(0, 1), has_aux=True), in_dims=(0, None, 0, 0))

    def per_example(x: Any, y: Any, m: int) -> tuple[list, list, Any]:
        zs = [torch.zeros((), dtype=prepared.dtype, device=prepared.device).expand(m, *shape) for _, shape in shapes]
        with attention[0](), for_transforms(model):  # no requires_grad_ hooks, no checkpointing under vmap
            (deltas, rest_grads), sides = step(zs, rest, x, y)
        return deltas, sides, rest_grads

    def batched(x: Any, y: Any, m: int) -> tuple[list, list, Any]:
        """One batched backward pass (no vmap): right when examples do not interact (checked once); the rest's
        gradients from its norm layers' calls and bare parameters' copies (``kronecker_rest``)."""
        sides, zs = [], []
        extra = RestPass(state.rest_plan, prepared, m) if plan.n_rest else None

        def hook(module: Any, args: Any, out: Any) -> Any:
            use, block, pair = by_module[module]
            a = args[0].detach()
            if out.ndim and out.shape[0] == a.shape[0] == 1 < m:  # a call shared by the batch: positions (1, T)
                a = a.expand(m, *a.shape[1:])  # each example's own perturbation; the sum broadcasts as before
                zs.append(torch.zeros((m, *out.shape[1:]), dtype=out.dtype, device=out.device, requires_grad=True))
            else:
                zs.append(torch.zeros_like(out, requires_grad=True))
            sides.append(input_side(use, block, pair, a, dtype))
            return out + zs[-1]

        def call(key: tuple, x: Any, out: Any, extra: Any) -> Any:
            use, block, pair = known(key)
            a, z, add = batch_layout(use.kind, x.detach(), out, m)
            sides.append(input_side(use, block, pair, a, dtype))
            zs.append(z)
            return add(out)

        norms = list(extra.found.norms) if extra else []
        with torch.enable_grad(), hooks(modules, hook), hooks(norms, extra.hook if extra else None), \
                intercepted(inside, call), slow(), attention[1](), batch_norm_layout(model):
            params = extra.params() if extra else prepared.params
            out = output_logits(backend._call(model, {**params, **prepared.frozen}, x, causal=causal),
                                backend.logits_fn)
            if task.logits_ndim == 2 and out.ndim == 1:
                out = out[:, None]
            deltas = torch.autograd.grad(task.output(out, y, xp=xp).sum(), zs + (extra.perturbations() if extra
                                                                                   else []), allow_unused=True)
        rest_grads = extra.gradients(list(deltas[len(zs):]), plan.rest) if extra else None
        return [torch.zeros_like(z) if d is None else d for d, z in zip(deltas, zs)], sides, rest_grads

    def features(x: Any, y: Any, m: int, run: Any) -> Any:
        deltas, sides, rest_grads = run(x, y, m)
        block_out = torch.zeros((m, plan.k), dtype=dtype, device=prepared.device)
        for (module, _), delta, side in zip(shapes, deltas, sides):
            use, block, pair = by_module[module]
            side = side.reshape(m, -1, side.shape[-1])
            row, col = rows_first(use, side, output_side(use, pair, delta, m, dtype))
            product = torch.bmm(row.transpose(1, 2), col).reshape(m, -1)[:, :block.k]
            block_out[:, block.start:block.start + block.k] += product * (1.0 / math.sqrt(block.k))
        if plan.n_rest:
            flat = (rest_grads if isinstance(rest_grads, torch.Tensor) else  # (m, n_rest) from the closed form
                    torch.cat([rest_grads[name].reshape(m, -1) for name in plan.rest], dim=1)).to(dtype)
            block_out[:, plan.k - plan.k_rest:] = project(flat, plan.k_rest, seed=rest_seed(seed),
                                                          checkpoint=checkpoint)
        return block_out

    def independent() -> bool | None:
        """Whether the batch's first two examples in one batched pass give the features each gives alone (``None``
        with one example: nothing to tell); the decision and its reason go to the log."""
        if n < 2:
            return None
        try:
            together = features(tree_map(lambda t: t[:2], inputs), labels[:2], 2, batched)
            alone = torch.cat([features(tree_map(lambda t: t[i:i + 1], inputs), labels[i:i + 1], 1, batched)
                               for i in range(2)])
        except RuntimeError as exc:  # NotPerExample (a functional call without one row per example), or a call the
            log.info("torch backend: factorized features through vmap: %s", exc)  # batched pass cannot follow (a
            return False  # (1, d) call taken for one shared by the batch)
        scale = float(torch.linalg.vector_norm(alone)) or 1.0
        error = float(torch.linalg.vector_norm(together - alone)) / scale
        tolerance = check_tolerance(prepared.dtype, prepared.device)  # the model's rounding, not the features'
        log.info("torch backend: factorized features %s: the first two examples together are %.1e from each alone "
                 "(tolerance %.0e)", "in one batched pass" if error <= tolerance else "through vmap (examples "
                 "interact)", error, tolerance)
        return error <= tolerance

    def rest_in_batched_pass() -> bool:
        """Whether the batched pass gives the rest's gradients: a rest of norms and bare parameters, equal to plain
        autograd one example at a time on the batch's first (two) examples; the reason goes to the log."""
        state.rest = _rest_checkpoint(prepared, plan)
        state.rest_plan = rest_plan(backend, model, prepared, plan, inputs, causal)
        if state.rest_plan is None:
            log.info("torch backend: factorized features through vmap: the rest (%s parameters outside factorizable "
                     "layers) is not only norm layers' gains and biases and bare parameters broadcast over the batch",
                     f"{plan.n_rest:,}")
            return False
        m = min(2, n)
        first, first_labels = tree_map(lambda t: t[:m], inputs), labels[:m]
        try:
            got = batched(first, first_labels, m)[2]
        except RuntimeError as exc:  # NotPerExample too
            log.info("torch backend: factorized features through vmap: %s", exc)
            return False
        with attention[1]():
            right, error, tolerance = check(backend, model, state.rest, first, first_labels, task, causal, got,
                                            prepared.dtype)
        if not right:
            log.info("torch backend: factorized features through vmap: the rest's gradients in the batched pass are "
                     "%.1e from plain autograd (tolerance %.0e)", error, tolerance)
        return right

    if state.batched is None and backend.per_example != "auto":
        state.batched = False
        log.info("torch backend: factorized features through vmap: per_example='vmap'")
    if state.batched is None and plan.n_rest and state.rest_plan is None and not rest_in_batched_pass():
        state.batched = False
    if state.batched is None:  # once per checkpoint, on its first batch of two or more examples
        state.batched = independent()
    run = batched if state.batched or (state.batched is None and n == 1) else per_example  # one example: alone
    size = max(size, 64) if state.batched and chunk is None else size
    out = torch.zeros((n, plan.k), dtype=dtype, device=prepared.device)
    for start in range(0, n, size):
        stop = min(n, start + size)
        chunk_inputs, chunk_labels = tree_map(lambda t: t[start:stop], inputs), labels[start:stop]
        try:
            out[start:stop] = features(chunk_inputs, chunk_labels, stop - start, run)
        except RuntimeError as exc:  # torch.func cannot run the model (Bloom's autograd.Function)
            if run is per_example:
                exc.add_note("trak-core: proj_type='kronecker' runs torch.func.vmap here (per_example='vmap', "
                             "examples that interact in a batched pass, or a rest that the batched pass does not "
                             "cover: see the INFO log of the trak_core logger); Kronecker(rest='drop') leaves the "
                             "rest out")
                raise
            # a later batch's call without one row per example (NotPerExample), or one the batched pass cannot
            # follow: vmap from now on, which raises the model's own errors again
            log.info("torch backend: factorized features through vmap from this batch on: %s", exc)
            state.batched, run = False, per_example
            out[start:stop] = features(chunk_inputs, chunk_labels, stop - start, run)
    return out


def _rest_checkpoint(prepared: Any, plan: KroneckerPlan) -> Any:
    """The rest's parameters (in ``plan.rest`` order) as a checkpoint whose other parameters are frozen: the
    reference of the batched pass's rest gradients (plain autograd one example at a time)."""
    from .checkpoint import TorchCheckpoint

    params = {name: prepared.params[name] for name in plan.rest}
    frozen = {**{name: t for name, t in prepared.params.items() if name not in params}, **prepared.frozen}
    return TorchCheckpoint(params, frozen, prepared.device, prepared.dtype)
