"""trak-core's PyTorch backend: per-example gradients of any ``nn.Module`` with ``torch.func``.

Importing this package does not import torch; the backend imports it on first use.
"""
from .backend import TorchBackend

backend = TorchBackend()

__all__ = ["TorchBackend", "backend"]
