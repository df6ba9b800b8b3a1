"""Where featurized checkpoints live. One job: hold per-checkpoint features and kernel factors.

:class:`MemoryStore` keeps everything in memory. Entries are added only when a checkpoint has
been featurized completely, so a failed ``featurize`` leaves the store as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from .kernel import KernelFactor

__all__ = ["CheckpointEntry", "MemoryStore", "open_store"]


@dataclass
class CheckpointEntry:
    """One featurized checkpoint: its snapshot, ``Phi_c`` (n, k), ``Q_c`` (n,) and kernel factor."""

    index: int
    prepared: Any
    n_params: int
    features: Any
    out_to_loss: Any
    factor: KernelFactor
    structure: Any = None
    kernel: Any = None  # Phi^T Phi (without lambda), kept so lambda can be changed


class MemoryStore:
    """Checkpoint entries kept in memory, in featurization order."""

    def __init__(self) -> None:
        self._entries: list[CheckpointEntry] = []

    def add(self, entry: CheckpointEntry) -> None:
        """Append a completely featurized checkpoint."""
        if entry.index != len(self._entries):
            raise ValueError(f"checkpoint index {entry.index} out of order; expected {len(self._entries)}")
        self._entries.append(entry)

    def __iter__(self) -> Iterator[CheckpointEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> CheckpointEntry:
        return self._entries[index]


def open_store(store: Any) -> MemoryStore:
    """Return the store for ``TRAK(store=...)``: ``None`` gives a new :class:`MemoryStore`."""
    if store is None:
        return MemoryStore()
    if isinstance(store, MemoryStore):
        return store
    raise ValueError(f"store={store!r} is not supported in this version: only in-memory stores "
                     "(store=None) are available; on-disk stores are planned")
