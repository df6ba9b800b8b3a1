"""The models and random batches of ``bench/kronecker_speed.py`` (GPT-2, a CIFAR ResNet-18, a small ViT), full and
quick sizes; nothing is downloaded."""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VIT = dict(full=dict(width=192, depth=6, heads=3), quick=dict(width=16, depth=2, heads=2))
GPT2_QUICK = dict(vocab_size=256, n_positions=16, n_embd=32, n_layer=2, n_head=2)
SEQUENCE = dict(full=128, quick=16)
RESNET = dict(full=dict(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
              quick=dict(widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1)))


def make_resnet18(widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 10):
    """A CIFAR ResNet-18 (He et al. 2016, the CIFAR variant: 3x3 stem, no max-pool), without torchvision."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            layers, cin = [], widths[0]
            for i, (width, count) in enumerate(zip(widths, blocks)):
                for j in range(count):
                    layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
                    cin = width
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            out = self.layers(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(out, 1), 1))

    return ResNet()


def make_model(name: str, size: str):
    import torch

    torch.manual_seed(0)
    if name == "gpt2":
        import transformers

        config = transformers.GPT2Config(**(GPT2_QUICK if size == "quick" else {}))
        return transformers.GPT2LMHeadModel(config).eval()
    if name == "vit":
        sys.path.insert(0, HERE)
        from _vit import VisionTransformer

        return VisionTransformer(image=32, patch=4, **VIT[size]).eval()
    model = make_resnet18(**RESNET[size]).eval()
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def make_batches(name: str, size: str, n: int, batch: int, model, seed: int = 1) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        if name == "gpt2":
            ids = torch.randint(1, model.config.vocab_size, (m, SEQUENCE[size]), generator=g)
            out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        else:
            out.append((torch.randn(m, 3, 32, 32, generator=g), torch.randint(0, 10, (m,), generator=g)))
    return out
