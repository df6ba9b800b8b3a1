"""The public estimator class: ``TRAK(model).featurize(checkpoint, data)`` then ``.score(data)``.

One job: orchestrate a backend (gradients), the projection, the kernel and the store.
"""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Any, Iterable, Sequence

from ._apart import featurize_at
from ._checks import (_check_lambda, _check_lengths, _check_proj_dim, _check_seed, _resolve_backend, check_scorable,
                      chosen_entries, take_rows)
from ._featurizer import Featurizer
from ._namespace import namespace
from ._progress import length_of, progress
from ._reopen import Reopening
from ._subnormal_rows import reporting
from ._subnormal_scores import SubnormalTargets
from ._target_groups import add_columns, group_columns, join_columns, target_groups
from ._target_projection import TargetProjection
from .backends import Backend
from .backends.protocol import batches
from .errors import TrakValueError
from .executors import get_executor
from .kernel import check_kernel_dtype
from .kronecker import Kronecker
from .notices import once_per_call, warn
from .projection import KINDS, PRECISIONS
from .scores import Ensemble, checkpoint_scores, ensemble, finish_products, self_scores, soft_threshold, target_weights
from .stores import open_store
from .store import settling
from .tasks import Task, get_task

__all__ = ["TRAK"]

log = logging.getLogger("trak_core")

