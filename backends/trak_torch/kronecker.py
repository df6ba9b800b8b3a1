"""Factorized (``proj_type="kronecker"``) features of torch models, without per-example gradients of layers.

One job: compute a model's projected per-example gradients of its factorizable layers from what flows through
them (``trak_core.kronecker`` is the specification; the layers and the plan: :mod:`trak_torch.kronecker_plan`).

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
in the rest. On a checkpoint's first batch, the features are checked against the dense per-example gradient of the
layers and the batch's ops are watched for uses of a factorized weight outside its modules
(``kronecker_check.check_plan``), so such a use is an error, not a wrong answer. Where ``vmap`` cannot run the
model, the examples go one at a time through the batched pass (where every call is that example's).
"""
from __future__ import annotations

import logging
import math
import contextlib
from contextlib import nullcontext
from typing import Any, Callable, Iterator

from trak_core.errors import TrakValueError
from trak_core.notices import warn
from trak_core.kronecker import KroneckerPlan, rest_seed

from .kronecker_plan import Factorized, discover, factorized_state, find_uses  # noqa: F401 (re-exported)
from .kronecker_rest import RestPass, check, rest_plan
from .kronecker_sides import input_side, output_side, rows_first
from .layers import hooks
from .looped import batch_norm_layout, looped_gradients, refuse_to_loop
from .transforms import for_transforms

__all__ = ["Factorized", "find_uses", "discover", "factorized_state", "batch_features"]

log = logging.getLogger("trak_core")
CHUNK_BYTES = 512 * 2**20  # per vmap call: output gradients, perturbations and projected sides


