"""Checkpoints featurized apart: ``TRAK.featurize(checkpoint, data, index=i)`` writes checkpoint ``i`` of an on-disk
store whatever the store holds before it, so that one job per checkpoint (a SLURM array, separate machines on a
shared filesystem) fills one store at once, as traker's one job per ``model_id`` does.

One job: the checks and the writing of such a checkpoint. Each job writes only its own ``c{i}`` group; the store's
root holds the configuration (every job writes the same one, and each checkpoint records its hash, checked again
before it is marked complete and by ``TRAK.open``) and the first batch's rows. Its projection is seeded with ``i``
as in one process, so ``TRAK.open`` of the finished store scores bit for bit as one process featurizing in order.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Iterable

from ._identity import DataCheck
from .errors import StoreMismatchError, TrakTypeError, TrakValueError
from .store import KERNEL_CHUNK_ROWS

__all__ = ["checked_index", "featurize_apart", "featurize_at", "shared_data_check"]

log = logging.getLogger("trak_core")


def checked_index(index: Any) -> int:
    """``index`` as a non-negative int, or a ``TrakTypeError``/``TrakValueError`` naming the fix."""
    if isinstance(index, bool):
        raise TrakTypeError(f"index must be an int (the checkpoint's index in the store), got {index!r}")
    try:
        index = operator.index(index)
    except TypeError:
        raise TrakTypeError(f"index must be an int (the checkpoint's index in the store), got a "
                            f"{type(index).__name__}") from None
    if index < 0:
        raise TrakValueError(f"index must be 0 or more (the checkpoint's index in the store), got {index}")
    return index


def featurize_at(trak: Any, checkpoint: Any, data: Iterable[Any], index: Any) -> None:
    """``TRAK.featurize(checkpoint, data, index=index)``: in order where ``index`` is the next checkpoint of this
    estimator (it holds it afterwards), else apart (``featurize_apart``); either way the store may be shared."""
    index, held = checked_index(index), [entry.index for entry in trak.store]
    in_order = held == list(range(len(held)))  # not an estimator opened with some checkpoints (a mapping)
    if index in held:
        what = f"0 to {len(held) - 1}" if in_order else f"checkpoints {held}"
        raise TrakValueError(f"this estimator holds checkpoint {index} already (it holds {what}); pass the index of a "
                             "checkpoint it does not hold" + (f" ({len(held)} for the next one)" if in_order else ""))
    if getattr(trak.store, "writes_apart", False):
        trak.store.shared = True  # other jobs may create the root or write other checkpoints beside this one now
    if in_order and index == len(held):
        trak._featurize(checkpoint, data)  # checked beside the other jobs' checkpoints (``shared_data_check``)
    else:
        featurize_apart(trak, checkpoint, data, index)


def featurize_apart(trak: Any, checkpoint: Any, data: Iterable[Any], index: int) -> None:
    """Featurize ``checkpoint`` as checkpoint ``index`` of ``trak``'s on-disk store, which is not this estimator's
    next (``index > len(trak.store)``, or any it does not hold where it was opened with some checkpoints); the
    estimator does not hold it afterwards."""
    store = trak.store
    if not getattr(store, "writes_apart", False):
        raise TrakValueError(f"featurize(..., index={index}): this estimator holds {len(store)} checkpoints, and only "
                             "an on-disk store (TRAK(..., store=path)) takes a checkpoint out of order, for one job "
                             "per checkpoint; featurize the checkpoints in order, or pass store=path")
    if trak.executor is not None:
        raise TrakValueError(f"featurize(..., index={index}) runs in this process only: drop executor=, or featurize "
                             "in order with the executor (it spreads each checkpoint's rows over its workers)")
    trak._featurize(checkpoint, data, index)
    complete = set(store.complete_checkpoints())
    waiting = [i for i in range(index) if i not in complete]
    log.info("checkpoint %d is stored in %s%s; TRAK.open(path, model, checkpoints) scores the store", index,
             store.location, f" (checkpoints {waiting} are not complete yet)" if waiting else "")


def shared_data_check(trak: Any, pending: Any) -> DataCheck:
    """Checkpoint ``pending.index`` of a shared store, beside the complete checkpoints other jobs wrote (before its
    writer writes anything): refused where it has the parameters of one of them; its data check (``_data_check``).
    Jobs featurizing in order (``index`` the estimator's next, job 0 among them) are checked so too."""
    store, index = trak.store, pending.index
    others = {i: digest for i, digest in store.checkpoint_digests().items() if i != index}
    if pending.digest is not None and pending.digest in others.values():
        other = next(i for i, digest in others.items() if digest == pending.digest)
        raise TrakValueError(f"this checkpoint has the same parameters as checkpoint {other} in {store.location} "
                             f"(featurized already); as checkpoint {index} it would count twice in the ensemble. "
                             "Pass each checkpoint once, under one index")
    return _data_check(store, pending.writer, index, others, trak._where, list(store))


def _data_check(store: Any, writer: Any, index: int, others: dict, where: str, entries: list) -> DataCheck:
    """The data check of checkpoint ``index``: against the lowest complete checkpoint besides it, where one is
    stored (its digests and rows); else as in one process (``DataCheck.for_checkpoint``: against the estimator's
    checkpoint 0, or what this checkpoint stored itself).
    Rows this checkpoint stored already (an interrupted job, perhaps before that checkpoint was complete) must be
    of the same data: a resumed run records the digests of the data it is given, so they would go unnoticed."""
    for other in sorted(others):
        reference = store.data_reference(other)
        if reference is not None:
            checksums, rows = reference
            stored = writer.data_checksums
            written = -(-int(getattr(writer, "rows_done", 0)) // KERNEL_CHUNK_ROWS)  # chunks with rows stored
            differing = [c for c in range(written) if str(c) in stored and stored[str(c)] != checksums.get(str(c))]
            if differing:
                first = differing[0] * KERNEL_CHUNK_ROWS
                raise StoreMismatchError(
                    f"checkpoint {index} in {where} holds rows from {first} on of other training data than checkpoint "
                    f"{other} was featurized on (data_checksums chunk {differing[0]}; an earlier, interrupted run of "
                    f"this checkpoint wrote them before checkpoint {other} was complete): the rows of one checkpoint "
                    f"would come from two data sets. Delete its group c{index} and featurize it again on checkpoint "
                    f"{other}'s data, or featurize into a new store path (nothing was overwritten)")
            return DataCheck(writer, checksums, rows, where)
    return DataCheck.for_checkpoint(writer, entries, where)
