"""How ``trak_core.TRAK`` turns a checkpoint and its training data into stored features.

One job: the featurizing machinery behind ``TRAK.featurize`` and ``TRAK.features`` (a base class of ``TRAK``):
per-batch gradients or fused features, projection in groups (aligned to absolute rows for the store; for
``features``, grouped as ``score``'s targets by ``trak_core._target_projection``), the checkpoint's checks against the
ones before and the store (parameters, data), the writer, and the factorized kernel.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from ._apart import shared_data_check
from ._checks import (_check_features, _check_finite, _check_lengths, _check_weights, check_backend_array,
                      check_gradient_precision, chosen_entries, projection_group_rows, take_rows, weights_like)
from ._delegation import is_accelerator
from ._fitting import KernelFitting
from ._identity import (DataCheck, check_lambda_setting, check_parameters, parameters_recorded, refuse_duplicate,
                        store_fingerprint)
from ._located import located
from ._namespace import namespace
from ._progress import length_of, progress
from ._subnormal_rows import note_params, unnoted
from ._target_projection import TargetProjection, batch_named
from .backends.protocol import batches
from .errors import BackendError, StoreMismatchError, TrakValueError
from .fingerprints import to_numpy
from .projection import project
from .scores import normalize_rows
from .store import CheckpointEntry, Writer

__all__ = ["Featurizer", "PendingCheckpoint"]

log = logging.getLogger("trak_core")


@dataclass
class PendingCheckpoint:
    """A checkpoint between its checks and its entry: snapshot, sizes, content hash and writer."""

    index: int
    prepared: Any
    n_params: int
    structure: Any
    digest: str | None
    writer: Writer


class Featurizer(KernelFitting):
    """The featurizing half of ``trak_core.TRAK`` (its configuration attributes are TRAK's)."""

    def features(self, data: Iterable[Any], *, checkpoint: int = 0) -> Any:
        """Features ``phi_c(z)`` (projected gradients) of ``data`` at featurized checkpoint ``checkpoint``.

        For baselines such as a gradient dot product, or retrieval, on the same projection as the scores.

        Parameters
        ----------
        data : iterable of (inputs, labels)
            Batches, as for ``featurize`` and ``score``.
        checkpoint : int
            Index of a featurized checkpoint (the store's index for a store opened with some of them).

        Returns
        -------
        array
            ``(n, k)`` (``(n, n_params)`` for ``proj_dim=None``), in the features' namespace, dtype and device.

        Notes
        -----
        Where the core projects (a ``proj_dim``, no fused step in the backend, not ``proj_type="kronecker"``), the
        batches' gradients are held until they make a group of rows (``projection_group_rows``, with the CPU's
        budget on every device), which is projected at once, as ``score`` projects its targets
        (``trak_core._target_projection``): the projection matrix is made, unpacked or read once per group, not once
        per small batch. Elsewhere, and for an empty batch, each batch's features are made alone. A batch whose
        gradients (or features) hold NaN or inf is named, the first one, as when each batch was projected alone.
        """
        self._load_opened(None)
        self._check_scorable("features()", uses_lambda=False)
        entry = chosen_entries(self.store, [checkpoint])[0]
        grouped = TargetProjection(self, [entry], naming=batch_named)  # no score groups: no limit
        parts, pulled = [], False
        for b, (inputs, labels) in enumerate(batches(data, self.label_key)):
            pulled = True
            if _check_lengths(inputs, labels, f"batch {b}") == 0:  # no rows to hold: as before, alone
                parts.append(self._batch_features(entry.prepared, entry.index, inputs, labels, f"batch {b}")[0])
                continue
            ready = grouped.featurize(inputs, labels, b)  # the rows a group completed, or None while held
            if ready is not None:
                parts.append(ready[0])
        held = grouped.flush()
        if held is not None:
            parts.append(held[0])
        if not pulled:
            raise TrakValueError("features: data yielded no batches (a generator, map or zip is used up by one pass); "
                                 "pass an iterable of (inputs, labels): a list, or a generator made anew for each call")
        return parts[0] if len(parts) == 1 else namespace(parts[0]).concat(parts, axis=0)

    def _project(self, grads: Any, checkpoint: int) -> Any:
        return self._finish(self._project_raw(grads, checkpoint))

    def _finish(self, features: Any) -> Any:
        return normalize_rows(features, xp=namespace(features)) if self.normalize_features else features

    def _project_raw(self, grads: Any, checkpoint: int) -> Any:
        if self.proj_dim is None:  # the gradients are the features: float32 for half precision, as projected ones
            xp = namespace(grads)
            return grads if xp.finfo(grads.dtype).bits >= 32 else xp.astype(grads, xp.float32)
        if self.backend.has_fused_projection:
            features = self.backend.project(grads, self.proj_dim, seed=self.seed, checkpoint=checkpoint,
                                            kind=self.proj_type, precision=self.precision)
            xp = namespace(grads)  # the dtype of trak_core.project's result: float32 for half-precision gradients
            dtype = grads.dtype if xp.finfo(grads.dtype).bits >= 32 else xp.float32
            check_backend_array(features, (grads.shape[0], self.proj_dim), dtype, f"checkpoint {checkpoint}",
                                "projected features (project)", self.backend.name)
            return features
        return project(grads, self.proj_dim, seed=self.seed, checkpoint=checkpoint, kind=self.proj_type,
                       precision=self.precision)

    def _gradients(self, prepared: Any, inputs: Any, labels: Any, where: str) -> tuple[Any, Any]:
        """Validated per-example gradients (n, p) and out-to-loss weights (n,) of one batch."""
        n_inputs = _check_lengths(inputs, labels, where)
        with located(where, self.backend.name, inputs):
            grads, out_to_loss = self.backend.gradients(self.model, prepared, inputs, labels, self.task)
        check_backend_array(grads, (n_inputs, self.backend.n_params(prepared)), None, where, "per-example gradients",
                            self.backend.name, ": a row per example, a column per parameter (its n_params)")
        check_gradient_precision(grads, prepared, where, self.backend.name)  # not below the checkpoint's dtype
        _check_weights(out_to_loss, where, n_inputs, self.backend.name)  # finiteness: through the features
        return grads, weights_like(grads, out_to_loss)

    def _fused_features(self, prepared: Any, index: int, inputs: Any, labels: Any, where: str,
                        first_row: int | None = None) -> tuple | None:
        """Features from a backend that projects inside its own step (fused or factorized), if it does
        (``first_row``: the training row of the batch's first, for messages)."""
        factorized = getattr(self, "kronecker", None) is not None
        if not (self.backend.has_fused_projection or factorized) or self.proj_dim is None:
            return None
        n_inputs = _check_lengths(inputs, labels, where)
        with located(where, self.backend.name, inputs):
            if factorized:
                self._check_plan(prepared, index, inputs, labels)
                out = self.backend.factorized_features(self.model, prepared, inputs, labels, self.task,
                                                       k=self.proj_dim, seed=self.seed, checkpoint=index,
                                                       options=self.kronecker)
            else:
                out = self.backend.features(self.model, prepared, inputs, labels, self.task, k=self.proj_dim,
                                            seed=self.seed, checkpoint=index, kind=self.proj_type,
                                            precision=self.precision)
        if out is not None:
            check_backend_array(out[0], (n_inputs, self.proj_dim), None, where, "features", self.backend.name)
            _check_finite(out[0], out[1], where, "features (projected per-example gradients)", self.backend.name,
                          getattr(prepared, "dtype", None), self.task, first_row)  # a torch snapshot's dtype
            out = (self._finish(out[0]), weights_like(out[0], out[1]))
        return out

    def _check_plan(self, prepared: Any, index: int, inputs: Any, labels: Any, writer: Writer | None = None) -> None:
        """The factorized layout of checkpoint ``index`` (once per snapshot) against the store's: another layout
        (a model whose ``forward`` now uses a weight outside its module, its parameters the same) would mix rows of
        two projections in one checkpoint, or project targets unlike the stored features. ``writer`` (featurize):
        records it where none is (a store written before trak-core kept it is not checked). Per checkpoint: a model
        whose calls depend on the data (experts routed by the first example) may have one per checkpoint."""
        checked = self.__dict__.setdefault("_plans_checked", {})
        if id(prepared) in checked and checked[id(prepared)][0] is prepared:
            return
        plan = self.backend.factorized_plan(self.model, prepared, inputs, labels, self.task, k=self.proj_dim,
                                            options=self.kronecker)
        digest = plan.digest()
        stored = getattr(writer, "plan_digest", None) if writer is not None else \
            getattr(self.store, "plan_digest", lambda index: None)(index)
        if stored is None and hasattr(writer, "record_plan"):
            writer.record_plan(digest)
        elif stored is not None and stored != digest:
            raise StoreMismatchError(f"proj_type='kronecker': the model's factorized layers now differ from those the "
                                     f"features in {self._where} were made with (layout {digest}, stored {stored}: "
                                     f"now {len(plan.blocks)} blocks, {plan.n_rest:,} parameters in the rest), though "
                                     "its parameters are the same: its forward uses them otherwise. Use the model "
                                     "the store was made with, or a new store path (nothing was overwritten)")
        checked[id(prepared)] = (prepared, digest)

    def _batch_features(self, prepared: Any, index: int, inputs: Any, labels: Any,
                        where: str) -> tuple[Any, Any]:
        fused = self._fused_features(prepared, index, inputs, labels, where)
        if fused is not None:
            return fused
        grads, out_to_loss = self._gradients(prepared, inputs, labels, where)
        features = self._project(grads, index)
        _check_features(features, where, grads.dtype, out_to_loss, self.task)
        return features, out_to_loss

    def _stream_features(self, prepared: Any, index: int, data: Iterable[Any], skip: int = 0,
                         stop: int | None = None, check: DataCheck | None = None, *, row0: int = 0,
                         batch0: int = 0, total: int | None = None) -> Iterator[tuple[Any, Any]]:
        """Features and out-to-loss weights of rows ``skip .. stop-1`` of ``data``.

        Whole batches are differentiated (rows outside the range are dropped afterwards), and
        gradients are projected in groups of exactly ``projection_group_rows`` rows aligned
        to absolute row indices, so a row's features do not depend on where a run started or
        stopped (resume, shards) and the matrix is made or unpacked once per group. Backends with
        a fused step (``features``) project batch by batch inside it.

        ``data`` may be a slice of the training data (a worker's shard) whose first row is training row
        ``row0`` and whose first batch is batch ``batch0``: groups are then aligned to the training rows
        (``row0 + skip`` and so on), and errors name the training data's batch index, as in one process.
        """
        grads, weights, seen, group, pending, held_row = [], [], 0, None, 0, 0
        stream = progress(batches(data, self.label_key), desc=f"featurize checkpoint {index}", enabled=self.progress,
                          total=length_of(data) if total is None else total)  # total: data's, before a chain
        for b, (inputs, labels) in enumerate(stream, start=batch0):
            where = f"checkpoint {index}, batch {b}"
            rows = _check_lengths(inputs, labels, where)
            first, seen = seen, seen + rows
            lo, hi = max(0, skip - first), rows if stop is None else min(rows, stop - first)
            if hi <= lo:
                if stop is not None and first >= stop:
                    break
                if check is not None:
                    check.batch(inputs, labels)
                continue
            fused = self._fused_features(prepared, index, inputs, labels, where, row0 + first)
            if fused is not None:
                if check is not None:  # after the batch's own checks, before its rows can reach the store
                    check.batch(inputs, labels)
                yield (fused[0][lo:hi, ...], fused[1][lo:hi]) if (lo, hi) != (0, rows) else fused
                continue
            g, q = self._gradients(prepared, inputs, labels, where)
            if check is not None:
                check.batch(inputs, labels)
            if (lo, hi) != (0, rows):
                g, q = g[lo:hi, ...], q[lo:hi]
            xp = namespace(g)
            if group is None:
                group = projection_group_rows(g.shape[1], xp.finfo(g.dtype).bits // 8, self.proj_dim,
                                              accelerator=is_accelerator(g))
                held_row = row0 + first + lo  # the training row of the first held row (the rows are contiguous)
                pending = held_row % group  # the first group ends at a multiple of `group` (absolute)
            grads.append(g)
            weights.append(q)
            pending += g.shape[0]
            while pending >= group:  # one pending array is sliced, never copied
                g_all = grads[0] if len(grads) == 1 else xp.concat(grads, axis=0)
                q_all = weights[0] if len(weights) == 1 else xp.concat(weights, axis=0)
                take = g_all.shape[0] - (pending - group)
                features = self._project(g_all[:take, ...], index)
                _check_features(features, f"checkpoint {index}, batches up to {b}", g_all.dtype, q_all[:take],
                                self.task, held_row)
                yield features, q_all[:take]
                grads, weights = [g_all[take:, ...]], [q_all[take:]]
                pending -= group
                held_row += take
        if sum(g.shape[0] for g in grads):
            xp = namespace(grads[0])
            features = self._project(grads[0] if len(grads) == 1 else xp.concat(grads, axis=0), index)
            weights = xp.concat(weights, axis=0)
            _check_features(features, f"checkpoint {index}, the last {features.shape[0]} rows", grads[0].dtype,
                            weights, self.task, held_row)
            yield features, weights

    def _featurize(self, checkpoint: Any, data: Iterable[Any], index: int | None = None) -> None:
        """Featurize the next checkpoint, or (``index``) one written apart, which the estimator does not hold after
        (``trak_core._apart``: its store is shared, so the checks are against the other jobs' checkpoints)."""
        if index is None and getattr(self, "_subset_of", None) is not None:  # TRAK.open with some of them
            raise TrakValueError(f"this estimator was opened with checkpoints {[e.index for e in self.store]} of the "
                                 f"{self._subset_of} in {self._where}: a new checkpoint goes after all of them; open "
                                 "the store with every checkpoint (a list, in order) to featurize into it")
        pending = self._open_checkpoint(checkpoint, index)
        writer = pending.writer
        check = (shared_data_check(self, pending) if getattr(self.store, "shared", False)  # other jobs' checkpoints
                 else DataCheck.for_checkpoint(writer, list(self.store), self._where))  # beside it (index=i)
        with parameters_recorded(writer, pending.digest):  # and, in a shared store, its configuration's hash
            self._write_features(checkpoint, pending, data, check)
        self._close_checkpoint(pending, apart=index is not None)

    @property
    def _where(self) -> str:
        return self.store.location or "memory"

    def _open_checkpoint(self, checkpoint: Any, index: int | None = None) -> PendingCheckpoint:
        """The next checkpoint's snapshot, checked against the ones before and the store; its writer."""
        index = len(self.store) if index is None else index
        prepared = self.backend.prepare(self.model, checkpoint)
        n_params = self.backend.n_params(prepared)
        note_params(n_params)  # normalize_features' warning: a job featurizing apart holds no checkpoint to tell it
        if len(self.store) and n_params != self.store[0].n_params:
            raise TrakValueError(f"checkpoint {index} has {n_params} parameters but checkpoint 0 had "
                                 f"{self.store[0].n_params}; every checkpoint must be of the same model")
        structure = self.backend.structure(prepared)
        if len(self.store) and structure != self.store[0].structure:
            raise TrakValueError(f"checkpoint {index} has a different parameter structure than checkpoint 0 "
                                 f"({structure} vs {self.store[0].structure}); every checkpoint must have the "
                                 "same parameter names, nesting and shapes")
        if self.store.location and len(self.store) and repr(structure) != repr(self.store[0].structure):
            raise BackendError(f"backend {self.backend.name!r}: structure() of checkpoint {index} equals checkpoint "
                               f"0's, but its repr differs ({structure!r} vs {self.store[0].structure!r}); an on-disk "
                               "store hashes the repr, which must be the same in every process (no object ids): a "
                               "backend defect, see Backend.structure in docs/backends.md")
        digest = self.backend.parameters_digest(prepared)
        refuse_duplicate(digest, list(self.store),  # before the writer: a refused checkpoint leaves no c{index}
                         len(self.store) if self._missing is not None else None)
        self._started = True  # a new checkpoint: from here on, a failure leaves the ensemble without it
        writer = self.store.writer(index, self._fingerprint(n_params, structure))
        stored_dtype = getattr(writer, "stored_dtype", None)
        if stored_dtype is not None:  # before the digests: a setting that changed the params' dtype is named
            with located(f"checkpoint {index} in {self._where}"):
                self.backend.check_stored_dtype(prepared, stored_dtype)
        check_parameters(digest, writer, list(self.store), index, self._where,
                         getattr(self.store, "checkpoint_digests", None))
        check_lambda_setting(self.store, writer, index, self.lambda_reg, self._where)
        return PendingCheckpoint(index, prepared, n_params, structure, digest, writer)

    def _close_checkpoint(self, pending: PendingCheckpoint, lambda_reg: float | None = None, *,
                          apart: bool = False) -> None:
        """Factorize the kernel and add the entry (the features are all in the writer; ``apart``: only mark it)."""
        kernel_dtype = self._kernel_dtype(self.lambda_reg if lambda_reg is None else lambda_reg)
        try:
            pending.writer.progress = self.progress  # a bar over the kernel's chunks (trak-core's writers)
        except AttributeError:  # a third-party Writer that takes no attributes
            pass
        features, q_all, kernel = pending.writer.finish(kernel_dtype=kernel_dtype)
        if features is None:
            raise TrakValueError("featurize: data yielded no examples (no batches, or only empty ones); pass an "
                                 "iterable of (inputs, labels) batches")
        factor, made_in = self._factor_of(kernel, kernel_dtype, features, pending.n_params, pending.index, lambda_reg)
        del kernel  # the entry re-reads or recomputes it when lambda changes (refit); only the factor is held
        loader = pending.writer.kernel_loader if made_in == kernel_dtype else None  # else recomputed in float64
        entry = CheckpointEntry(pending.index, pending.prepared, pending.n_params, features, q_all, factor,
                                pending.structure, loader, pending.digest, pending.writer.data_checksums, made_in,
                                self.lambda_reg)
        self.store.add(entry, held=False) if apart else self.store.add(entry)

    def _write_features(self, checkpoint: Any, pending: PendingCheckpoint, data: Iterable[Any],
                        check: DataCheck) -> None:
        """Features of the rows the writer lacks (none when complete), the data checked against the store's."""
        writer, prepared, index = pending.writer, pending.prepared, pending.index
        total = length_of(data)
        if self.executor is not None:
            data = list(batches(data, self.label_key))
        writing = not writer.complete
        factorized = writing and getattr(self, "kronecker", None) is not None and self.proj_dim is not None
        stored_rows = getattr(self.store, "first_batch_rows", lambda: 0)()
        record_rows = writing and stored_rows is None
        if stored_rows and (writer.complete or getattr(writer, "rows_done", 0)):  # a resume, or the same calls again:
            from .executors import fix_step_size  # JAX sizes its steps as the process that began the store (as open)

            fix_step_size(self, stored_rows)
        template = writer.needs_template or (self.executor is not None and writer.template is None)
        if factorized or record_rows or template:  # the first batch, before any row is written
            data = iter(batches(data, self.label_key))
            first = next(data, None)
            if first is not None:
                where = f"checkpoint {index}, batch 0"
                if record_rows:  # JAX derives its step sizes from the first batch's: TRAK.open gives it that size
                    self.store.record_first_batch_rows(_check_lengths(*first, where))
                if factorized:  # the layout, recorded or checked
                    with located(where, self.backend.name, first[0]):
                        self._check_plan(prepared, index, *first, writer=writer)
                if template:  # one example tells the features' namespace, device and dtype
                    one = (take_rows(first[0], 0, 1), first[1][:1, ...])
                    with unnoted():  # not a row written here (a resume's, a Ray worker's): not warned of
                        writer.set_template(self._batch_features(prepared, index, *one, where)[0])
                data = itertools.chain([first], data)
        if writer.complete:  # stored: only check that the data is the same, in the same order
            for inputs, labels in progress(batches(data, self.label_key), desc=f"check checkpoint {index}'s data",
                                           enabled=self.progress, total=total):
                check.batch(inputs, labels)
            check.finish(writer.rows_done)
            return
        if self.executor is not None:
            data = list(data)
            for inputs, labels in data:
                check.batch(inputs, labels)
            check.finish(at_least=writer.rows_done)
            self._featurize_distributed(checkpoint, index, data, writer)
            return
        rows = writer.rows_done
        for phi, q in self._stream_features(prepared, index, data, skip=writer.rows_done, check=check, total=total):
            rows += phi.shape[0]
            check.check_written(rows)
            writer.append(phi, q)
        check.finish(at_least=writer.rows_done)

    def _featurize_distributed(self, checkpoint: Any, index: int, data: list, writer: Writer) -> None:
        offsets, total = [], 0
        for b, (inputs, labels) in enumerate(data):
            offsets.append(total)
            total += _check_lengths(inputs, labels, f"checkpoint {index}, batch {b}")
        if not total:
            return
        template = to_numpy(writer.template)
        writer.allocate(total, template.shape[1], template.dtype, template.dtype)
        self.executor.featurize(self, checkpoint, index, data, writer, total, offsets)

    def _fingerprint(self, n_params: int, structure: Any) -> dict[str, Any]:
        """What must not change between runs sharing a store (``_identity.store_fingerprint``)."""
        return store_fingerprint(self, n_params, structure)
