"""One call's reading of an on-disk store's metadata: every ``zarr.json`` read once per call.

One job: while a call that only reads a store runs (``TRAK.open``, ``trak-core store``, ``saved_scores``,
``load_scores``: ``reading``), remember each zarr node it opened, or failed to open, and each group's listing, so that
the checks that look at one node again (its damage, whether it is complete, its ridge, its data digests) reuse it
instead of reading its ``zarr.json`` again: on a network filesystem or an object store each read is a round trip,
and a store of 100 checkpoints was read three or four times over. Nothing is kept past the call: another process may
write the store between two calls, and the next call reads it again. The snapshot is the calling thread's own (zarr
reads in a thread of its own, which the calling thread waits for), and nodes are told apart by their zarr store
object, so a group opened afresh (``disk_writer.open_root``, a deliberate fresh read) is read again. The folders of
a store at a URL (``disk_tree.UrlPath``) keep their listings, reads and queries in the same snapshot (``kept``).
"""
from __future__ import annotations

import contextlib
import pathlib
import threading
from typing import Any, Iterator

__all__ = ["Snapshot", "reading", "active", "lookup", "child", "group_at", "opened", "listed", "group_from_metadata"]

_local = threading.local()


class Snapshot:
    """The zarr nodes and group listings one call has read (see the module notes)."""

    def __init__(self) -> None:
        self._nodes: dict[tuple[int, str], tuple[Any, Exception | None]] = {}
        self._names: dict[tuple[int, str], list[str]] = {}
        self._held: list[Any] = []  # the zarr stores keyed by id: alive for the call, so that no id is reused
        self._kept: dict[Any, tuple[Any, Exception | None]] = {}  # disk_tree.UrlPath's answers (``kept``)

    def _key(self, group: Any, name: str | None = None) -> tuple[int, str]:
        store = group.store
        if not any(held is store for held in self._held):
            self._held.append(store)
        path = group.path.strip("/")
        return id(store), path if name is None else f"{path}/{name}" if path else name

    def lookup(self, group: Any, name: str) -> Any:
        """``group[name]``, read once: a later lookup returns the same node, or raises the same error."""
        key = self._key(group, name)
        found = self._nodes.get(key)
        if found is None:
            try:
                found = (group[name], None)
            except Exception as exc:  # KeyError where there is none; zarr's JSON and metadata errors
                found = (None, exc)
            self._nodes[key] = found
        node, error = found
        if error is not None:  # the same error again, its traceback this lookup's (not grown by each raise)
            raise error.with_traceback(None)
        return node

    def kept(self, key: Any, compute: Any) -> Any:
        """``compute()``, once per ``key`` in the call: a later call returns the same value, or raises the same
        error (``disk_tree.UrlPath``: one listing, read or query of each file or folder at a URL per call)."""
        found = self._kept.get(key)
        if found is None:
            try:
                found = (compute(), None)
            except Exception as exc:  # FileNotFoundError where there is none; the filesystem's own errors
                found = (None, exc)
            self._kept[key] = found
        value, error = found
        if error is not None:  # as lookup: its traceback this call's, not grown by each raise
            raise error.with_traceback(None)
        return value

    def peek(self, key: Any) -> tuple[Any, Exception | None] | None:
        """``(value, error)`` of ``kept(key, ...)`` where it ran in this call, else ``None`` (nothing is read)."""
        return self._kept.get(key)

    def forget(self, keys: Any) -> None:
        """Drop what ``kept`` holds for ``keys`` (a file this call deleted: ``disk_tree.UrlPath.unlink``)."""
        for key in keys:
            self._kept.pop(key, None)

    def names(self, group: Any, read: Any) -> list[str]:
        """``read(group)`` (the names of ``group``'s members), listed once."""
        key = self._key(group)
        if key not in self._names:
            self._names[key] = list(read(group))
        return list(self._names[key])


@contextlib.contextmanager
def reading() -> Iterator[Snapshot]:
    """A snapshot of what this call reads, for the calling thread, dropped when the call ends (a call within one
    shares the outer call's)."""
    outer = getattr(_local, "snapshot", None)
    if outer is not None:
        yield outer
        return
    _local.snapshot = Snapshot()
    try:
        yield _local.snapshot
    finally:
        _local.snapshot = None


def active() -> Snapshot | None:
    """The calling thread's snapshot, or ``None`` outside ``reading``."""
    return getattr(_local, "snapshot", None)


def lookup(group: Any, name: str) -> Any:
    """``group[name]``, from the call's snapshot where one is active (``KeyError`` where there is none, as zarr's)."""
    snapshot = active()
    return group[name] if snapshot is None else snapshot.lookup(group, name)


def child(group: Any, name: str) -> Any:
    """``group[name]`` (``lookup``), ``None`` where there is none: ``name in group`` and then ``group[name]`` read its
    ``zarr.json`` twice. zarr's errors for metadata it cannot read are raised, as ``in`` raised them."""
    try:
        return lookup(group, name)
    except KeyError:
        return None


def group_at(root: Any, name: str) -> Any:
    """``root[name]`` where it is a group (``lookup``), else ``None``: absent, an array, or metadata zarr cannot read
    (``require_group`` then creates it or says what is wrong, as it did)."""
    try:
        group = lookup(root, name)
    except Exception:
        return None
    return group if hasattr(group, "require_group") else None


def opened(group: Any, name: str) -> bool:
    """Whether, in an active snapshot, zarr opens ``group[name]``: its ``zarr.json`` was read and parsed, so it is
    not damaged (``disk_layout.metadata_problem`` finds nothing), and later lookups reuse the node. ``False`` outside
    a snapshot (the caller reads the file itself) or where zarr cannot open it (the caller tells why)."""
    snapshot = active()
    if snapshot is None or group is None:
        return False
    try:
        snapshot.lookup(group, name)
    except Exception:
        return False
    return True


def listed(group: Any, read: Any) -> list[str]:
    """``read(group)``, listed once in an active snapshot."""
    snapshot = active()
    return list(read(group)) if snapshot is None else snapshot.names(group, read)


def group_from_metadata(path: pathlib.Path, raw: bytes | OSError | None) -> Any:
    """The zarr group of a local store's root metadata ``raw`` (its ``zarr.json``, read and checked by
    ``disk_store.DiskStore._refuse_foreign``), opened from those bytes as ``zarr.open_group(path, mode="a")``
    opens an existing group, without reading the file again; ``None`` where it holds no zarr v3 group (zarr opens or
    creates it)."""
    import json

    import zarr
    from zarr.storage import LocalStore, StorePath

    try:
        meta = None if raw is None or isinstance(raw, OSError) else json.loads(raw.decode())
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        return None
    try:
        return zarr.Group(zarr.AsyncGroup.from_dict(StorePath(LocalStore(str(path), read_only=False)), dict(meta)))
    except Exception:  # metadata zarr does not take: zarr.open_group says why, as before
        return None
