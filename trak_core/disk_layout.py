"""What a store directory holds, as trak-core's on-disk store (``trak_core.disk_store``) sees it.

One job: tell a trak-core store (or an empty directory) from a directory that holds something else, which
trak-core refuses to write into, name zarr's temporary files, and find damaged metadata (a ``zarr.json`` truncated,
zeroed or deleted) from the files themselves: zarr stops at the first one it cannot parse, with a raw JSON error that
names no file, and takes a store whose root ``zarr.json`` is gone for a foreign directory. A store at a URL is read
the same way through ``disk_tree.UrlPath`` (the few ``pathlib.Path`` methods used here, over fsspec).
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import TYPE_CHECKING, Any, Callable, Union

from .disk_listing import listed, lookup

if TYPE_CHECKING:
    from .disk_tree import UrlPath

__all__ = ["ANY_ZARR_TEMPORARY", "CHECKPOINT_GROUP", "ZARR_TEMPORARY", "foreign_contents", "metadata_problem",
           "damaged_metadata", "damaged_checkpoints", "unreadable_metadata", "damaged_root", "member", "has_member",
           "member_names", "read_metadata"]

Raw = Union[bytes, OSError]  # a zarr.json's bytes, or why they could not be read (``read_metadata``)

ZARR_TEMPORARY = re.compile(r"zarr\.[0-9a-f]{32}\.partial")  # zarr.json written, not yet renamed into place
ANY_ZARR_TEMPORARY = re.compile(r".*\.[0-9a-f]{32}\.partial")  # chunks too: ``c/0/0.<32 hex>.partial``


def read_metadata(file: pathlib.Path) -> Raw:
    """The bytes of ``file`` (a ``zarr.json``), or the ``OSError`` that reading it raised (``FileNotFoundError``
    where it is missing): read once, for ``metadata_problem`` and the other checks of the same file."""
    try:
        return file.read_bytes()
    except OSError as exc:
        return exc


def foreign_contents(path: pathlib.Path, raw: Raw | None = None) -> str | None:
    """What the directory holds that is not a trak-core store's: a ``zarr.json`` that is a user's own file of
    that name (zarr would replace it), a zarr array, or a zarr group with attributes or members of its own
    (trak-core would add its arrays to it); zarr v2 data; files without a ``zarr.json`` (hidden ones aside).
    ``None`` for a store, an empty directory, or a group with neither attributes nor members (a first run
    created it and stopped before recording its configuration). ``raw``: its ``zarr.json`` as ``read_metadata``
    read it (else read here)."""
    others = sorted(entry.name for entry in path.iterdir()
                    if entry.name != "zarr.json" and not entry.name.startswith(".trak_core_write_probe")
                    and not ZARR_TEMPORARY.fullmatch(entry.name))  # a write a kill cut short: not the user's
    v2 = [name for name in (".zarray", ".zgroup", ".zattrs") if name in others]
    visible = [name for name in others if not name.startswith(".")]  # hidden files aside
    if not (path / "zarr.json").exists():
        if v2:
            return "zarr v2 data"
        return f"files that are not a trak-core store's ({visible[:5]})" if visible else None
    if v2:
        return "zarr v2 data beside a zarr.json"
    raw = read_metadata(path / "zarr.json") if raw is None else raw
    try:
        meta = None if isinstance(raw, OSError) else json.loads(raw.decode())
    except ValueError:  # UnicodeDecodeError too
        meta = None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or "node_type" not in meta:
        return "a zarr.json file that is not zarr metadata"
    if meta["node_type"] != "group":
        return f"a zarr {meta['node_type']}"
    attributes = meta.get("attributes") or {}
    if "trak_core" not in attributes and (attributes or visible):
        return f"a zarr group that is not a trak-core store (it holds {visible[:5] or 'attributes'})"
    return None


CHECKPOINT_GROUP = re.compile(r"c(\d+)")  # a checkpoint's group: c0, c1, ...
_CHECKPOINT_ATTRIBUTES = {"rows_done", "parameters_sha256", "data_checksums", "checksums", "complete"}


def metadata_problem(file: pathlib.Path | UrlPath, raw: Raw | None = None) -> str | None:
    """What is wrong with the zarr metadata ``file`` (a ``zarr.json``): ``"is missing"``, ``"cannot be read (...)"``
    (truncated, zeroed, not JSON) or ``"is not zarr metadata"``; ``None`` where it is zarr v3 metadata. ``raw``: the
    file as ``read_metadata`` read it (else read here)."""
    raw = read_metadata(file) if raw is None else raw
    if isinstance(raw, FileNotFoundError):
        return "is missing"
    if isinstance(raw, OSError):
        return f"cannot be read ({raw})"
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for a zeroed file
        why = "empty" if not raw else "zeroed" if not raw.strip(b"\0") else f"truncated or overwritten: {exc}"
        return f"cannot be read ({why})"
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or "node_type" not in meta:
        return "is not zarr metadata"
    return None


def damaged_metadata(directory: pathlib.Path | UrlPath) -> str | None:
    """``"<directory>/zarr.json <what is wrong>"`` where the zarr node at ``directory`` has damaged metadata: its
    ``zarr.json`` cannot be read, or is missing while the folder holds nodes (a group's members with their own
    ``zarr.json``, an array's chunks in ``c/``: zarr writes a node's metadata before them); ``None`` where it is
    readable, or the folder holds no node (absent, empty, or only what a killed write left)."""
    file = directory / "zarr.json"
    problem = metadata_problem(file)
    if problem == "is missing":
        folders = [entry for entry in _entries(directory) if entry.is_dir()]  # one listing: kinds come with it
        if not any(entry.name == "c" or (entry / "zarr.json").exists() for entry in folders):
            return None
    return None if problem is None else f"{file} {problem}"


def _entries(folder: pathlib.Path | UrlPath) -> list[Any]:
    """The entries of ``folder``; none where it is no folder (at a URL one listing, no ``is_dir`` asked first)."""
    if isinstance(folder, pathlib.Path):
        return list(folder.iterdir()) if folder.is_dir() else []
    return folder.entries()


def _checkpoint_folders(path: pathlib.Path | UrlPath) -> list[tuple[int, Any]]:
    """``(index, folder)`` of the ``c{index}`` folders of the store at ``path``, in order."""
    found = [(int(m.group(1)), entry) for entry in _entries(path)
             if entry.is_dir() and (m := CHECKPOINT_GROUP.fullmatch(entry.name))]
    return sorted(found, key=lambda item: (item[0], item[1].name))


Opened = Callable[[str], bool]  # whether zarr opened the node at a path relative to the store (``disk_listing.opened``)


def _never(_: str) -> bool:
    return False


def damaged_checkpoints(path: pathlib.Path | UrlPath, opened: Opened = _never) -> dict[int, str]:
    """``{index: "its metadata <file> <what is wrong>"}`` for each checkpoint of the local store at ``path`` whose
    group's, ``features``' or ``out_to_loss``'s ``zarr.json`` is damaged (``damaged_metadata``; the kernel's is not
    listed: a damaged kernel is made again from the features). A node ``opened`` (``"c0"``, ``"c0/features"``: zarr
    read and parsed its ``zarr.json`` in this call) is not read again: its metadata is whole."""
    found = {}
    for index, folder in _checkpoint_folders(path):
        names = ("", "features", "out_to_loss")
        what = next(filter(None, (None if opened(f"c{index}/{name}".rstrip("/")) else damaged_metadata(folder / name)
                                  for name in names)), None)
        if what is not None:
            found[index] = f"its metadata {what}"
    return found


def unreadable_metadata(folder: pathlib.Path | UrlPath, opened: Opened = _never) -> list[Any]:
    """The ``zarr.json`` files of checkpoint ``folder`` (its group's, ``features``' and ``out_to_loss``') that are
    there and cannot be read: zarr neither reads nor replaces them (the kernel's: ``DiskWriter.finish`` makes it
    again). A node ``opened`` (as in ``damaged_checkpoints``) is not read again."""
    nodes = [(folder.name, folder / "zarr.json")] + [(f"{folder.name}/{name}", folder / name / "zarr.json")
                                                     for name in ("features", "out_to_loss")]
    return [file for node, file in nodes if not opened(node) and _unreadable(file)]


def _unreadable(file: pathlib.Path | UrlPath) -> bool:
    """Whether the ``zarr.json`` ``file`` is there and cannot be read. A local one as ever (``exists`` first: a
    ``c{i}`` or an array folder that is a file is no damaged metadata, nothing to delete); at a URL read once, a file
    that is not there (``FileNotFoundError``, ``NotADirectoryError``) taken as absent."""
    if isinstance(file, pathlib.Path):
        return file.exists() and metadata_problem(file) is not None
    raw = read_metadata(file)
    return not isinstance(raw, (FileNotFoundError, NotADirectoryError)) and metadata_problem(file, raw) is not None


def _holds_checkpoint(folder: pathlib.Path | UrlPath) -> bool:
    """Whether ``folder`` is a trak-core checkpoint's group: its arrays' metadata, or a checkpoint's attributes."""
    if any((folder / name / "zarr.json").exists() for name in ("features", "out_to_loss")):
        return True
    try:
        attributes = json.loads((folder / "zarr.json").read_bytes()).get("attributes")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and bool(_CHECKPOINT_ATTRIBUTES & set(attributes))


def damaged_root(path: pathlib.Path | UrlPath, raw: Raw | None = None) -> str | None:
    """``"<path>/zarr.json <what is wrong>"`` where the directory ``path`` holds a trak-core store's checkpoints (a
    ``c{i}`` group with a checkpoint's arrays or attributes) and its root metadata is missing or cannot be read;
    ``None`` otherwise (a readable store, or a directory that is no trak-core store: ``foreign_contents``). ``raw``:
    its root ``zarr.json`` as ``read_metadata`` read it (else read here)."""
    problem = metadata_problem(path / "zarr.json", raw)
    if problem is None or not any(_holds_checkpoint(folder) for _, folder in _checkpoint_folders(path)):
        return None
    return f"{path / 'zarr.json'} {problem}"


def member(group: Any, name: str) -> Any:
    """``group[name]``; ``None`` where there is none, or its ``zarr.json`` is missing or cannot be read (read once in
    a call that reads the store, ``disk_listing.reading``)."""
    try:
        return lookup(group, name)
    except (KeyError, ValueError):  # zarr's JSON, decoding and metadata errors are ValueErrors
        return None


def has_member(group: Any, name: str) -> bool:
    """Whether ``group`` holds ``name`` with metadata zarr reads (an unreadable one is taken as absent)."""
    try:
        lookup(group, name)  # what ``name in group`` does, read once in a call that reads the store
    except (KeyError, ValueError):
        return False
    return True


def member_names(group: Any) -> list[str]:
    """The names of ``group``'s members, their metadata unread (zarr's listing stops at the first one it cannot
    parse): the folders of a local store or of a store at a URL (``disk_tree.fsspec_tree``), else zarr's keys
    (listed once in a call that reads the store)."""
    return listed(group, _member_names)


def _member_names(group: Any) -> list[str]:
    store = getattr(group, "store", None)
    root = getattr(store, "root", None)  # zarr's LocalStore: a pathlib.Path
    if isinstance(root, pathlib.PurePath):
        folder: Any = pathlib.Path(root) / group.path
    else:
        from .disk_tree import fsspec_tree

        tree = fsspec_tree(store)  # zarr's FsspecStore (s3://, memory://...)
        if tree is None:
            return list(group.keys())
        folder = tree / group.path
    return sorted(entry.name for entry in _entries(folder) if entry.is_dir())
