"""Factorized (Kronecker) projection: per-layer sketches that never form per-example gradients.

One job: the backend-neutral half of ``proj_type="kronecker"``: which parameters are layers, how
the total ``k`` is shared between them, their factor matrices, and how a layer's two projected
sides become its features. Backends capture the sides (``trak_torch.kronecker``,
``trak_jax.kronecker``).

**Layers.** A weight ``W`` used by a layer the backend knows (Linear, Conv2d through its unfolded
patches, Embedding, Hugging Face's ``Conv1D``) is a matrix of ``rows x cols`` (``W.shape[0]`` by
the product of the others), and its per-example gradient is a sum over positions ``t`` (tokens,
pixels) of outer products ``u_t v_t^T``: for Linear ``u_t`` is the gradient at the output and
``v_t`` the input; for Embedding ``u_t`` is the one-hot token and ``v_t`` the output gradient.
The layer's bias, when it has one, is folded in as one more column (Linear, Conv2d: ``v_t``
gains a constant 1) or row (Conv1D, whose weight is ``(in, out)``). Projecting with
``P_rows (x) P_cols`` gives ``sum_t (P_rows^T u_t)(P_cols^T v_t)^T``: ``O(T (rows k_rows + cols
k_cols))`` work and memory per example, whatever the number of parameters.

**Features of a layer.** The row-major ``k_rows x k_cols`` product, its first ``k_layer`` entries
kept, times ``1 / sqrt(k_layer)``. The factors' entries are ``+-1``: column ``(i, j)`` of the
layer's matrix is ``P_rows[:, i] (x) P_cols[:, j] / sqrt(k_layer)``, so every kept column has
entries ``+-1/sqrt(k_layer)`` and inner products of features estimate those of gradients without
bias, as with a dense Rademacher matrix.

**The rest.** Parameters that are not (part of) a layer (norms, scales, positional tables that are
indexed rather than looked up, biases of other layers) are projected densely, with
``trak_core.project`` at ``k_rest`` columns and seed ``rest_seed`` (``rest="dense"``), or
left out (``rest="drop"``). Their features come last.

**Dimensions** (``make_plan``). ``k`` is shared between the layers and the rest in proportion to
their parameter counts (largest remainders, each at least 1 and at most its size), unless
``dims`` sets a layer's ``k_layer``. A layer's ``k_cols`` is ``ceil(sqrt(k_layer sqrt(cols / rows)))``
(so ``k_cols / k_rows ~ sqrt(cols / rows)``: the wider side gets the larger factor, but less than in
proportion, so neither side's work dominates), clipped to ``[1, cols]``; ``k_rows = ceil(k_layer /
k_cols)``, clipped to ``[1, rows]`` (where that leaves ``k_rows k_cols < k_layer``, ``k_cols = ceil(k_layer / k_rows)``,
clipped to ``cols``); the product's first ``k_layer`` entries are kept.

**Matrices.** ``P_rows`` and ``P_cols`` of layer ``i`` (its position among the layers, in the order
of the parameters) are the sign patterns of ``trak_core.projection`` for the seed
``layer_seed`` ``(seed, i, side)`` (the hash spec, domain ``"KRON"``) and the checkpoint:
``P[a, j] = s(a) R[a, j] sqrt(k)``, the same bits in every namespace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from . import hashing
from ._checks import _integer
from ._delegation import full_precision_products
from .errors import TrakValueError

__all__ = ["Kronecker", "Layer", "Block", "KroneckerPlan", "make_plan", "layer_seed", "rest_seed", "factor",
           "layer_features", "explicit_matrix", "DOMAIN_KRONECKER", "RESTS"]

DOMAIN_KRONECKER = 0x4B524F4E  # "KRON"
RESTS = ("dense", "drop")
_SIDES = {"rows": 0, "cols": 1, "rest": 2}


@dataclass(frozen=True)
class Kronecker:
    """``proj_type=Kronecker(...)``: the factorized projection, with its options (``"kronecker"`` is the default one).

    Parameters
    ----------
    dims : mapping of str to int, optional
        ``k_layer`` of named layers (the weight's parameter name); the others share what is left.
    rest : {"dense", "drop"}
        What happens to parameters outside the layers: projected densely (default) or left out.
    """

    dims: Mapping[str, int] | None = None
    rest: str = "dense"

    def __post_init__(self) -> None:
        if self.rest not in RESTS:
            raise TrakValueError(f"Kronecker(rest=...) must be one of {RESTS}, got {self.rest!r}")
        if self.dims is not None:
            if not isinstance(self.dims, Mapping):
                raise TrakValueError(f"Kronecker(dims=...) maps layer names to k_layer, got {type(self.dims).__name__}")
            dims = {}
            for name, value in self.dims.items():
                number = _integer(value)  # ints and NumPy integers, not bools or floats
                if number is None or number <= 0:
                    raise TrakValueError(f"Kronecker(dims=...): layer {name!r} needs a positive integer, got {value!r}")
                dims[name] = number
            object.__setattr__(self, "dims", dict(sorted(dims.items())))

    def __hash__(self) -> int:
        return hash((tuple((self.dims or {}).items()), self.rest))

    def describe(self) -> dict[str, Any]:
        """What a store records (and ``from_description`` reads back).

        Returns
        -------
        dict
            ``{"dims": {layer name: k_layer}, "rest": rest}`` (``dims`` empty for ``None``).
        """
        return {"dims": dict(self.dims or {}), "rest": self.rest}

    @classmethod
    def from_description(cls, description: Mapping[str, Any] | None) -> "Kronecker":
        """The options a store recorded with ``describe``.

        Parameters
        ----------
        description : mapping or None
            What ``describe`` returned; ``None`` and missing keys give the defaults.

        Returns
        -------
        Kronecker
            Equal to the one described.
        """
        description = description or {}
        return cls(dims=dict(description.get("dims") or {}) or None, rest=description.get("rest", "dense"))


@dataclass(frozen=True)
class Layer:
    """A factorized weight: its parameter name, matrix shape and folded bias.

    ``rows`` and ``cols`` include the bias (one more column, or one more row for ``bias_side="rows"``).
    """

    name: str
    rows: int
    cols: int
    bias: str | None = None
    bias_side: str | None = None

    @property
    def size(self) -> int:
        """Number of parameters the layer covers (weight and bias): ``rows * cols``."""
        return self.rows * self.cols


@dataclass(frozen=True)
class Block:
    """A layer's place in the features: its factor sizes, the kept entries, the first column."""

    layer: Layer
    index: int
    k_rows: int
    k_cols: int
    k: int
    start: int


@dataclass(frozen=True)
class KroneckerPlan:
    """The layers' blocks, then the rest: ``k = sum(block.k) + k_rest`` features."""

    blocks: tuple[Block, ...]
    rest: tuple[str, ...]
    n_rest: int
    k_rest: int
    k: int
    options: Kronecker = field(default_factory=Kronecker)

    def digest(self) -> str:
        """A hash of the layout (each block's layer, sizes and place; the rest's names and share): features made
        with another layout are other features, even with the same parameters and options (a model whose
        ``forward`` changed to use a weight outside its module)."""
        import hashlib

        layout = ([(b.layer.name, b.layer.rows, b.layer.cols, b.layer.bias, b.layer.bias_side, b.k_rows, b.k_cols, b.k,
                    b.start) for b in self.blocks], list(self.rest), self.n_rest, self.k_rest, self.k)
        return hashlib.sha256(repr(layout).encode()).hexdigest()[:16]

    def block(self, name: str) -> Block:
        """The block of the layer whose weight is ``name``."""
        for block in self.blocks:
            if block.layer.name == name:
                return block
        raise TrakValueError(f"{name!r} is not a factorized layer; the layers are "
                             f"{[b.layer.name for b in self.blocks]}")


def _shares(sizes: Sequence[int], total: int) -> list[int]:
    """``total`` split in proportion to ``sizes`` (largest remainders), each in ``[1, size]``."""
    if total < len(sizes):
        raise TrakValueError(f"proj_dim={total} is smaller than the number of factorized blocks ({len(sizes)}): "
                             "raise proj_dim, or leave parameters out (Kronecker(rest='drop'), backend params=)")
    capacity = sum(sizes)
    if total > capacity:
        raise TrakValueError(f"proj_dim={total} is larger than the {capacity} parameters it projects; lower proj_dim")
    ideal = [total * s / capacity for s in sizes]
    share = [min(s, max(1, math.floor(x))) for s, x in zip(sizes, ideal)]
    order = sorted(range(len(sizes)), key=lambda i: (share[i] - ideal[i], i))
    while sum(share) < total:  # hand out what flooring left, largest remainders first
        for i in order:
            if sum(share) == total:
                break
            if share[i] < sizes[i]:
                share[i] += 1
    while sum(share) > total:  # the floor of 1 took too much: take from the most over its ideal, never below 1
        i = max((j for j in range(len(sizes)) if share[j] > 1), key=lambda j: (share[j] - ideal[j], share[j]))
        share[i] -= 1
    return share


def factor_dims(rows: int, cols: int, k: int) -> tuple[int, int]:
    """``(k_rows, k_cols)`` with ``k_rows k_cols >= k`` for a ``rows x cols`` layer (module docstring)."""
    k_cols = min(cols, max(1, math.ceil(math.sqrt(k * math.sqrt(cols / rows)))))
    k_rows = min(rows, max(1, math.ceil(k / k_cols)))
    if k_rows * k_cols < k:
        k_cols = min(cols, math.ceil(k / k_rows))
    return k_rows, k_cols


def make_plan(layers: Sequence[Layer], rest: Sequence[tuple[str, int]], k: int,
              options: Kronecker | None = None) -> KroneckerPlan:
    """Share ``k`` between ``layers`` (in parameter order) and the ``rest`` ``(name, size)`` parameters.

    Raises
    ------
    TrakValueError
        No layer to factorize, ``k`` smaller than the number of blocks or larger than the parameters,
        or ``dims`` naming a layer that is not there or asking for more than it has.
    """
    options = options or Kronecker()
    if not layers:
        raise TrakValueError("proj_type='kronecker' found no Linear, Conv2d or Embedding layer among the attributed "
                             "parameters; use proj_type='rademacher'")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise TrakValueError(f"layers listed twice: {sorted({n for n in names if names.count(n) > 1})}")
    dims = dict(options.dims or {})
    unknown = sorted(set(dims) - set(names))
    if unknown:
        raise TrakValueError(f"Kronecker(dims=...) names {unknown}, which are not factorized layers; the layers are "
                             f"{names}")
    n_rest = sum(size for _, size in rest) if options.rest == "dense" else 0
    sizes = [layer.size for layer in layers]
    fixed = {i: dims[layer.name] for i, layer in enumerate(layers) if layer.name in dims}
    for i, value in fixed.items():
        if value > sizes[i]:
            raise TrakValueError(f"Kronecker(dims=...): layer {names[i]!r} has {sizes[i]} parameters, fewer than "
                                 f"k_layer={value}")
    free = [i for i in range(len(layers)) if i not in fixed] + (["rest"] if n_rest else [])
    left = k - sum(fixed.values())
    if fixed and free and left < len(free):
        others = [names[i] if i != "rest" else "the rest" for i in free]
        raise TrakValueError(f"Kronecker(dims=...) sets {sum(fixed.values())} of proj_dim={k}, leaving {left} for "
                             f"{len(free)} other blocks ({', '.join(others)}) that need at least 1 each; lower dims or "
                             "raise proj_dim")
    if free:
        capacity = sum(sizes[i] if i != "rest" else n_rest for i in free)
        if fixed and left > capacity:
            others = [names[i] if i != "rest" else "the rest" for i in free]
            raise TrakValueError(f"Kronecker(dims=...) sets {sum(fixed.values())} of proj_dim={k}, leaving {left} for "
                                 f"{', '.join(others)}, which hold {capacity} parameters; lower proj_dim or raise dims")
        shares = dict(zip(free, _shares([sizes[i] if i != "rest" else n_rest for i in free], left)))
    elif left != 0:
        raise TrakValueError(f"Kronecker(dims=...) sets {sum(fixed.values())} of proj_dim={k} and leaves nothing to "
                             "take the rest; make them add up to proj_dim")
    else:
        shares = {}
    shares.update(fixed)
    blocks, start = [], 0
    for i, layer in enumerate(layers):
        k_rows, k_cols = factor_dims(layer.rows, layer.cols, shares[i])
        blocks.append(Block(layer, i, k_rows, k_cols, shares[i], start))
        start += shares[i]
    rest_names = tuple(name for name, _ in rest) if options.rest == "dense" else ()
    return KroneckerPlan(tuple(blocks), rest_names, n_rest, shares.get("rest", 0), k, options)


def _seed(seed: int, *words: int) -> int:
    lo = hashing.key(*hashing.split64(seed, "seed"), DOMAIN_KRONECKER, *words)
    return lo | (hashing.key(lo, DOMAIN_KRONECKER, *words) << 32)


def layer_seed(seed: int, index: int, side: str) -> int:
    """The 64-bit seed of layer ``index``'s ``side`` (``"rows"`` or ``"cols"``) factor."""
    return _seed(seed, index & hashing.MASK32, index >> 32, _SIDES[side])


def rest_seed(seed: int) -> int:
    """The seed of the dense projection of the rest."""
    return _seed(seed, 0, 0, _SIDES["rest"])


def factor(d: int, k: int, *, seed: int, checkpoint: int, index: int, side: str, xp: Any = None, device: Any = None,
           dtype: Any = None) -> Any:
    """Layer ``index``'s ``d x k`` factor for ``side`` at ``checkpoint``: entries ``+-1``."""
    from .projection import _rademacher_words, _unpack, row_signs

    if xp is None:
        import array_api_compat.numpy as xp
    dtype = xp.float32 if dtype is None else dtype
    sub = layer_seed(seed, index, side)
    signs = row_signs(0, d, seed=sub, checkpoint=checkpoint, xp=xp, device=device, dtype=dtype)
    shared = _unpack(_rademacher_words(0, d, k, sub, xp=xp, device=device), k, xp=xp, dtype=dtype, scale=1.0)
    return signs[:, None] * shared


@full_precision_products
def layer_features(row_side: Any, col_side: Any, block: Block, *, xp: Any) -> Any:
    """A layer's features ``(n, block.k)`` from its projected sides ``(n, T, k_rows)`` and ``(n, T, k_cols)``."""
    n = row_side.shape[0]
    product = xp.matmul(xp.permute_dims(row_side, (0, 2, 1)), col_side)  # (n, k_rows, k_cols)
    flat = xp.reshape(product, (n, block.k_rows * block.k_cols))
    return flat[:, :block.k] * (1.0 / math.sqrt(block.k))


def explicit_matrix(plan: KroneckerPlan, shapes: Mapping[str, tuple[int, ...]], *, seed: int,
                    checkpoint: int) -> Any:
    """The ``p x k`` matrix (NumPy float64) the factorized features equal, for tests.

    ``shapes`` maps every attributed parameter name to its shape, in the order of the gradient
    vector (the backend's canonical order); the features equal ``gradients @ explicit_matrix``.
    """
    import numpy as np

    from .projection import projection_matrix

    offsets, p = {}, 0
    for name, shape in shapes.items():
        offsets[name] = p
        p += int(np.prod(shape, dtype=np.int64))
    out = np.zeros((p, plan.k))
    for block in plan.blocks:
        layer = block.layer
        rows = factor(layer.rows, block.k_rows, seed=seed, checkpoint=checkpoint, index=block.index, side="rows",
                      dtype=np.float64)
        cols = factor(layer.cols, block.k_cols, seed=seed, checkpoint=checkpoint, index=block.index, side="cols",
                      dtype=np.float64)
        full = np.kron(rows, cols)[:, :block.k] / math.sqrt(block.k)  # row (a, b) of the (rows x cols) matrix
        full = full.reshape(layer.rows, layer.cols, block.k)
        columns = slice(block.start, block.start + block.k)
        w_rows = layer.rows - (layer.bias_side == "rows")
        w_cols = layer.cols - (layer.bias_side == "cols")
        o = offsets[layer.name]
        out[o:o + w_rows * w_cols, columns] += full[:w_rows, :w_cols].reshape(-1, block.k)
        if layer.bias is not None:
            b = offsets[layer.bias]
            bias = full[w_rows, :w_cols] if layer.bias_side == "rows" else full[:w_rows, w_cols]
            out[b:b + bias.shape[0], columns] += bias
    if plan.n_rest:
        start = plan.k - plan.k_rest
        rest = projection_matrix(plan.n_rest, plan.k_rest, seed=rest_seed(seed), checkpoint=checkpoint,
                                 dtype=np.float64)
        row = 0
        for name in plan.rest:
            size = int(np.prod(shapes[name], dtype=np.int64))
            out[offsets[name]:offsets[name] + size, start:] = rest[row:row + size]
            row += size
    return out
