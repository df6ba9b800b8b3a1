"""A least-recently-used cache bounded in bytes, for projection matrices and their packed bits.

One job: keep what is expensive to regenerate while it fits a memory budget.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

from .errors import TrakValueError

__all__ = ["ProjectionCache", "default_cache", "device_cache"]


class ProjectionCache:
    """A least-recently-used cache of projection pieces, bounded in bytes.

    Parameters
    ----------
    max_bytes : int
        Entries larger than this are never cached; older entries are evicted to make room. 0 disables
        caching.

    Raises
    ------
    TrakValueError
        On a ``max_bytes`` that is not a non-negative integer.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        from ._checks import _integer

        budget = _integer(max_bytes)
        if budget is None or budget < 0:  # a negative budget was taken: nothing fitted, unsaid
            raise TrakValueError(f"max_bytes must be a non-negative integer (bytes; 0 disables caching), got "
                                 f"{max_bytes!r}")
        self.max_bytes = budget
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` may be cached.

        Parameters
        ----------
        nbytes : int
            Size of the entry in bytes.

        Returns
        -------
        bool
            ``nbytes <= max_bytes``.
        """
        return nbytes <= self.max_bytes

    def get(self, key: tuple, nbytes: int, make: Callable[[], Any]) -> Any:
        """Return the cached entry for ``key``, making (and caching, if it fits) it when absent.

        Parameters
        ----------
        key : tuple
            What identifies the entry (hashable).
        nbytes : int
            The entry's size in bytes, counted against ``max_bytes``: the least recently used entries are
            evicted to make room.
        make : callable
            Called with no arguments to make the entry when ``key`` is absent (outside the lock: two threads
            missing the same key both make it, and the first one stored is kept).

        Returns
        -------
        object
            The cached entry, or what ``make`` returned.
        """
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        value = make()
        with self._lock:
            if key not in self._entries and self.fits(nbytes):
                while self._entries and self._bytes + nbytes > self.max_bytes:
                    _, (_, old) = self._entries.popitem(last=False)
                    self._bytes -= old
                self._entries[key] = (value, nbytes)
                self._bytes += nbytes
        return value

    def clear(self) -> None:
        """Drop every cached entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


default_cache = ProjectionCache()

device_cache = ProjectionCache(4 * 2**30)
"""The cache of the half-precision GPU path (``trak_core._split``): float16 signs, packed bits and row
signs on the device. 4 GiB holds the packed bits of 16M parameters at k = 2,048, or the dense float16
signs of 1M. Raising ``device_cache.max_bytes`` (for example to 48 GiB for ResNet-18's 11.2M x 2,048 float16
matrix) trades GPU memory for speed: the signs are then never unpacked again."""