def batch_features(backend: Any, model: Any, prepared: Any, state: Factorized, inputs: Any, labels: Any, task: Any,
                   causal: bool, *, seed: int, checkpoint: int, chunk: int | None = None,
                   attention: tuple[Callable[[], Any], Callable[[], Any]] = (nullcontext, nullcontext)) -> Any:
    """Features ``(n, k)`` of a checked batch (the backend computes ``out_to_loss`` on its own); ``attention``: the
    contexts of the ``vmap`` pass and of the batched pass (a Hugging Face model's attention implementation)."""
    import torch
    from torch.func import grad, vmap
    from torch.utils._pytree import tree_map

    from trak_core.projection import project

    from .outputs import _rows, batch_logits, output_logits
    from .closed_form import NotPerExample, check_tolerance
    from .kronecker_functional import batch_layout, intercepted, no_fast_path
    from .routing import picked_rows

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

    def batched(x: Any, y: Any, m: int, watch: bool = False) -> tuple[list, list, Any]:
        """One batched backward pass (no vmap): right when examples do not interact (checked once); the rest's
        gradients from its norm layers' calls and bare parameters' copies (``kronecker_rest``). ``watch`` (the pass
        that decides the path): raise ``NotPerExample`` for a layer called on rows picked from the batch by data
        (unpadded tokens, tokens routed to an expert; ``trak_torch.routing``), whose rows are not grouped by example
        even where their number divides by the batch's."""
        sides, zs = [], []
        extra = RestPass(state.rest_plan, prepared, m) if plan.n_rest and state.rest_plan is not None else None

        def hook(module: Any, args: Any, out: Any) -> Any:
            use, block, pair = by_module[module]
            not_picked(type(module).__name__, args[0])
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
            not_picked(f"{key[0]}() of {key[1]!r}", x)
            a, z, add = batch_layout(use.kind, x.detach(), out, m)
            sides.append(input_side(use, block, pair, a, dtype))
            zs.append(z)
            return add(out)

        def not_picked(what: str, a: Any) -> None:
            if picked(a):
                raise NotPerExample(f"{what} is called on rows picked from the batch by a mask or an index (unpadded "
                                    "tokens, tokens routed to an expert): which example each row is of depends on "
                                    "the data")

        norms = list(extra.found.norms) if extra else []
        with picked_rows(watch, m, x) as picked, torch.enable_grad(), hooks(modules, hook), \
                hooks(norms, extra.hook if extra else None), intercepted(inside, call), slow(), attention[1](), \
                batch_norm_layout(model), _no_checkpoint():
            params = extra.params() if extra else prepared.params
            out = output_logits(backend._call(model, {**params, **prepared.frozen}, x, causal=causal),
                                backend.logits_fn)
            out = batch_logits(out, _rows(x), task.logits_ndim)
            deltas = torch.autograd.grad(task.output(out, y, xp=xp).sum(), zs + (extra.perturbations() if extra
                                                                                   else []), allow_unused=True)
        rest_grads = extra.gradients(list(deltas[len(zs):]), plan.rest) if extra else None
        return [torch.zeros_like(z) if d is None else d for d, z in zip(deltas, zs)], sides, rest_grads

    def alone(x: Any, y: Any, m: int) -> tuple[list, list, Any]:
        """One example (``m`` = 1) in the batched pass, where every call is that example's whatever its shape, and
        the rest by plain autograd where the batched pass does not cover it: models that ``vmap`` cannot run."""
        deltas, sides, rest_grads = batched(x, y, m)
        if plan.n_rest and state.rest_plan is None:
            state.rest = _rest_checkpoint(prepared, plan) if state.rest is None else state.rest
            with attention[1]():
                rest_grads = looped_gradients(backend, model, state.rest, x, y, task, causal)
        return deltas, sides, rest_grads

    def features(x: Any, y: Any, m: int, run: Any) -> Any:
        if run is alone and m > 1:
            return torch.cat([features(tree_map(lambda t: t[i:i + 1], x), y[i:i + 1], 1, run) for i in range(m)])
        deltas, sides, rest_grads = run(x, y, m)
        block_out = torch.zeros((m, plan.k), dtype=dtype, device=prepared.device)
        for (module, _), delta, side in zip(shapes, deltas, sides):
            use, block, pair = by_module[module]
            side = side.reshape(m, side.numel() // (m * side.shape[-1]), side.shape[-1])  # 0 rows: 0 positions
            row, col = rows_first(use, side, output_side(use, pair, delta, m, dtype))
            product = torch.bmm(row.transpose(1, 2), col).reshape(m, -1)[:, :block.k]
            block_out[:, block.start:block.start + block.k] += product * (1.0 / math.sqrt(block.k))
        if plan.n_rest:
            flat = (rest_grads if isinstance(rest_grads, torch.Tensor) else  # (m, n_rest) from the closed form
                    torch.cat([rest_grads[name].reshape(m, -1) for name in plan.rest], dim=1)).to(dtype)
            block_out[:, plan.k - plan.k_rest:] = project(flat, plan.k_rest, seed=rest_seed(seed),
                                                          checkpoint=checkpoint)
        return block_out

    def watched(x: Any, y: Any, m: int) -> tuple[list, list, Any]:
        return batched(x, y, m, watch=True)

    def independent() -> bool | None:
        """Whether the batch's first two examples in one batched pass give the features each gives alone (``None``
        with one example: nothing to tell); the decision and its reason go to the log."""
        if n < 2:
            return None
        try:
            together = features(tree_map(lambda t: t[:2], inputs), labels[:2], 2, watched)
            alone = torch.cat([features(tree_map(lambda t: t[i:i + 1], inputs), labels[i:i + 1], 1, batched)
                               for i in range(2)])
        except Exception as exc:  # NotPerExample (a functional call without one row per example), or a call the
            log.info("torch backend: factorized features through vmap: %s: %s", type(exc).__name__, exc)  # batched
            return False  # pass cannot follow (a (1, d) call taken for one shared by the batch)
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
        except Exception as exc:  # NotPerExample, or a call the batched pass cannot follow: a table (K, 1) taken
            log.info("torch backend: factorized features through vmap: %s: %s", type(exc).__name__, exc)  # for a
            return False  # scale (C, 1) and passed as copies, then indexed (Swin's bias table with one head)
        with attention[1]():
            right, error, tolerance = check(backend, model, state.rest, first, first_labels, task, causal, got,
                                            prepared.dtype)
        if not right:
            log.info("torch backend: factorized features through vmap: the rest's gradients in the batched pass are "
                     "%.1e from plain autograd (tolerance %.0e)", error, tolerance)
        return right

    if state.batched is None and backend.per_example != "auto":
        state.batched, state.looped = False, backend.per_example == "loop"
        log.info("torch backend: factorized features %s: per_example=%r", "one example at a time" if state.looped
                 else "through vmap", backend.per_example)
    if state.batched is None and plan.n_rest and state.rest_plan is None and not rest_in_batched_pass():
        state.batched = False
    if state.batched is None:  # once per checkpoint, on its first batch of two or more examples
        state.batched = independent()
    run = batched if state.batched or (state.batched is None and n == 1) else per_example  # one example: alone
    run = alone if state.looped and run is per_example else run
    size = max(size, 64) if state.batched and chunk is None else size
    out = torch.zeros((n, plan.k), dtype=dtype, device=prepared.device)
    for start in range(0, n, size):
        stop = min(n, start + size)
        chunk_inputs, chunk_labels = tree_map(lambda t: t[start:stop], inputs), labels[start:stop]
        while True:
            try:
                out[start:stop] = features(chunk_inputs, chunk_labels, stop - start, run)
                break
            except RuntimeError as exc:
                if run is alone:  # the model's own error
                    raise
                if run is per_example:  # torch.func cannot run the model (Bloom's autograd.Function, T5's
                    refuse_to_loop(exc, chunk)  # unique_consecutive, Wav2Vec2's in-place masking): one example
                    state.looped, run = True, alone  # at a time, unless a loop would hide the error
                    warn(f"proj_type='kronecker': torch.func.vmap cannot run this model ({type(exc).__name__}"
                         f": {str(exc).splitlines()[0][:200] if str(exc) else ''}); its features are taken "
                         "one example at a time instead (the same numbers, slower)", RuntimeWarning)
                    continue
                # a later batch's call without one row per example (NotPerExample), or one the batched pass cannot
                # follow: vmap from now on, which raises the model's own errors again
                log.info("torch backend: factorized features through vmap from this batch on: %s", exc)
                state.batched, run = False, alone if state.looped else per_example
    return out


def _rest_checkpoint(prepared: Any, plan: KroneckerPlan) -> Any:
    """The rest's parameters (in ``plan.rest`` order) as a checkpoint whose other parameters are frozen: the
    reference of the batched pass's rest gradients (plain autograd one example at a time)."""
    from .checkpoint import TorchCheckpoint

    params = {name: prepared.params[name] for name in plan.rest}
    frozen = {**{name: t for name, t in prepared.params.items() if name not in params}, **prepared.frozen}
    return TorchCheckpoint(params, frozen, prepared.device, prepared.dtype)


@contextlib.contextmanager
def _no_checkpoint() -> Iterator[None]:
    """Name gradient checkpointing written in ``forward`` (``torch.utils.checkpoint``): its recomputation runs the
    layers again without the factorized path's perturbations (torch's "recomputed values ... have different
    metadata", or features the first batch's check refuses)."""
    from torch.utils.checkpoint import CheckpointError

    try:
        yield
    except CheckpointError as exc:
        raise TrakValueError("proj_type='kronecker' cannot follow torch.utils.checkpoint (gradient checkpointing "
                             f"written in the model's forward; torch: {str(exc).splitlines()[0]}): call the layers "
                             "without checkpoint for attribution, or use proj_type='rademacher', which takes such "
                             "models one example at a time") from exc
