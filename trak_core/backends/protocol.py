"""What a backend supplies (DESIGN.md, architecture): per-example gradients, optionally a projection.

One job: declare the ``Backend`` protocol and the errors the registry raises.
"""
from __future__ import annotations

import abc
from typing import Any, Iterable, Mapping

from ..errors import BackendError, MissingFrameworkError, TrakTypeError, TrakValueError, UnknownBackendError

__all__ = ["Backend", "BackendError", "UnknownBackendError", "MissingFrameworkError", "check_backend"]


class Backend(abc.ABC):
    """What a framework backend supplies to the estimator: subclass it and implement the abstract methods.

    Required: ``owns``, ``prepare``, ``n_params``, ``gradients``, and the class
    attribute ``name``. Optional, with the default behaviour shown: ``structure``,
    ``parameters_digest``, ``model_identity``, ``check_stored_dtype``, ``project``, ``features``, and
    ``factorized_plan`` and ``factorized_features`` (called only where ``can_factorize``). The estimator calls
    these methods and no others. Beyond the attributes below it reads only these optional ones, where present:
    ``model_lock`` (``TRAK.open``'s loading takes ``backend.model_lock(model)``, as trak_torch's does),
    ``features_follow_params`` (``TRAK.open`` reads the features' format from the parameters, as trak_jax's does),
    and ``batch_size`` and ``step_rows`` (the Ray executor sets ``step_rows`` on a copy where both are ``None``).

    Attributes
    ----------
    name : str
        The name users pass as ``backend=``.
    framework : str or None
        Top-level module of the framework (imported lazily, never by ``import trak_core``).
    extra : str or None
        The pip extra of the backend's distribution that installs the framework (for trak-core's own backends,
        ``pip install -e ".[<extra>]"`` in a checkout; error messages also name the framework's package).
    can_gradients : bool
        Whether ``gradients`` works (a projection-only backend says ``False``).
    has_fused_projection : bool
        Whether the estimator should call ``project`` (and ``features``) instead of the
        core's ``trak_core.project``.
    can_factorize : bool
        Whether ``factorized_plan`` and ``factorized_features`` work
        (``proj_type="kronecker"``, ``trak_core.kronecker``).
    """

    name: str = ""
    framework: str | None = None
    extra: str | None = None
    can_gradients: bool = True
    has_fused_projection: bool = False
    can_factorize: bool = False

    @abc.abstractmethod
    def owns(self, model: Any) -> bool:
        """Whether ``model`` belongs to this backend; must not import a framework not yet imported.

        Parameters
        ----------
        model : object
            A model given to ``TRAK`` without ``backend=`` (``trak_core.backends.infer_backend`` asks each backend).

        Returns
        -------
        bool
            ``True`` for a model of this backend's own types, else ``False`` (never an error: inference skips a
            plug-in whose ``owns`` raises, with a ``BackendPluginWarning``).
        """

    @abc.abstractmethod
    def prepare(self, model: Any, checkpoint: Any) -> Any:
        """A snapshot of ``checkpoint`` ready for ``gradients`` (later changes to it do not leak in).

        Parameters
        ----------
        model : object
            The estimator's model, as given to ``TRAK``.
        checkpoint : object
            One checkpoint as passed to ``TRAK.featurize`` or ``TRAK.open`` (a state dict, a params pytree, a
            flat vector: whatever this backend takes); Ray actors prepare their own copy.

        Returns
        -------
        object
            The prepared checkpoint, of any type, with copies of the parameters (training the same arrays further
            must not change it): the estimator keeps it and passes it back unchanged as ``prepared``. A store
            reopened with ``TRAK.open`` and loaded without a target batch takes its features' namespace and device
            from the first array found in it (through mappings, sequences and attributes).
        """

    @abc.abstractmethod
    def n_params(self, prepared: Any) -> int:
        """Number of parameters ``p`` the gradients of ``prepared`` have.

        Parameters
        ----------
        prepared : object
            What ``prepare`` returned.

        Returns
        -------
        int
            ``p``, the columns of ``gradients``: the same for every checkpoint (part of a store's configuration).
        """

    @abc.abstractmethod
    def gradients(self, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any) -> tuple[Any, Any]:
        """Per-example gradients of ``task.output``, shape (n, p), and ``task.out_to_loss``, shape (n,).

        Parameters
        ----------
        model : object
            The estimator's model.
        prepared : object
            What ``prepare`` returned for the checkpoint.
        inputs : array or mapping of str to array
            One batch's inputs as the data yields them, ``n`` rows: an array, or for a dict batch the mapping
            less its labels' key (``TRAK(label_key=...)``), every array with ``n`` rows. Left unchanged.
        labels : array
            The batch's labels, ``n`` rows (the estimator checked that inputs and labels have as many).
        task : Task
            The estimator's task (``trak_core.Task``): its ``output``, not the loss, is differentiated.

        Returns
        -------
        grads : array, shape (n, p)
            Row ``i``: the gradient of example ``i``'s ``task.output`` with respect to the parameters, in a fixed
            order the backend documents, ``p = n_params(prepared)``; of a real floating dtype, the checkpoint's
            (the estimator refuses one of fewer bits than every floating dtype in ``prepared``), in the backend's
            namespace and on its device.
        out_to_loss : array, shape (n,)
            ``task.out_to_loss`` of each example, finite.
        """

    def structure(self, prepared: Any) -> Any:
        """A description of the parameters (names, nesting, shapes) that every checkpoint must share.

        Parameters
        ----------
        prepared : object
            What ``prepare`` returned.

        Returns
        -------
        object
            Compared with ``!=`` to checkpoint 0's (a difference is a ``TrakValueError``); its ``repr`` is hashed
            into an on-disk store's configuration, so it must be the same in every process (no object ids).
            Default ``None``: only ``n_params`` is compared between checkpoints.
        """
        return None

    def parameters_digest(self, prepared: Any) -> str | None:
        """A content hash of the checkpoint's parameters (same values, same digest).

        The estimator records it per checkpoint, refuses to featurize the same checkpoint twice,
        and checks it when a store is reopened. Default ``None``: no such checks.

        Parameters
        ----------
        prepared : object
            What ``prepare`` returned.

        Returns
        -------
        str or None
            Equal for equal parameters, different otherwise (``trak_core.fingerprints.parameters_digest`` of
            the named arrays); ``None`` where there is nothing to hash.
        """
        return None

    def model_identity(self, model: Any) -> str | None:
        """What the model is made of, beyond its parameters: an on-disk store records it and refuses another.

        Parameters
        ----------
        model : object
            The estimator's model.

        Returns
        -------
        str or None
            Equal for models that compute the same function of their parameters (in every process: no object
            ids), different for another architecture with the same parameters (another activation, say); short
            and readable, since errors show it. Default ``None``: not recorded, not checked.
        """
        return None

    def check_stored_dtype(self, prepared: Any, dtype: str) -> None:
        """Raise where this process cannot make features of ``dtype``, the dtype a store holds this checkpoint's
        features in (reopened or resumed), from ``prepared``.

        Called before the stored ``parameters_digest`` is compared, so that a setting that changes the
        parameters' dtype (JAX casts float64 to float32 with ``jax_enable_x64`` off) is named with its fix
        rather than reported as other parameters. Default: no check.

        Parameters
        ----------
        prepared : object
            What ``prepare`` returned.
        dtype : str
            The NumPy name of the stored features' dtype: ``"float32"`` or ``"float64"``.
        """

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """``grads @ P_checkpoint``, equal to ``trak_core.project`` (same ``precision``) up to float rounding.

        Default: ``trak_core.project``. Called only for a backend with ``has_fused_projection``, with ``proj_dim`` set.

        Parameters
        ----------
        grads : array, shape (n, p)
            Per-example gradients from ``gradients``: the rows of one or several batches.
        k : int
            Projection dimension (``TRAK(proj_dim=...)``).
        seed, checkpoint : int
            Seed of the projection (``TRAK(seed=...)``) and index of the checkpoint: each has its own matrix.
        kind : {"rademacher", "gaussian"}
            Kind of the matrix (``TRAK(proj_type=...)``).
        precision : {"float32", "fast"}
            As in ``trak_core.project`` (``"fast"``: Rademacher only).

        Returns
        -------
        array, shape (n, k)
            ``grads @ trak_core.projection_matrix(p, k, seed=seed, checkpoint=checkpoint, kind=kind)``, in the
            namespace and on the device of ``grads``, in its dtype (float32 for float16 or bfloat16 gradients):
            the estimator checks the shape and the dtype.
        """
        from ..projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)

    def features(self, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, *, k: int, seed: int,
                 checkpoint: int, kind: str, precision: str = "float32") -> tuple[Any, Any] | None:
        """Projected features (n, k) and out-to-loss weights (n,) in one fused step, or ``None``.

        Default ``None``: the estimator calls ``gradients`` and projects them itself. A backend
        whose compiled step can multiply by the projection matrix (JAX) returns the features here.
        Called per batch, only for a backend with ``has_fused_projection`` and when ``proj_dim`` is set.

        Parameters
        ----------
        model, prepared : object
            As in ``gradients``.
        inputs : array or mapping of str to array
            As in ``gradients``.
        labels : array
            As in ``gradients``.
        task : Task
            As in ``gradients``.
        k, seed, checkpoint : int
            As in ``project``.
        kind : {"rademacher", "gaussian"}
            As in ``project``.
        precision : {"float32", "fast"}
            As in ``project``.

        Returns
        -------
        tuple of (array, array) or None
            ``(features, out_to_loss)``: features ``(n, k)`` equal to ``project`` of the batch's ``gradients`` up
            to float rounding (about 2e-4 relative at ``"fast"``, as ``trak_core.project``), real floating and
            finite; weights ``(n,)`` as in ``gradients``. ``None``: not here (JAX: ``"fast"``, or a matrix too
            large for the projection cache).
        """
        return None

    def factorized_plan(self, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, *, k: int,
                        options: Any) -> Any:
        """The ``trak_core.kronecker.KroneckerPlan`` of ``model`` at ``k`` (layers found on one example of the
        batch ``inputs``). Only for backends with ``can_factorize``; called once per prepared checkpoint in a
        process, with the first batch it featurizes or scores.

        Parameters
        ----------
        model, prepared : object
            As in ``gradients``.
        inputs : array or mapping of str to array
            As in ``gradients``.
        labels : array
            As in ``gradients``.
        task : Task
            As in ``gradients``.
        k : int
            The projection dimension the plan divides between the layers and the rest.
        options : Kronecker
            The factorized projection's options (``TRAK(proj_type=...)``; ``Kronecker()`` for ``"kronecker"``).

        Returns
        -------
        KroneckerPlan
            The layers' blocks and the rest (``trak_core.kronecker``). An on-disk store records its
            ``digest()`` and refuses another layout for the same checkpoint.
        """
        raise BackendError(f"backend {self.name!r} has no factorized projection (proj_type='kronecker'); use "
                           "proj_type='rademacher'")

    def factorized_features(self, model: Any, prepared: Any, inputs: Any, labels: Any, task: Any, *, k: int,
                            seed: int, checkpoint: int, options: Any) -> tuple[Any, Any]:
        """Features ``(n, k)`` of ``proj_type="kronecker"`` and out-to-loss weights ``(n,)``, without per-example
        gradients of the layers: they equal ``gradients @ explicit_matrix(plan)`` (``trak_core.kronecker``).
        Only for backends with ``can_factorize``.

        Parameters
        ----------
        model, prepared : object
            As in ``gradients``.
        inputs : array or mapping of str to array
            As in ``gradients``.
        labels : array
            As in ``gradients``.
        task : Task
            As in ``gradients``.
        k, seed, checkpoint : int
            As in ``factorized_plan`` (``k``) and ``project``.
        options : Kronecker
            As in ``factorized_plan``.

        Returns
        -------
        features : array, shape (n, k)
            Equal to the batch's ``gradients`` times ``trak_core.kronecker.explicit_matrix`` of the plan
            (``factorized_plan`` at this ``k`` and ``options``), ``seed`` and ``checkpoint``, up to float
            rounding; of a real floating dtype and finite.
        out_to_loss : array, shape (n,)
            As in ``gradients``.
        """
        raise BackendError(f"backend {self.name!r} has no factorized projection (proj_type='kronecker'); use "
                           "proj_type='rademacher'")


