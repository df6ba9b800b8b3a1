"""What an on-disk store holds, read into a report: the ``describe`` behind ``trak-core store PATH``.

One job: read a store's configuration, its checkpoints (complete, in progress, missing, damaged: its metadata, or
with ``verify`` its chunks) and its saved scores into a dict (``trak_core.store_report`` prints it as text or
JSON). It reads only: a store that jobs are writing, or a read-only directory, is left as it is. No framework is
imported.
"""
from __future__ import annotations

import itertools
import time
from typing import Any

from .errors import StoreDamagedError, StoreMismatchError, TrakCoreError, TrakValueError

__all__ = ["describe", "MISSING_LISTED", "INDEX_LIMIT"]

#: how many missing indices ``describe`` lists in ``missing``; ``missing_count`` and ``missing_ranges`` give them all
MISSING_LISTED = 100_000
#: checkpoint indices are below 2**64 (``featurize(..., index=i)``, which seeds the projection with it)
INDEX_LIMIT = 2**64


def describe(path: str, *, verify: bool = False, expect: int | None = None) -> dict[str, Any]:
    """What the on-disk store at ``path`` holds.

    Parameters
    ----------
    path : str
        The store (``TRAK(..., store=path)``): a directory or a URL zarr opens.
    verify : bool
        Also read every stored chunk of features and out-to-loss weights, every kernel and every saved score set,
        and check them against their checksums (reads the whole store).
    expect : int, optional
        How many checkpoints the store is to hold (a job array's size), at most ``2**64``: ``missing`` then runs to
        ``expect - 1``, and ``beyond_expect`` lists the stored checkpoints at ``expect`` or above (jobs of another
        array, or a wrong size).

    Returns
    -------
    dict
        ``path``, ``now`` (when it was read), ``configuration`` (as stored), ``first_batch_rows``,
        ``checkpoints`` (per ``c{i}`` group:
        ``index``, ``state`` ("complete", "in progress": rows written, "started": none yet, "damaged": its group's
        or an array's ``zarr.json`` is missing or cannot be read, ``disk_layout.damaged_checkpoints``), ``rows``,
        ``lambda_reg``, ``lambda_setting``, ``dtype``, ``parameters_sha256``, ``configuration`` ("same" or
        "other", of configuration or model, for checkpoints featurized apart, else ``None``), ``run`` (the run that
        last wrote to it: ``host``, ``pid``, ``started``; ``None`` in stores written before trak-core kept it),
        ``written_at`` (its last rows),
        ``running`` (for an incomplete one: whether that process still runs, ``None`` on another host or where
        unknown), ``ridge_edited`` (a complete one's ``lambda_reg`` does not match the hash written with it), with
        ``verify`` also ``damaged`` (a message or ``None``; also ``rows_damaged``), ``data`` ("same" or "other":
        its training data digests against those of
        the lowest complete checkpoint, ``data_reference``; ``None`` for that one or where none is complete)),
        ``complete``, ``opens`` (the complete checkpoints ``TRAK.open`` scores together: not on other data, of
        another configuration, with an edited ridge or, with ``verify``, with damaged rows) and ``missing`` (indices
        without a group, below ``expect`` or else below the highest stored one: the first ``MISSING_LISTED``,
        100,000), ``missing_count`` (how many there are), ``missing_truncated`` (``missing`` lists fewer) and
        ``missing_ranges`` (all of them, as ``[first, last]`` pairs, one
        more at most than there are stored checkpoints), ``beyond_expect`` (stored indices at ``expect`` or above;
        empty without ``expect``),
        ``scores`` (``name``, ``shape``, ``dtype``, ``state``: "finished", "interrupted" or "damaged", its
        ``zarr.json`` unreadable, with ``shape`` and ``dtype`` ``None``; with ``verify``, ``damaged``),
        ``scores_damaged`` (what is wrong with the ``zarr.json`` of the group of every set, else ``None``) and
        ``damaged`` (whether anything checked failed).

    Raises
    ------
    TrakValueError
        Where ``path`` holds no trak-core store, is empty, or ``expect`` is negative or above ``2**64``.
    StoreMismatchError
        Where the store has another format (``store_format``) than this trak-core reads: written by another version.
    """
    from .disk_listing import reading

    if not str(path).strip():  # was read as a store at "": "no trak-core store at :"
        raise TrakValueError(f"path is empty ({path!r}): pass the store's directory or URL, the path given to "
                             "TRAK(..., store=path)")
    if expect is not None and not 0 <= expect <= INDEX_LIMIT:
        raise TrakValueError(f"expect must be from 0 to 2**64 (checkpoint indices are below 2**64), got {expect}")
    with reading():  # each zarr.json of the store read once
        return _describe(path, verify, expect)


