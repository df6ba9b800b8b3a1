"""Reopening a finished on-disk store: ``trak_core.TRAK.open``.

One job: rebuild the estimator's configuration from the store, check every checkpoint against the
content hash stored with it, and load the stored features, out-to-loss weights and kernels when
they are first needed (by the first targets, which tell the namespace and device to read into, or by
any other use of the estimator: then the checkpoint's parameters tell them).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import TYPE_CHECKING, Any, Mapping, Sequence, TypeVar

from ._checks import _integer
from .disk_shared import check_configuration
from .errors import StoreDamagedError, StoreMismatchError, TrakTypeError, TrakValueError
from .kronecker import Kronecker
from .store import KERNEL_CHUNK_ROWS

if TYPE_CHECKING:
    from .backends import Backend
    from .tasks import Task

__all__ = ["Reopening", "open_trak", "load_opened"]

_Opened = TypeVar("_Opened", bound="Reopening")
_loading: "weakref.WeakKeyDictionary[Any, list]" = weakref.WeakKeyDictionary()  # estimator -> [lock, loader]
_guard = threading.Lock()


class Reopening:
    """The reopening half of ``trak_core.TRAK``: ``TRAK.open`` and the deferred loading of what it opened."""

    _opened: list

    @classmethod
    def open(cls: type[_Opened], path: Any, model: Any, checkpoints: Sequence[Any] | Mapping[int, Any], *,
             task: str | Task | None = None, backend: str | Backend | None = None,
             lambda_reg: float | str | None = None, progress: bool | None = None, soft_threshold: float | None = None,
             checkpoint_weighting: str = "uniform", executor: Any = None, label_key: str = "labels",
             kernel_dtype: str = "auto") -> _Opened:
        """Reopen a finished on-disk store to score new targets, without the training data.

        Parameters
        ----------
        path : str or os.PathLike
            The store written by ``TRAK(..., store=path)``.
        model
            The model, as when featurizing.
        checkpoints : sequence or mapping
            Every checkpoint the store holds, in featurization order, or a mapping ``{index: checkpoint}``
            to score with some of them (only those are loaded; ``score(checkpoints=...)`` and
            ``features(checkpoint=...)`` then take the store's indices, and ``featurize`` needs them all).
            Each is checked against the content hash stored with it (``StoreMismatchError`` if it differs).
        task, backend : optional
            As stored (a custom task must be passed again; a backend name may be replaced by an
            equivalent backend object).
        lambda_reg : float, "auto" or None
            ``None`` (default): the ``lambda`` each checkpoint was factorized with, so scores equal
            those of the original run bit for bit; ``lambda_reg`` reads what the store was featurized
            with ("auto" or the float), which checkpoints featurized into it later follow too.
        progress, soft_threshold, checkpoint_weighting, executor, label_key, kernel_dtype
            Scoring options, as in ``TRAK`` (the kernel is stored in the dtype it was made in: a float64
            one is cast down for ``"float32"``, a float32 one is made again from the features for ``"float64"``).

        Returns
        -------
        TRAK
            Ready for ``score``, ``self_influence`` and ``load_scores``; the features are
            read from the store in chunks as scoring needs them.
        """
        return open_trak(cls, path, model, checkpoints, task=task, backend=backend, lambda_reg=lambda_reg,
                         progress=progress, soft_threshold=soft_threshold,
                         checkpoint_weighting=checkpoint_weighting, executor=executor, label_key=label_key,
                         kernel_dtype=kernel_dtype)

    def _load_opened(self, example: tuple[Any, Any] | None) -> None:
        """Load the checkpoints of ``open``; ``example`` (one target row) sets the features' namespace, else the
        checkpoint's parameters do (NumPy where they hold no array)."""
        if self._opened:  # read without the lock: once loaded, every later call is one attribute read
            loading = _loading_state(self)
            if loading[1] == threading.get_ident():  # called by the loading itself: nothing more to load here
                return
            # the backend's lock of the model first (torch: trak_torch.locks.model_lock), then the loading lock: the
            # loading's gradient pass takes the model's lock, so a thread holding it (a user's forward under
            # model_lock, as docs/store.md says) that waited here for the loading lock deadlocked with the loader
            guard = getattr(self.backend, "model_lock", None)
            with guard(self.model) if callable(guard) else contextlib.nullcontext(), loading[0]:
                loading[1] = threading.get_ident()  # other threads wait for the checkpoints, not find some (or none)
                try:
                    load_opened(self, example)
                finally:
                    loading[1] = None


def _loading_state(trak: Any) -> list:
    """``[lock, id of the thread loading or None]`` of ``trak``'s deferred loading (kept outside the estimator,
    which is copied and pickled)."""
    with _guard:
        state = _loading.get(trak)
        if state is None:
            state = _loading[trak] = [threading.Lock(), None]
        return state


def open_trak(cls: type, path: Any, model: Any, checkpoints: Sequence[Any], *, task: Any, backend: Any,
              lambda_reg: Any, **options: Any) -> Any:
    """``cls`` configured as the store at ``path`` was written, its checkpoints checked (see ``TRAK.open``); each
    ``zarr.json`` of the store is read once (``disk_listing.reading``)."""
    from .disk_listing import reading

    with reading():
        return _open_trak(cls, path, model, checkpoints, task=task, backend=backend, lambda_reg=lambda_reg, **options)


def _open_trak(cls: type, path: Any, model: Any, checkpoints: Sequence[Any], *, task: Any, backend: Any,
               lambda_reg: Any, **options: Any) -> Any:
    from .disk_store import STORE_FORMAT, DiskStore

    store = DiskStore(path)
    config = store.configuration()
    if config is None:
        raise TrakValueError(f"no trak-core store at {path}: featurize with TRAK(..., store=path) first")
    if config.get("store_format") != STORE_FORMAT:
        raise StoreMismatchError(f"the store at {path} has format {config.get('store_format')!r}; this trak-core "
                                 f"reads format {STORE_FORMAT}: featurize again into a new store path")
    damaged = store.damaged_checkpoints()  # left out of the complete ones: named before a count is blamed
    for index in [_integer(key) for key in checkpoints] if isinstance(checkpoints, Mapping) else sorted(damaged):
        if index in damaged:
            raise StoreDamagedError(f"checkpoint {index} in {path} is damaged: {damaged[index]}; featurize it again "
                                    f"with its training data (the same calls, or featurize(..., index={index})), which "
                                    f"redoes it and leaves the others as they are; `trak-core store {path} --verify` "
                                    "lists every damaged part (nothing was changed)")
    stored, complete = store.stored_checkpoints(), store.complete_checkpoints()
    if not complete:
        raise TrakValueError(f"the store at {path} holds no complete checkpoint: featurize first"
                             f"{_interrupted(store)}")
    chosen = _chosen_checkpoints(checkpoints, stored, path, store, complete)
    if lambda_reg is None:  # checkpoints featurized later in this store follow the same rule as the stored ones
        setting = store.stored_lambda_setting()
        lambda_reg, keep_stored = ("auto" if setting is None else setting), True
    else:
        keep_stored = False
    trak = cls(model, task=config["task"] if task is None else task, proj_dim=config["proj_dim"],
               proj_type=Kronecker.from_description(config.get("kronecker")) if config["proj_type"] == "kronecker"
               else config["proj_type"], seed=config["seed"],
               backend=config["backend"] if backend is None else backend, store=store,
               normalize_features=config["normalize_features"], precision=config.get("precision", "float32"),
               lambda_reg=lambda_reg, **options)
    from .executors import fix_step_size

    rows = getattr(store, "first_batch_rows", lambda: None)()
    if rows is not None:  # JAX: its step compiled at the writer's size, not the targets' (XLA rounds by size)
        fix_step_size(trak, rows)
    digests: list[str] = []
    for index, checkpoint in chosen:
        pending = trak._open_checkpoint(checkpoint, index=index)
        if getattr(pending.writer, "damaged", False):
            raise StoreDamagedError(f"checkpoint {index} in {path} is damaged (a chunk of its features or out-to-loss "
                                    "weights fails its checksum); featurize it again with its training data, which "
                                    "redoes the damaged rows only")
        # a backend without parameters_digest (the protocol's default None; trak_cupy's PrecomputedGradients)
        # stores none: nothing to check, as when featurizing (Backend.parameters_digest)
        if not pending.writer.complete or (pending.writer.parameters_digest is None and pending.digest is not None):
            raise StoreMismatchError(f"checkpoint {index} in {path} is incomplete or has no parameters_sha256; "
                                     "featurize it again with its training data")
        if pending.digest is not None and pending.digest in digests:
            raise TrakValueError(f"checkpoints {chosen[digests.index(pending.digest)][0]} and {index} have the same "
                                 "parameters; pass each stored checkpoint once, in order")
        digests.append(pending.digest)
        check_configuration(path, index, pending.writer.group.attrs, store.root.attrs)
        trak._opened.append((pending, store.stored_lambda(index) if keep_stored else None))
    _check_same_data([pending for pending, _ in trak._opened], path)
    if keep_stored:
        _check_same_lambda_setting([pending for pending, _ in trak._opened], path)
    if [index for index, _ in chosen] != list(range(stored)):
        trak._subset_of = len(complete)
    return trak


def _check_same_data(opened: list, path: Any) -> None:
    """Refuse checkpoints featurized on different training data (jobs featurizing apart check theirs against the
    checkpoints complete when they began, not against those finished later)."""
    first = opened[0]
    for pending in opened[1:]:
        a, b = first.writer.data_checksums, pending.writer.data_checksums
        differing = sorted((int(c) for c in set(a) & set(b) if a[c] != b[c]))
        rows = (first.writer.rows_done, pending.writer.rows_done)
        if differing or rows[0] != rows[1]:
            what = (f"in rows {differing[0] * KERNEL_CHUNK_ROWS} on (data_checksums chunk {differing[0]})" if differing
                    else f"in length ({rows[0]} and {rows[1]} examples)")
            raise StoreMismatchError(f"checkpoints {first.index} and {pending.index} in {path} were featurized on "
                                     f"different training data, {what}: every checkpoint must see the same data in "
                                     f"the same order. Featurize checkpoint {pending.index} again on checkpoint "
                                     f"{first.index}'s data (delete its group c{pending.index} in {path} first), or "
                                     "open the store with a mapping {index: checkpoint} of the checkpoints that agree")


def _check_same_lambda_setting(opened: list, path: Any) -> None:
    """Refuse, where each checkpoint is to be scored with its stored ridge (``lambda_reg=None``), checkpoints
    featurized with other ``lambda_reg`` settings: jobs featurizing apart at once each found no complete checkpoint
    to check theirs against, and the scores would mix the ridges (one process refuses the second setting)."""
    settings = [(pending.index, pending.writer.group.attrs.get("lambda_setting")) for pending in opened
                if hasattr(getattr(pending.writer, "group", None), "attrs")]
    settings = [(index, setting) for index, setting in settings if setting is not None]  # older stores kept none
    for index, setting in settings[1:]:
        first, stored = settings[0]
        if setting != stored:
            raise StoreMismatchError(
                f"checkpoints {first} and {index} in {path} were featurized with lambda_reg={stored!r} and "
                f"lambda_reg={setting!r} (jobs featurizing apart at once with other settings): scored with their "
                f"stored ridges they would mix the two. Pass lambda_reg= to TRAK.open (lambda_reg={stored!r}: every "
                "checkpoint is refit with it), or open a mapping {index: checkpoint} of the checkpoints that agree")


def _interrupted(store: Any) -> str:
    """A sentence naming the checkpoint an interrupted run left unfinished in ``store``, or ``""``."""
    interrupted = store.interrupted_checkpoint()
    if interrupted is None:
        return ""
    index, rows = interrupted
    kept = f"with its first {rows} training rows written" if rows else "before its first chunk of rows was written"
    return (f" (checkpoint {index} was interrupted {kept}: run the same featurize call with TRAK(..., store=path) "
            "and its training data to finish it, then open the store)")


def _chosen_checkpoints(checkpoints: Any, stored: int, path: Any, store: Any,
                        complete: list[int]) -> list[tuple[int, Any]]:
    """``(store index, checkpoint)`` pairs in index order: every stored checkpoint (``0 .. stored - 1``) from a list,
    some of the ``complete`` ones (jobs featurizing apart may leave gaps) from a mapping ``{index: checkpoint}``; too
    many name an interrupted checkpoint of ``store``, or the gap before later complete ones."""
    if isinstance(checkpoints, Mapping) and any(isinstance(key, str) for key in checkpoints):
        raise TrakTypeError(f"checkpoints must be a list of every checkpoint the store holds, or a mapping {{index: "
                            f"checkpoint}} for some of them, got a {type(checkpoints).__name__} with string keys (one "
                            "checkpoint's state_dict?): pass [checkpoint] for a store of one")
    if isinstance(checkpoints, Mapping):
        pairs = []
        for key, checkpoint in checkpoints.items():
            index = _integer(key)
            if index is None or index not in complete:
                raise TrakValueError(f"checkpoints maps store indices to checkpoints; the store at {path} holds "
                                     f"{_held(complete)}, got the key {key!r}{_not_complete(index)}")
            pairs.append((index, checkpoint))
        if not pairs:
            raise TrakValueError("checkpoints is an empty mapping: pass {index: checkpoint} for at least one stored "
                                 "checkpoint")
        return sorted(pairs, key=lambda pair: pair[0])
    if isinstance(checkpoints, (str, bytes)) or hasattr(checkpoints, "shape") or not hasattr(checkpoints, "__iter__"):
        raise TrakTypeError(f"checkpoints must be a list of every checkpoint the store holds, in featurization order, "
                            f"or a mapping {{index: checkpoint}} for some of them, got a {type(checkpoints).__name__}: "
                            "pass [checkpoint] for a store of one")
    checkpoints = list(checkpoints)
    if len(checkpoints) != stored:
        later = [index for index in complete if index > stored]
        if later:  # jobs featurizing apart: "holds {stored} complete checkpoints" would miss the later ones
            raise TrakValueError(f"the store at {path} holds complete checkpoints {complete}, not every one from 0 "
                                 f"(got a list of {len(checkpoints)}): checkpoint {stored} is not complete, and "
                                 f"{later} are: jobs featurizing apart may still be running, or its job was interrupted"
                                 f" or refused (run its featurize(..., index={stored}) call again: it resumes); wait "
                                 "for them, or pass a mapping {index: checkpoint} of the complete ones")
        raise TrakValueError(f"the store at {path} holds {stored} complete checkpoints; pass all {stored}, in the "
                             f"order they were featurized (got {len(checkpoints)}), or a mapping {{index: checkpoint}} "
                             f"to score with some of them{_interrupted(store) if len(checkpoints) > stored else ''}")
    return list(enumerate(checkpoints))


def _not_complete(index: int | None) -> str:
    """Why a mapping's key is refused where it names a checkpoint not complete yet."""
    if index is None or index < 0:
        return ""
    return (f" (checkpoint {index} is not complete: its job may still be running, or was interrupted or refused; run "
            f"its featurize(..., index={index}) call again, which resumes, or leave it out of the mapping)")


def _held(complete: list[int]) -> str:
    """``checkpoints 0 to 4``, or ``checkpoints [0, 2, 3]`` where some are missing."""
    if complete == list(range(len(complete))):
        return f"checkpoints 0 to {len(complete) - 1}"
    return f"checkpoints {complete}"


def load_opened(trak: Any, example: tuple[Any, Any] | None) -> None:
    """Finish the checkpoints ``open_trak`` checked: one target row (or NumPy) sets the namespace, or, for a backend
    whose features are in its parameters' namespace, device and stored dtype (``features_follow_params``: JAX), the
    parameters do, with no row through the model (JAX compiled a one-row step for it, 1.1 s of XLA on a small
    MLP, that no real batch used). Each leaves
    ``trak._opened`` once its entry is in the store: a call that fails (targets the model refuses) leaves the rest
    to the next call, and the estimator counts every checkpoint all along (the caller holds the loading lock)."""
    import numpy as np

    from ._subnormal_rows import unnoted

    while trak._opened:
        pending, stored_lambda = trak._opened[0]
        writer = pending.writer
        template = None
        if example is None or getattr(trak.backend, "features_follow_params", False):  # no row through the model
            template = _template(pending.prepared, writer.stored_dtype or "float64", trak.proj_dim or pending.n_params)
        if template is None and example is not None:
            with unnoted():  # the row is scored with its batch: noted there, once
                template = trak._batch_features(pending.prepared, pending.index, *example,
                                                f"targets batch 0, checkpoint {pending.index}")[0]
        if template is None:
            template = np.zeros((1, trak.proj_dim or pending.n_params), dtype=np.dtype(writer.stored_dtype or
                                                                                        "float64"))
        writer.set_template(template)
        trak._close_checkpoint(pending, stored_lambda)
        trak._opened = trak._opened[1:]  # a new list: a copy of the estimator (worker_copy) keeps its own


def _template(prepared: Any, dtype: str, k: int) -> Any:
    """A ``(1, k)`` array of ``dtype`` in the namespace and on the device of the first array among the checkpoint's
    parameters, as its features are; ``None`` where they hold no array or the namespace lacks ``dtype`` there."""
    from ._namespace import device_of, has_float64, namespace

    leaf = _first_array(prepared, depth=0)
    if leaf is None:
        return None
    xp, device = namespace(leaf), device_of(leaf)
    wanted = getattr(xp, dtype, None)
    if wanted is None or (dtype == "float64" and not has_float64(xp, device)):
        return None
    return xp.zeros((1, k), dtype=wanted, device=device)


def _first_array(value: Any, depth: int) -> Any:
    """The first Array API array in a checkpoint snapshot (a dataclass, mapping or sequence of them)."""
    import array_api_compat

    if array_api_compat.is_array_api_obj(value):
        return value
    if depth > 4 or isinstance(value, (str, bytes, int, float)):
        return None
    children = (value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else
                vars(value).values() if hasattr(value, "__dict__") else ())
    for child in children:
        found = _first_array(child, depth + 1)
        if found is not None:
            return found
    return None
