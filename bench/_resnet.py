"""ResNet-18 for the GPU benchmark without torchvision, and its random image batches (bench/gpu_peers.py)."""
from __future__ import annotations

from typing import Any

import torch


class _Block(torch.nn.Module):
    """torchvision's BasicBlock: two 3x3 convolutions with batch norm, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet18(num_classes: int = 10, width: int = 64) -> torch.nn.Module:
    """torchvision's ResNet-18 architecture (BasicBlock, [2, 2, 2, 2]); ``width`` scales the channels."""
    nn, w = torch.nn, [width * 2**i for i in range(4)]
    layers = [nn.Sequential(_Block(w[max(i - 1, 0)], w[i], 2 if i else 1), _Block(w[i], w[i], 1)) for i in range(4)]
    return nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(w[3], num_classes))


def batches(n: int, batch: int, cfg: dict, *, seed: int, device: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random ``cfg['image']``-pixel RGB images with labels 0-9, in batches of ``batch`` (seeded)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 3, cfg["image"], cfg["image"], generator=generator, device=device)
    y = torch.randint(0, 10, (n,), generator=generator, device=device)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]
