"""Where featurized checkpoints live: the store and writer contracts, and the in-memory store.

One job: declare what the estimator asks of a store (``Store``) and of the writer of one
checkpoint's features (``Writer``), with defaults for what is optional, and implement them in
memory (``MemoryStore``). Entries are added only when a checkpoint has been featurized
completely, so a failed ``featurize`` leaves the store as it was. The on-disk store is
``trak_core.disk_store``; ``trak_core.stores.open_store`` chooses between them.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from . import kernel as kernel_ops
from ._namespace import device_of, namespace
from .errors import TrakValueError
from .kernel import KernelFactor

__all__ = ["CheckpointEntry", "Store", "Writer", "MemoryStore", "MemoryWriter", "kernel_from_features",
           "KERNEL_CHUNK_ROWS", "settling"]

KERNEL_CHUNK_ROWS = 4096  # rows of features per update of the kernel K (and rows per on-disk chunk)


def kernel_from_features(features: Any, *, xp: Any = None, kernel_dtype: str = "float64",
                         show: bool | None = False) -> Any:
    """The matrix to factorize, as featurizing makes it (same bits): ``Phi^T Phi`` accumulated in chunks of
    ``KERNEL_CHUNK_ROWS`` rows, or ``Phi Phi^T`` when ``n_train < k`` (:func:`trak_core.kernel.space_for`),
    in the dtype ``kernel_dtype`` names (:func:`trak_core.kernel.work_dtype`). ``show``: a progress bar over the
    chunks (``TRAK(progress=...)``; half a minute at n = 200,000, k = 2,048)."""
    from ._progress import progress

    first = features[:1, :]
    xp = namespace(first) if xp is None else xp
    dtype = kernel_ops.work_dtype(xp, device_of(first), kernel_dtype, first.dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # a float32 kernel out of range is checked, and made again in
        if kernel_ops.space_for(features.shape[0], features.shape[1]) == "n":  # float64 or refused, by the fitting
            return kernel_ops.gram(features, xp=xp, chunk_rows=KERNEL_CHUNK_ROWS, dtype=dtype)
        kernel = None
        starts = range(0, features.shape[0], KERNEL_CHUNK_ROWS)
        for start in progress(starts, desc="kernel", enabled=show):
            kernel = kernel_ops.accumulate(kernel, features[start:min(features.shape[0], start + KERNEL_CHUNK_ROWS),
                                                            :], xp=xp, dtype=dtype)
    return kernel


@dataclass
class CheckpointEntry:
    """One featurized checkpoint: its snapshot, ``Phi_c`` (n, k), ``Q_c`` (n,) and kernel factor.

    The kernel ``Phi^T Phi`` is not held: only its factor is needed to score, and a k x k float64
    matrix per checkpoint is as large as the features when k is close to n. ``kernel`` reads it
    from the store (``kernel_loader``) or recomputes it from the features, bit for bit as featurizing
    made it, when ``lambda`` changes.
    """

    index: int
    prepared: Any
    n_params: int
    features: Any
    out_to_loss: Any
    factor: KernelFactor
    structure: Any = None
    kernel_loader: Callable[[], Any] | None = None
    parameters_digest: str | None = None
    data_checksums: dict[str, str] = field(default_factory=dict)
    kernel_dtype: str = "float64"
    lambda_setting: float | str | None = None  # what the estimator was asked for ("auto" or a float), kept by stores

    @property
    def kernel(self) -> Any:
        """``Phi^T Phi``, or ``Phi Phi^T`` when ``n_train < k`` (without lambda), in ``kernel_dtype``'s dtype."""
        if self.kernel_loader is not None:
            return self.kernel_loader()
        return kernel_from_features(self.features, kernel_dtype=self.kernel_dtype)


