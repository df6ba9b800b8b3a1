"""The folder of an on-disk store as files: what ``DiskStore`` checks and tidies outside zarr.

One job: ``StoreFolder``, the part of ``trak_core.disk_store.DiskStore`` that reads the store's folder itself rather
than through zarr: a directory that is not a trak-core store (refused before anything is written), damaged root or
checkpoint metadata (``disk_layout``), the folder of a store at a URL (``disk_tree``), the directory a checkpoint's
claim locks (``disk_claim``), whether zarr opened a node in this call (``disk_listing``) and the temporary files of
writes a killed run cut short.
"""
from __future__ import annotations

import pathlib
from typing import Any

from .disk_layout import (ANY_ZARR_TEMPORARY, ZARR_TEMPORARY, Raw, damaged_checkpoints, damaged_root,
                          foreign_contents, member, read_metadata)
from .disk_listing import active, opened
from .disk_tree import UrlPath, local_folder, store_tree
from .errors import StoreDamagedError, TrakOSError

__all__ = ["StoreFolder"]


class StoreFolder:
    """The folder checks of a ``DiskStore`` (which gives ``path``, ``root`` and ``exists``)."""

    path: Any
    root: Any
    exists: Any

    def _refuse_foreign(self) -> Raw | None:
        """Refuse a directory that is not a trak-core store (``disk_layout.foreign_contents``), before anything is
        written to it; returns its root ``zarr.json`` as read for the checks (``None``: no directory yet). At a URL
        too (``tree``): zarr v2 data there was written into as a v2 store, which reading calls (zarr v3 only) then
        took for no store."""
        tree = self.tree
        if not tree.is_dir():
            self._refuse_damaged()
            return None
        raw = read_metadata(tree / "zarr.json")  # once, for both checks
        self._refuse_damaged(raw)
        what = foreign_contents(tree, raw)
        if what is not None:
            raise TrakOSError(f"the store path {self.path} holds {what}; trak-core writes only into its own stores "
                              "and changed nothing: choose another (new or empty) directory for store=")
        return raw

    def _refuse_damaged(self, raw: Raw | None = None) -> None:
        """Refuse a store whose root metadata is missing or cannot be read (``disk_layout.damaged_root``), rather than
        take it for a foreign directory or for no store at all; nothing is written. ``raw``: its root ``zarr.json``
        as read (else read here)."""
        tree = self.tree
        what = damaged_root(tree, raw) if tree.is_dir() else None
        if what is not None:
            raise StoreDamagedError(f"the trak-core store at {self.path} is damaged: its root metadata {what}. That "
                                    "file records the store's configuration, so the store cannot be opened; trak-core "
                                    "changed nothing. Put the file back from a copy of the store, or featurize into a "
                                    "new store path")

    def damaged_checkpoints(self) -> dict[int, str]:
        """``{index: what}`` of the checkpoints whose metadata is damaged (``disk_layout.damaged_checkpoints``; at a
        URL too, ``disk_tree``): featurizing such a checkpoint again redoes it."""
        return {} if not self.exists() else damaged_checkpoints(self.tree, self._opened)

    @property
    def tree(self) -> pathlib.Path | UrlPath:
        """The store's folder as ``disk_layout`` reads it (``disk_tree.store_tree``): a ``pathlib.Path`` for a local
        directory or a ``file://`` URL, a ``disk_tree.UrlPath`` for another URL."""
        return self.path if isinstance(self.path, pathlib.Path) else store_tree(self.path)

    def checkpoint_folder(self, index: int) -> pathlib.Path | None:
        """The local directory of checkpoint ``index``'s group, which its claim locks (``disk_claim``); ``None`` for a
        store at a URL other than ``file://`` (nothing to lock: its run record tells)."""
        folder = local_folder(self.tree)
        return None if folder is None else folder / f"c{index}"

    def _opened(self, node: str) -> bool:
        """Whether zarr opens ``node`` (``"c0"``, ``"c0/features"``) in the call's snapshot (``disk_listing.opened``:
        its metadata is whole, and read once); ``False`` outside one, where the files are read as they are."""
        if active() is None:
            return False
        *parents, name = node.split("/")
        group = self.root
        for parent in parents:
            group = member(group, parent)
            if group is None:
                return False
        return opened(group, name)

    def _sweep_temporaries(self, group: str, root: bool = True) -> None:
        """Delete the temporary files of zarr writes that a killed run cut short (``*.<32 hex>.partial``: zarr writes
        each file so and renames it into place) in ``group``, just finished by this, the store's one writer, and
        (``root``) beside the store's own ``zarr.json``. A local store only (a ``file://`` URL too: zarr writes it as
        a local directory); a file that cannot be deleted is left."""
        folder = local_folder(self.tree)
        if folder is None:
            return
        directory = folder / group
        found = [entry for entry in directory.rglob("*.partial") if ANY_ZARR_TEMPORARY.fullmatch(entry.name)]
        if root:
            found += [entry for entry in folder.glob("*.partial") if ZARR_TEMPORARY.fullmatch(entry.name)]
        for entry in found:
            try:
                entry.unlink()
            except OSError:
                pass
