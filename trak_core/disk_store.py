"""Features on disk: a zarr v3 group, rows in chunks, resumable, checked, never silently overwritten.

One job: ``TRAK(store=path)``. Layout of the directory:

- group attributes ``trak_core``: the configuration fingerprint (projection kind, dimension,
  seed and precision, task (what a custom task computes too: ``tasks.task_identity``), parameter count and
  structure hash, backend, store format version); ``model``: ``Backend.model_identity``; ``configuration_sha256``:
  the configuration's hash, written with it and checked whenever it is read (a hand edit is refused, and which
  field changed cannot be told; stores written before it: unchecked); ``first_batch_rows``:
  the training data's first batch's rows
  (JAX compiles its step at that size; ``TRAK.open`` gives it to the backend again).
  Reopening with any difference raises ``StoreMismatchError`` naming the
  fields, and nothing is written. ``data``: the training set's ``n_train`` and digest (order
  included), once checkpoint 0 is complete.
- ``c{index}/features`` (n, k) and ``c{index}/out_to_loss`` (n,), chunked by ``KERNEL_CHUNK_ROWS``
  rows; attributes ``rows_done``, one SHA-256 per chunk of each (``checksums``, ``out_to_loss_checksums``),
  ``kronecker_plan`` (with ``proj_type="kronecker"``: the layout's hash, ``KroneckerPlan.digest``, written before
  its first rows and checked by every later run on it, targets included), ``parameters_sha256`` (the checkpoint's
  content hash, written before any row), ``data_checksums`` (one digest of the training data per
  chunk, written before the chunk), and, once the checkpoint is done, ``c{index}/kernel`` (its SHA-256
  ``kernel_sha256`` written after it; ``Phi^T Phi``,
  k x k, or the Gram matrix ``Phi Phi^T``, n x n, when n < k; in the dtype ``kernel_dtype`` gave: float32
  for float32 features at the default), ``lambda_reg`` (the value), ``lambda_setting`` (what the
  estimator was given: "auto" or the float), ``lambda_sha256`` (their hash, checked where they are read) and
  ``complete``. Rows past ``rows_done`` (an array grown
  or allocated by a run that did not record them) are not data: the next run writes or cuts them.
- ``scores/<name>``: scores saved with ``score(..., save_as=name)``; their SHA-256 (attribute ``sha256``)
  is written after them, with one per chunk of rows (``checksums``, for reading part of a set:
  ``disk_score_parts``), so a set without it was interrupted: not listed, and replaced by the next
  ``save_as`` of that name (a finished set is never overwritten).

The directory is created by the first write, not by opening. Reading a finished store (``TRAK.open``, scoring,
self-influence, saved scores, featurizing its complete checkpoints again) writes nothing, so it works in a read-only
directory; whatever must write (a new or incomplete checkpoint, ``save_as``) first checks that the directory is
writable (``DiskStore.writable``). One writer per checkpoint: a run at a checkpoint another process is writing is
refused before it writes (``disk_claim.CheckpointClaim``; at a URL other than ``file://``, which has no directory to
lock, only where the checkpoint's run record names a live process on this host); another process writing the same
store at the same time is an error (``TrakOSError``) where zarr notices it, except jobs that featurize one checkpoint
each (``featurize(..., index=i)``; ``trak_core.disk_shared``).

Safety: zarr's ``LocalStore`` writes every chunk to a temporary file and renames it into place,
so a chunk is either the old or the new bytes; ``rows_done`` and the checksum of a chunk are
written (the same way) only after the chunk. A run killed at any moment and restarted with the
same arguments re-verifies the checksums, recomputes from the first missing or damaged chunk, and
accumulates ``Phi^T Phi`` from the chunks on disk in order, so the result is bit-identical to an
uninterrupted run (and to the in-memory store, which uses the same chunks).
"""
from __future__ import annotations

import errno
import os
import pathlib
from typing import Any

from .errors import MissingFrameworkError, StoreMismatchError, TrakOSError, TrakValueError, install_hint
from .fingerprints import combine
from .store import KERNEL_CHUNK_ROWS, CheckpointEntry, Store
from ._zarr_io import settle
from .disk_layout import has_member, member, unreadable_metadata
from .disk_listing import group_from_metadata, lookup
from .disk_folder import StoreFolder
from .disk_scores import ScoreSets
from .disk_claim import CheckpointClaim, busy_error, claim_checkpoint, recorded_run
from .disk_shared import (check_configuration, checked_configuration, checked_lambda, checkpoint_indices,
                          configuration_digest, data_reference)
from .disk_writer import DiskFeatures, DiskWriter, one_writer, open_root, write_rows

