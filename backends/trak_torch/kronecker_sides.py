"""The projected sides of one layer call, for the factorized projection of torch models.

One job: a call's input side times its factor, and its output gradient times the other factor
(:mod:`trak_torch.kronecker` combines them into a block's features); ``use`` is a ``kronecker.Use``.
"""
from __future__ import annotations

import math
from typing import Any

__all__ = ["input_side", "output_side", "rows_first"]


def input_side(use: Any, block: Any, pair: tuple[Any, Any], x: Any, dtype: Any) -> Any:
    """The projected input side of one call, ``(B, T, k)`` for a call on ``B`` examples (under ``vmap``: 1)."""
    import torch

    rows, cols = pair
    module = use.module
    if use.kind == "embedding":
        ids = x.reshape(x.shape[0], -1)
        side = torch.nn.functional.embedding(ids, use.row_factor(rows))
        padding_idx = use.padding_idx if use.function else module.padding_idx
        if padding_idx is not None:
            side = side * (ids != padding_idx).to(dtype)[..., None]
        return side
    if use.kind in ("conv2d", "conv1d-torch"):
        padding = (0,) * len(module.kernel_size) if module.padding == "valid" else tuple(module.padding)
        if use.kind == "conv1d-torch":  # as a 2-D convolution of height 1
            x, kernel, dilation, stride = (x.unsqueeze(-2), (1, *module.kernel_size), (1, *module.dilation),
                                           (1, *module.stride))
            padding = (0, *padding)
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        patches = torch.nn.functional.unfold(x.to(dtype), kernel, dilation=dilation, padding=padding,
                                             stride=stride)  # (B, C kh kw, L)
        a = patches.transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1]).to(dtype)  # no -1: a call on 0 rows (an
        # expert no token of the example is routed to) has 0 positions
    matrix = rows if use.kind == "conv1d" else cols
    side = a @ matrix[:a.shape[-1]]
    return side + matrix[a.shape[-1]] if use.bias is not None else side


def output_side(use: Any, pair: tuple[Any, Any], delta: Any, n: int, dtype: Any) -> Any:
    """The projected output-gradient side of one call, ``(n, T, k)``. A lookup's output gradient (width ``d``) takes
    the first ``d`` rows of the column factor: the factor has ``d + 1`` when the table is tied to a ``Linear`` head
    whose bias is folded into the block (BERT's masked-LM head), and the lookup does not reach the bias."""
    rows, cols = pair
    if use.kind in ("conv2d", "conv1d-torch"):  # (..., channels, H, W) or (..., channels, L)
        d = delta.reshape(n, delta.shape[-3 if use.kind == "conv2d" else -2], -1).transpose(1, 2)
    else:
        d = delta.reshape(n, delta.numel() // max(1, n * delta.shape[-1]), delta.shape[-1])
    if use.kind == "embedding":
        return d.to(dtype) @ cols[:d.shape[-1]]
    return d.to(dtype) @ (cols if use.kind == "conv1d" else use.row_factor(rows))


def rows_first(use: Any, input_side: Any, output_side: Any) -> tuple[Any, Any]:
    """``(row side, col side)`` of a call."""
    if use.kind in ("embedding", "conv1d"):
        return input_side, output_side
    return output_side, input_side
