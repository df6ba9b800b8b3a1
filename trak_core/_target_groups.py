"""Target batches scored together: one pass over the training features serves several batches.

One job: group ``score``'s target batches so that each pass over a checkpoint's training features (read from
disk, decompressed and checked, in an on-disk store: seconds per pass at n = 200,000, k = 2,048) multiplies as
many targets as a block of ``SCORE_GROUP_BYTES`` holds, not one small batch; ``score`` multiplies a wider batch
in column slices of that size, so that its blocks (the checkpoint's, the running sum, the result) stay bounded.
Empty batches hold no targets and are skipped.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

from ._checks import _check_lengths

__all__ = ["SCORE_GROUP_BYTES", "group_columns", "target_groups"]

SCORE_GROUP_BYTES = 256 << 20  # an (n_train, targets) float64 block per group at most (a larger batch: its own)


def group_columns(n_train: int, width: int) -> int:
    """Targets per group: an ``(n_train, targets)`` float64 block of ``SCORE_GROUP_BYTES`` (features ``width`` wide
    hold as many targets as that too), at least one."""
    return max(1, SCORE_GROUP_BYTES // (8 * max(n_train, width, 1)))


def target_groups(data: Iterable[tuple[Any, Any]], n_train: int, width: int) -> Iterator[list[tuple[Any, Any, int]]]:
    """Lists of ``(inputs, labels, batch index)`` holding at least ``group_columns(n_train, width)`` targets each
    (the last one fewer; a wider batch alone), in order."""
    limit = group_columns(n_train, width)
    group: list[tuple[Any, Any, int]] = []
    rows = 0
    for b, (inputs, labels) in enumerate(data):
        n = _check_lengths(inputs, labels, f"targets batch {b}")
        if n == 0:
            continue  # an empty batch holds no target (as featurize skips empty training batches)
        group.append((inputs, labels, b))
        rows += n
        if rows >= limit:
            yield group
            group, rows = [], 0
    if group:
        yield group
