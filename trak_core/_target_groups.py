"""Target batches scored together: one pass over the training features serves several batches.

One job: group ``score``'s target batches so that each pass over a checkpoint's training features (read from
disk, decompressed and checked, in an on-disk store: seconds per pass at n = 200,000, k = 2,048) multiplies as
many targets as a block of ``SCORE_GROUP_BYTES`` holds, not one small batch. Each batch is featurized as soon as
it is pulled (a loader that refills one buffer gives each batch's own targets; only the small ``(b, k)`` features
are held); a batch wider than the block is a group of its own, as a batch was before. Empty batches hold no
targets and are skipped.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from ._checks import _check_lengths
from ._namespace import namespace

__all__ = ["SCORE_GROUP_BYTES", "group_columns", "target_groups"]

SCORE_GROUP_BYTES = 256 << 20  # an (n_train, targets) float64 block per group at most (a wider batch: its own)


def group_columns(n_train: int, width: int) -> int:
    """Targets per group: an ``(n_train, targets)`` float64 block of ``SCORE_GROUP_BYTES``, and as much held in
    target features ``width`` wide (every checkpoint's together), at least one."""
    return max(1, SCORE_GROUP_BYTES // (8 * max(n_train, width, 1)))


def target_groups(data: Iterable[tuple[Any, Any]], featurize: Callable[[Any, Any, int], list],
                  limit: int, first: int = 0) -> Iterator[list]:
    """Each checkpoint's target features ``(group, k)`` for groups of at least ``limit`` targets (the last one
    fewer), in order; ``featurize(inputs, labels, batch index)`` gives a batch's, one array per checkpoint.
    ``first``: the index of ``data``'s first batch (empty batches before it were skipped), for messages."""
    parts: list[list] = []
    rows = 0
    for b, (inputs, labels) in enumerate(data, start=first):
        n = _check_lengths(inputs, labels, f"targets batch {b}")
        if n == 0:
            continue  # an empty batch holds no target (as featurize skips empty training batches)
        parts.append(featurize(inputs, labels, b))
        rows += n
        if rows >= limit:
            yield _joined(parts)
            parts, rows = [], 0
    if parts:
        yield _joined(parts)


def _joined(parts: list[list]) -> list:
    """Per checkpoint, its batches' target features one after the other."""
    if len(parts) == 1:
        return parts[0]
    xp = namespace(parts[0][0])
    return [xp.concat([batch[c] for batch in parts], axis=0) for c in range(len(parts[0]))]
