"""Progress bars when tqdm is installed (an optional dependency); a no-op otherwise."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, enabled: bool | None, total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar (to stderr) when ``enabled`` and tqdm is importable.

    ``enabled=None`` means: only when stderr is a terminal.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)
