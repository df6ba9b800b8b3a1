"""A torch model's factorizable layers, found on one example, and its plan and factors per checkpoint.

One job: the discovery half of :mod:`trak_torch.kronecker`. A module counts when it is called with an attributed
weight (tied weights: each use adds to the same block); so do the ``F.linear`` and ``F.embedding`` calls of
``nn.MultiheadAttention`` and of ``Embedding`` subclasses with their own ``forward``
(:mod:`trak_torch.kronecker_functional`). Parameters used any other way are in the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from trak_core.errors import TrakValueError
from trak_core.kronecker import Kronecker, KroneckerPlan, Layer, factor, make_plan

from .layers import computes_linear, hooks, kronecker_kind, layer_kind

__all__ = ["Use", "Factorized", "find_uses", "discover", "discovered", "factorized_state"]


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
    looped: bool = False  # vmap cannot run the model: one example at a time in the batched pass


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


def discovered(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool, options: Kronecker,
               k: int) -> tuple[KroneckerPlan, list[Use], Any]:
    """``discover``'s result for ``prepared``, found once (on the first batch it sees) and kept: the layout of every
    seed's and checkpoint index's features, and the one the store's check reads (``TorchBackend.factorized_plan``),
    so that a model whose calls depend on the data (experts routed by the first example) keeps one layout."""
    cache = prepared.__dict__.setdefault("_kronecker_found", {})
    if (k, options) not in cache:
        cache[(k, options)] = discover(backend, model, prepared, inputs, causal, options, k)
    return cache[(k, options)]


def factorized_state(backend: Any, model: Any, prepared: Any, inputs: Any, causal: bool, *, k: int, seed: int,
                     checkpoint: int, options: Kronecker) -> Factorized:
    """The cached ``Factorized`` of ``prepared`` (made on its first batch)."""
    import torch

    key = (k, seed, checkpoint, options)
    cache = prepared.__dict__.setdefault("_kronecker", {})
    if key not in cache:
        plan, uses, inside = discovered(backend, model, prepared, inputs, causal, options, k)
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
