"""Whether a checkpoint's per-example gradients take the closed form, checked once and said on the log.

One job: the decision of :meth:`trak_torch.TorchBackend._closed_form_uses`. The closed form
(:mod:`trak_torch.closed_form`) is taken when its uses cover every attributed parameter, no layer is called on rows
picked by data (tokens routed to experts: :mod:`trak_torch.routing`, watched in this check only) or on rows that are
not the batch's (positions without a batch dimension: rows per example differ between two examples and three), and
its gradients of the batch's first two examples equal plain autograd one example at a time; otherwise ``vmap(grad)``
is. Each decision is logged at INFO on the ``trak_core`` logger with its reason, so a user can tell which path a
model takes (``logging.basicConfig(level=logging.INFO)``).
"""
from __future__ import annotations

import logging
from typing import Any

__all__ = ["checked_uses", "log_fallback"]

log = logging.getLogger("trak_core")


def checked_uses(backend: Any, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any,
                 causal: bool) -> list | None:
    """The closed form's uses for ``prepared``, or ``None`` (``vmap``), checked on the first two examples."""
    import torch
    from torch.utils._pytree import tree_map

    from .closed_form import check_tolerance, closed_form_gradients, covering_uses
    from .looped import looped_gradients

    first = tree_map(lambda t: t[:2], inputs)  # two rows: an interaction between examples shows
    try:
        uses = covering_uses(backend, model, prepared, inputs, causal)
        if uses is None:
            log.info("torch backend: per-example gradients through vmap: the attributed parameters' uses overlap in "
                     "ways the closed form does not follow (a bias shared by two layers, a weight used by a layer and "
                     "also by a function call, a weight that is also a bias, an nn.MultiheadAttention's bias_k/bias_v)")
            return None
        rows: tuple[list, list] = ([], [])
        closed, _ = closed_form_gradients(backend, model, prepared, uses, first, labels[:2], task, causal,
                                          watch_rows=True, rows_seen=rows[0])  # routed tokens: vmap
        unbatched(backend, model, prepared, uses, inputs, labels, task, causal, rows)
        reference = looped_gradients(backend, model, prepared, first, labels[:2], task, causal)
    except Exception as exc:  # NotPerExample, or a layer call the closed form cannot follow: vmap does
        log.info("torch backend: per-example gradients through vmap: the closed form failed on the first two "
                 "examples (%s: %s)", type(exc).__name__, exc)
        return None
    scale = float(torch.linalg.vector_norm(reference)) or 1.0
    error, tolerance = float(torch.linalg.vector_norm(closed - reference)) / scale, \
        check_tolerance(prepared.dtype, prepared.device)
    if not bool(torch.isfinite(reference).all()):
        log.info("torch backend: per-example gradients through vmap: plain autograd's own gradients of the first "
                 "two examples are not finite (the model's forward or backward on them: a fully masked attention "
                 "row in eager float64 attention, say), so the closed form cannot be checked")
        return None
    if not error <= tolerance:  # NaN too: a closed form with NaN where plain autograd has numbers
        log.info("torch backend: per-example gradients through vmap: the closed form differs from plain autograd "
                 "by %.1e (tolerance %.0e) on the first two examples (examples interact, or a weight is used "
                 "outside its layer)", error, tolerance)
        return None
    kinds = sorted({kind for _, kind, _, _ in uses})
    log.info("torch backend: per-example gradients in closed form (%d uses: %s; %.1e from plain autograd on the "
             "first two examples)", len(uses), ", ".join(kinds), error)
    return uses


def unbatched(backend: Any, model: Any, prepared: Any, uses: list, inputs: Any, labels: Any, task: Any,
              causal: bool, rows: tuple[list, list]) -> None:
    """Raise ``NotPerExample`` for a layer called on rows that are not the batch's: rows per example differ between
    the first two examples and three (the first again). A lookup of positions shared by the batch without a batch
    dimension (``embed_positions(torch.arange(T))``: ``(T, d)``) has as many rows whatever the batch; had ``T`` been
    a multiple of the batch size, it would have been taken for the batch's tokens flattened (OPT's ``(n * T, d)``),
    each example given ``T / n`` positions' gradients, a mistake the check's tolerance can miss where that
    parameter's gradients are small next to the rest (half precision, CUDA)."""
    from torch.utils._pytree import tree_map

    from .closed_form import NotPerExample, closed_form_gradients

    def pick(tree: Any) -> Any:
        return tree_map(lambda t: t[[0, 1, 0]], tree)

    said = "on rows that are not the batch's (positions without a batch dimension, shared by the batch)"
    try:
        closed_form_gradients(backend, model, prepared, uses, pick(inputs), pick(labels), task, causal,
                              rows_seen=rows[1])
    except NotPerExample as exc:
        raise NotPerExample(f"on three examples (the first two, then the first again): {exc}") from exc
    differ = [name for (name, two), (_, more) in zip(*rows) if two != more]
    if differ or len(rows[0]) != len(rows[1]):
        raise NotPerExample(f"the layer of {differ[0] if differ else 'a weight'} is called on as many rows for two "
                            f"examples as for three: {said}")


def log_fallback(exc: Exception) -> None:
    """Say that a batch after the checked one sent the checkpoint to ``vmap``, and why."""
    log.info("torch backend: per-example gradients through vmap from this batch on: the closed form cannot "
             "follow it (%s)", exc)
