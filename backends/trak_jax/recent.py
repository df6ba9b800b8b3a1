"""A mapping that keeps only its most recently used entries: the JAX backend's caches per ``apply``.

One job: bound what the process-wide JAX backend (``trak_jax.backend``, one object per process) keeps per
``apply`` function. Its compiled steps and abstract traces are keyed by ``apply``, so an unbounded cache kept every
model ever attributed alive, with what its closure holds and its compiled XLA programs (about 10 MiB a model in
a program that attributes one new model after another). An evicted entry is remade on its next use: one more
trace, or one more compilation. Used from several threads at once (one backend per process), an entry made by
one thread may be dropped by another's before it is read back: callers take what ``get_or_make`` returns.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable

__all__ = ["Recent"]


class Recent(OrderedDict):
    """An ``OrderedDict`` of at most ``max_entries`` entries, the least recently read or written dropped first.

    Parameters
    ----------
    max_entries : int, default 16
        How many entries are kept.
    """

    def __init__(self, max_entries: int = 16) -> None:
        super().__init__()
        self.max_entries = int(max_entries)

    def __getitem__(self, key: Hashable) -> Any:
        value = super().__getitem__(key)
        try:
            self.move_to_end(key)
        except KeyError:  # dropped by another thread in between: the value read is still the one asked for
            pass
        return value

    def __setitem__(self, key: Hashable, value: Any) -> None:
        super().__setitem__(key, value)
        try:
            self.move_to_end(key)
        except KeyError:  # dropped by another thread's entry in between
            pass
        while len(self) > self.max_entries:
            try:
                self.popitem(last=False)
            except KeyError:  # emptied by another thread in between
                break

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry of ``key``, made by ``make()`` and stored when absent; what was made is returned as it is,
        not read back (another thread's entries may have dropped it in between: a ``KeyError`` before).

        Parameters
        ----------
        key : hashable
            The entry's key.
        make : callable
            Called without arguments when ``key`` is absent.

        Returns
        -------
        object
            The entry.
        """
        try:
            return self[key]
        except KeyError:
            value = make()
            self[key] = value
            return value

    def copy(self) -> "Recent":
        """A copy with the same bound and order (``OrderedDict.copy`` reads each entry through ``__getitem__``,
        which reorders this mapping while it is copied: the copy lost entries)."""
        copied = type(self)(self.max_entries)
        for key, value in self.items():
            copied[key] = value
        return copied