def check_backend(backend: Any) -> Backend:
    """``backend`` if it is a ``Backend`` with a name, else a ``TrakTypeError`` saying what to fix."""
    if not isinstance(backend, Backend):
        raise TrakTypeError(f"{backend!r} is not a trak_core Backend: subclass trak_core.Backend and implement "
                            "owns, prepare, n_params and gradients (docs/backends.md)")
    if not isinstance(backend.name, str) or not backend.name:
        raise TrakTypeError(f"backend {type(backend).__name__} needs a non-empty class attribute `name`")
    return backend


def batches(data: Iterable[Any], label_key: str = "labels") -> Iterable[tuple[Any, Any]]:
    """Yield ``(inputs, labels)`` pairs from ``data``, with a clear error for anything else.

    A batch is an ``(inputs, labels)`` pair, or a mapping of arrays as a Hugging Face tokenizer or
    collator returns it: its ``label_key`` entry is the labels, and the other entries are the
    inputs (a dict, passed to the model as keyword arguments).
    """
    if isinstance(data, tuple) and len(data) == 2 and (hasattr(data[0], "shape") or isinstance(data[0], Mapping)):
        raise TrakTypeError("data must be an iterable of (inputs, labels) batches, got a single "
                            "(inputs, labels) pair: wrap it in a list, e.g. [(inputs, labels)]")
    if isinstance(data, Mapping):
        raise TrakTypeError("data must be an iterable of batches, got a single dict batch: wrap it in a list, "
                            "e.g. [batch]")
    _check_loader(data)
    for i, batch in enumerate(data):
        if isinstance(batch, Mapping):
            if label_key not in batch:
                raise TrakTypeError(f"batch {i} is a mapping with keys {sorted(batch)} and no {label_key!r}: add "
                                    f"the labels under {label_key!r}, or pass label_key= to TRAK")
            yield {key: value for key, value in batch.items() if key != label_key}, batch[label_key]
            continue
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            extra = (f" of {len(batch)} elements; drop the others, e.g. ((x, y) for x, y, *_ in loader) for a dataset "
                     "that also yields indices") if isinstance(batch, (tuple, list)) and len(batch) > 2 else ""
            raise TrakTypeError(f"batch {i} must be an (inputs, labels) pair or a mapping with {label_key!r}, "
                                f"got {type(batch).__name__}{extra}")
        yield batch[0], batch[1]


