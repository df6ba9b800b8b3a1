"""A vision transformer laid out as torchvision's ``VisionTransformer``, without torchvision (benchmarks, tests)."""
from __future__ import annotations

import torch

nn = torch.nn


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: pre-norm ``nn.MultiheadAttention`` (batch-first, no weights), pre-norm MLP."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, mlp), nn.GELU(), nn.Linear(mlp, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """Patch ``Conv2d``, a class token ``(1, 1, d)`` and position embeddings ``(1, T, d)`` as bare parameters,
    encoder blocks, ``LayerNorm``, a linear head on the class token (torchvision's names and layout)."""

    def __init__(self, image: int = 32, patch: int = 4, width: int = 192, depth: int = 12, heads: int = 3,
                 mlp: int | None = None, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, width, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, width) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(width, heads, mlp or 4 * width) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(width, eps=1e-6), nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])
