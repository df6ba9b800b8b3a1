"""The public estimator class: ``TRAK(model).featurize(checkpoint, data)`` then ``.score(data)``.

One job: orchestrate a backend (gradients), the projection, the kernel and the store.
"""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Any, Iterable, Iterator, Sequence

from . import kernel as kernel_ops
from ._checks import (_check_finite, _check_lambda, _check_lengths, _check_proj_dim, _check_seed, _resolve_backend,
                      projection_group_rows)
from ._namespace import namespace
from ._progress import progress
from .backends import Backend
from .backends.protocol import batches
from ._delegation import is_accelerator
from .projection import KINDS, PRECISIONS, project
from .regularization import choose_lambda
from .executors import get_executor
from .scores import checkpoint_scores, ensemble, normalize_rows, soft_threshold, target_weights
from .store import CheckpointEntry, open_store
from .tasks import Task, get_task

__all__ = ["TRAK"]

log = logging.getLogger("trak_core")

class TRAK:
    """Attribute a model's predictions to its training examples with TRAK.

    Parameters
    ----------
    model
        The model, of a type some installed backend owns (e.g. a
        :class:`trak_core.models.MLP` for the ``"numpy"`` backend).
    task : str or Task
        ``"classification"`` (margin output, ``Q = 1 - p_y``), ``"regression"``, or a Task.
    proj_dim : int or None
        Projection dimension ``k``; ``None`` keeps the raw gradients (the exact estimator).
    proj_type : {"rademacher", "gaussian"}
        Kind of random projection (see :func:`trak_core.projection_matrix`).
    seed : int
        Seed of the projection; the matrices are a pure function of it.
    lambda_reg : "auto" or float
        The ridge in ``K = Phi^T Phi + lambda I``. ``"auto"`` (default) chooses it per checkpoint
        from the training features (:mod:`trak_core.regularization`); the chosen values are in
        :attr:`lambdas` and the log. A float is an absolute ``lambda >= 0``; ``0`` uses the
        minimum-norm solution when ``K`` is singular (with a warning).
    backend : str, Backend or None
        Backend name (see :func:`trak_core.available_backends`), object, or ``None`` to infer
        it from the model's type.
    store : None, str, os.PathLike or store object
        Where features live: ``None`` keeps them in memory; a directory path or fsspec URL
        (``"s3://..."``) is a resumable zarr v3 store (:class:`trak_core.disk_store.DiskStore`,
        needs ``zarr``), reopened and checked against this configuration when it exists.
    progress : bool or None
        Show progress bars (when tqdm is installed); ``None``: when stderr is a terminal.
    normalize_features : bool
        Scale every feature row (train and target) to unit norm (TrackStar-style). Off by default:
        it lowers LDS on the task suite (``docs/quality.md``).
    soft_threshold : float or None
        Per target, shrink scores towards 0 by this quantile of their magnitudes (the TRAK paper's
        soft-thresholding). Off by default (measured in ``docs/quality.md``).
    checkpoint_weighting : {"uniform", "normalized"}
        How checkpoints are averaged: a plain mean (``docs/estimator.md``), or each checkpoint's scores scaled
        to unit norm per target first.
    executor : None, "ray" or RayExecutor
        Where featurization runs: this process, or Ray actors over row shards (needs ``store=path``;
        see :mod:`trak_core.executors`). The numbers are the same bit for bit.
    precision : {"float32", "fast"}
        Of the projection (:func:`trak_core.project`): ``"float32"`` (default) is float32-grade
        everywhere, computed on GPUs as two float16 tensor-core products of a split input;
        ``"fast"`` is one float16 product (relative error about 3e-4, traker's fast_jl grade),
        Rademacher only. CPU results at the default are those of a float32 product.

    Notes
    -----
    ``featurize`` keeps a snapshot of each checkpoint, since scoring needs the targets'
    gradients at every checkpoint.
    """

    def __init__(self, model: Any, *, task: str | Task = "classification", proj_dim: int | None = 2048,
                 proj_type: str = "rademacher", seed: int = 0, lambda_reg: float | str = "auto",
                 backend: str | Backend | None = None, store: Any = None, progress: bool | None = None,
                 normalize_features: bool = False, soft_threshold: float | None = None,
                 checkpoint_weighting: str = "uniform", executor: Any = None, precision: str = "float32") -> None:
        self.proj_dim = _check_proj_dim(proj_dim)
        if proj_type not in KINDS:
            raise ValueError(f"unknown proj_type {proj_type!r}; choose one of {KINDS}")
        self.proj_type = proj_type
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        if precision == "fast" and proj_type != "rademacher":
            raise ValueError("precision='fast' needs proj_type='rademacher' (Gaussian entries are not exact in "
                             "float16); use precision='float32' for Gaussian projections")
        self.precision = precision
        self.seed = _check_seed(seed)
        self.lambda_reg = _check_lambda(lambda_reg)
        self.model = model
        self.task = get_task(task)
        self.backend = _resolve_backend(backend, model)
        if not self.backend.can_gradients:
            raise ValueError(f"backend {self.backend.name!r} cannot compute gradients (can_gradients=False); "
                             "choose a backend for this model's framework")
        self.store = open_store(store)
        self.progress = progress
        self.normalize_features = bool(normalize_features)
        if soft_threshold is not None and not 0 <= soft_threshold < 1:
            raise ValueError(f"soft_threshold is a quantile in [0, 1) (or None), got {soft_threshold!r}")
        self.soft_threshold = soft_threshold
        if checkpoint_weighting not in ("uniform", "normalized"):
            raise ValueError(f"checkpoint_weighting must be 'uniform' or 'normalized', got {checkpoint_weighting!r}")
        self.checkpoint_weighting = checkpoint_weighting
        self.executor = get_executor(executor)
        if self.executor is not None and not hasattr(self.store, "path"):
            raise ValueError("executor='ray' needs an on-disk store that every worker can reach: pass store=PATH")

    @property
    def n_checkpoints(self) -> int:
        """Number of checkpoints featurized so far."""
        return len(self.store)

    @property
    def n_train(self) -> int | None:
        """Number of training examples (``None`` before the first ``featurize``)."""
        return self.store[0].features.shape[0] if len(self.store) else None

    def _project(self, grads: Any, checkpoint: int) -> Any:
        return self._finish(self._project_raw(grads, checkpoint))

    def _finish(self, features: Any) -> Any:
        return normalize_rows(features, xp=namespace(features)) if self.normalize_features else features

    def _project_raw(self, grads: Any, checkpoint: int) -> Any:
        if self.proj_dim is None:
            return grads
        if self.backend.has_fused_projection:
            return self.backend.project(grads, self.proj_dim, seed=self.seed, checkpoint=checkpoint,
                                        kind=self.proj_type, precision=self.precision)
        return project(grads, self.proj_dim, seed=self.seed, checkpoint=checkpoint, kind=self.proj_type,
                       precision=self.precision)

    def _gradients(self, prepared: Any, inputs: Any, labels: Any, where: str) -> tuple[Any, Any]:
        """Validated per-example gradients (n, p) and out-to-loss weights (n,) of one batch."""
        n_inputs = _check_lengths(inputs, labels, where)
        grads, out_to_loss = self.backend.gradients(self.model, prepared, inputs, labels, self.task)
        if grads.ndim != 2 or grads.shape[0] != n_inputs:
            raise ValueError(f"{where}: backend {self.backend.name!r} returned gradients of shape "
                             f"{tuple(grads.shape)} for {n_inputs} examples; expected (n, p)")
        _check_finite(grads, out_to_loss, where, "per-example gradients")
        return grads, out_to_loss

    def _fused_features(self, prepared: Any, index: int, inputs: Any, labels: Any, where: str) -> tuple | None:
        """Features from a backend that projects inside its own compiled step, if it has one."""
        fused = getattr(self.backend, "features", None)
        if fused is None or self.proj_dim is None:
            return None
        n_inputs = _check_lengths(inputs, labels, where)
        out = fused(self.model, prepared, inputs, labels, self.task, k=self.proj_dim, seed=self.seed,
                    checkpoint=index, kind=self.proj_type, precision=self.precision)
        if out is not None:
            if tuple(out[0].shape) != (n_inputs, self.proj_dim):
                raise ValueError(f"{where}: backend {self.backend.name!r} returned features of shape "
                                 f"{tuple(out[0].shape)}; expected {(n_inputs, self.proj_dim)}")
            _check_finite(out[0], out[1], where, "features (projected per-example gradients)")
            out = (self._finish(out[0]), out[1])
        return out

    def _batch_features(self, prepared: Any, index: int, inputs: Any, labels: Any,
                        where: str) -> tuple[Any, Any]:
        fused = self._fused_features(prepared, index, inputs, labels, where)
        if fused is not None:
            return fused
        grads, out_to_loss = self._gradients(prepared, inputs, labels, where)
        return self._project(grads, index), out_to_loss

    def _stream_features(self, prepared: Any, index: int, data: Iterable[Any], skip: int = 0,
                         stop: int | None = None) -> Iterator[tuple[Any, Any]]:
        """Features and out-to-loss weights of rows ``skip .. stop-1`` of ``data``.

        Whole batches are differentiated (rows outside the range are dropped afterwards), and
        gradients are projected in groups of exactly :func:`projection_group_rows` rows aligned
        to absolute row indices, so a row's features do not depend on where a run started or
        stopped (resume, shards) and the matrix is made or unpacked once per group. Backends with
        a fused step (:meth:`features`) project batch by batch inside it.
        """
        grads, weights, seen, group, pending = [], [], 0, None, 0
        for b, (inputs, labels) in enumerate(progress(batches(data), desc=f"featurize checkpoint {index}",
                                                      enabled=self.progress)):
            where = f"checkpoint {index}, batch {b}"
            rows = _check_lengths(inputs, labels, where)
            first, seen = seen, seen + rows
            lo, hi = max(0, skip - first), rows if stop is None else min(rows, stop - first)
            if hi <= lo:
                if stop is not None and first >= stop:
                    break
                continue
            fused = self._fused_features(prepared, index, inputs, labels, where)
            if fused is not None:
                yield (fused[0][lo:hi, ...], fused[1][lo:hi]) if (lo, hi) != (0, rows) else fused
                continue
            g, q = self._gradients(prepared, inputs, labels, where)
            if (lo, hi) != (0, rows):
                g, q = g[lo:hi, ...], q[lo:hi]
            xp = namespace(g)
            if group is None:
                group = projection_group_rows(g.shape[1], xp.finfo(g.dtype).bits // 8, self.proj_dim,
                                              accelerator=is_accelerator(g))
                pending = (first + lo) % group  # the first group ends at a multiple of `group`
            grads.append(g)
            weights.append(q)
            pending += g.shape[0]
            while pending >= group:  # one pending array is sliced, never copied
                g_all = grads[0] if len(grads) == 1 else xp.concat(grads, axis=0)
                q_all = weights[0] if len(weights) == 1 else xp.concat(weights, axis=0)
                take = g_all.shape[0] - (pending - group)
                yield self._project(g_all[:take, ...], index), q_all[:take]
                grads, weights = [g_all[take:, ...]], [q_all[take:]]
                pending -= group
        if sum(g.shape[0] for g in grads):
            xp = namespace(grads[0])
            yield self._project(xp.concat(grads, axis=0), index), xp.concat(weights, axis=0)

    def featurize(self, checkpoint: Any, data: Iterable[Any]) -> None:
        """Compute and store the training features of one checkpoint.

        Parameters
        ----------
        checkpoint
            The parameters (a flat vector or mapping for analytic models; a state_dict or
            params pytree for framework backends). Call once per checkpoint.
        data : iterable of (inputs, labels)
            The training set in batches, in the same order for every checkpoint.

        Raises
        ------
        ValueError
            On empty data, mismatched batch lengths, non-finite gradients, or a checkpoint or
            training set inconsistent with those featurized before.
        """
        index = len(self.store)
        prepared = self.backend.prepare(self.model, checkpoint)
        n_params = self.backend.n_params(prepared)
        if index and n_params != self.store[0].n_params:
            raise ValueError(f"checkpoint {index} has {n_params} parameters but checkpoint 0 had "
                             f"{self.store[0].n_params}; every checkpoint must be of the same model")
        structure = self.backend.structure(prepared) if hasattr(self.backend, "structure") else None
        if index and structure != self.store[0].structure:
            raise ValueError(f"checkpoint {index} has a different parameter structure than checkpoint 0 "
                             f"({structure} vs {self.store[0].structure}); every checkpoint must have the "
                             "same parameter names, nesting and shapes")
        fingerprint = self._fingerprint(n_params, structure)
        writer = self.store.writer(index, fingerprint)
        if self.executor is not None:
            data = list(batches(data))
            writer.needs_template = writer.template is None
        if getattr(writer, "needs_template", False):  # resuming: one example tells namespace, device, dtype
            data = iter(batches(data))
            first = next(data, None)
            if first is not None:
                one = (first[0][:1, ...], first[1][:1, ...])
                writer.template = self._batch_features(prepared, index, *one, f"checkpoint {index}, batch 0")[0]
                data = itertools.chain([first], data)
        if writer.complete and hasattr(writer, "check_rows"):  # stored: only check that the data is the same size
            writer.check_rows(sum(_check_lengths(i, lab, f"checkpoint {index}, batch {b}")
                                  for b, (i, lab) in enumerate(batches(data))))
        if not writer.complete and self.executor is not None:
            self._featurize_distributed(checkpoint, index, list(data), writer)
        elif not writer.complete:
            for phi, q in self._stream_features(prepared, index, data, skip=writer.rows_done):
                writer.append(phi, q)
        features, q_all, kernel = writer.finish()
        if features is None:
            raise ValueError("featurize: data yielded no batches; pass an iterable of (inputs, labels)")
        if index and features.shape[0] != self.n_train:
            writer.discard()
            raise ValueError(f"checkpoint {index} saw {features.shape[0]} training examples but checkpoint 0 "
                             f"saw {self.n_train}; featurize every checkpoint on the same training set")
        factor = self._factorize(kernel, features.shape[0], n_params, index)
        del kernel  # the entry re-reads or recomputes it when lambda changes (refit); only the factor is held
        self.store.add(CheckpointEntry(index, prepared, n_params, features, q_all, factor, structure,
                                       getattr(writer, "kernel_loader", None)))

    def _featurize_distributed(self, checkpoint: Any, index: int, data: list, writer: Any) -> None:
        from .disk_store import _to_numpy

        offsets, total = [], 0
        for b, (inputs, labels) in enumerate(data):
            offsets.append(total)
            total += _check_lengths(inputs, labels, f"checkpoint {index}, batch {b}")
        if not total:
            return
        template = _to_numpy(writer.template)
        writer.allocate(total, template.shape[1], template.dtype, template.dtype)
        self.executor.featurize(self, checkpoint, index, data, writer, total, offsets)

    def worker_copy(self) -> "TRAK":
        """This configuration without its store or executor: what a worker process needs."""
        clone = copy.copy(self)
        clone.store, clone.executor, clone.progress = open_store(None), None, False
        return clone

    def _fingerprint(self, n_params: int, structure: Any) -> dict[str, Any]:
        """What must not change between runs sharing a store (checked by on-disk stores)."""
        import hashlib

        from . import __version__

        return {"proj_type": self.proj_type, "proj_dim": self.proj_dim, "seed": self.seed, "task": self.task.name,
                "n_params": n_params, "parameter_structure": hashlib.sha256(repr(structure).encode()).hexdigest()[:16],
                "normalize_features": self.normalize_features, "backend": self.backend.name,
                "precision": self.precision,
                "trak_core": __version__}

    def _factorize(self, kernel: Any, n_train: int, n_params: int, index: int) -> kernel_ops.KernelFactor:
        xp = namespace(kernel)
        lam = self.lambda_reg
        if lam == "auto":
            lam = choose_lambda(kernel, n_train, n_params=n_params, xp=xp)
        factor = kernel_ops.factorize(kernel, lam, xp=xp)
        log.info("checkpoint %d: %d examples, k=%d, lambda=%.4g%s, kernel rank %d", index, n_train,
                 kernel.shape[0], lam, " (auto)" if self.lambda_reg == "auto" else "", factor.rank)
        return factor

    @property
    def lambdas(self) -> list[float]:
        """The ridge ``lambda`` used for each featurized checkpoint."""
        return [entry.factor.lambda_reg for entry in self.store]

    def refit(self, lambda_reg: float | str) -> None:
        """Refactorize every featurized checkpoint's kernel with another ``lambda_reg`` (no re-featurizing)."""
        self.lambda_reg = _check_lambda(lambda_reg)
        for entry in self.store:
            entry.factor = self._factorize(entry.kernel, entry.features.shape[0], entry.n_params, entry.index)

    def score(self, data: Iterable[Any], *, checkpoints: Sequence[int] | None = None,
              save_as: str | None = None) -> Any:
        """Scores of every training example for every target, shape ``(n_train, n_targets)``.

        Parameters
        ----------
        data : iterable of (inputs, labels)
            The targets in batches; it is iterated once.
        checkpoints : sequence of int, optional
            Indices of the featurized checkpoints to ensemble (default: all of them).
        save_as : str, optional
            Also write the scores to the on-disk store under this name (``scores/<name>``, chunked
            by rows); an existing name is an error, never overwritten.

        Returns
        -------
        array
            In the namespace, dtype and on the device of the features, averaged over the
            checkpoints (``docs/estimator.md``).
        """
        if not len(self.store):
            raise ValueError("score() called before any featurize(); featurize at least one checkpoint first")
        entries = self._entries(checkpoints)
        columns = []
        for b, (inputs, labels) in enumerate(progress(batches(data), desc="score", enabled=self.progress)):
            per_checkpoint = []
            for entry in entries:
                target, _ = self._batch_features(entry.prepared, entry.index, inputs, labels,
                                                 f"targets batch {b}, checkpoint {entry.index}")
                xp = namespace(target)
                if self.executor is not None:
                    weights = target_weights(entry.factor, target, xp=xp)
                    per_checkpoint.append(self.executor.products(self, entry, weights))
                else:
                    per_checkpoint.append(checkpoint_scores(entry.features, entry.factor, target, xp=xp))
            block = ensemble(per_checkpoint, [e.out_to_loss for e in entries], xp=xp,
                             weighting=self.checkpoint_weighting)
            if self.soft_threshold is not None:
                block = soft_threshold(block, self.soft_threshold, xp=xp)
            columns.append(block)
        if not columns:
            raise ValueError("score: data yielded no batches; pass an iterable of (inputs, labels)")
        scores = xp.astype(columns[0] if len(columns) == 1 else xp.concat(columns, axis=1), self.store[0].features.dtype)
        if save_as is not None:
            if not hasattr(self.store, "save_scores"):
                raise ValueError("save_as needs an on-disk store: TRAK(..., store=PATH)")
            self.store.save_scores(save_as, scores)
        return scores

    def features(self, data: Iterable[Any], *, checkpoint: int = 0) -> Any:
        """Features ``phi_c(z)`` (projected gradients) of ``data`` at featurized checkpoint ``checkpoint``.

        For baselines such as a gradient dot product, or retrieval, on the same projection as the scores.
        """
        entry = self._entries([checkpoint])[0]
        parts = []
        for b, (inputs, labels) in enumerate(batches(data)):
            parts.append(self._batch_features(entry.prepared, entry.index, inputs, labels, f"batch {b}")[0])
        if not parts:
            raise ValueError("features: data yielded no batches; pass an iterable of (inputs, labels)")
        return parts[0] if len(parts) == 1 else namespace(parts[0]).concat(parts, axis=0)

    def _entries(self, checkpoints: Sequence[int] | None) -> list[CheckpointEntry]:
        if checkpoints is None:
            return list(self.store)
        chosen = list(checkpoints)
        bad = [c for c in chosen if not isinstance(c, int) or not 0 <= c < len(self.store)]
        if bad or not chosen:
            raise ValueError(f"checkpoints must be a non-empty list of indices in [0, {len(self.store) - 1}], "
                             f"got {checkpoints!r}")
        return [self.store[c] for c in chosen]
