"""trak-core's CuPy backend: analytic models on CuPy arrays, per-example gradients computed elsewhere taken
zero-copy through DLPack, and a CUDA-core projection kernel (``projection.fused_project``, not the default).

Importing this package does not import CuPy; the backend imports it on first use.
"""
from .backend import CupyBackend, PrecomputedGradients

backend = CupyBackend()

__all__ = ["CupyBackend", "PrecomputedGradients", "backend"]
