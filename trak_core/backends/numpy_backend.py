"""The reference backend: hand-written gradients of ``trak_core.models``, any Array API namespace.

Named ``"numpy"`` because NumPy is what it needs, but it runs on array-api-strict, CuPy, torch
or JAX arrays as given: the namespace is the checkpoint's.
"""
from __future__ import annotations

import math
from typing import Any

import array_api_compat

from .._namespace import namespace
from ..errors import TrakTypeError, non_finite_parameters
from ..fingerprints import parameters_digest
from ..models import AnalyticModel
from .protocol import Backend

__all__ = ["ArrayAPIBackend", "backend"]


class ArrayAPIBackend(Backend):
    """Per-example gradients of ``AnalyticModel`` models."""

    name = "numpy"
    framework = "numpy"
    extra = None
    can_gradients = True
    has_fused_projection = False

    def owns(self, model: Any) -> bool:
        return isinstance(model, AnalyticModel)

    def prepare(self, model: Any, checkpoint: Any) -> dict[str, Any]:
        if not isinstance(model, AnalyticModel):
            raise TrakTypeError(f"the numpy backend needs a trak_core.models.AnalyticModel, got {type(model).__name__}")
        params = model.params(checkpoint)
        bad = [name for name, a in params.items() if not bool(namespace(a).all(namespace(a).isfinite(a)))]
        if bad:
            raise non_finite_parameters(bad)
        return {name: array_api_compat.array_namespace(a).asarray(a, copy=True) for name, a in params.items()}

    def n_params(self, prepared: dict[str, Any]) -> int:
        return sum(math.prod(a.shape) for a in prepared.values())  # torch's ``size`` is a method

    def parameters_digest(self, prepared: dict[str, Any]) -> str:
        return parameters_digest(sorted(prepared.items()))

    def gradients(self, model: AnalyticModel, prepared: dict[str, Any], inputs: Any, labels: Any,
                  task: Any) -> tuple[Any, Any]:
        xp = namespace(inputs, *prepared.values())
        logits = model.logits(prepared, inputs)
        task.check_labels(labels, logits.shape[1], xp=xp)
        dlogits = task.output_grad(logits, labels, xp=xp)
        return model.per_example_grads(prepared, inputs, dlogits), task.out_to_loss(logits, labels, xp=xp)

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        from ..projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)


backend = ArrayAPIBackend()
