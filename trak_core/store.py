"""Where featurized checkpoints live. One job: hold per-checkpoint features and kernel factors.

:class:`MemoryStore` keeps everything in memory. Entries are added only when a checkpoint has
been featurized completely, so a failed ``featurize`` leaves the store as it was.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from . import kernel as kernel_ops
from ._namespace import namespace
from .kernel import KernelFactor

__all__ = ["CheckpointEntry", "MemoryStore", "MemoryWriter", "open_store", "kernel_from_features",
           "KERNEL_CHUNK_ROWS"]

KERNEL_CHUNK_ROWS = 4096  # rows of features per update of the kernel K (and rows per on-disk chunk)


def kernel_from_features(features: Any, *, xp: Any = None) -> Any:
    """``Phi^T Phi`` accumulated in chunks of :data:`KERNEL_CHUNK_ROWS` rows, as featurizing does (same bits)."""
    xp = namespace(features[:1, :]) if xp is None else xp
    kernel = None
    for start in range(0, features.shape[0], KERNEL_CHUNK_ROWS):
        kernel = kernel_ops.accumulate(kernel, features[start:min(features.shape[0], start + KERNEL_CHUNK_ROWS), :],
                                       xp=xp)
    return kernel


@dataclass
class CheckpointEntry:
    """One featurized checkpoint: its snapshot, ``Phi_c`` (n, k), ``Q_c`` (n,) and kernel factor.

    The kernel ``Phi^T Phi`` is not held: only its factor is needed to score, and a k x k float64
    matrix per checkpoint is as large as the features when k is close to n. :attr:`kernel` reads it
    from the store (``kernel_loader``) or recomputes it from the features, bit for bit as featurizing
    made it, when ``lambda`` changes.
    """

    index: int
    prepared: Any
    n_params: int
    features: Any
    out_to_loss: Any
    factor: KernelFactor
    structure: Any = None
    kernel_loader: Callable[[], Any] | None = None

    @property
    def kernel(self) -> Any:
        """``Phi^T Phi`` (without lambda), in the accumulation dtype."""
        return self.kernel_loader() if self.kernel_loader is not None else kernel_from_features(self.features)


class MemoryWriter:
    """Collects one checkpoint's features in memory; ``K`` is updated once per chunk of rows."""

    complete = False
    rows_done = 0

    def __init__(self) -> None:
        self._features: list[Any] = []
        self._weights: list[Any] = []
        self._chunk: list[Any] = []
        self._chunk_rows = 0
        self._kernel: Any = None

    def append(self, features: Any, out_to_loss: Any) -> None:
        """Add the features (rows) and out-to-loss weights of the next examples."""
        self._features.append(features)
        self._weights.append(out_to_loss)
        self._chunk.append(features)
        self._chunk_rows += features.shape[0]
        while self._chunk_rows >= KERNEL_CHUNK_ROWS:  # exact chunks of rows, whatever the batch sizes
            self._flush(KERNEL_CHUNK_ROWS)

    def _flush(self, rows: int | None = None) -> None:
        xp = namespace(self._chunk[0])
        pending = xp.concat(self._chunk, axis=0) if len(self._chunk) > 1 else self._chunk[0]
        rows = pending.shape[0] if rows is None else rows
        self._kernel = kernel_ops.accumulate(self._kernel, pending[:rows, ...], xp=xp)
        rest = pending[rows:, ...]
        self._chunk, self._chunk_rows = ([rest], rest.shape[0]) if rest.shape[0] else ([], 0)

    def finish(self) -> tuple[Any, Any, Any]:
        """``(features, out_to_loss, Phi^T Phi)``, or ``(None, None, None)`` when nothing was added."""
        if not self._features:
            return None, None, None
        if self._chunk:
            self._flush()
        xp = namespace(self._features[0])
        return xp.concat(self._features, axis=0), xp.concat(self._weights, axis=0), self._kernel

    def discard(self) -> None:
        """Forget what was collected (nothing was stored)."""
        self._features = []


class MemoryStore:
    """Checkpoint entries kept in memory, in featurization order."""

    def __init__(self) -> None:
        self._entries: list[CheckpointEntry] = []

    def writer(self, index: int, fingerprint: dict) -> MemoryWriter:
        """A writer for checkpoint ``index``'s features."""
        return MemoryWriter()

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


def open_store(store: Any) -> Any:
    """The store for ``TRAK(store=...)``: ``None`` is a new :class:`MemoryStore`; a path is a
    :class:`~trak_core.disk_store.DiskStore` there; a store object is used as it is."""
    if store is None:
        return MemoryStore()
    if isinstance(store, (str, os.PathLike)):
        from .disk_store import DiskStore

        return DiskStore(store)
    if hasattr(store, "writer") and hasattr(store, "add"):
        return store
    raise TypeError(f"store must be None, a directory path or a store object, got {type(store).__name__}")
