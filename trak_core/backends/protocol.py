"""What a backend supplies (DESIGN.md, architecture): per-example gradients, optionally a projection.

One job: declare the :class:`Backend` protocol and the errors the registry raises.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

__all__ = ["Backend", "BackendError", "UnknownBackendError", "MissingFrameworkError"]


class BackendError(ValueError):
    """A backend cannot be found or cannot run here."""


class UnknownBackendError(BackendError):
    """No backend is registered under the requested name."""


class MissingFrameworkError(BackendError, ImportError):
    """The backend's framework (or the backend package) is not installed."""


@runtime_checkable
class Backend(Protocol):
    """A framework backend.

    Attributes
    ----------
    name : str
        The name users pass as ``backend=``.
    framework : str or None
        Top-level module of the framework (imported lazily, never by ``import trak_core``).
    extra : str or None
        The pip extra that installs it: ``pip install "trak-core[<extra>]"``.
    can_gradients : bool
        Whether :meth:`gradients` works (a projection-only backend says ``False``).
    has_fused_projection : bool
        Whether :meth:`project` is faster than the reference :func:`trak_core.project`.
    """

    name: str
    framework: str | None
    extra: str | None
    can_gradients: bool
    has_fused_projection: bool

    def owns(self, model: Any) -> bool:
        """Whether ``model`` belongs to this backend; must not import a framework not yet imported."""

    def prepare(self, model: Any, checkpoint: Any) -> Any:
        """A snapshot of ``checkpoint`` ready for :meth:`gradients` (later changes to it do not leak in)."""

    def n_params(self, prepared: Any) -> int:
        """Number of parameters ``p`` the gradients of ``prepared`` have."""

    def gradients(self, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any) -> tuple[Any, Any]:
        """Per-example gradients of ``task.output``, shape (n, p), and ``task.out_to_loss``, shape (n,)."""

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """``grads @ P_checkpoint``, equal to :func:`trak_core.project` (same ``precision``) up to float rounding."""


def batches(data: Iterable[Any]) -> Iterable[tuple[Any, Any]]:
    """Yield ``(inputs, labels)`` pairs from ``data``, with a clear error for anything else."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        raise TypeError("data must be an iterable of (inputs, labels) batches, got a single "
                        "(inputs, labels) pair: wrap it in a list, e.g. [(inputs, labels)]")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"batch {i} must be an (inputs, labels) pair, got {type(batch).__name__}")
        yield batch[0], batch[1]
