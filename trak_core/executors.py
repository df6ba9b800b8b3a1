"""Running featurization on a Ray cluster: (checkpoint, row shard) units written to a shared store.

One job: ``TRAK(..., store=path, executor="ray")`` (or ``executor=RayExecutor(address=...)``).
Shards are ranges of rows aligned to the store's chunks; each Ray actor holds the model once,
differentiates the whole batches overlapping its shard (so every row sees exactly the batch it
sees in a single process), projects in groups aligned to absolute rows, and writes its chunks to
the store. The driver then accumulates ``Phi^T Phi`` from the chunks on disk in order, so a
distributed run gives the single-process numbers bit for bit (NumPy float32 products: with the driver's BLAS on
one thread, as each actor's is). Actors are restarted and their
shard retried when a worker dies; once retries run out the call fails, the actors are dropped, and the
same call again starts new ones and resumes after the shards that finished. A worker's error names the
checkpoint and batch of the whole training data, as in one process. Scoring: the driver makes each
checkpoint's ``K^{-1} phi(z')^T``; actors multiply their row shards of the stored features by it in the
same blocks as one process.
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Sequence

from ._progress import progress
from .errors import MissingFrameworkError, TrakOSError, TrakTypeError, TrakValueError, install_hint
from .store import KERNEL_CHUNK_ROWS

__all__ = ["RayExecutor", "get_executor", "shards"]


def fix_step_size(trak: Any, rows: int) -> None:
    """Give ``trak`` a backend whose step sizes derive from the training data's first batch's size where its backend
    takes them from the first batch it sees (JAX: ``batch_size=None`` and ``step_rows=None``), as one process would
    have: a worker whose shard starts later sees other first batches, and a step compiled at another size rounds
    differently (the docs promise one process's bits). It sets ``step_rows``, not ``batch_size``, which would fix
    one size where the process padded short batches to smaller buckets. A copy: ``get_backend("jax")`` is one
    instance per process, and setting it there fixed the step size of every later TRAK there."""
    backend = trak.backend
    if rows > 1 and getattr(backend, "batch_size", 0) is None and getattr(backend, "step_rows", 0) is None:
        backend = copy.copy(backend)  # the copy protocol takes __getstate__: no compiled steps carried over
        backend.step_rows = rows
        trak.backend = backend


def shards(start: int, n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """Chunk-aligned ``[start, stop)`` ranges covering rows ``start .. n_rows-1``."""
    size = max(KERNEL_CHUNK_ROWS, math.ceil(shard_rows / KERNEL_CHUNK_ROWS) * KERNEL_CHUNK_ROWS)
    edges = list(range(start, n_rows, size)) + [n_rows]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


class _Worker:
    """Body of the Ray actor: one TRAK configuration (model, backend, task, projection) per process."""

    def __init__(self, trak_bytes: bytes) -> None:
        import cloudpickle

        self.trak = cloudpickle.loads(trak_bytes)

    def score(self, path: str, index: int, checksums: dict, weights: Any, start: int, stop: int) -> Any:
        return _score_shard(path, index, checksums, weights, start, stop)

    def pid(self) -> int:
        import os

        return os.getpid()

    def featurize(self, checkpoint: Any, index: int, batches: list, first_batch: int, first_row: int, start: int,
                  stop: int, path: str, fail_marker: str | None = None,
                  step_rows: int = 0) -> dict[str, dict[str, str]]:
        """Write rows ``start .. stop-1`` of checkpoint ``index``; ``batches`` are the training data's batches
        ``first_batch ..``, whose first row is training row ``first_row``. Returns the chunks' checksums.
        ``step_rows``: the training data's first batch's rows, which fix a compiled step's size in one process."""
        import os

        import numpy as np

        from .disk_store import write_rows
        from .fingerprints import to_numpy

        if fail_marker and not os.path.exists(fail_marker):  # tests: die once, as a killed worker would
            open(fail_marker, "w").close()
            os._exit(1)
        from ._subnormal_rows import noting

        fix_step_size(self.trak, step_rows)
        prepared = self.trak.backend.prepare(self.trak.model, checkpoint)
        with noting(getattr(self.trak, "normalize_features", False)) as noted:  # for the driver's warning
            parts = list(self.trak._stream_features(prepared, index, batches, skip=start - first_row,
                                                    stop=stop - first_row, row0=first_row, batch0=first_batch))
        features = np.concatenate([to_numpy(f) for f, _ in parts])
        weights = np.concatenate([to_numpy(q) for _, q in parts])
        return {**write_rows(path, index, start, features, weights), "noted": noted}


def _score_shard(path: str, index: int, checksums: dict, weights: Any, start: int, stop: int) -> Any:
    """Rows ``start .. stop-1`` of ``Phi_c @ weights``, read from the store (checksums verified)."""
    from ._namespace import namespace
    from .disk_store import DiskFeatures, open_root
    from .scores import train_products

    features = DiskFeatures(open_root(path, "r")[f"c{index}"]["features"], checksums, weights)
    return train_products(features, weights, start, stop, xp=namespace(weights))


class RayExecutor:
    """Featurize, and score, on Ray actors (``TRAK(executor=...)``; row shards of the on-disk store).

    Parameters
    ----------
    address : str, optional
        A Ray cluster address; ``None`` starts (or joins) a local cluster on this machine.
    num_workers : int
        Actors (one model copy each).
    shard_rows : int
        Rows per unit of work: rounded up to whole chunks of 4,096 rows (``trak_core.store.KERNEL_CHUNK_ROWS``)
        when featurizing, and of 16,384 rows (``trak_core.scores.SCORE_BLOCK_ROWS``) when scoring.
    max_retries : int
        Restarts of a dead actor, and retries of its shard (-1: no limit, as in Ray). When they run out (at once
        for 0) the call
        raises Ray's ``RayActorError`` and the actors are stopped: the same call again starts new ones and
        resumes after the shards finished before the failing one.
    cpu_wait_s : float
        How long to wait for free CPUs when starting the actors (each takes one; Ray frees those of
        stopped actors asynchronously): up to a fifth of it for all ``num_workers``, then the rest for
        at least one (fewer actors then), else a ``TrakOSError`` instead of waiting forever.
    """

    def __init__(self, address: str | None = None, num_workers: int = 2, shard_rows: int = KERNEL_CHUNK_ROWS,
                 max_retries: int = 3, cpu_wait_s: float = 30.0) -> None:
        for name, value, least in (("num_workers", num_workers, 1), ("max_retries", max_retries, -1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise TrakValueError(f"{name} must be an integer of at least {least}, got {value!r}")
        for name, value, least in (("shard_rows", shard_rows, 1), ("cpu_wait_s", cpu_wait_s, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not least <= value < math.inf:
                raise TrakValueError(f"{name} must be a number of at least {least}, got {value!r}")
        if address is not None and not isinstance(address, str):
            raise TrakTypeError(f"address must be a Ray cluster address such as 'ray://host:10001' (or None for a "
                                 f"local cluster), got {address!r}")
        num_workers, shard_rows, max_retries = int(num_workers), math.ceil(shard_rows), int(max_retries)
        self.address, self.num_workers, self.shard_rows = address, num_workers, shard_rows
        self.max_retries, self.cpu_wait_s = max_retries, cpu_wait_s
        self._actors: list[Any] = []
        self._trak_id: int | None = None
        self.fail_marker: str | None = None  # tests only

    def __getstate__(self) -> dict:
        """A copy (pickled into another process, a Ray task) starts actors of its own: the original's stay its
        own (a copy that stopped them, scoring with another estimator, killed the original's)."""
        return {**vars(self), "_actors": [], "_trak_id": None}

    def _start(self, trak: Any) -> list[Any]:
        try:
            import cloudpickle
            import ray
        except ImportError:
            raise MissingFrameworkError(f'executor="ray" needs Ray: {install_hint("ray", "ray zarr")}') from None
        if not ray.is_initialized():
            options = dict(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            if self.address is None:
                options["num_cpus"] = self.num_workers
            ray.init(address=self.address, **options)
        if self._trak_id != id(trak):
            self.close()
            count = min(self.num_workers, _free_cpus(ray, self.num_workers, self.cpu_wait_s / 5))
            count = count or min(1, _free_cpus(ray, 1, self.cpu_wait_s * 4 / 5))
            if count < 1:
                raise TrakOSError(f"the Ray cluster has had no free CPU for trak-core's actors (each takes one) for "
                                  f"{self.cpu_wait_s:g} s: other actors hold them, such as those of another TRAK with "
                                  "executor='ray' in this process (del it, or call trak.executor.close()); or start "
                                  "Ray with more (ray.init(num_cpus=...))")
            worker = ray.remote(num_cpus=1, max_restarts=self.max_retries,
                                max_task_retries=self.max_retries)(_Worker)
            try:
                payload = cloudpickle.dumps(trak.worker_copy())
            except Exception as exc:  # was a bare "cannot pickle '_thread.lock' object"
                raise TrakTypeError(f"executor='ray' sends the estimator to its workers, and it cannot be pickled "
                                    f"({type(exc).__name__}: {exc}): the model, the task or the backend "
                                    f"{trak.backend.name!r} holds something that does not pickle (a lock, an open "
                                    "file); drop it in the object's __getstate__, or use the default executor") from exc
            self._actors = [worker.remote(payload) for _ in range(count)]
            self._trak_id = id(trak)
        return self._actors

    def close(self) -> None:
        """Stop this executor's actors (their CPUs go back to the cluster); the next use starts new ones."""
        if self._actors:
            import ray

            held = len(self._actors)
            for actor in self._actors:
                ray.kill(actor)
            self._actors, self._trak_id = [], None
            _free_cpus(ray, held, self.cpu_wait_s / 5)

    def featurize(self, trak: Any, checkpoint: Any, index: int, data: Sequence[tuple[Any, Any]], writer: Any,
                  n_rows: int, offsets: list[int]) -> None:
        """Fill ``writer``'s arrays for rows ``writer.rows_done .. n_rows-1`` with actor work.

        When a shard fails, the shards queued after it are cancelled and those running are waited for (none
        writes after the error is raised; when an actor died, the actors are stopped instead, and the next call
        starts new ones), and the shards before it are recorded, so that the same call again resumes after them.

        Parameters
        ----------
        trak : TRAK
            The estimator; its ``worker_copy`` goes to the actors (started once per estimator).
        checkpoint : object
            The checkpoint as passed to ``TRAK.featurize``; each actor prepares its own copy.
        index : int
            The checkpoint's index in the store.
        data : sequence of (inputs, labels)
            The training data's batches, in order.
        writer : Writer
            The checkpoint's writer, its arrays allocated for ``n_rows`` rows; the actors write rows
            ``writer.rows_done ..`` to the store, and the chunks' checksums are recorded with ``record_rows``.
        n_rows : int
            Rows of the training data.
        offsets : list of int
            The first row of each batch of ``data``.
        """
        actors = self._start(trak)  # first: without Ray it raises MissingFrameworkError, naming the extra
        import ray

        from ._subnormal_rows import merge

        step_rows = _rows(data[0]) if data else 0
        fix_step_size(trak, step_rows)  # the driver's targets, as one process compiles them
        futures, stops = [], []
        for i, (start, stop) in enumerate(shards(writer.rows_done, n_rows, self.shard_rows)):
            first = max(b for b in range(len(offsets)) if offsets[b] <= start)
            last = min(b for b in range(len(offsets)) if offsets[b] + _rows(data[b]) >= stop)
            futures.append(actors[i % len(actors)].featurize.remote(
                checkpoint, index, list(data[first:last + 1]), first, offsets[first], start, stop,
                trak.store.location, self.fail_marker if i == 0 else None, step_rows))
            stops.append(stop)
        checksums: dict[str, dict[str, str]] = {"features": {}, "out_to_loss": {}}
        done = progress(futures, desc=f"featurize checkpoint {index} (Ray shards)",  # TRAK(progress=...): as one
                        enabled=getattr(trak, "progress", False))  # process's bar over batches
        try:
            for i, future in enumerate(done):  # in row order: on a failure, the shards before it are done
                try:
                    written = dict(self._get(future))
                    merge(written.pop("noted", None))  # its subnormal rows, for normalize_features' warning
                    for name, digests in written.items():
                        checksums[name].update(digests)
                except Exception:
                    rest = futures[i + 1:]
                    if self._actors and rest:  # no actor died: none writes after the error (queued shards never start)
                        for queued in rest:
                            ray.cancel(queued)
                        ray.wait(rest, num_returns=len(rest))
                    if i:
                        writer.record_rows(checksums, stops[i - 1])
                    raise
        finally:  # a shard's error or Ctrl-C: the bar is cleared, not left half drawn
            getattr(done, "close", lambda: None)()
        writer.record_rows(checksums, n_rows)

    def _get(self, futures: Any) -> Any:
        """``ray.get(futures)``; after an actor died (its restarts spent, or ``max_retries=0``) the actors are
        stopped, so that the next call starts new ones instead of failing on the dead one. A worker's error keeps
        the notes its message (Ray's remote traceback) does not hold already."""
        import ray

        try:
            return ray.get(futures)
        except ray.exceptions.RayActorError:
            self.close()
            raise
        except Exception as exc:  # a worker's error: its notes (trak-core's location) are in Ray's remote
            notes = getattr(exc, "__notes__", None)  # traceback already, which the message holds: not twice
            if notes:
                exc.__notes__ = [note for note in notes if note not in str(exc)]
            raise

    def products(self, trak: Any, entry: Any, weights: Any) -> Any:
        """``Phi_c @ weights`` over row shards aligned to the scoring blocks, on the actors, in row order.

        Parameters
        ----------
        trak : TRAK
            The estimator (its store's location is read by the actors).
        entry : CheckpointEntry
            The featurized checkpoint: its stored features are read with their checksums verified.
        weights : array, shape (k, n_targets)
            What the training features multiply (``trak_core.scores.target_weights``): ``K_c^{-1} phi_c(z')^T``,
            or ``phi_c(z')^T`` where the kernel is solved in n-space.

        Returns
        -------
        array, shape (n_train, n_targets)
            In the namespace and dtype of ``weights``.
        """
        from .scores import SCORE_BLOCK_ROWS

        actors = self._start(trak)
        n = entry.features.shape[0]
        size = max(SCORE_BLOCK_ROWS, math.ceil(self.shard_rows / SCORE_BLOCK_ROWS) * SCORE_BLOCK_ROWS)
        futures = [actors[i % len(actors)].score.remote(trak.store.location, entry.index, entry.features.checksums,
                                                        weights, start, min(n, start + size))
                   for i, start in enumerate(range(0, n, size))]
        parts = self._get(futures)
        from ._namespace import namespace

        xp = namespace(weights)
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def _free_cpus(ray: Any, wait_for: int = 0, seconds: float = 10.0) -> int:
    """CPUs the cluster has free now; after actors were stopped, wait (up to ``seconds``) until at least
    ``wait_for`` are free again (Ray frees a killed actor's resources asynchronously)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        free = int(ray.available_resources().get("CPU", 0))
        if free >= wait_for or time.monotonic() > deadline:
            return free
        time.sleep(0.05)


def _rows(batch: tuple[Any, Any]) -> int:
    """Rows of an ``(inputs, labels)`` batch, from its labels (a dict batch's inputs are a mapping)."""
    return int(batch[1].shape[0])


def get_executor(executor: Any) -> Any:
    """``None``, ``"ray"`` (a local ``RayExecutor``), or an executor object."""
    if executor is None or isinstance(executor, RayExecutor):
        return executor
    if executor == "ray":
        return RayExecutor()
    raise TrakValueError(f"executor must be None, 'ray' or a RayExecutor, got {executor!r}")