class TRAK(Featurizer, Reopening):
    """Attribute a model's predictions to its training examples with TRAK.

    Parameters
    ----------
    model
        The model, of a type some installed backend owns (e.g. a
        ``trak_core.models.MLP`` for the ``"numpy"`` backend).
    task : str or Task
        ``"classification"`` (margin output, ``Q = 1 - p_y``), ``"regression"``, ``"language_modeling"``
        (causal LMs), ``"seq2seq"`` (encoder-decoder LMs), ``"token_classification"`` (per-token labels), or a
        Task (``trak_core.CustomTask``).
    proj_dim : int or None
        Projection dimension ``k``; ``None`` keeps the raw gradients (the exact estimator).
    proj_type : {"rademacher", "gaussian", "kronecker"} or Kronecker
        Kind of random projection: dense (see ``trak_core.projection_matrix``), or factorized
        per layer (``"kronecker"``, or ``trak_core.kronecker.Kronecker`` for its options;
        ``trak_core.kronecker``): Linear, Conv2d and Embedding layers are projected without ever
        forming their per-example gradients (LoGra-style), which is much faster for large models.
        Needs a backend with ``can_factorize`` (torch, JAX).
    seed : int
        Seed of the projection; the matrices are a pure function of it.
    lambda_reg : "auto" or float
        The ridge in ``K = Phi^T Phi + lambda I``. ``"auto"`` (default) chooses it per checkpoint
        from the training features (``trak_core.regularization``); the chosen values are in
        ``lambdas`` and the log. A float is an absolute ``lambda >= 0``; ``0`` uses the
        minimum-norm solution when ``K`` is singular (solved through the ``n x n`` Gram matrix when
        ``n_train < k``; a warning only where the matrix factorized is rank-deficient).
    backend : str, Backend or None
        Backend name (see ``trak_core.available_backends``), object, or ``None`` to infer
        it from the model's type.
    store : None, str, os.PathLike or store object
        Where features live: ``None`` keeps them in memory; a directory path or fsspec URL
        (``"s3://..."``) is a resumable zarr v3 store (``trak_core.disk_store.DiskStore``,
        needs ``zarr``), reopened and checked against this configuration when it exists.
    progress : bool or None
        Show progress bars (with tqdm; ``True`` without it warns); ``None``: when stderr is a terminal or in
        a Jupyter notebook (widget bars with ipywidgets, else text bars). Bars go over
        ``featurize``'s batches (its shards with ``executor="ray"``) and the kernel's chunks, ``score``'s target
        batches and its passes over the checkpoints' features, ``refit``'s checkpoints and ``self_influence``'s
        row blocks; trak-core's warnings and log lines clear them first.
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
        Where featurization runs: this process, or Ray actors over row shards (needs ``store=path``; see
        ``trak_core.executors``): the same bits (NumPy float32: with the driver's BLAS on one thread, as actors').
    precision : {"float32", "fast"}
        Of the projection (``trak_core.project``): ``"float32"`` (default) is float32-grade
        everywhere, computed on GPUs as two float16 tensor-core products of a split input;
        ``"fast"`` is one float16 product (relative error about 2e-4, traker's fast_jl grade),
        Rademacher only. CPU results at the default are those of a float32 product.
    label_key : str
        The labels' key in dict batches (default ``"labels"``, as Hugging Face collators name it);
        the other keys are passed to the model as keyword arguments.
    kernel_dtype : {"auto", "float64", "float32"}
        Of the kernel (``Phi^T Phi``, or ``Phi Phi^T`` when ``n_train < k``), its factorization and the
        solves (``trak_core.kernel.work_dtype``). ``"auto"`` (default): float32 for float32 (or
        half-precision) features, float64 for float64 features, whenever ``lambda_reg == 0``, and when the
        float32 kernel is ill-conditioned at the ridge (``lambda_max / lambda_reg > AUTO_FLOAT32_MAX_RATIO``) or
        out of float32's range (made again in float64). ``"float64"`` is the reference (float32 where the
        namespace has no float64); ``"float32"`` keeps float32. A float32 kernel is made about twice as fast on
        CPUs; scores move by up to about ``1e-7 * lambda_max / lambda`` relative (7e-6 on the digits task at the
        automatic ridge, LDS unchanged: ``docs/choosing.md``).
        Not part of the store's configuration: a store written with one can be scored with the other.

    Notes
    -----
    ``featurize`` keeps a snapshot of each checkpoint, since scoring needs the targets'
    gradients at every checkpoint.

    Threads: ``score``, ``self_influence``, ``features`` and ``load_scores`` may run in several threads at once
    (a ``TRAK.open``'ed estimator's first call loads its checkpoints while the others wait); ``featurize`` and
    ``refit`` one at a time, with no other call on the estimator meanwhile. A torch model runs one gradient pass at
    a time (``trak_torch.locks``). The contract: ``docs/store.md``, "Threads".
    """

    def __init__(self, model: Any, *, task: str | Task = "classification", proj_dim: int | None = 2048,
                 proj_type: str | Kronecker = "rademacher", seed: int = 0, lambda_reg: float | str = "auto",
                 backend: str | Backend | None = None, store: Any = None, progress: bool | None = None,
                 normalize_features: bool = False, soft_threshold: float | None = None,
                 checkpoint_weighting: str = "uniform", executor: Any = None, precision: str = "float32",
                 label_key: str = "labels", kernel_dtype: str = "auto") -> None:
        self.proj_dim = _check_proj_dim(proj_dim)
        self.kronecker: Kronecker | None = None
        if isinstance(proj_type, Kronecker) or proj_type == "kronecker":
            self.kronecker = proj_type if isinstance(proj_type, Kronecker) else Kronecker()
            proj_type = "kronecker"
            if self.proj_dim is None:
                raise TrakValueError("proj_type='kronecker' needs a proj_dim (an integer); proj_dim=None keeps raw "
                                     "gradients, with proj_type='rademacher'")
        elif proj_type not in KINDS:
            raise TrakValueError(f"unknown proj_type {proj_type!r}; choose one of {KINDS + ('kronecker',)}")
        self.proj_type = proj_type
        if precision not in PRECISIONS:
            raise TrakValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
        if precision == "fast" and proj_type != "rademacher":
            why = ("Gaussian entries are not exact in float16" if proj_type == "gaussian" else
                   "the factorized projection has no float16 mode")
            raise TrakValueError(f"precision='fast' needs proj_type='rademacher' ({why}); use precision='float32' "
                                 f"with proj_type={proj_type!r}")
        if precision == "fast" and self.proj_dim is None:  # was ignored without a word (bit-identical scores)
            warn("precision='fast' rounds the projection's input to float16, and proj_dim=None projects nothing: "
                 "it has no effect; give a proj_dim, or leave precision at its default", UserWarning)
        self.precision = precision
        self.kernel_dtype = check_kernel_dtype(kernel_dtype)
        if not isinstance(label_key, str) or not label_key:
            raise TrakValueError(f"label_key must be a non-empty string, got {label_key!r}")
        self.label_key = label_key
        self.seed = _check_seed(seed)
        self.lambda_reg = _check_lambda(lambda_reg)
        self.model = model
        self.task = get_task(task)
        self.backend = _resolve_backend(backend, model)
        if self.kronecker is not None and not self.backend.can_factorize:
            raise TrakValueError(f"backend {self.backend.name!r} has no factorized projection (proj_type='kronecker'); "
                                 "use proj_type='rademacher', or the torch or JAX backend")
        if not self.backend.can_gradients:
            raise TrakValueError(f"backend {self.backend.name!r} cannot compute gradients (can_gradients=False); "
                                 "choose a backend for this model's framework")
        self.store, self.progress = open_store(store, progress), progress  # the store's bars: checksums on reopening
        self.normalize_features = bool(normalize_features)
        if soft_threshold is not None and (isinstance(soft_threshold, (str, bool)) or not 0 <= soft_threshold < 1):
            raise TrakValueError(f"soft_threshold is a quantile in [0, 1) (or None), got {soft_threshold!r}")
        self.soft_threshold = soft_threshold
        if checkpoint_weighting not in ("uniform", "normalized"):
            raise TrakValueError(
                f"checkpoint_weighting must be 'uniform' or 'normalized', got {checkpoint_weighting!r}")
        self.checkpoint_weighting = checkpoint_weighting
        self.executor = get_executor(executor)
        self._last_error = self._missing = None  # the last featurize's error (score()'s message); a new checkpoint's
        self._opened: list = []  # checkpoints of a store reopened with TRAK.open, loaded at the first score
        self._subset_of: int | None = None  # opened with some of a store's checkpoints: how many it holds
        self._refitting: float | str | None = None  # the lambda of a refit not finished yet (score() refuses)
        if self.executor is not None and self.store.location is None:
            raise TrakValueError("executor='ray' needs an on-disk store that every worker can reach: pass store=PATH")

    @property
    def n_checkpoints(self) -> int:
        """Number of checkpoints featurized so far."""
        self._load_opened(None)
        return len(self.store)

    @property
    def n_train(self) -> int | None:
        """Number of training examples (``None`` before the first ``featurize``)."""
        self._load_opened(None)
        return self.store[0].features.shape[0] if len(self.store) else None

    def __repr__(self) -> str:  # reads nothing: checkpoints opened but not loaded yet count too
        return (f"TRAK(backend={self.backend.name!r}, task={getattr(self.task, 'name', self.task)!r}, proj_dim="
                f"{self.proj_dim}, proj_type={self.proj_type!r}, lambda_reg={self.lambda_reg!r}, checkpoints="
                f"{len(self.store) + len(self._opened)}, store={self.store.location or 'memory'!r})")

    @once_per_call  # a warning of the model's outputs is said once per call, not per batch
    @reporting("training")  # normalize_features: subnormal rows, once per call
    def featurize(self, checkpoint: Any, data: Iterable[Any], *, index: int | None = None) -> None:
        """Compute and store the training features of one checkpoint.

        Parameters
        ----------
        checkpoint
            The parameters (a flat vector or mapping for analytic models; a state_dict or
            params pytree for framework backends). Call once per checkpoint.
        data : iterable of (inputs, labels)
            The training set in batches, in the same order for every checkpoint.
        index : int, optional
            The checkpoint's index (it seeds its projection). Default: the next one, ``len(checkpoints)``.
            With an on-disk store, a later index writes that checkpoint only, so that one job per checkpoint
            fills one store at once; ``TRAK.open`` then scores the store (``docs/store.md``).

        Raises
        ------
        TrakValueError
            On empty data, mismatched batch lengths, non-finite gradients, a checkpoint featurized
            already, a checkpoint or training set inconsistent with those featurized before, or an
            ``index`` that is negative, held already, or beyond the checkpoints without an on-disk store.
        StoreMismatchError
            When an on-disk store holds features of another configuration, other parameters for
            this checkpoint, or other training data (the message names the field); nothing
            stored is overwritten.
        TrakTypeError
            On data that is not batches of (inputs, labels), inputs the backend cannot take, or an ``index``
            that is not an int.
        TrakOSError
            When the store's directory cannot be written (another process writing it, a full disk).
        """
        self._started = False
        try:
            self._load_opened(None)  # a store reopened with open: its checkpoints first, then this one after them
            with settling(self.store):  # interrupted (Ctrl-C too): a write it cut short lands before this returns
                self._featurize(checkpoint, data) if index is None else featurize_at(self, checkpoint, data, index)
            self._last_error = self._missing = None
        except BaseException as exc:  # Ctrl-C too: a new checkpoint started is missing all the same
            # a call refused before it started (a duplicate, as when a cell's loop is run again after Ctrl-C) keeps
            # the record of a checkpoint interrupted before: the ensemble still lacks that one
            self._last_error, self._missing = exc, exc if self._started else self._missing
            raise

    def worker_copy(self) -> "TRAK":
        """This configuration without its store or executor: what a worker process needs.

        Returns
        -------
        TRAK
            A shallow copy (same model, task and backend) with an empty in-memory store, no executor, no bars.
        """
        clone = copy.copy(self)
        clone.store, clone.executor, clone.progress = open_store(None), None, False
        clone.__dict__.pop("_plans_checked", None)  # the checked checkpoint snapshots stay here
        return clone

    @once_per_call
    @reporting("target")
    def score(self, data: Iterable[Any], *, checkpoints: Sequence[int] | None = None,
              save_as: str | None = None) -> Any:
        """Scores of every training example for every target, shape ``(n_train, n_targets)``.

        Parameters
        ----------
        data : iterable of (inputs, labels)
            The targets in batches; it is iterated once.
        checkpoints : sequence of int, optional
            Indices of the featurized checkpoints to ensemble (default: all of them; after a ``featurize``
            that failed, name them, or featurize that checkpoint again: the ensemble would lack it).
        save_as : str, optional
            Also write the scores to the on-disk store under this name (``scores/<name>``, chunked
            by rows); an existing name is an error, never overwritten. A plain file name: not empty or only
            dots, no ``/`` or ``\\``, no leading ``__`` or surrounding spaces, at most 255 bytes in UTF-8, not
            ``zarr.json`` (in any case); refused before any target is scored.

        Returns
        -------
        array
            In the namespace, dtype and on the device of the features, averaged over the
            checkpoints (``docs/estimator.md``).
        """
        if save_as is not None:
            self.store.check_score_name(save_as)  # before any work: a bad name or an in-memory store
        total = length_of(data)
        data = iter(batches(data, self.label_key))
        first, skipped = next(data, None), 0
        while first is not None and _check_lengths(*first, f"targets batch {skipped}") == 0:  # empty: no targets
            first, skipped = next(data, None), skipped + 1
        if first is not None:
            self._load_opened((take_rows(first[0], 0, 1), first[1][:1, ...]))
            data = itertools.chain([first], data)
            del first  # the chain holds it until it is scored
        self._check_scorable(ensemble=checkpoints is None)
        entries = chosen_entries(self.store, checkpoints)
        columns, dtype = [], entries[0].features.dtype
        tiny = SubnormalTargets(entries, self.proj_dim)  # targets whose scores keep a few bits: warned of
        stream = progress(data, desc="score", enabled=self.progress,  # the leading empty batches were pulled
                          total=None if total is None else max(total - skipped, 0))
        n_train, width = entries[0].features.shape
        limit = group_columns(n_train, len(entries) * width)
        targets_of = TargetProjection(self, entries, limit)  # each batch's, all checkpoints: projected in groups
        for targets in target_groups(stream, targets_of.featurize, limit, skipped, targets_of.flush):
            xp = namespace(targets[0])  # one pass over each checkpoint's features per group of batches
            running = Ensemble([e.out_to_loss for e in entries], weighting=self.checkpoint_weighting)
            passes = progress(zip(entries, targets), desc="score: checkpoints", enabled=self.progress,
                              total=len(entries))  # the slow part, after the batch bar of the last group closed
            for entry, target in passes:  # a running sum: one checkpoint's block at a time
                if self.executor is not None:
                    weights = target_weights(entry.factor, target, xp=xp)
                    products = self.executor.products(self, entry, weights)
                    running.add(finish_products(entry.factor, products, xp=namespace(products)), xp=xp)
                else:
                    running.add(checkpoint_scores(entry.features, entry.factor, target, xp=xp), xp=xp)
            block = running.result(xp=xp)
            del running
            if self.soft_threshold is not None:
                block = soft_threshold(block, self.soft_threshold, xp=xp)
            # the features' dtype (float64 kernels' blocks were joined in float64 and then cast: 5x the result at the
            # peak), in pieces of rows that join_columns frees one at a time
            block = xp.astype(block, dtype, copy=False)  # the float64 block let go before it is cut
            tiny.note(targets, block, xp=xp)
            add_columns(columns, block, limit, xp=xp)
            del block
        if not columns:
            raise TrakValueError("score: data yielded no targets (no batches, or only empty ones: a generator, map or "
                                 "zip is used up by one pass); pass an iterable of (inputs, labels) batches: a list, "
                                 "or a generator made anew for each call")
        tiny.warn()
        scores = join_columns(columns, xp=xp)  # a piece at a time into the result (concat held it twice)
        if save_as is not None:
            with settling(self.store):
                self.store.save_scores(save_as, scores)
        return scores

    def self_influence(self, *, checkpoints: Sequence[int] | None = None) -> Any:
        """Each training example's score for itself as the target, shape ``(n_train,)``.

        The diagonal of ``score(training data)``, computed from the stored features in row blocks,
        without a target pass and without the ``n_train x n_train`` score matrix (where ``n_train < k`` the
        kernel is solved in n-space: the ``n_train x n_train`` Gram matrix is made, as for ``score``). A large
        value marks an example the model fits through its own gradient (memorized, mislabeled or atypical ones).

        Parameters
        ----------
        checkpoints : sequence of int, optional
            Indices of the featurized checkpoints to ensemble (default: all of them).

        Returns
        -------
        array
            In the namespace, dtype and device of the features (for a store opened with ``open``
            and not scored yet: those of the checkpoints' parameters, NumPy where they hold no array).
        """
        if self.checkpoint_weighting != "uniform" or self.soft_threshold is not None:
            raise TrakValueError("self_influence needs checkpoint_weighting='uniform' and soft_threshold=None: the "
                                 "others rescale each target's scores over all training examples; score the "
                                 "training set as targets and take the diagonal instead")
        self._load_opened(None)
        self._check_scorable("self_influence()", ensemble=checkpoints is None)
        entries = chosen_entries(self.store, checkpoints)
        xp = namespace(entries[0].out_to_loss)
        diagonals = [self_scores(entry.features, entry.factor, xp=xp, show=self.progress,
                                 desc=f"self-influence, checkpoint {entry.index}")[:, None] for entry in entries]
        block = ensemble(diagonals, [entry.out_to_loss for entry in entries], xp=xp, weighting="uniform")
        return xp.astype(block[:, 0], self.store[0].features.dtype)

    def saved_scores(self) -> list[str]:
        """Names of the score sets saved in the store with ``score(..., save_as=name)``.

        Returns
        -------
        list of str
            Sorted names of an on-disk store's finished sets (not interrupted ones); empty for an in-memory store.
        """
        return self.store.score_names()

    def load_scores(self, name: str, rows: Any = None, targets: Any = None) -> Any:
        """Scores saved with ``score(..., save_as=name)``, or some of their rows and targets (NumPy, checked).

        Parameters
        ----------
        name : str
            The ``save_as`` name (see ``saved_scores``).
        rows, targets : slice or array_like of int, optional
            Training rows and target columns to read, as NumPy takes them (``scores[rows][:, targets]``): a slice
            or a 1-D array of integer positions. ``None`` (default): all. An on-disk store reads only the chunks
            that hold ``rows``, each checked (``docs/store.md``); a float, a mask, a single integer, a step of 0,
            a 2-D array or a position out of range raise ``TrakTypeError``/``TrakValueError``.

        Returns
        -------
        numpy.ndarray
            Shape ``(n_train, n_targets)`` (or the rows and targets taken), in the dtype they were saved in; a
            chunk that fails its checksum raises ``StoreDamagedError``.
        """
        if rows is None and targets is None:  # a custom store's load_scores(name) keeps working
            return self.store.load_scores(name)
        return self.store.load_scores(name, rows=rows, targets=targets)

    def _check_scorable(self, what: str = "score()", *, ensemble: bool = False, uses_lambda: bool = True) -> None:
        check_scorable(self.store, self._last_error, what, missing=self._missing if ensemble else None)
        if uses_lambda and self._refitting is not None:  # a refit interrupted (Ctrl-C) part way: two lambdas
            raise TrakValueError(f"{what}: refit({self._refitting!r}) did not finish, so the checkpoints hold "
                                 f"different lambdas ({self.lambdas}); call refit({self._refitting!r}) again (or "
                                 "refit another value)")
