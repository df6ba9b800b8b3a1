"""The folders of an on-disk store at a URL, read as ``trak_core.disk_layout`` reads a local directory.

One job: ``UrlPath``, the few ``pathlib.Path`` methods ``disk_layout`` uses (``/``, ``name``, ``read_bytes``,
``exists``, ``is_dir``, ``iterdir``, ``unlink``; ``entries``: a listing without an ``is_dir`` first) over an fsspec
filesystem, each listing, read or query asked once per call that reads the store (``disk_listing.reading``: on an
object store each is a round trip), so that the damaged metadata of a store at
a URL (``s3://``, ``gs://``, ``memory://``...) is found and named as a local store's is; and ``store_tree``, the
folder of a store's location: a ``pathlib.Path`` for a local directory or a ``file://`` URL (``disk_writer.open_root``
opens it as a local folder, not percent-decoded), a ``UrlPath`` for any other URL.
"""
from __future__ import annotations

import pathlib
from typing import Any, Iterator

from .disk_listing import active
from .errors import MissingFrameworkError, install_hint

__all__ = ["UrlPath", "store_tree", "fsspec_tree", "local_folder"]


class UrlPath:
    """A file or folder of an fsspec filesystem, with the subset of ``pathlib.Path`` that ``disk_layout`` uses.

    Parameters
    ----------
    fs
        A synchronous fsspec filesystem.
    path : str
        The path in ``fs`` (protocol stripped, as ``fsspec.core.url_to_fs`` gives it).
    url : str, optional
        How it is shown (``str``): the store's URL as given, with the names joined below it; by default
        ``fs.unstrip_protocol(path)``.
    kind : str, optional
        ``"directory"`` or ``"file"`` where a listing told it (``is_dir`` then asks nothing).
    """

    def __init__(self, fs: Any, path: str, url: str | None = None, kind: str | None = None) -> None:
        self.fs, self.path, self._kind = fs, path.rstrip("/") or "/", kind
        self.url = (url if url is not None else fs.unstrip_protocol(self.path)).rstrip("/")

    def __truediv__(self, name: Any) -> "UrlPath":
        name = str(name).strip("/")
        if name in ("", "."):
            return self
        return UrlPath(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def _key(self, what: str, path: str | None = None) -> tuple[Any, ...]:
        """The key of ``what`` (``"ls"``, ``"cat"``, ``"exists"``, ``"isdir"``) of ``path`` (default: this one) in
        the call's snapshot: filesystems of one type and the same options (an asynchronous twin's flag aside,
        ``sync_filesystem``) answer alike, so zarr's folder listings (``disk_layout.member_names``) and the store's
        (``disk_layout.damaged_checkpoints``) are one."""
        try:
            options = repr(sorted(((key, value) for key, value in getattr(self.fs, "storage_options", {}).items()
                                   if key != "asynchronous"), key=lambda item: item[0]))
        except Exception:  # noqa: BLE001 - options that cannot be shown: this filesystem object alone
            options = f"id {id(self.fs)}"
        return what, type(self.fs), options, (self.path if path is None else path).strip("/")

    def _fresh(self) -> None:
        """Forget what the filesystem's listing cache holds of this folder: zarr writes through its own filesystem
        object, whose writes this one's cache (s3fs, gcsfs) does not see."""
        try:
            self.fs.invalidate_cache(self.path)
        except Exception:  # noqa: BLE001 - a cache is an optimisation only
            pass

    def _ask(self, what: str, query: Any, fresh: bool = True) -> Any:
        """``query()``, asked of the filesystem (its listing cache forgotten first: ``fresh``), once per call that
        reads the store (``disk_listing.reading``: later asks return the same answer, or raise the same error;
        nothing is kept past the call, as another process may write between two calls), else every time."""
        def asked() -> Any:
            if fresh:
                self._fresh()
            return query()

        snapshot = active()
        return asked() if snapshot is None else snapshot.kept(self._key(what), asked)

    def _listed_here(self) -> tuple[str | None, bool] | None:
        """``(kind, found)`` of this entry where the call's snapshot holds its folder's listing (``kind`` ``None``
        where the listing does not tell it), or its bytes; ``None`` where it holds neither (nothing is read)."""
        snapshot = active()
        if snapshot is None:
            return None
        parent = self.path.rsplit("/", 1)[0] if "/" in self.path.strip("/") else None
        listing = None if parent is None else snapshot.peek(self._key("ls", parent))
        if listing is not None:
            entries, error = listing
            if error is None:
                kinds = _members(self.fs, parent, entries)
                return kinds.get(self.name), self.name in kinds
            if isinstance(error, (FileNotFoundError, NotADirectoryError)):
                return None, False
        read = snapshot.peek(self._key("cat"))
        if read is not None and (read[1] is None or isinstance(read[1], FileNotFoundError)):
            return ("file" if read[1] is None else None), read[1] is None
        return None

    def read_bytes(self) -> bytes:
        """The file's bytes; ``FileNotFoundError`` where there is none (read once per call, ``_ask``)."""
        return self._ask("cat", lambda: self.fs.cat_file(self.path), fresh=False)

    def exists(self) -> bool:
        """Whether the file or folder is there (from its folder's listing or its bytes where the call read them)."""
        known = self._listed_here()
        if known is not None:
            return known[1]
        return bool(self._ask("exists", lambda: self.fs.exists(self.path)))

    def is_dir(self) -> bool:
        """Whether it is a folder (as a listing told it, where one did: nothing is asked then)."""
        if self._kind is not None:
            return self._kind == "directory"
        known = self._listed_here()
        if known is not None and (known[0] is not None or not known[1]):
            return known[0] == "directory"
        return bool(self._ask("isdir", lambda: self.fs.isdir(self.path)))

    def iterdir(self) -> Iterator["UrlPath"]:
        """The folder's entries (one listing: each one's kind comes with it)."""
        listing = self._ask("ls", lambda: list(self.fs.ls(self.path, detail=True)))
        for name, kind in _members(self.fs, self.path, listing).items():
            yield UrlPath(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.url}/{name}", kind)

    def entries(self) -> list["UrlPath"]:
        """``iterdir``'s entries; none where there is no folder (one listing: no ``is_dir`` asked first)."""
        try:
            return list(self.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._fresh()
        snapshot = active()
        if snapshot is not None:  # what this call read of it, and of its folder, is out of date
            parent = self.path.rsplit("/", 1)[0]
            snapshot.forget([self._key(what) for what in ("cat", "exists", "isdir", "ls")] + [self._key("ls", parent)])


def _members(fs: Any, folder: str, listing: list[dict]) -> dict[str, str | None]:
    """``{name: kind}`` of the entries of ``folder``'s ``listing`` (``fs.ls(..., detail=True)``), the folder itself
    left out (a file lists itself, an object store's folder marker names the folder), not a member of the same
    name (a score set named ``scores``)."""
    own, found = _stripped(fs, folder), {}
    for entry in listing:
        full = _stripped(fs, str(entry["name"]))
        name = full.rsplit("/", 1)[-1]
        if name and full != own:
            found[name] = entry.get("type")
    return found


def _stripped(fs: Any, path: str) -> str:
    """``path`` as ``fs`` names it in its listings (protocol and trailing ``/`` removed)."""
    try:
        path = fs._strip_protocol(path)
    except Exception:  # noqa: BLE001 - a filesystem without it: the path as given
        pass
    return str(path).rstrip("/")


def sync_filesystem(fs: Any) -> Any:
    """A synchronous twin of the filesystem zarr's ``FsspecStore`` holds (an asynchronous one, or fsspec's wrapper of
    a synchronous one)."""
    inner = getattr(fs, "sync_fs", None)  # fsspec's AsyncFileSystemWrapper (memory://, and other synchronous ones)
    if inner is not None:
        return inner
    if getattr(fs, "asynchronous", False):  # s3fs, gcsfs...: the same options, without asynchronous=True
        return type(fs)(**{**getattr(fs, "storage_options", {}), "asynchronous": False})
    return fs


def fsspec_tree(store: Any) -> UrlPath | None:
    """The root folder of zarr's fsspec store ``store`` (``None`` for another kind of store, or where no synchronous
    twin of its filesystem can be made: zarr's own listing is used then)."""
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is None or not isinstance(path, str):
        return None
    try:
        return UrlPath(sync_filesystem(fs), path)
    except Exception:  # noqa: BLE001 - a filesystem this cannot rebuild: listed as zarr lists it
        return None


def store_tree(location: Any) -> pathlib.Path | UrlPath:
    """The folder of the store at ``location``: a ``pathlib.Path`` for a local directory or a ``file://`` URL, else
    a ``UrlPath`` through fsspec (``MissingFrameworkError`` where fsspec, or the filesystem's package, is absent)."""
    text = str(location)
    if "://" not in text:
        return pathlib.Path(text)
    if text.startswith("file://"):  # as disk_writer.open_root opens it: a local folder, not percent-decoded
        return pathlib.Path(text[len("file://"):])
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(text)
    except ImportError as exc:
        raise MissingFrameworkError(f"the store at {text} is a URL, which zarr opens through fsspec: {exc} ("
                                    f"{install_hint('urls', 'fsspec')}, and the filesystem's package, such as s3fs or "
                                    "gcsfs)") from None
    return UrlPath(fs, path, text.rstrip("/"))


def local_folder(tree: Any) -> pathlib.Path | None:
    """``tree`` where it is a local folder (one ``flock`` can lock, ``disk_claim``), else ``None``."""
    return tree if isinstance(tree, pathlib.Path) else None
