"""Which projection path trak-core takes on a GPU (its Triton kernel or the generic split), and the A/B switch."""
from __future__ import annotations

import os
from typing import Any, Callable


def without_triton(fn: Callable[[], Any]) -> Any:
    """``fn()`` with trak-core's Triton projection kernel turned off (``TRAK_CORE_TRITON=0``)."""
    before = os.environ.get("TRAK_CORE_TRITON")
    os.environ["TRAK_CORE_TRITON"] = "0"
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["TRAK_CORE_TRITON"]
        else:
            os.environ["TRAK_CORE_TRITON"] = before


def triton_note(grads: Any, precision: str) -> str:
    """Which path ``trak_core.project`` takes for ``grads`` at ``precision`` here, and why not the kernel if not."""
    try:
        from trak_core import _triton
        from trak_core.projection import uses_split
    except ImportError:
        return "no Triton kernel in this version"
    if not uses_split(grads, "rademacher", precision):
        return "a plain float32 product (no split off GPUs)"
    failed = _triton.failure(grads)
    if failed:
        return f"generic split: the Triton kernel failed: {failed}"[:200]
    return "Triton kernel" if _triton.available(grads) else "generic split (no CUDA tensor or no Triton)"
