"""The layers the closed form follows through their calls: their kinds, their normalized inputs, convolution patches.

One job: name the torch modules :mod:`trak_torch.closed_form` (and the factorized projection's rest,
:mod:`trak_torch.kronecker_rest`) takes as layer calls (``Linear``, ``Conv1d``/``Conv2d``, ``Embedding``, Hugging
Face's ``Conv1D``, norm layers with torch's own ``forward``), compute a norm layer's input normalized as it does it
(``xhat``), and a convolution's input patches.
"""
from __future__ import annotations

from typing import Any

__all__ = ["NORMS", "TOKENWISE", "norm_kind", "conv_kind", "closed_form_kind", "conv_gradient", "normalized",
           "check_rms_norm"]

NORMS = ("batchnorm", "groupnorm", "layernorm", "rmsnorm", "rmsnorm-hf")  # channel-wise (dim 1), then trailing
TOKENWISE = ("linear", "conv1d", "embedding", "layernorm", "rmsnorm", "rmsnorm-hf")  # rows may be flattened tokens


def _hf_rms_epsilon(module: Any) -> float | None:
    """The epsilon of a Hugging Face ``*RMSNorm`` (Llama, Mistral, Qwen, Gemma: their own classes, a 1-D
    ``weight`` times the input scaled in float32 by ``rsqrt(mean(x^2) + eps)``), else ``None``."""
    import torch

    weight = getattr(module, "weight", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def norm_kind(module: Any) -> str | None:
    """The norm layers whose examples do not interact in eval mode and whose affine weight is attributable
    (torch's own ``forward``: a subclass that reshapes first, such as a channels-first LayerNorm, is left to vmap)."""
    import torch

    nn = torch.nn
    kinds = [(nn.modules.batchnorm._BatchNorm, "batchnorm", "affine"), (nn.GroupNorm, "groupnorm", "affine"),
             (nn.LayerNorm, "layernorm", "elementwise_affine")]
    if hasattr(nn, "RMSNorm"):  # torch >= 2.4
        kinds.append((nn.RMSNorm, "rmsnorm", "elementwise_affine"))
    for base, kind, affine in kinds:
        if isinstance(module, base) and type(module).forward is base.forward and getattr(module, affine):
            if kind == "batchnorm" and module.running_mean is None:  # batch statistics: examples interact
                return None
            return kind
    return "rmsnorm-hf" if _hf_rms_epsilon(module) is not None else None


def conv_kind(module: Any) -> str | None:
    """torch's ``Conv1d`` and ``Conv2d`` with their own ``forward``: any groups, stride, dilation, padding mode."""
    import torch

    for base in (torch.nn.Conv1d, torch.nn.Conv2d):
        if (isinstance(module, base) and type(module).forward is base.forward
                and hasattr(module, "_reversed_padding_repeated_twice")):
            return "conv"
    return None


def closed_form_kind(module: Any) -> str | None:
    """The closed form's kind of ``module``. Subclasses of Linear are taken with their parent's gradient (Falcon's
    Linear computes the same product; the check against plain autograd catches one that computes something else);
    Embedding subclasses with their own ``forward`` are followed through their ``F.embedding`` call instead
    (:mod:`trak_torch.closed_form_functional`)."""
    import torch

    from .layers import layer_kind

    conv, layer = conv_kind(module), layer_kind(module, own_forward=False)
    if conv or layer in ("conv2d", "conv1d-torch"):  # convolutions: torch's own forward only (``conv_kind``)
        return conv
    if layer == "embedding" and type(module).forward is not torch.nn.Embedding.forward:
        return None
    return layer or norm_kind(module)


def conv_gradient(module: Any, a: Any, delta: Any) -> tuple[Any, Any | None]:
    """Per-example weight gradients ``(n, out, in/groups * kernel)`` of a Conv1d/Conv2d call, as ``put`` takes
    them: its output gradients and input patches (``unfold``; padded first as the layer pads, for
    ``padding="same"`` or a non-zero padding mode) for one group, else their product group by group."""
    import torch

    F = torch.nn.functional
    one_d = a.ndim == 3
    kernel, stride, dilation = (((1,) + tuple(v) if one_d else tuple(v)) for v in
                                (module.kernel_size, module.stride, module.dilation))
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a, padding = F.pad(a, module._reversed_padding_repeated_twice, mode=mode), (0, 0)
    else:
        padding = (0,) + tuple(module.padding) if one_d else tuple(module.padding)
    patches = F.unfold(a.unsqueeze(2) if one_d else a, kernel, dilation=dilation, padding=padding, stride=stride)
    n, groups, out = a.shape[0], module.groups, delta.shape[1]
    if groups == 1:
        return delta.reshape(n, out, -1), patches.transpose(1, 2)  # (n, out, L) @ (n, L, in * kernel)
    d = delta.reshape(n, groups, out // groups, -1)  # (n, G, out/G, L)
    patches = patches.reshape(n, groups, -1, d.shape[-1])  # (n, G, in/G * kernel, L): channels are major
    return torch.matmul(d, patches.transpose(2, 3)).reshape(n, out, -1), None


def normalized(module: Any, kind: str, a: Any) -> Any:
    """``xhat``: the norm layer's input normalized as the layer does it, without its weight and bias."""
    import torch

    F = torch.nn.functional
    if kind == "batchnorm":
        return F.batch_norm(a, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    if kind == "groupnorm":
        return F.group_norm(a, module.num_groups, None, None, module.eps)
    if kind == "layernorm":
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    if kind == "rmsnorm":
        return F.rms_norm(a, module.normalized_shape, None, module.eps)
    x = a.float()  # rmsnorm-hf: as Hugging Face's classes compute it
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _hf_rms_epsilon(module))).to(a.dtype)


def check_rms_norm(module: Any, xhat: Any, out: Any) -> None:
    """Raise ``NotPerExample`` unless a Hugging Face ``*RMSNorm`` call's output ``out`` is ``weight * xhat`` or
    Gemma's ``(1 + weight) * xhat``, to ``max(1e-3, check_tolerance)`` of its largest entry: the kind is taken from
    the class's name, and a variant that applies its weight first or normalizes by groups has other gradients."""
    from .closed_form import NotPerExample, check_tolerance

    weight = module.weight.detach().to(xhat.dtype)
    scale = float(out.detach().abs().max()) or 1.0
    tolerance = max(1e-3, check_tolerance(out.dtype, out.device)) * scale
    for gain in (weight, 1 + weight):
        if float((out.detach() - (gain * xhat).to(out.dtype)).abs().max()) <= tolerance:
            return
    raise NotPerExample(f"{type(module).__name__} does not compute weight * x / rms(x) as Hugging Face's RMSNorm "
                        "classes do")