def _describe(path: str, verify: bool, expect: int | None) -> dict[str, Any]:
    from .disk_shared import checkpoint_indices
    from .disk_store import DiskStore

    store = DiskStore(path)
    config = store.configuration()
    if config is None:
        raise TrakValueError(f"no trak-core store at {path}: a store is made by TRAK(..., store=path).featurize(...)")
    _check_format(path, config)
    root, broken = store.root, store.damaged_checkpoints()  # damaged metadata: listed, not taken for missing
    indices = sorted(set(checkpoint_indices(root, complete=False)) | set(broken))
    checkpoints = [_checkpoint(store, root, i, verify, broken.get(i)) for i in indices]
    _compare_data(root, checkpoints)
    try:
        scores, scores_damaged = _scores(store, root, verify), None
    except StoreDamagedError as exc:  # the scores group's zarr.json: no set can be listed
        scores, scores_damaged = [], str(exc)
    complete = [c["index"] for c in checkpoints if c["state"] == "complete"]
    opens = [c["index"] for c in checkpoints if c["state"] == "complete" and c["data"] != "other"
             and c["configuration"] != "other" and not c.get("rows_damaged")
             and not c.get("ridge_edited")]
    model = root.attrs.get("model")  # beside the configuration (Backend.model_identity), where recorded
    return {"path": store.location, "now": time.time(),
            "configuration": config if model is None else {**config, "model": model}, "expect": expect,
            "first_batch_rows": store.first_batch_rows(),
            "checkpoints": checkpoints, "complete": complete, "opens": opens,
            **_missing(indices, expect if expect is not None else indices[-1] + 1 if indices else 0),
            "beyond_expect": [i for i in indices if expect is not None and i >= expect], "scores": scores,
            "scores_damaged": scores_damaged,
            "damaged": any(item.get("damaged") for item in checkpoints + scores) or bool(verify and scores_damaged)}


def _missing(indices: list[int], end: int) -> dict[str, Any]:
    """``missing``, ``missing_count`` and ``missing_ranges`` of ``describe``: the indices below ``end`` not in
    ``indices`` (sorted), counted and listed as ranges without listing every one (``--expect 10**9`` made a list of
    a billion indices: gigabytes)."""
    ranges, start = [], 0
    for index in indices:
        if index >= end:
            break
        if index > start:
            ranges.append([start, index - 1])
        start = index + 1
    if start < end:
        ranges.append([start, end - 1])
    listed = itertools.islice(itertools.chain.from_iterable(range(a, b + 1) for a, b in ranges), MISSING_LISTED)
    count = sum(b - a + 1 for a, b in ranges)
    return {"missing": list(listed), "missing_count": count, "missing_truncated": count > MISSING_LISTED,
            "missing_ranges": ranges}


def _check_format(path: str, config: dict[str, Any]) -> None:
    """Refuse a store of another layout than this trak-core's (``TRAK.open``'s check): read with this layout, its
    checkpoints were listed as ones ``TRAK.open`` takes, and it refuses them all."""
    from . import __version__
    from .disk_store import STORE_FORMAT

    if config.get("store_format") != STORE_FORMAT:
        raise StoreMismatchError(f"the store at {path} has format {config.get('store_format')!r}, written by another "
                                 f"version of trak-core; this one ({__version__}) reads format {STORE_FORMAT} only, "
                                 "so it cannot tell what the store holds, and TRAK.open refuses it: run `trak-core "
                                 "store` of the version that wrote it, or featurize again into a new store path")


def _compare_data(root: Any, checkpoints: list[dict[str, Any]]) -> None:
    """Set each row's ``data``: "same" or "other" against the training data digests of the lowest complete
    checkpoint (the one ``TRAK.open`` checks the others against; jobs that began at once were not compared),
    ``None`` for that checkpoint itself, where there is none, or where a checkpoint recorded no digests."""
    from .disk_layout import member
    from .disk_listing import lookup
    from .disk_shared import data_reference

    found = ((c["index"], data_reference(lookup(root, f"c{c['index']}"))) for c in checkpoints
             if c["state"] == "complete")
    reference, (theirs, rows) = next(((i, data) for i, data in found if data is not None), (None, ({}, 0)))
    for c in checkpoints:
        c["data"] = None
        if reference is None or c["index"] == reference:
            continue
        group = member(root, f"c{c['index']}")
        mine = dict(group.attrs.get("data_checksums", {})) if group is not None else {}
        if not mine:
            continue
        differs = any(mine[chunk] != theirs[chunk] for chunk in set(mine) & set(theirs))
        if c["state"] == "complete":
            differs = differs or c["rows"] != rows
        c["data"] = "other" if differs else "same"
        c["data_reference"] = reference


