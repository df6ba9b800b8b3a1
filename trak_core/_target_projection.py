"""Target gradients of ``TRAK.score`` (and the data of ``TRAK.features``) projected in groups of rows, as training
gradients are.

One job: the per-batch step that :func:`trak_core._target_groups.target_groups` calls, and that ``TRAK.features``
calls with its one checkpoint (no score groups: ``limit`` is ``None``; its messages name ``batch b`` alone). Where
the core projects (a ``proj_dim``, no fused step in the backend, not ``proj_type="kronecker"``), each batch's
gradients, one array per checkpoint, are held until the batches make a group of rows, which is then projected at
once: the projection matrix is made, unpacked or read once per group rather than once per small batch (projecting
targets batch by batch took 14% of a small torch job, digits MLP with batches of 8 at k = 2,048; ``features`` of
1,000 examples took 1.4-2.9x as long batch by batch, batches of 8 to 32 at k = 512 and 2,048). Elsewhere each
batch's features are made at once, as before.

Memory: score pulls each batch once and differentiates it at every checkpoint, so ``C`` checkpoints hold ``C``
buffers, each a ``(group, p)`` array filled batch by batch (no concatenation: no second copy) and let go when it
is projected; a group is ``projection_group_rows(p, ...) // C`` rows with the CPU's budget on every device (at
most a score group's columns): all of them together no more gradient bytes than one CPU group of ``featurize``
(128 MiB, or up to 1 GiB and at least 64 rows where the matrix is not cached). On a GPU that is less than
``featurize``'s 16 GiB groups: a store opened on a smaller GPU than it was written on keeps fitting. A batch that
would overflow a group first projects the held rows; a batch as wide as a group is projected alone, as before.
The held rows are also projected at the end of each score group, whose features must be complete before its pass
over the stored ones. Each batch's gradients are checked for NaN and inf when they are held (one sum, ``1/k`` of
a projection), so the first bad batch is named as when each batch was projected alone.
"""
from __future__ import annotations

from typing import Any, Callable

import array_api_compat

from ._certain_rows import check_certain_rows
from ._checks import _all_finite, _check_features, _check_lengths, projection_group_rows
from ._namespace import device_of, namespace
from .errors import TrakValueError

__all__ = ["TargetProjection", "target_named", "batch_named"]


def target_named(batches: str, index: int | None) -> str:
    """Where in ``score`` (the default ``naming``): ``targets batch 3, checkpoint 1``, ``targets batches 0 to 7, ...``;
    ``index`` ``None``: the batch alone (its row count, checked before any checkpoint)."""
    return f"targets {batches}" + ("" if index is None else f", checkpoint {index}")


def batch_named(batches: str, index: int | None) -> str:
    """Where in ``features`` (one checkpoint, named by the call): ``batch 3``, ``batches 0 to 7``."""
    return batches


