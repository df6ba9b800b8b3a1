"""Part of a saved score set on disk: ``load_scores(name, rows=..., targets=...)`` reads only what it needs, checked.

One job, for ``trak_core.disk_scores``. A set is saved in chunks of rows that span every target. One saved by this
version records a SHA-256 per chunk (attribute ``checksums``, ``{str(chunk): digest}``, written with the whole set's
``sha256`` in one metadata write, last): a part reads the chunks that hold its rows, one at a time, checks each,
and keeps its rows and targets (target columns alone still read every chunk, holding one at a time). A set saved
before has the whole set's ``sha256`` only: every chunk is read in order into one running SHA-256 (the bytes of
row chunks in order are the set's bytes) and the part kept, so it is returned only once the whole set checked,
holding one chunk and the part, never the set. Earlier versions read new sets unchanged: they check ``sha256``
and ignore ``checksums``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np

from ._score_index import positions, selection
from .disk_writer import _digest

__all__ = ["chunk_digests", "read_part", "check_set"]


def chunk_digests(values: np.ndarray, chunk_rows: int) -> dict[str, str]:
    """``{str(chunk): SHA-256}`` of each block of ``chunk_rows`` rows of ``values`` (the set's ``checksums``)."""
    return {str(start // chunk_rows): _digest(values[start:start + chunk_rows])
            for start in range(0, values.shape[0], chunk_rows)}


def _width(columns: slice | np.ndarray, n_targets: int) -> int:
    return len(range(n_targets)[columns]) if isinstance(columns, slice) else columns.size


def _groups(wanted: np.ndarray, chunk_rows: int) -> list[tuple[int, np.ndarray]]:
    """``[(chunk, positions in the result of the rows it holds)]``, chunks ascending."""
    chunk_of = wanted // chunk_rows
    order = np.argsort(chunk_of, kind="stable")
    chunks, firsts = np.unique(chunk_of[order], return_index=True)
    return [(int(c), order[a:b]) for c, a, b in zip(chunks, firsts, [*firsts[1:], order.size])]


def _take(block: np.ndarray, local: np.ndarray, columns: slice | np.ndarray) -> np.ndarray:
    """``block[local][:, columns]`` in one copy."""
    if isinstance(columns, slice):
        return block[local, columns]
    return block[np.ix_(local, columns)]


def read_part(array: Any, rows: Any, targets: Any, *, damaged: Callable[[str], Exception]) -> np.ndarray:
    """``values[rows][:, targets]`` of the finished score set ``array``, read as the module notes say.

    Parameters
    ----------
    array : zarr.Array
        The set, shape (n_train, n_targets), whose ``sha256`` is written.
    rows, targets : None, slice or array_like of int
        As ``trak_core._score_index.selection`` takes them (checked here, before anything is read).
    damaged : callable
        Makes the error to raise from what is wrong (a chunk that cannot be read or fails its checksum).

    Returns
    -------
    numpy.ndarray
        Shape (rows taken, targets taken), in the set's dtype.
    """
    n_train, n_targets = array.shape
    chosen, columns = selection(rows, n_train, "rows"), selection(targets, n_targets, "targets")
    wanted = positions(chosen)
    out = np.empty((wanted.size, _width(columns, n_targets)), dtype=array.dtype)
    if out.size == 0:  # nothing to return: nothing read
        return out
    chunk_rows, checksums = array.chunks[0], _checksums(array, damaged)
    if checksums is None:  # saved before per-chunk checksums: the whole set is checked
        return _read_all(array, (wanted, columns, out), damaged)
    for chunk, at in _groups(wanted, chunk_rows):
        block = _chunk(array, chunk, checksums, damaged)
        out[at] = _take(block, wanted[at] - chunk * chunk_rows, columns)
    return out


def check_set(array: Any, *, damaged: Callable[[str], Exception]) -> None:
    """Read every chunk of the finished score set ``array`` once, holding one at a time, and check each against
    its own checksum (where the set has them) and all of them against the whole set's ``sha256``
    (``trak-core store --verify``)."""
    _read_all(array, None, damaged)


def _checksums(array: Any, damaged: Callable[[str], Exception]) -> dict | None:
    checksums = array.attrs.get("checksums")
    if checksums is not None and not isinstance(checksums, dict):
        raise damaged(f"its per-chunk checksums (attribute 'checksums') are a {type(checksums).__name__}, "
                      "not a mapping")
    return checksums


def _chunk(array: Any, chunk: int, checksums: dict | None, damaged: Callable[[str], Exception]) -> np.ndarray:
    """Rows of chunk ``chunk`` (one chunk read: a block of one chunk's rows spanning every target), checked against
    its checksum in ``checksums`` (``None``: not checked)."""
    size = array.chunks[0]
    rows = f"chunk {chunk}, rows {chunk * size} to {min(array.shape[0], (chunk + 1) * size) - 1}"
    try:
        block = array[chunk * size:(chunk + 1) * size]
    except Exception as exc:  # a truncated chunk fails to decode
        raise damaged(f"{rows}, cannot be read: {exc}") from None
    if checksums is not None and _digest(block) != checksums.get(str(chunk)):
        raise damaged(f"{rows}: checksum mismatch")
    return block


def _read_all(array: Any, part: tuple[np.ndarray, slice | np.ndarray, np.ndarray] | None,
              damaged: Callable[[str], Exception]) -> np.ndarray | None:
    """Every chunk in order into one running SHA-256, each checked on its own where the set has checksums, and
    ``part`` (``(positions, columns, out)``) kept; ``out`` is returned once the whole set checked."""
    size, checksums = array.chunks[0], _checksums(array, damaged)
    hasher, groups = hashlib.sha256(), dict(_groups(part[0], size)) if part is not None else {}
    for chunk in range(-(-array.shape[0] // size)):
        block = np.ascontiguousarray(_chunk(array, chunk, checksums, damaged))
        hasher.update(block.view(np.uint8).reshape(-1) if block.size else b"")
        if chunk in groups:
            wanted, columns, out = part
            out[groups[chunk]] = _take(block, wanted[groups[chunk]] - chunk * size, columns)
    if hasher.hexdigest() != array.attrs.get("sha256"):
        raise damaged("checksum mismatch")
    return part[2] if part is not None else None
