"""Choosing a store for ``TRAK(store=...)``.

One job: map what users pass (``None``, a path or URL, a store object) to a ``Store``.
It imports both kinds of store, so neither has to import the other.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from .errors import TrakTypeError
from .store import MemoryStore, Store

__all__ = ["open_store"]


def open_store(store: Any, progress: bool | None = False) -> Store:
    """The store for ``TRAK(store=...)``: ``None`` is a new ``MemoryStore``; a path
    or URL is a ``DiskStore`` there (created on the first write); a
    ``Store`` is used as it is. ``progress``: its ``progress`` (bars over its own long passes), where it
    takes the attribute."""
    if store is None:
        return MemoryStore()
    if isinstance(store, (str, os.PathLike)):
        from .disk_store import DiskStore

        store = DiskStore(store)
    if isinstance(store, Store):
        with contextlib.suppress(AttributeError):  # a third-party Store that takes no attributes
            store.progress = progress
        return store
    raise TrakTypeError(f"store must be None, a directory path or URL, or a trak_core.store.Store, "
                        f"got {type(store).__name__}")