ROWS_DAMAGED = "rows "  # how _damage's message for rows that fail their checksums begins


def _checkpoint(store: Any, root: Any, index: int, verify: bool, broken: str | None = None) -> dict[str, Any]:
    """One checkpoint's row of ``describe`` (``broken``: what is damaged in its metadata, its state then "damaged")."""
    from .disk_layout import member
    from .disk_shared import check_configuration, run_state

    group = member(root, f"c{index}")
    attrs = group.attrs if group is not None else {}  # its group's zarr.json cannot be read
    rows, complete = int(attrs.get("rows_done", 0)), bool(attrs.get("complete", False)) and broken is None
    try:  # a job that began the store at once with other settings or another model: TRAK.open's check
        check_configuration(store.path, index, attrs, root.attrs)
        configuration = None if attrs.get("configuration_sha256") is None else "same"
    except StoreMismatchError:
        configuration = "other"
    state = "damaged" if broken else "complete" if complete else "in progress" if rows else "started"
    row = {"index": index, "state": state, "rows": rows,
           "lambda_reg": attrs.get("lambda_reg"), "lambda_setting": attrs.get("lambda_setting"),
           "dtype": attrs.get("dtype"), "parameters_sha256": attrs.get("parameters_sha256"),
           "configuration": configuration,
           "run": attrs.get("run"), "written_at": attrs.get("written_at"),
           "running": None if complete else run_state(attrs.get("run"))}
    ridge = _ridge_edit(store, attrs, index) if complete else None  # no chunk read: with or without verify
    row["ridge_edited"] = ridge is not None  # TRAK.open refuses it (unless given lambda_reg=)
    if verify:
        damage = None if broken else _damage(store, group, index, rows, complete)
        rows_bad = bool(damage) and damage.startswith(ROWS_DAMAGED)  # TRAK.open refuses it
        row["damaged"] = (f"{broken} (featurize this checkpoint again: it redoes it)" if broken else
                          damage if rows_bad else ridge or damage)
        row["rows_damaged"] = rows_bad
    return row


def _ridge_edit(store: Any, attrs: Any, index: int) -> str | None:
    """What is wrong with a complete checkpoint's ridge against the hash written with it (TRAK.open's check), or
    ``None``."""
    from .disk_shared import checked_lambda

    try:
        checked_lambda(attrs, store.path, index)
    except StoreMismatchError as exc:
        return str(exc)
    return None


def _damage(store: Any, group: Any, index: int, rows: int, complete: bool) -> str | None:
    """What fails its checksum in a checkpoint's group (``None``: nothing)."""
    from .disk_layout import damaged_metadata, member, member_names
    from .disk_listing import opened
    from .disk_writer import DiskWriter, _read_kernel

    verified = DiskWriter(store, index).rows_done if rows else 0
    if verified < rows:
        return f"{ROWS_DAMAGED}{verified} on fail their checksums (featurize this checkpoint again: it redoes them)"
    if complete and (opened(group, "kernel") or "kernel" in member_names(group)):  # listed where zarr opens none
        # (its zarr.json cannot be read, or there is no kernel)
        what = None if opened(group, "kernel") else damaged_metadata(store.tree / group.path / "kernel")
        if what is not None:
            return f"the kernel's metadata {what} (TRAK.open or featurize makes it again from the features)"
        try:
            _read_kernel(group, member(group, "kernel"))  # opened above: not read again
        except TrakCoreError as exc:
            return str(exc)
    return None


def _scores(store: Any, root: Any, verify: bool) -> list[dict[str, Any]]:
    """The saved score sets' rows of ``describe``."""
    from .disk_layout import member, member_names

    group = store._scores_group()  # a StoreDamagedError where its zarr.json is damaged
    found = []
    for name in member_names(group) if group is not None else []:
        array, state = member(group, name), store._scores_state(name)
        if state is None:
            continue
        row = {"name": name, "shape": list(array.shape) if array is not None else None,
               "dtype": str(array.dtype) if array is not None else None, "state": state}
        if verify and state in ("finished", "damaged"):
            try:
                store.check_scores(name)  # each chunk too, one at a time
                row["damaged"] = None
            except TrakCoreError as exc:
                row["damaged"] = str(exc)
        found.append(row)
    return found
