"""Backends that misbehave on purpose, shared by the error tests."""
from trak_core.backends import numpy_backend


class ZeroGradients(numpy_backend.ArrayAPIBackend):
    """Gradients that vanish everywhere (a dead network)."""

    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        return grads * 0.0, q