class TargetProjection:
    """Each checkpoint's target features for ``score`` (or one checkpoint's features for ``features``), the gradients
    projected in groups where the core projects.

    Parameters
    ----------
    trak : TRAK
        The estimator (its backend, ``proj_dim``, ``_gradients``, ``_project`` and ``_batch_features``).
    entries : list of CheckpointEntry
        The checkpoints scored, in order (``features``: its one checkpoint).
    limit : int, optional
        Targets per score group (``target_groups``'s ``limit``): no projection group holds more rows (``None``: no
        bound but the projection group's).
    naming : callable, optional
        ``naming(batches, index)``: where an error happened, from ``"batch 3"`` (or ``"batches 0 to 7"``) and the
        checkpoint's index (``None`` for a batch's own checks); default :func:`target_named` (``score``'s).
    """

    def __init__(self, trak: Any, entries: list, limit: int | None = None, *,
                 naming: Callable[[str, int | None], str] = target_named) -> None:
        self.trak, self.entries, self.naming = trak, entries, naming
        self.limit = None if limit is None else max(1, limit)
        self.grouped = (trak.proj_dim is not None and not trak.backend.has_fused_projection
                        and getattr(trak, "kronecker", None) is None)
        self.group: int | None = None  # rows per projection, from the first gradients
        self.held: list[Any] = [None] * len(entries)  # per checkpoint, its (group, p) buffer, filled from row 0
        self.batches: list[tuple[int, int]] = []  # (batch index, rows) of the held batches
        self.rows = 0

    def featurize(self, inputs: Any, labels: Any, b: int) -> list | None:
        """Each checkpoint's features of the rows completed by batch ``b`` (those held before it, then its own),
        or ``None`` while its gradients are held.

        Parameters
        ----------
        inputs, labels : array
            A non-empty target batch.
        b : int
            Its index, for messages.

        Returns
        -------
        list of array or None
            One ``(rows, k)`` array per checkpoint; per batch (``(b, k)`` each) where the core does not project.
        """
        if not self.grouped:
            return [self.trak._batch_features(e.prepared, e.index, inputs, labels,
                                              self.naming(f"batch {b}", e.index))[0] for e in self.entries]
        n = _check_lengths(inputs, labels, self.naming(f"batch {b}", None))
        ready = [self.flush()] if self.rows and self.rows + n > self.group else []  # never more than a group held
        alone = []
        for c, entry in enumerate(self.entries):
            where = self.naming(f"batch {b}", entry.index)
            grads, out_to_loss = self.trak._gradients(entry.prepared, inputs, labels, where)
            if self.group is None:
                self.group = self._group_rows(grads)
            if not _all_finite(grads):  # raises, naming this batch (as when each batch was projected alone)
                check_certain_rows(grads, out_to_loss, self.trak.task, where)
                self._projected(grads, entry.index, [(b, n)])
            del out_to_loss
            if n >= self.group:  # as wide as a group: projected alone, one checkpoint's gradients at a time
                alone.append(self._projected(grads, entry.index, [(b, n)]))
            else:
                self._hold(c, grads)
            del grads
        if alone:
            ready.append(alone)
        else:
            self.batches.append((b, n))
            self.rows += n
            if self.rows >= self.group:
                ready.append(self.flush())
        if not ready:
            return None
        if len(ready) == 1:
            return ready[0]
        return [namespace(ready[0][c]).concat([part[c] for part in ready], axis=0) for c in range(len(self.entries))]

    def flush(self) -> list | None:
        """Each checkpoint's features of the held batches (``None`` where none are held), which are let go.

        Returns
        -------
        list of array or None
            One ``(rows held, k)`` array per checkpoint.
        """
        if not self.rows:
            return None
        out = []
        for c, entry in enumerate(self.entries):
            buffer, self.held[c] = self.held[c], None
            if isinstance(buffer, list):  # arrays that cannot be written to (JAX): joined here
                buffer = buffer[0] if len(buffer) == 1 else namespace(buffer[0]).concat(buffer, axis=0)
            out.append(self._projected(buffer[:self.rows, ...], entry.index, self.batches))
            del buffer  # let go: a later group makes a new one
        self.batches, self.rows = [], 0
        return out

    def _hold(self, c: int, grads: Any) -> None:
        """Copy ``grads`` into checkpoint ``c``'s buffer after the rows held (made at the first batch of a group);
        arrays that cannot be written to (JAX) are kept in a list, joined when projected."""
        if not array_api_compat.is_writeable_array(grads):
            self.held[c] = (self.held[c] or []) + [grads]
            return
        if self.held[c] is None:
            xp = namespace(grads)
            self.held[c] = xp.empty((self.group, grads.shape[1]), dtype=grads.dtype, device=device_of(grads))
        self.held[c][self.rows:self.rows + grads.shape[0], ...] = grads

    def _group_rows(self, grads: Any) -> int:
        """Rows per projection: a training group's (``projection_group_rows``) shared by the checkpoints."""
        rows = projection_group_rows(grads.shape[1], namespace(grads).finfo(grads.dtype).bits // 8,
                                     self.trak.proj_dim)  # the CPU's budget on a GPU too (see the module)
        rows = max(1, rows // len(self.entries))
        return rows if self.limit is None else min(self.limit, rows)

    def _projected(self, grads: Any, index: int, batches: list[tuple[int, int]]) -> Any:
        """The features of ``grads`` (the rows of ``batches``) at checkpoint ``index``, checked; a non-finite row is
        named by its own batch, as when each batch was projected alone."""
        features = self.trak._project(grads, index)
        first, last = batches[0][0], batches[-1][0]
        where = self.naming(f"batches {first} to {last}" if last != first else f"batch {first}", index)
        try:
            _check_features(features, where, grads.dtype)
        except TrakValueError:
            start = 0
            for b, n in batches:  # the first batch with a non-finite row raises, with its own name
                _check_features(features[start:start + n, ...], self.naming(f"batch {b}", index), grads.dtype)
                start += n
            raise
        return features
