"""Target gradients of ``TRAK.score`` projected in groups of rows, as training gradients are.

One job: the per-batch step that :func:`trak_core._target_groups.target_groups` calls. Where the core projects (a
``proj_dim``, no fused step in the backend, not ``proj_type="kronecker"``), each target batch's gradients, one
array per checkpoint, are held until the batches make a group of rows, which is then projected at once: the
projection matrix is made, unpacked or read once per group rather than once per small batch (projecting targets
batch by batch took 14% of a small torch job, digits MLP with batches of 8 at k = 2,048). Elsewhere each batch's
features are made at once, as before.

Memory: score pulls each batch once and differentiates it at every checkpoint, so ``C`` checkpoints hold ``C``
buffers; a group is ``projection_group_rows(p, ...) // C`` rows (at most a score group's columns), so that all of
them together hold no more gradient bytes than one group of ``featurize``. A batch that would overflow a group
first projects the held rows; a batch as wide as a group is projected alone, as before. The held rows are also
projected at the end of each score group, whose features must be complete before its pass over the stored ones.
"""
from __future__ import annotations

from typing import Any

from ._checks import _check_features, _check_lengths, projection_group_rows
from ._delegation import is_accelerator
from ._namespace import namespace
from .errors import TrakValueError

__all__ = ["TargetProjection"]


class TargetProjection:
    """Each checkpoint's target features for ``score``, the gradients projected in groups where the core projects.

    Parameters
    ----------
    trak : TRAK
        The estimator (its backend, ``proj_dim``, ``_gradients``, ``_project`` and ``_batch_features``).
    entries : list of CheckpointEntry
        The checkpoints scored, in order.
    limit : int
        Targets per score group (``target_groups``'s ``limit``): no projection group holds more rows.
    """

    def __init__(self, trak: Any, entries: list, limit: int) -> None:
        self.trak, self.entries, self.limit = trak, entries, max(1, limit)
        self.grouped = (trak.proj_dim is not None and not trak.backend.has_fused_projection
                        and getattr(trak, "kronecker", None) is None)
        self.group: int | None = None  # rows per projection, from the first gradients
        self.held: list[list] = [[] for _ in entries]  # per checkpoint, its held gradients (b, p), in order
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
                                              f"targets batch {b}, checkpoint {e.index}")[0] for e in self.entries]
        n = _check_lengths(inputs, labels, f"targets batch {b}")
        ready = [self.flush()] if self.rows and self.rows + n > self.group else []  # never more than a group held
        alone = []
        for c, entry in enumerate(self.entries):
            where = f"targets batch {b}, checkpoint {entry.index}"
            grads = self.trak._gradients(entry.prepared, inputs, labels, where)[0]
            if self.group is None:
                self.group = self._group_rows(grads)
            if n >= self.group:  # as wide as a group: projected alone, one checkpoint's gradients at a time
                alone.append(self._projected(grads, entry.index, [(b, n)]))
            else:
                self.held[c].append(grads)
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
            held, self.held[c] = self.held[c], []
            grads = held[0] if len(held) == 1 else namespace(held[0]).concat(held, axis=0)
            del held  # the pieces go once joined
            out.append(self._projected(grads, entry.index, self.batches))
            del grads
        self.batches, self.rows = [], 0
        return out

    def _group_rows(self, grads: Any) -> int:
        """Rows per projection: a training group's (``projection_group_rows``) shared by the checkpoints."""
        rows = projection_group_rows(grads.shape[1], namespace(grads).finfo(grads.dtype).bits // 8,
                                     self.trak.proj_dim, accelerator=is_accelerator(grads))
        return max(1, min(self.limit, rows // len(self.entries)))

    def _projected(self, grads: Any, index: int, batches: list[tuple[int, int]]) -> Any:
        """The features of ``grads`` (the rows of ``batches``) at checkpoint ``index``, checked; a non-finite row is
        named by its own batch, as when each batch was projected alone."""
        features = self.trak._project(grads, index)
        first, last = batches[0][0], batches[-1][0]
        where = f"targets batch{f'es {first} to {last}' if last != first else f' {first}'}, checkpoint {index}"
        try:
            _check_features(features, where, grads.dtype)
        except TrakValueError:
            start = 0
            for b, n in batches:  # the first batch with a non-finite row raises, with its own name
                _check_features(features[start:start + n, ...], f"targets batch {b}, checkpoint {index}", grads.dtype)
                start += n
            raise
        return features
