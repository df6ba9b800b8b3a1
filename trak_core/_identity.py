"""Checks that a checkpoint and a training set are the ones a store already holds features of.

One job: compare content hashes (``trak_core.fingerprints``) with what a writer or checkpoint 0
recorded, and raise ``StoreMismatchError`` naming the field, before any
row that would contradict them is written; and make the configuration fingerprint a store records and
checks (``store_fingerprint``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from .disk_claim import refuse_busy, take_over
from ._task_identity import task_functions, task_identity, task_identity_before_classes
from .errors import StoreMismatchError, TrakValueError
from .fingerprints import DataFingerprint
from .store import KERNEL_CHUNK_ROWS, CheckpointEntry, Writer

__all__ = ["check_parameters", "DataCheck", "store_fingerprint"]


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:12]


def refuse_duplicate(digest: str | None, entries: Sequence[CheckpointEntry], interrupted: int | None = None) -> None:
    """Refuse a checkpoint featurized already under another index (checked before its writer touches a store);
    ``interrupted``: the index of a checkpoint whose featurize this estimator did not finish (named as the fix)."""
    if digest is not None:
        for entry in entries:
            if entry.parameters_digest == digest:
                hint = "" if interrupted is None else (
                    f" (this estimator's featurize of checkpoint {interrupted} did not finish: featurize the "
                    f"checkpoints from that one on, which resumes it, or rerun every call on a new estimator)")
                raise TrakValueError(f"this checkpoint has the same parameters as checkpoint {entry.index} "
                                     "(featurized already); featurizing it again would count it twice in the "
                                     f"ensemble. Pass each checkpoint once{hint}")


def check_parameters(digest: str | None, writer: Writer, entries: Sequence[CheckpointEntry], index: int,
                     where: str, stored_digests: Any = None) -> None:
    """Refuse a checkpoint featurized already under another index, or other parameters than the store holds
    (``stored_digests``: a function giving ``{index: parameters_sha256}`` of the store's complete checkpoints, read
    only to name the one these parameters are, where they are another's: checkpoints passed in another order), or
    one another process is writing now (``disk_claim.refuse_busy``); the hash of a run killed before its first rows
    is taken over (``disk_claim.take_over``)."""
    refuse_duplicate(digest, entries)
    stored = writer.parameters_digest
    if stored is not None and digest is not None and stored != digest and not take_over(writer, index, where):
        dtype = getattr(writer, "stored_dtype", None)
        others = [i for i, d in (stored_digests() if stored_digests else {}).items() if d == digest and i != index]
        cast = (f"; these parameters are checkpoint {others[0]}'s in the store: pass the checkpoints in the order "
                "they were featurized" if others else
                f"; parameters cast to another dtype count as other parameters (its features are stored as {dtype})"
                if dtype else "")
        raise StoreMismatchError(f"checkpoint {index} in {where} was featurized from other parameters "
                                 f"(parameters_sha256: stored {_short(stored)}..., now {_short(digest)}...){cast}; "
                                 "pass the same checkpoints in the same order, or use a new store path (nothing was "
                                 "overwritten)")
    refuse_busy(writer, index, where)


@contextmanager
def parameters_recorded(writer: Writer, digest: str | None) -> Iterator[None]:
    """Record ``digest`` on an incomplete checkpoint's ``writer`` (``record_parameters``) for the run inside. A run
    that fails before the checkpoint's first rows (refused by the data check, interrupted) takes back the hash it
    recorded where none was there before: nothing of it is stored, and its rerun with the right checkpoint is not
    refused as "other parameters". A hash recorded before (another job at the same index, still running, or an
    earlier run whose rows were kept) stays, and ``check_parameters`` refuses other parameters against it."""
    if writer.complete:
        yield
        return
    before = writer.parameters_digest
    writer.record_parameters(digest)
    try:
        yield
    except BaseException:
        if before is None and digest is not None and not writer.complete and not getattr(writer, "rows_done", 0):
            writer.parameters_digest = None
            group = getattr(writer, "group", None)
            try:
                if group is not None and group.attrs.get("parameters_sha256") == digest:
                    del group.attrs["parameters_sha256"]
            except Exception:  # (a store gone read-only, a full disk): the run's own error is the one to see
                pass
        raise


def check_lambda_setting(store: Any, writer: Writer, index: int, lambda_reg: float | str, where: str) -> None:
    """Refuse a new checkpoint in a store whose checkpoints were featurized with another ``lambda_reg`` setting: it
    would be stored with another ridge than theirs, and ``TRAK.open`` would score the mix."""
    stored_setting = getattr(store, "stored_lambda_setting", None)
    if writer.complete or stored_setting is None:  # no complete checkpoint: stored_setting() is None
        return
    stored = stored_setting()
    if stored is None or stored == lambda_reg:
        return
    raise StoreMismatchError(
        f"the checkpoints in {where} were featurized with lambda_reg={stored!r}, and this estimator has "
        f"lambda_reg={lambda_reg!r}: checkpoint {index} would be stored with another ridge than theirs, and TRAK.open "
        f"would score the mix. Featurize with lambda_reg={stored!r} (TRAK(..., lambda_reg={stored!r}), or "
        f"refit({stored!r}) first if a refit changed it), then refit({lambda_reg!r}) to score with yours (the store "
        "keeps its own); or use a new store path (nothing was overwritten)")


class DataCheck:
    """Hashes the training data batch by batch and compares each chunk with the recorded digests.

    Parameters
    ----------
    writer : Writer
        Receives the digests (``record_data``).
    expected : dict
        Chunk index (str) to digest: checkpoint 0's, or, for checkpoint 0 resumed, the chunks it stored.
    n_train : int or None
        The number of rows the data must have (``None`` when not known yet).
    where : str
        The store's location or ``"memory"``, for messages.
    resumed : bool
        ``n_train`` is the length of the data an earlier run of this incomplete checkpoint ended on (its messages
        say to resume that run), not checkpoint 0's.
    """

    def __init__(self, writer: Writer, expected: dict[str, str], n_train: int | None, where: str, *,
                 resumed: bool = False) -> None:
        self.writer, self.expected, self.n_train, self.where = writer, expected, n_train, where
        self.resumed = resumed  # n_train is that of an earlier run of this (incomplete) checkpoint, not checkpoint 0's
        self.fingerprint = DataFingerprint(KERNEL_CHUNK_ROWS)

    @classmethod
    def for_checkpoint(cls, writer: Writer, entries: Sequence[CheckpointEntry], where: str) -> "DataCheck":
        """Expected digests: checkpoint 0's for later checkpoints; the stored chunks when resuming checkpoint 0."""
        if entries:
            first = entries[0]
            return cls(writer, dict(first.data_checksums), int(first.features.shape[0]), where)
        stored = writer.data_checksums
        if writer.complete:
            return cls(writer, stored, None, where)
        total = getattr(writer, "rows_total", None)
        if total is not None:  # its last, partial chunk is stored: that run's data ended there, every chunk hashed
            chunks = -(-total // KERNEL_CHUNK_ROWS)
            return cls(writer, {c: d for c, d in stored.items() if int(c) < chunks}, total, where, resumed=True)
        whole = writer.rows_done // KERNEL_CHUNK_ROWS  # chunks written completely
        return cls(writer, {c: d for c, d in stored.items() if int(c) < whole}, None, where)

    def _compare(self, chunk: int, digest: str) -> None:
        expected = self.expected.get(str(chunk))
        if expected is not None and expected != digest:
            first = chunk * KERNEL_CHUNK_ROWS
            last = min(first + KERNEL_CHUNK_ROWS, max(self.fingerprint.rows, first + 1)) - 1  # rows that exist
            raise StoreMismatchError(
                f"the training data differs from the data {self._featurized} was featurized on, in rows "
                f"{first}..{last} (data_checksums chunk {chunk}): other examples, other labels or another order, "
                "or the same values in another dtype or shape (int64 labels one time and int32 the next: JAX makes "
                "int32 of them without x64) or changed by random transforms (data augmentation), or the same examples "
                "padded to another length (a collator pads each batch to its longest example, so another batch size "
                "pads them otherwise). Featurize every checkpoint on the same data, in the same order and dtypes, "
                f"padded the same way{self._new}")
        self.writer.record_data(chunk, digest)

    def batch(self, inputs: Any, labels: Any) -> None:
        """Hash one batch (in order); raises before the rows of a differing chunk are written."""
        for chunk, digest in self.fingerprint.update(inputs, labels):
            self._compare(chunk, digest)

    def finish(self, stored_rows: int | None = None, *, at_least: int = 0) -> None:
        """Check the number of rows (``stored_rows`` exactly, or at least ``at_least``: the rows a resumed checkpoint
        already holds), then the last (partial) chunk."""
        n_train = self.n_train if self.n_train is not None else stored_rows
        rows = self.fingerprint.rows
        if n_train is not None and rows != n_train:
            used_up = (" (it yielded nothing: a generator, map or zip is used up by one pass; pass a list, or make it "
                       "anew for each checkpoint)") if rows == 0 else ""
            raise StoreMismatchError(f"the training data has {rows} examples{used_up}, but "
                                     f"{self._made_from(n_train)}; {self._fix}")
        if rows < at_least or (n_train is not None and at_least > n_train):
            raise StoreMismatchError(
                f"the training data has {rows} examples, but this checkpoint in {self.where} already holds features "
                f"of {at_least} rows from an earlier run on longer data; featurize on that run's data (resume it), "
                "or use a new store path (nothing was overwritten)")
        for chunk, digest in self.fingerprint.finish():
            self._compare(chunk, digest)

    def check_written(self, rows: int) -> None:
        """Refuse, before they are written, rows past the ``n_train`` of checkpoint 0 (the data is longer)."""
        if self.n_train is not None and rows > self.n_train:
            raise StoreMismatchError(f"the training data has more than {self.n_train} examples, but "
                                     f"{self._made_from(self.n_train)}; {self._fix}")

    def _made_from(self, n_train: int) -> str:
        """What the store's rows were made from, for messages."""
        if self.resumed:
            return (f"this checkpoint in {self.where} holds features of all n_train={n_train} examples of an earlier "
                    "run's data (its last chunk is stored; the checkpoint is not complete yet)")
        return f"{self._featurized} was featurized on n_train={n_train} examples"

    @property
    def _fix(self) -> str:
        """How to go on, for messages."""
        if self.resumed:
            return ("featurize on that run's data to resume it (the same call), or use a new store path (nothing was "
                    "overwritten)")
        return f"featurize every checkpoint on the same data (not truncated or extended){self._new}"

    @property
    def _featurized(self) -> str:
        """What was featurized first, for messages: the store, or (in memory) this estimator's checkpoint 0."""
        return "checkpoint 0 of this estimator" if self.where == "memory" else f"the store at {self.where}"

    @property
    def _new(self) -> str:
        """The way out besides the same data, for messages (an in-memory store keeps nothing of this checkpoint)."""
        return " (nothing of this checkpoint was kept)" if self.where == "memory" else \
            ", or use a new store path (nothing was overwritten)"


def store_fingerprint(trak: Any, n_params: int, structure: Any) -> dict[str, Any]:
    """What must not change between runs sharing a store (checked by on-disk stores: ``DiskStore._check``); keys
    beginning with ``_`` serve comparisons with stores written by earlier versions and are not stored."""
    import hashlib

    from .disk_store import STORE_FORMAT

    out = {"proj_type": trak.proj_type, "proj_dim": trak.proj_dim, "seed": trak.seed, "task": trak.task.name,
           "n_params": n_params, "parameter_structure": hashlib.sha256(repr(structure).encode()).hexdigest()[:16],
           "normalize_features": trak.normalize_features, "backend": trak.backend.name,
           "precision": trak.precision, "store_format": STORE_FORMAT}
    if trak.kronecker is not None:
        out["kronecker"] = trak.kronecker.describe()
    model = trak.backend.model_identity(trak.model)
    if model is not None:  # the same parameters in another architecture (another activation) score otherwise
        out["model"] = model
    output_grad = trak.backend.name == "numpy"
    identity = task_identity(trak.task, output_grad=output_grad)
    if identity is not None:  # a custom task: what it computes, so another one with the same name is told apart
        out["task_identity"] = identity
        out["_legacy_task_functions"] = task_functions(trak.task)  # to reopen stores written before (not stored)
        out["_legacy_task_identity"] = task_identity_before_classes(trak.task, output_grad=output_grad)  # likewise
    return out