__all__ = ["DiskStore", "DiskWriter", "DiskFeatures", "StoreMismatchError", "STORE_FORMAT", "write_rows",
           "open_root"]

STORE_FORMAT = 1  # the layout above; a store of another format is refused (StoreMismatchError)


class DiskStore(StoreFolder, ScoreSets, Store):
    """Checkpoint entries whose features live in a zarr v3 group at ``path`` (created by the first write)."""

    writes_apart = True  # takes a checkpoint out of order, written by a job of its own (``trak_core._apart``)
    shared = False  # set by ``featurize(..., index=i)``: other jobs may be writing other checkpoints now
    model_record: str | None = None  # this job's ``Backend.model_identity`` (``_check``)
    _claim: CheckpointClaim | None = None  # held while a writer writes a checkpoint (``disk_claim``)

    def __init__(self, path: str | os.PathLike) -> None:
        """Open the store at ``path``: a local directory, or any URL zarr opens through fsspec.

        Notes
        -----
        Nothing is created until the first write. On a local directory every chunk write is
        atomic (temporary file, then rename). On other fsspec filesystems atomicity is the
        filesystem's: object stores (S3, GCS) replace whole objects, so a chunk is still old or
        new, never partial. A ``file://`` URL is a local directory (claimed with a ``flock``, as a path is); damaged
        metadata is named at any URL (``disk_tree``).
        """
        try:
            import zarr  # noqa: F401
        except ImportError:
            raise MissingFrameworkError(f'on-disk stores need zarr (v3): {install_hint("store", "zarr")}') from None
        self._url = "://" in str(path)
        if str(path).startswith("file://localhost/"):  # RFC 8089: the local host named; was taken for ./localhost/...
            path = "file://" + str(path)[len("file://localhost"):]
        if str(path).startswith("file://") and not str(path)[len("file://"):].startswith("/"):  # a relative local URL
            path = "file://" + str(pathlib.Path(str(path)[len("file://"):]).expanduser().absolute())  # fixed now
        # "~/x" as a shell would; a relative path is fixed now, so a later os.chdir does not move the store
        self.path: str | pathlib.Path = str(path) if self._url else pathlib.Path(path).expanduser().absolute()
        if not self._url and self.path.exists() and not self.path.is_dir():
            raise TrakOSError(f"the store path {self.path} is a file, not a directory; choose a directory path "
                              "(it is created if absent)")
        self._root: Any = None
        self._writable = False  # checked by the first write (writable())
        self._entries: list[CheckpointEntry] = []
        self.template: Any = None

    @property
    def location(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        """Whether a store was written at this path."""
        if self._root is not None:
            return True
        if self._url:
            try:
                self._root = open_root(self.path, "r+")
            except Exception:
                self._refuse_damaged()  # its root zarr.json damaged or deleted: not taken for "no store here"
                return False
            return True
        if (self.path / "zarr.json").exists():
            return True
        self._refuse_damaged()  # its root zarr.json deleted: not taken for "no store here"
        return False

    @property
    def root(self) -> Any:
        """The zarr group: an existing one is opened without writing to it (a read-only directory is fine), a new
        one is created, in a directory checked to be writable."""
        if self._root is None:
            if self._url:
                self._refuse_foreign()  # zarr would raise its raw JSON error, write a new root over a deleted one,
                with one_writer(self.path):  # or write into another's zarr v2 group
                    self._root = open_root(self.path, "a")
                return self._root
            import zarr

            raw = self._refuse_foreign()
            self._root = group_from_metadata(self.path, raw)  # the zarr.json just read and checked: not read again
            if self._root is not None:
                return self._root
            if not self.exists():
                self.writable()
            try:
                with one_writer(self.path):
                    self._root = zarr.open_group(str(self.path), mode="a")
            except TrakOSError:
                if not self.shared:
                    raise
                self._root = zarr.open_group(str(self.path), mode="a")  # another job created it just now
        return self._root

    def writable(self) -> None:
        """Check, before the first write, that the store's directory can be written (once; creating it if absent):
        a ``TrakOSError`` that says so where not. Reading a finished store never calls it."""
        if self._writable or self._url:  # a URL's filesystem reports its own errors
            return
        probe = self.path / f".trak_core_write_probe-{os.getpid()}"  # one per process: writers do not race on it
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink(missing_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise TrakOSError(f"the store path {self.path} cannot be a directory ({exc}): a file is in the way; "
                              "choose another path") from None
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise TrakOSError(f"the store directory {self.path} is not writable ({exc}), and this call writes to it "
                              "(a new or incomplete checkpoint, or save_as); reading a finished store needs no write "
                              "access. Choose another path or fix its permissions") from None
        self._writable = True

    def configuration(self) -> dict | None:
        """The configuration fingerprint stored with the features (``None`` for a new store)."""
        return checked_configuration(self.root.attrs, self.path) if self.exists() else None

    def _check(self, fingerprint: dict) -> None:
        legacy, before_classes = fingerprint.get("_legacy_task_functions"), fingerprint.get("_legacy_task_identity")
        fingerprint = {k: v for k, v in fingerprint.items() if not k.startswith("_")}  # "_" keys: for comparisons
        model = fingerprint.pop("model", None)  # an attribute of its own, which versions before it do not read
        self.model_record = model  # recorded by each checkpoint of a shared store (``disk_shared``)
        stored = checked_configuration(self.root.attrs, self.path)
        if stored is None:
            self.writable()
            if self.shared:  # this job's root may predate another job's write of it: read it again, just before
                self._root = None
                stored = checked_configuration(self.root.attrs, self.path)
        if stored is None:  # its hash last: a run killed before it leaves a configuration not checked, not refused
            self.root.attrs.update({"trak_core": fingerprint, **({"model": model} if model is not None else {}),
                                    "configuration_sha256": configuration_digest(fingerprint)})
            return
        recorded = self.root.attrs.get("model")  # None: a store written before the model was recorded (unchecked)
        if recorded is not None and model is not None and recorded != model:
            raise StoreMismatchError(f"the store at {self.path} was featurized with another model (model: stored "
                                     f"{recorded!r}, now {model!r}): its modules' names or classes differ (modules "
                                     "that do nothing in eval mode, such as dropout, are left out), so its scores "
                                     "would be another function's; pass the model the store was featurized with, or "
                                     "use a new store path (nothing was overwritten)")
        if "task_functions" in stored and "task_identity" in fingerprint:  # a store written before task_identity
            fingerprint = {**{k: v for k, v in fingerprint.items() if k != "task_identity"}, "task_functions": legacy}
        elif before_classes is not None and stored.get("task_identity") == before_classes:  # written before classes
            fingerprint = {**fingerprint, "task_identity": before_classes}  # were digested whole: compared as then
        keys = list(fingerprint) + [k for k in stored if k not in fingerprint]
        differing = {k: (stored.get(k), fingerprint.get(k)) for k in keys if stored.get(k) != fingerprint.get(k)}
        if differing:
            fields = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in differing.items())
            raise StoreMismatchError(f"the store at {self.path} was written with another configuration ({fields}); "
                                     "use the same arguments, or a new store path (nothing was overwritten)")

    def writer(self, index: int, fingerprint: dict) -> DiskWriter:
        self._check(fingerprint)
        self._release()  # one checkpoint at a time: claimed before its writer reads the group, released by add or
        directory = self.checkpoint_folder(index)  # settle; not held: refused (_identity). None: at a URL
        broken = unreadable_metadata(self.tree / f"c{index}", self._opened)
        if broken:  # featurized again: its zarr.json files that zarr cannot read are deleted, and it is redone as one
            run = None if directory is not None else recorded_run(self.tree / f"c{index}")  # no lock: the record
            self._claim = CheckpointClaim(directory, run)  # whose metadata was deleted (DiskWriter._verified_rows);
            if not self._claim.held:  # TRAK.open refused it before. Claimed first: another run may be redoing it
                self._release()
                raise busy_error(index, str(self.path), run)
            self.writable()
            for file in broken:
                file.unlink(missing_ok=True)
        else:
            self._claim = claim_checkpoint(self, index)
        writer = DiskWriter(self, index)
        if self._claim is None and not writer.complete:  # complete, yet damaged: redone (claimed)
            self._claim = CheckpointClaim(directory, writer.group.attrs.get("run"))
        writer.claim = self._claim
        return writer

    def _release(self) -> None:
        """Drop the claim on the checkpoint this store's writer writes (``disk_claim.CheckpointClaim``)."""
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def stored_checkpoints(self) -> int:
        """Checkpoints stored completely, ``c0 .. c{n-1}``."""
        if not self.exists():
            return 0
        complete, count = set(self.complete_checkpoints()), 0
        while count in complete:
            count += 1
        return count

    def interrupted_checkpoint(self) -> tuple[int, int] | None:
        """``(index, rows written)`` of the checkpoint after the complete ones, where an interrupted run left one."""
        index = self.stored_checkpoints()
        group = member(self.root, f"c{index}") if self.exists() else None
        return None if group is None else (index, int(group.attrs.get("rows_done", 0)))

    def settle(self) -> None:
        """Wait for zarr writes an interrupted call left running (``trak_core._zarr_io.settle``), then drop the
        claim on its checkpoint."""
        settle()
        self._release()

    def add(self, entry: CheckpointEntry, *, held: bool = True) -> None:
        """Mark the checkpoint complete and hold its entry (``held=False``: a checkpoint featurized apart, by
        ``featurize(..., index=i)`` beyond this estimator's, is only marked)."""
        group = lookup(self.root, f"c{entry.index}")
        last = self._entries[-1].index if self._entries else -1  # a stored checkpoint may skip some (TRAK.open subset)
        if held and (entry.index <= last or (entry.index != last + 1 and not group.attrs.get("complete", False))):
            raise TrakValueError(f"checkpoint index {entry.index} out of order; expected {len(self._entries)}")
        if not group.attrs.get("complete", False):  # a stored checkpoint keeps the lambda it was featurized with
            check_configuration(self.path, entry.index, group.attrs,
                                open_root(str(self.path), "r").attrs if self.shared else None)
            self.writable()
            # zarr writes attrs.update one key at a time: "complete" after the lambda, so that a kill in between leaves
            # an incomplete checkpoint (finished again by the rerun), never a complete one without its lambda; their
            # hash after it, so that a kill never leaves one that does not match (a missing one is not checked)
            ridge = {"lambda_reg": float(entry.factor.lambda_reg), "lambda_setting": entry.lambda_setting}
            group.attrs.update({**ridge, "complete": True, "lambda_sha256": configuration_digest(ridge)})
            self._sweep_temporaries(f"c{entry.index}", root=not self.shared)  # another job may write the root's
        self._release()  # complete: another run at this index only reads it
        if not held:
            return
        if entry.index == 0 and "data" not in self.root.attrs and not self.shared:
            n = int(entry.features.shape[0])
            digests = [entry.data_checksums[str(c)] for c in range(-(-n // KERNEL_CHUNK_ROWS))
                       if str(c) in entry.data_checksums]
            self.writable()
            self.root.attrs["data"] = {"n_train": n, "sha256": combine(digests, n)}
        self._entries.append(entry)

    def complete_checkpoints(self) -> list[int]:
        """The indices of every complete checkpoint, read now (jobs featurizing apart may leave gaps)."""
        return checkpoint_indices(self.root) if self.exists() else []

    def checkpoint_digests(self) -> dict[int, str]:
        """``{index: parameters_sha256}`` of the complete checkpoints, read now."""
        digests = {i: lookup(self.root, f"c{i}").attrs.get("parameters_sha256") for i in self.complete_checkpoints()}
        return {i: digest for i, digest in digests.items() if digest is not None}

    def data_reference(self, index: int) -> tuple[dict[str, str], int] | None:
        """``(data_checksums, rows)`` of complete checkpoint ``index`` (``trak_core.disk_shared.data_reference``)."""
        return data_reference(lookup(self.root, f"c{index}"))

    def stored_lambda(self, index: int) -> float | None:
        """The ridge ``lambda`` checkpoint ``index`` was factorized with (``None`` if not stored)."""
        group = f"c{index}"
        value = (checked_lambda(lookup(self.root, group).attrs, self.path, index)["lambda_reg"]
                 if has_member(self.root, group) else None)
        return None if value is None else float(value)

    def plan_digest(self, index: int) -> str | None:
        """The factorized projection's layout (``KroneckerPlan.digest``) checkpoint ``index``'s features were made
        with (``None``: a dense projection, or a store written before trak-core kept it)."""
        group = f"c{index}"
        return (lookup(self.root, group).attrs.get("kronecker_plan") if self.exists() and has_member(self.root, group)
                else None)

    def first_batch_rows(self) -> int | None:
        """Rows of the training data's first batch (``None`` for stores written before trak-core kept it): a backend
        that derives its step's sizes from its first batch's size (JAX) is given it on reopening, as the writer had
        it."""
        rows = self.root.attrs.get("first_batch_rows") if self.exists() else None
        return None if rows is None else int(rows)

    def record_first_batch_rows(self, rows: int) -> None:
        self.writable()
        self.root.attrs["first_batch_rows"] = int(rows)

    def stored_lambda_setting(self) -> float | str | None:
        """The ``lambda_reg`` the estimator was given ("auto" or a float) when the complete checkpoint of the highest
        index was featurized (``None`` for stores written before trak-core kept it)."""
        settings = [checked_lambda(lookup(self.root, f"c{c}").attrs, self.path, c)["lambda_setting"]
                    for c in self.complete_checkpoints()]
        return next((value for value in reversed(settings) if value is not None), None)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> CheckpointEntry:
        return self._entries[index]