class Writer(abc.ABC):
    """Writes one checkpoint's features; what the estimator calls while featurizing.

    Attributes
    ----------
    complete : bool
        The checkpoint's features are all stored already (a reopened store): nothing is appended.
    rows_done : int
        Rows stored already (a resumed run appends from there).
    needs_template : bool
        Resuming without having seen a feature row: the estimator makes one and passes it to
        ``set_template`` (it tells the namespace, device and dtype of reads).
    parameters_digest : str or None
        The content hash of the parameters this checkpoint was featurized from, if stored.
    data_checksums : dict
        Digests of the training data per chunk of ``KERNEL_CHUNK_ROWS`` rows, if stored.
    kernel_loader : callable or None
        Reads ``Phi^T Phi`` back (``None``: the entry recomputes it from the features).
    template : array or None
        One row of features seen or set (the namespace, device and dtype of reads), if any.
    """

    template: Any = None
    complete: bool = False
    rows_done: int = 0
    needs_template: bool = False
    parameters_digest: str | None = None
    kernel_loader: Callable[[], Any] | None = None

    @property
    def data_checksums(self) -> dict[str, str]:
        """The digests ``record_data`` received, ``{str(chunk): digest}`` (the base writer keeps none)."""
        return {}

    @property
    def stored_dtype(self) -> str | None:
        """The dtype of the features already stored (``None`` when nothing is)."""
        return None

    @abc.abstractmethod
    def append(self, features: Any, out_to_loss: Any) -> None:
        """Add the features (rows) and out-to-loss weights of the next examples, in row order from ``rows_done``.

        Parameters
        ----------
        features : array, shape (rows, k)
            Features ``Phi`` of the examples, in the backend's namespace and on its device (``k``: ``proj_dim``).
        out_to_loss : array, shape (rows,)
            Their out-to-loss weights ``Q``.
        """

    @abc.abstractmethod
    def finish(self, kernel_dtype: str = "float64") -> tuple[Any, Any, Any]:
        """``(features (n, k), out_to_loss (n,), kernel)`` after the last row; ``(None, None, None)`` if none was added.

        Parameters
        ----------
        kernel_dtype : str
            The dtype of the kernel ``Phi^T Phi`` (``Phi Phi^T`` when ``n < k``;
            ``trak_core.store.kernel_from_features``).
        """

    @abc.abstractmethod
    def discard(self) -> None:
        """Forget this checkpoint's features (its data contradicted checkpoint 0's)."""

    def set_template(self, features: Any) -> None:
        """One row of features, when resuming: the namespace, device and dtype to read rows back in.

        Parameters
        ----------
        features : array, shape (1, k)
            The features of one example (the base writer ignores it).
        """

    def record_parameters(self, digest: str | None) -> None:
        """Remember the content hash of the checkpoint's parameters (before any row is written).

        Parameters
        ----------
        digest : str or None
            ``Backend.parameters_digest`` of the checkpoint; the base writer sets ``parameters_digest``.
        """
        self.parameters_digest = digest

    def record_data(self, chunk: int, digest: str) -> None:
        """Remember the digest of chunk ``chunk`` of the training data (before its features are written).

        Parameters
        ----------
        chunk : int
            The chunk's index: rows from ``chunk * KERNEL_CHUNK_ROWS`` on.
        digest : str
            Its SHA-256 hex digest (``trak_core.fingerprints.DataFingerprint``).
        """

    def allocate(self, n_rows: int, width: int, dtype: Any, weight_dtype: Any) -> None:
        """Make room for ``n_rows`` rows that parallel workers fill in any order (on-disk stores only).

        Parameters
        ----------
        n_rows, width : int
            The number of training examples and of features per row ``k``.
        dtype, weight_dtype : numpy.dtype
            The dtypes of the features and of the out-to-loss weights (the estimator passes the features' for both).
        """
        raise TrakValueError(f"{type(self).__name__} cannot be filled by parallel workers; use an on-disk store "
                             "(store=PATH) with executor='ray'")

    def record_rows(self, checksums: dict[str, dict[str, str]], rows_done: int) -> None:
        """Record chunks that parallel workers wrote and the rows now done.

        Parameters
        ----------
        checksums : dict
            ``{"features": {str(chunk): sha256}, "out_to_loss": {str(chunk): sha256}}``.
        rows_done : int
            The rows written, from row 0.
        """
        raise TrakValueError(f"{type(self).__name__} cannot be filled by parallel workers")


def _joined(parts: list[Any], *, xp: Any) -> Any:
    """``concat(parts)``, each part dropped as soon as it is copied where the arrays can be written in place (a
    checkpoint's features were held twice while joined: 822 MB for 390 MB), else ``xp.concat`` (JAX)."""
    import array_api_compat

    if array_api_compat.is_jax_array(parts[0]) or not hasattr(xp, "empty") or \
            any(part.dtype != parts[0].dtype for part in parts):  # mixed dtypes: concat's promotion
        return xp.concat(parts, axis=0)
    first = parts[0]
    out = xp.empty((sum(part.shape[0] for part in parts), *first.shape[1:]), dtype=first.dtype,
                   device=device_of(first))
    row = 0
    while parts:
        part = parts.pop(0)
        out[row:row + part.shape[0], ...] = part
        row += part.shape[0]
    return out


class MemoryWriter(Writer):
    """Collects one checkpoint's features in memory; the kernel is made from them at the end."""

    def __init__(self) -> None:
        self._data: dict[str, str] = {}
        self._features: list[Any] = []
        self._weights: list[Any] = []

    def append(self, features: Any, out_to_loss: Any) -> None:
        """Add the features (rows) and out-to-loss weights of the next examples."""
        self._features.append(features)
        self._weights.append(out_to_loss)

    def finish(self, kernel_dtype: str = "float64") -> tuple[Any, Any, Any]:
        """``(features, out_to_loss, kernel)`` (``kernel_from_features``), or ``(None, None, None)`` when
        nothing was added."""
        if not self._features:
            return None, None, None
        xp = namespace(self._features[0])
        features = self._features[0] if len(self._features) == 1 else _joined(self._features, xp=xp)
        self._features = [features]
        return features, xp.concat(self._weights, axis=0), kernel_from_features(
            features, xp=xp, kernel_dtype=kernel_dtype, show=getattr(self, "progress", False))

    def discard(self) -> None:
        """Forget what was collected (nothing was stored)."""
        self._features = []

    @property
    def data_checksums(self) -> dict[str, str]:
        return dict(self._data)

    def record_data(self, chunk: int, digest: str) -> None:
        self._data[str(chunk)] = digest


