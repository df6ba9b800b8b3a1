"""The canonical causal language model (``"lm"`` in ``trak_core.testing.canonical``) as a torch module.

One job: the torch twin of ``trak_core.testing.cases.jax_apply`` ``("lm")``, parameters in the
canonical order. Imports torch: load it through ``trak_core.testing.cases.torch_model``.
"""
from __future__ import annotations

import math

import torch

__all__ = ["TinyCausalLM"]


class _Block(torch.nn.Module):
    """Pre-LayerNorm block: multi-head causal self-attention, then a tanh-GELU MLP, each residual."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width)
        self.query, self.key, self.value = (torch.nn.Linear(width, width) for _ in range(3))
        self.out = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.fc = torch.nn.Linear(width, mlp)
        self.proj = torch.nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        size = width // self.heads
        a = self.norm1(x)
        q, k, v = (layer(a).reshape(n, length, self.heads, size).transpose(1, 2)
                   for layer in (self.query, self.key, self.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(size)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        attention = torch.softmax(scores, dim=-1) @ v
        x = x + self.out(attention.transpose(1, 2).reshape(n, length, width))
        return x + self.proj(torch.nn.functional.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class TinyCausalLM(torch.nn.Module):
    """Token and learned positional embeddings, pre-LayerNorm blocks, a final LayerNorm, an untied head.

    ``forward(input_ids, attention_mask=None)`` returns logits ``(n, T, vocabulary)``. The mask is a
    2-D padding mask ``(n, T)`` (1 keep, 0 pad) or the additive ``(n, 1, T, T)`` mask the torch
    backend makes of it (0 keep); either way it is combined with the causal mask here.
    """

    def __init__(self, vocab: int, length: int, width: int, heads: int, mlp: int, blocks: int) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Embedding(length, width)
        self.blocks = torch.nn.ModuleList(_Block(width, heads, mlp) for _ in range(blocks))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        if attention_mask is None:
            keep = causal[None, None]
        elif attention_mask.ndim == 4:  # additive: 0 where kept, the dtype's lowest value where masked
            keep = (attention_mask == 0) & causal
        else:
            keep = (attention_mask[:, None, None, :] != 0) & causal
        x = self.tokens(input_ids) + self.positions.weight[:length]
        for block in self.blocks:
            x = block(x, keep)
        return self.head(self.norm(x))