# Samplers whose order changes between passes (torch.utils.data, matched by name: no framework import)
_SHUFFLING_SAMPLERS = ("RandomSampler", "SubsetRandomSampler", "WeightedRandomSampler")


def _check_loader(data: Any) -> None:
    """Refuse a data loader that shuffles, or that drops the examples of its last, incomplete batch.

    Scores have one row per training example (one column per target) in the order the data yields
    them; a shuffling loader gives another order at every pass, and ``drop_last`` leaves examples out,
    silently either way. Detected by duck typing on ``torch.utils.data.DataLoader``'s attributes: its
    ``sampler`` and ``batch_sampler``, and the samplers they wrap (a ``BatchSampler`` given as the
    ``sampler`` of a loader with ``batch_size=None``); a sampler of another kind is taken as ordered.
    """
    if not (hasattr(data, "sampler") and hasattr(data, "batch_sampler") and hasattr(data, "dataset")):
        return
    kind = type(data).__name__
    for sampler in _samplers(data):
        names = {cls.__name__ for cls in type(sampler).__mro__}
        if names & set(_SHUFFLING_SAMPLERS) or getattr(sampler, "shuffle", False) is True:  # DistributedSampler's flag
            raise TrakValueError(f"data is a {kind} with a shuffling sampler ({type(sampler).__name__}): the scores "
                                 "have one row per training example (one column per target) in the order the data "
                                 "yields them, and a shuffling loader yields another order at every pass. Pass a "
                                 f"{kind}(dataset, batch_size=..., shuffle=False)")
        if getattr(sampler, "drop_last", False) is True:
            dropped = _remainder(sampler)
            if dropped != 0:
                what = (f"the {dropped} examples of its last, incomplete batch" if dropped else
                        "the examples of its last, incomplete batch (how many is unknown: its dataset has no length)")
                raise TrakValueError(f"data is a {kind} with drop_last=True ({type(sampler).__name__}): {what} would "
                                     "be left out of the scores. Pass drop_last=False")


def _samplers(data: Any) -> list[Any]:
    """A loader's samplers: its ``sampler`` and ``batch_sampler``, and the ``sampler`` each wraps, to any depth."""
    found: list[Any] = []
    stack = [getattr(data, "batch_sampler", None), getattr(data, "sampler", None)]
    while stack:
        sampler = stack.pop()
        if sampler is None or any(sampler is seen for seen in found):
            continue
        found.append(sampler)
        stack.append(getattr(sampler, "sampler", None))
    return found


def _remainder(batch_sampler: Any) -> int | None:
    """Examples a batch sampler's last, incomplete batch leaves out: the length of the sampler it wraps modulo its
    batch size (``None`` where unknown: an iterable dataset's sampler has no length)."""
    try:
        return len(batch_sampler.sampler) % int(batch_sampler.batch_size)
    except Exception:
        return None
