"""trak-core's CuPy backend: a fused GPU projection kernel, analytic models on CuPy arrays, and
per-example gradients computed elsewhere taken zero-copy through DLPack.

Importing this package does not import CuPy; the backend imports it on first use.
"""
from .backend import CupyBackend, PrecomputedGradients

backend = CupyBackend()

__all__ = ["CupyBackend", "PrecomputedGradients", "backend"]
