"""trak-core's JAX backend: per-example gradients with ``jax.vmap(jax.grad(...))`` under ``jax.jit``.

Importing this package does not import JAX; the backend imports it on first use.
"""
from .backend import JaxBackend, JaxModel

backend = JaxBackend()

__all__ = ["JaxBackend", "JaxModel", "backend"]
