"""Progress bars when tqdm is installed (an optional dependency); a no-op otherwise."""
from __future__ import annotations

import sys
from typing import Any, Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, enabled: bool | None, total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar (to stderr) when ``enabled`` and tqdm is importable.

    ``enabled=None`` means: only when stderr is a terminal. ``total``: the number of items, else ``len(iterable)``
    where it has one (pass ``length_of(data)`` when wrapping a generator over ``data``).
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if total is None:
        total = length_of(iterable)
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)


def length_of(data: Any) -> int | None:
    """``len(data)`` when ``data`` has one (a list, a ``DataLoader``), else ``None`` (a generator)."""
    try:
        return len(data)
    except TypeError:
        return None
