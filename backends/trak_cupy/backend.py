"""The CuPy backend object: analytic models on the GPU, precomputed gradients, fused projection."""
from __future__ import annotations

from typing import Any

from trak_core.backends.numpy_backend import ArrayAPIBackend
from trak_core.backends.protocol import MissingFrameworkError
from trak_core.errors import TrakValueError

__all__ = ["CupyBackend", "PrecomputedGradients"]


class PrecomputedGradients:
    """A "model" whose batches are per-example gradients computed elsewhere.

    Each batch is ``(grads, out_to_loss)``: ``grads`` of shape (n, n_params) and the weights ``Q``
    of shape (n,), as arrays of any framework on a CUDA device (torch, JAX, CuPy), taken without a
    copy through DLPack. Checkpoints are labels only (any value); featurize once per checkpoint.

    Parameters
    ----------
    n_params : int
        Number of parameters ``p``, the columns of every batch's ``grads``: a positive integer (NumPy integers
        accepted, not bools).
    """

    def __init__(self, n_params: int) -> None:
        import operator

        try:  # NumPy integers too; not a bool
            count = None if isinstance(n_params, bool) else operator.index(n_params)
        except TypeError:
            count = None
        if count is None or count <= 0:
            raise TrakValueError(f"n_params must be a positive integer, got {n_params!r}")
        self.n_params = count


def _require_gpu() -> Any:
    try:
        import cupy
    except ImportError:
        raise MissingFrameworkError("the cupy backend needs CuPy and a CUDA device: pip install cupy-cuda12x (or "
                                    "cupy-cuda13x, matching your CUDA driver; in a trak-core checkout, pip install -e "
                                    '".[cupy-cuda12]" or ".[cupy-cuda13]") on a machine with an NVIDIA GPU') from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver
        raise MissingFrameworkError(f"the cupy backend needs a CUDA device, and CuPy found none ({exc})") from None
    if count == 0:
        raise MissingFrameworkError("the cupy backend needs a CUDA device, and CuPy found none")
    return cupy


def _to_cupy(array: Any, what: str) -> Any:
    cupy = _require_gpu()
    if isinstance(array, cupy.ndarray):
        return array
    if hasattr(array, "__dlpack__") and type(array).__module__.split(".")[0] != "numpy":
        try:
            return cupy.from_dlpack(array)
        except Exception as exc:
            raise TrakValueError(f"{what} could not be shared with CuPy through DLPack ({exc}); it must live on a "
                                 "CUDA device (torch .cuda(), jax.device_put to a GPU)") from None
    return cupy.asarray(array)


class CupyBackend(ArrayAPIBackend):
    """Analytic models and precomputed gradients on CuPy arrays; projected by the core's tensor-core path (the Triton
    kernel, ``trak_core._triton_aot``), not by ``trak_cupy.projection.fused_project`` (``has_fused_projection`` is
    ``False``)."""

    name = "cupy"
    framework = "cupy"
    extra = "cupy"
    can_gradients = True
    has_fused_projection = False  # project() is the core's: float16 tensor-core products on the GPU

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is a ``PrecomputedGradients`` (an analytic model needs ``backend="cupy"``)."""
        return isinstance(model, PrecomputedGradients)

    def prepare(self, model: Any, checkpoint: Any) -> Any:
        """The analytic model's parameters as CuPy arrays; for ``PrecomputedGradients``, only ``n_params``."""
        cupy = _require_gpu()
        if isinstance(model, PrecomputedGradients):
            return {"n_params": model.n_params}
        params = super().prepare(model, checkpoint)
        return {name: cupy.asarray(value) for name, value in params.items()}

    def n_params(self, prepared: Any) -> int:
        """See ``Backend.n_params`` (``PrecomputedGradients.n_params`` for precomputed gradients)."""
        if set(prepared) == {"n_params"}:
            return prepared["n_params"]
        return super().n_params(prepared)

    def parameters_digest(self, prepared: Any) -> str | None:
        """See ``Backend.parameters_digest``; ``None`` for precomputed gradients (a checkpoint is a label)."""
        if set(prepared) == {"n_params"}:  # precomputed gradients: the checkpoint is a label, nothing to hash
            return None
        return super().parameters_digest(prepared)

    def gradients(self, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any) -> tuple[Any, Any]:
        """See ``Backend.gradients``; for ``PrecomputedGradients``, the batch's pair itself, as CuPy arrays."""
        if isinstance(model, PrecomputedGradients):
            grads, weights = _to_cupy(inputs, "grads"), _to_cupy(labels, "out_to_loss")
            if grads.ndim != 2 or grads.shape[1] != model.n_params:
                raise TrakValueError(f"precomputed gradients must have shape (n, {model.n_params}), got {grads.shape}")
            return grads, weights
        return super().gradients(model, prepared, _to_cupy(inputs, "inputs"), _to_cupy(labels, "labels"), task)

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """``trak_core.project``: float16 tensor-core products of a split input (the Triton kernel of
        ``trak_core._triton`` launched by CuPy when Triton is installed, else cuBLAS ``gemmEx``).

        The CUDA-core kernel of ``trak_cupy.projection`` (``fused_project``) stays available; it
        keeps memory at ``O(n (p + k))`` but is several times slower than tensor cores.
        """
        from trak_core.projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)
