"""A ConvNeXt laid out as torchvision's, without torchvision (benchmarks, tests): channels-first ``LayerNorm2d``
(its own ``forward``, calling ``F.layer_norm``) and layer scales ``(C, 1, 1)`` as bare parameters."""
from __future__ import annotations

import torch

nn = torch.nn


class LayerNorm2d(nn.LayerNorm):
    """torchvision's channels-first layer norm: ``F.layer_norm`` on ``(n, H, W, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                                           self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block: depthwise 7x7 ``Conv2d``, ``LayerNorm`` and an MLP channels-last, a layer scale
    ``(C, 1, 1)``, a residual."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dw, self.norm = nn.Conv2d(dim, dim, 7, padding=3, groups=dim), nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class ConvNeXt(nn.Module):
    """Patchify stem with ``LayerNorm2d``, stages of blocks joined by ``LayerNorm2d`` + 2x2 ``Conv2d``
    downsampling, then pooling, ``LayerNorm2d`` and a linear head."""

    def __init__(self, dims: tuple = (32, 64, 128, 256), depths: tuple = (2, 2, 2, 2), patch: int = 4,
                 num_classes: int = 10, layer_scale: float = 1e-6) -> None:
        super().__init__()
        layers: list = [nn.Conv2d(3, dims[0], patch, patch), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], dim, 2, 2)]
            layers += [CNBlock(dim, layer_scale) for _ in range(depth)]
        self.features = nn.Sequential(*layers)
        self.norm, self.head = LayerNorm2d(dims[-1], eps=1e-6), nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean((2, 3), keepdim=True)
        return self.head(self.norm(h).flatten(1))