class Store(abc.ABC):
    """Featurized checkpoints, in featurization order; what the estimator calls on a store.

    Attributes
    ----------
    location : str or None
        Where the store lives (a directory or URL) for workers and messages; ``None`` in memory.
    progress : bool or None
        Bars over the store's own long passes (an on-disk store's checksum pass when a checkpoint is
        reopened); the estimator sets it from its ``progress=``.
    """

    location: str | None = None
    progress: bool | None = False

    @abc.abstractmethod
    def writer(self, index: int, fingerprint: dict) -> Writer:
        """A writer for checkpoint ``index``; an on-disk store checks ``fingerprint`` against its own.

        Parameters
        ----------
        index : int
            The checkpoint's position (``len(store)`` for a new one).
        fingerprint : dict
            Settings that must not change between runs sharing a store (``proj_dim``, ``seed``, ``task``, ...).
        """

    @abc.abstractmethod
    def add(self, entry: CheckpointEntry) -> None:
        """Append a completely featurized checkpoint (its index must be the next one).

        Parameters
        ----------
        entry : CheckpointEntry
            Made from its writer's ``finish`` and the kernel's factor.
        """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of checkpoints added."""

    @abc.abstractmethod
    def __getitem__(self, index: int) -> CheckpointEntry:
        """Checkpoint ``index``'s entry."""

    def __iter__(self) -> Iterator[CheckpointEntry]:
        return (self[i] for i in range(len(self)))

    def stored_checkpoints(self) -> int:
        """Checkpoints stored completely (more than ``len`` in a reopened store not yet loaded).

        Returns
        -------
        int
            ``len(self)`` here.
        """
        return len(self)

    def settle(self) -> None:
        """Return once no write of an interrupted call is still in flight (an on-disk store's IO thread); in
        memory, at once."""

    def save_scores(self, name: str, scores: Any) -> None:
        """Save ``scores`` under ``name`` (on-disk stores); never overwrites. Here: raise ``TrakValueError``.

        Parameters
        ----------
        name : str
            The ``save_as`` name, checked by ``check_score_name`` before scoring.
        scores : array, shape (n_train, n_targets)
            What ``score`` returns.
        """
        raise TrakValueError("save_as needs an on-disk store: TRAK(..., store=PATH)")

    def check_score_name(self, name: str) -> Any:
        """Refuse ``score(..., save_as=name)`` before any target is scored: here, where ``save_scores`` is not
        overridden (this store cannot save scores); a store that overrides it may override this too.

        Parameters
        ----------
        name : str
            The ``save_as`` name (the estimator ignores what this returns).
        """
        if type(self).save_scores is Store.save_scores:
            raise TrakValueError("save_as needs an on-disk store: TRAK(..., store=PATH)")

    def load_scores(self, name: str, rows: Any = None, targets: Any = None) -> Any:
        """Scores saved with ``score(..., save_as=name)``, shape (n_train, n_targets). Here: raise ``TrakValueError``.

        Parameters
        ----------
        name : str
            The ``save_as`` name.
        rows, targets : slice or array_like of int, optional
            Only these (``TRAK.load_scores``; passed only where given: a store taking ``name`` alone serves sets).
        """
        raise TrakValueError("saved scores live in on-disk stores: TRAK(..., store=PATH)")

    def score_names(self) -> list[str]:
        """Names of the saved score sets.

        Returns
        -------
        list of str
            Empty here.
        """
        return []


@contextlib.contextmanager
def settling(store: Store) -> Iterator[None]:
    """On any exception in the block (``KeyboardInterrupt`` too), wait for ``store``'s writes in flight
    (``Store.settle``) before it propagates."""
    try:
        yield
    except BaseException:
        store.settle()
        raise


class MemoryStore(Store):
    """Checkpoint entries kept in memory, in featurization order."""

    def __init__(self) -> None:
        self._entries: list[CheckpointEntry] = []

    def writer(self, index: int, fingerprint: dict) -> MemoryWriter:
        """A writer for checkpoint ``index``'s features."""
        return MemoryWriter()

    def add(self, entry: CheckpointEntry) -> None:
        """Append a completely featurized checkpoint."""
        if entry.index != len(self._entries):
            raise TrakValueError(f"checkpoint index {entry.index} out of order; expected {len(self._entries)}")
        self._entries.append(entry)

    def __iter__(self) -> Iterator[CheckpointEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> CheckpointEntry:
        return self._entries[index]
