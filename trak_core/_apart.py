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
from .errors import TrakTypeError, TrakValueError

__all__ = ["checked_index", "featurize_apart", "featurize_at"]

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
    index, held = checked_index(index), len(trak.store)
    if index < held:
        raise TrakValueError(f"this estimator holds checkpoint {index} already (it holds 0 to {held - 1}); pass the "
                             f"index of a checkpoint it does not hold ({held} for the next one)")
    if getattr(trak.store, "writes_apart", False):
        trak.store.shared = True  # other jobs may create the root or write other checkpoints beside this one now
    if index == held:
        trak._featurize(checkpoint, data)
    else:
        featurize_apart(trak, checkpoint, data, index)


def featurize_apart(trak: Any, checkpoint: Any, data: Iterable[Any], index: int) -> None:
    """Featurize ``checkpoint`` as checkpoint ``index`` of ``trak``'s on-disk store, which this estimator's
    checkpoints do not reach (``index > len(trak.store)``); the estimator does not hold it afterwards."""
    store = trak.store
    if not getattr(store, "writes_apart", False):
        raise TrakValueError(f"featurize(..., index={index}): this estimator holds {len(store)} checkpoints, and only "
                             "an on-disk store (TRAK(..., store=path)) takes a checkpoint out of order, for one job "
                             "per checkpoint; featurize the checkpoints in order, or pass store=path")
    if trak.executor is not None:
        raise TrakValueError(f"featurize(..., index={index}) runs in this process only: drop executor=, or featurize "
                             "in order with the executor (it spreads each checkpoint's rows over its workers)")
    pending = trak._open_checkpoint(checkpoint, index=index)
    writer = pending.writer
    others = {i: digest for i, digest in store.checkpoint_digests().items() if i != index}
    if pending.digest is not None and pending.digest in others.values():
        other = next(i for i, digest in others.items() if digest == pending.digest)
        raise TrakValueError(f"this checkpoint has the same parameters as checkpoint {other} in {store.location} "
                             f"(featurized already); as checkpoint {index} it would count twice in the ensemble. "
                             "Pass each checkpoint once, under one index")
    if not writer.complete:
        writer.record_parameters(pending.digest)  # and, the store being shared, its configuration's hash
    trak._write_features(checkpoint, pending, data, _data_check(store, writer, index, others, trak._where))
    trak._close_checkpoint(pending, apart=True)
    trak._apart = sorted(set(getattr(trak, "_apart", ())) | {index})
    waiting = [i for i in range(index) if i not in store.complete_checkpoints()]
    log.info("checkpoint %d is stored in %s%s; TRAK.open(path, model, checkpoints) scores the store", index,
             store.location, f" (checkpoints {waiting} are not complete yet)" if waiting else "")


def _data_check(store: Any, writer: Any, index: int, others: dict, where: str) -> DataCheck:
    """The data check of checkpoint ``index``: against the lowest complete checkpoint besides it, where one is
    stored (its digests and rows); else against what this checkpoint stored itself (``DataCheck.for_checkpoint``)."""
    for other in sorted(others):
        reference = store.data_reference(other)
        if reference is not None:
            checksums, rows = reference
            return DataCheck(writer, checksums, rows, where)
    return DataCheck.for_checkpoint(writer, [], where)
