"""Small Array API helpers shared by the core: namespace, device and dtype facts.

Every public function of the core calls ``namespace`` once; private helpers take a
keyword-only ``xp``. Nothing here imports a framework.
"""
from __future__ import annotations

from typing import Any

import array_api_compat

from .errors import TrakTypeError

__all__ = ["namespace", "device_of", "has_float64", "accumulation_dtype", "is_numpy", "wide_ids"]


def namespace(*arrays: Any) -> Any:
    """Return the (compat-wrapped) Array API namespace of ``arrays``.

    Raises
    ------
    TypeError
        If the arrays are not Array API arrays or come from different libraries.
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as exc:  # pragma: no cover - message enrichment only
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in arrays})
        raise TrakTypeError(
            f"expected arrays of one Array API library (numpy, torch, jax, cupy, ...), got {kinds}: {exc}"
        ) from None


def device_of(x: Any) -> Any:
    """Return the device of array ``x``."""
    return array_api_compat.device(x)


def is_numpy(xp: Any) -> bool:
    """Return whether ``xp`` is NumPy's namespace (plain or compat-wrapped)."""
    return array_api_compat.is_numpy_namespace(xp)


def has_float64(xp: Any, device: Any = None) -> bool:
    """Return whether namespace ``xp`` supports float64 (on ``device`` where it can tell).

    Notes
    -----
    JAX without ``jax_enable_x64`` and torch on Apple's MPS have no float64.
    """
    if array_api_compat.is_jax_namespace(xp):
        import jax  # already imported: xp is jax.numpy

        return bool(jax.config.jax_enable_x64)
    try:
        info = xp.__array_namespace_info__()
        return "float64" in info.dtypes(device=device)
    except Exception:  # pragma: no cover - very old namespaces
        return hasattr(xp, "float64")


def accumulation_dtype(xp: Any, device: Any = None) -> Any:
    """float64 where the namespace has it, otherwise float32 (see DESIGN.md, kernel)."""
    return xp.float64 if has_float64(xp, device) else xp.float32


def wide_ids(labels: Any, *, xp: Any) -> Any:
    """Integer labels in a signed dtype of 32 bits or more: in uint8, ``arange(300)`` wraps to 0 after 255 and
    ``labels != -100`` is false for 156 (JAX wraps -100 to uint8)."""
    if xp.isdtype(labels.dtype, "signed integer") and xp.iinfo(labels.dtype).bits >= 32:
        return labels
    return xp.astype(labels, xp.int32)
