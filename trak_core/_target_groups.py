"""Target batches scored together: one pass over the training features serves several batches.

One job: group ``score``'s target batches so that each pass over a checkpoint's training features (read from
disk, decompressed and checked, in an on-disk store: seconds per pass at n = 200,000, k = 2,048) multiplies as
many targets as a block of ``SCORE_GROUP_BYTES`` holds, not one small batch. Each batch is differentiated as soon
as it is pulled (a loader that refills one buffer gives each batch's own targets; its gradients are held until
``_target_projection`` projects a group of them, then only the small ``(b, k)`` features); a batch wider than
the block is a group of its own (one pass over the features for it: fewer targets a batch bound the memory, more
bound the passes). Empty batches hold no targets and are skipped.
:func:`row_pieces` and :func:`join_columns` join the groups' columns into the result without a second copy of it
where the arrays can be written to.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import array_api_compat

from ._checks import _check_lengths
from ._delegation import is_accelerator
from ._namespace import device_of, namespace

__all__ = ["SCORE_GROUP_BYTES", "group_columns", "target_groups", "row_pieces", "add_columns", "join_columns"]

SCORE_GROUP_BYTES = 256 << 20  # an (n_train, targets) float64 block per group at most (a wider batch: its own)
# join_columns frees the groups' scores a piece of rows at a time as it fills the result; pieces below glibc's
# largest mmap threshold (32 MiB on 64-bit) come from the heap, which free() seldom gives back to the system (the
# process's peak RSS stayed twice the result with pieces of 11 MB)
PIECE_BYTES = 40 << 20


def group_columns(n_train: int, width: int) -> int:
    """Targets per group: an ``(n_train, targets)`` float64 block of ``SCORE_GROUP_BYTES``, and as much held in
    target features ``width`` wide (every checkpoint's together), at least one."""
    return max(1, SCORE_GROUP_BYTES // (8 * max(n_train, width, 1)))


def target_groups(data: Iterable[tuple[Any, Any]], featurize: Callable[[Any, Any, int], list | None],
                  limit: int, first: int = 0, flush: Callable[[], list | None] | None = None) -> Iterator[list]:
    """Each checkpoint's target features ``(group, k)`` for groups of at least ``limit`` targets (the last one
    fewer), in order; ``featurize(inputs, labels, batch index)`` gives a batch's, one array per checkpoint.
    ``first``: the index of ``data``'s first batch (empty batches before it were skipped), for messages.
    ``flush``: where ``featurize`` holds batches to project them together (``_target_projection``), it gives the
    rows it completed (those held before, then the batch's) or ``None``, and ``flush()`` the held ones' features
    (or ``None``), called at the end of each group."""
    parts: list[list] = []
    rows = 0
    for b, (inputs, labels) in enumerate(data, start=first):
        n = _check_lengths(inputs, labels, f"targets batch {b}")
        if n == 0:
            continue  # an empty batch holds no target (as featurize skips empty training batches)
        features = featurize(inputs, labels, b)
        if features is not None:
            parts.append(features)
        rows += n
        if rows >= limit:
            yield _joined(_flushed(parts, flush))
            parts, rows = [], 0
    if rows:
        yield _joined(_flushed(parts, flush))


def _flushed(parts: list[list], flush: Callable[[], list | None] | None) -> list[list]:
    """``parts`` and then the features of the batches ``featurize`` still holds."""
    held = flush() if flush is not None else None
    return parts if held is None else parts + [held]


def _joined(parts: list[list]) -> list:
    """Per checkpoint, its batches' target features one after the other."""
    if len(parts) == 1:
        return parts[0]
    xp = namespace(parts[0][0])
    return [xp.concat([batch[c] for batch in parts], axis=0) for c in range(len(parts[0]))]


def row_pieces(block: Any, width: int, *, xp: Any) -> list:
    """``block`` cut into separate arrays (copies, so that each is freed on its own) of the rows that make
    ``PIECE_BYTES`` at ``width`` targets (a group's limit, the same for every group, so that all are cut alike):
    what :func:`join_columns` takes, one list per group of targets. Not cut (``[block]``) where the array cannot be
    written to (JAX: the pieces would be concatenated, a third copy) or is on an accelerator (device memory takes the
    whole result at once: cutting would only add a copy of the group)."""
    rows = max(1, -(-PIECE_BYTES // max(1, width * xp.finfo(block.dtype).bits // 8)))
    if block.shape[0] <= rows or not array_api_compat.is_writeable_array(block) or is_accelerator(block):
        return [block]
    n = block.shape[0]
    return [xp.asarray(block[start:min(n, start + rows), ...], copy=True) for start in range(0, n, rows)]


def add_columns(columns: list[list], block: Any, limit: int, *, xp: Any) -> None:
    """Append a group's ``(n_train, group)`` scores to ``columns`` for :func:`join_columns`: a lone group stays
    whole (it is the result as it is); from the second group on, every group is cut by :func:`row_pieces` alike
    (sized from ``limit``, the groups' width), the first one then too."""
    if len(columns) == 1 and len(columns[0]) == 1:
        columns[0] = row_pieces(columns[0].pop(), limit, xp=xp)
    columns.append(row_pieces(block, limit, xp=xp) if columns else [block])


def join_columns(columns: list[list], *, xp: Any) -> Any:
    """The groups' scores side by side, ``(n_train, targets)``, emptying ``columns`` as they are copied.

    Parameters
    ----------
    columns : list of list of array
        Per group of targets, in order, its ``(n_train, group)`` scores as :func:`row_pieces` gives them (every
        group cut alike); the caller must hold no other reference to them.
    xp : namespace
        Their Array API namespace.

    Returns
    -------
    array
        Where the arrays can be written to (NumPy, torch, CuPy) the result is allocated once and filled a row
        piece at a time, each piece freed once copied: memory holds the result and one piece of every group (a
        concatenation of whole groups held the result twice, since filling a group's columns touches every row of
        the result). Groups not cut (JAX, an accelerator, few rows) are concatenated: the result twice for a
        moment, as before.
    """
    if len(columns) == 1 and len(columns[0]) == 1:
        return columns.pop()[0]
    if all(len(group) == 1 for group in columns):  # not cut (JAX, a device, few rows): one concatenation
        joined = xp.concat([group[0] for group in columns], axis=1)
        columns.clear()
        return joined
    first = columns[0][0]
    n_train = sum(piece.shape[0] for piece in columns[0])
    result = xp.empty((n_train, sum(group[0].shape[1] for group in columns)), dtype=first.dtype,
                      device=device_of(first))
    del first
    row = 0
    for i in range(len(columns[0])):
        column, rows = 0, columns[0][i].shape[0]
        for group in columns:
            piece, group[i] = group[i], None  # freed once copied
            result[row:row + rows, column:column + piece.shape[1]] = piece
            column += piece.shape[1]
            del piece
        row += rows
    columns.clear()
    return result
