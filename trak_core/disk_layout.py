"""What a store directory holds, as trak-core's on-disk store (``trak_core.disk_store``) sees it.

One job: tell a trak-core store (or an empty directory) from a directory that holds something else, which
trak-core refuses to write into, and name zarr's temporary files.
"""
from __future__ import annotations

import json
import pathlib
import re

__all__ = ["ANY_ZARR_TEMPORARY", "ZARR_TEMPORARY", "foreign_contents"]

ZARR_TEMPORARY = re.compile(r"zarr\.[0-9a-f]{32}\.partial")  # zarr.json written, not yet renamed into place
ANY_ZARR_TEMPORARY = re.compile(r".*\.[0-9a-f]{32}\.partial")  # chunks too: ``c/0/0.<32 hex>.partial``


def foreign_contents(path: pathlib.Path) -> str | None:
    """What the directory holds that is not a trak-core store's: a ``zarr.json`` that is a user's own file of
    that name (zarr would replace it), a zarr array, or a zarr group with attributes or members of its own
    (trak-core would add its arrays to it); zarr v2 data; files without a ``zarr.json`` (hidden ones aside).
    ``None`` for a store, an empty directory, or a group with neither attributes nor members (a first run
    created it and stopped before recording its configuration)."""
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
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or "node_type" not in meta:
        return "a zarr.json file that is not zarr metadata"
    if meta["node_type"] != "group":
        return f"a zarr {meta['node_type']}"
    attributes = meta.get("attributes") or {}
    if "trak_core" not in attributes and (attributes or visible):
        return f"a zarr group that is not a trak-core store (it holds {visible[:5] or 'attributes'})"
    return None
