"""Which torch modules are which layer kind, for the closed form and the factorized projection; forward hooks.

One job: name the layers that :mod:`trak_torch.closed_form` and :mod:`trak_torch.kronecker` follow through forward
hooks (``Linear``, ``Conv2d``, ``Embedding``, Hugging Face's ``Conv1D``), and register such hooks for a pass.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["layer_kind", "kronecker_kind", "own_linear", "computes_linear", "hooks"]


def kronecker_kind(module: Any) -> str | None:
    """The factorizable layer kind of ``module``. A subclass with its own ``forward`` is not one: an ``Embedding``
    subclass (Gemma's scaled embedding, OPT's offset positions) is followed through its ``F.embedding`` call
    (``kronecker_functional``), a ``Linear`` subclass (Falcon's) is one where its output is ``F.linear``'s
    (``computes_linear``), others are projected densely with the rest."""
    return layer_kind(module, own_forward=True) or own_linear(module)


def own_linear(module: Any) -> str | None:
    """``"linear"`` for a ``Linear`` subclass with its own ``forward``."""
    return "linear" if layer_kind(module, own_forward=False) == "linear" else None


def computes_linear(module: Any, args: Any, output: Any) -> bool:
    """Whether a call's output is ``F.linear`` of its input, weight and bias, to rounding (a ``Linear`` subclass
    that computes ``x @ W.T + b`` its own way, as Falcon's, is factorized as a ``Linear``; one that quantizes or
    adds to it is not)."""
    import torch

    from .closed_form import check_tolerance

    if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
        return False
    expected = torch.nn.functional.linear(args[0], module.weight, module.bias)
    if expected.shape != output.shape:
        return False
    scale = float(torch.linalg.vector_norm(expected)) or 1.0
    return float(torch.linalg.vector_norm(output - expected)) <= check_tolerance(output.dtype, output.device) * scale


def layer_kind(module: Any, *, own_forward: bool) -> str | None:
    """``"linear"``, ``"conv2d"``, ``"conv1d-torch"`` (convolutions: ``groups=1``, zero padding, not ``"same"``),
    ``"embedding"`` or ``"conv1d"`` (Hugging Face's ``Conv1D``), else ``None``; with ``own_forward``, torch's layers
    only where their ``forward`` is torch's own."""
    import torch

    nn = torch.nn

    def own(base: Any) -> bool:
        return not own_forward or type(module).forward is base.forward

    if isinstance(module, nn.Linear) and own(nn.Linear):
        return "linear"
    for base, kind in ((nn.Conv2d, "conv2d"), (nn.Conv1d, "conv1d-torch")):
        if isinstance(module, base) and own(base):
            ok = module.groups == 1 and module.padding_mode == "zeros" and module.padding != "same"
            return kind if ok else None
    if isinstance(module, nn.Embedding) and own(nn.Embedding):
        return "embedding" if module.max_norm is None and not module.scale_grad_by_freq else None  # else: vmap
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.ndim == 2:
        return "conv1d"  # Hugging Face GPT-2's: y = x @ W + b, W (in, out)
    return None


@contextmanager
def hooks(modules: list[Any], hook: Any) -> Iterator[None]:
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
