"""The JAX backend object: per-example gradients and projection in one jitted step.

The featurize step ``(params, inputs, labels, signs, R) -> (features, out_to_loss)`` is one
``jax.jit`` function: ``jax.vmap(jax.grad(f))`` over the batch (over every array of a dict batch),
with respect to the selected leaves of ``params`` (``JaxBackend(params=...)``; the others enter as
constants), ravel in the canonical order,
flip by the checkpoint's row signs and multiply by the shared matrix ``R`` made by
``trak_core.projection.cached_factors`` (the reference projection, cached). The step's size is the
first batch's rows ``S``: larger batches are split into chunks of ``S`` rows, and a short chunk is
padded to the smallest of ``S``, ``ceil(S / 2)``, ``ceil(S / 4)``, ..., 1 that holds it
(``trak_jax.batch.bucket``), so the step compiles at most ``ceil(log2(S)) + 1`` times per (model,
task, shapes of one example: a sequence length is one), each only for a size a batch needs, and
pads a batch to less than twice its rows; ``JaxBackend(batch_size=...)`` pads every chunk to that
one size (one compilation). Each new batch size costs a few small compilations (padding, cropping:
``trak_jax.batch``), and each new batch shape one abstract trace of ``apply`` for the checks
(``trak_jax.checks``). When ``R`` does not fit the projection
cache, the jitted step returns gradients and the core projects them block by block.

The logits are taken from what the apply function returns by ``output_logits``, with the
shape the task asks for (``task.logits_ndim``: ``(n, n_outputs)`` or ``(n, sequence, vocabulary)``).

dtypes: with ``jax_enable_x64`` off, JAX has no float64, so features, the kernel and its
factorization are float32; with it on, float64 params give float64 features and a float64 kernel
(featurize and score in the same x64 setting: float64 params where x64 is off are an error).
Half-precision params (bfloat16, float16): gradients in the params' dtype, projected in float32
(float32 ``R``; the signs are exact in any dtype) to float32 features.
"""
from __future__ import annotations

import weakref

from collections.abc import Sequence
from typing import Any, Callable

from trak_core.backends import Backend
from trak_core.errors import TrakTypeError, TrakValueError
from trak_core.fingerprints import parameters_digest
from trak_core.outputs import select_logits

from .batch import check_stored_x64, check_x64, chunks, crop, device_batch
from .checkpoint import JaxCheckpoint, check_selection, snapshot
from .checks import OutputCheck, check_rows_apart, not_jittable, rows_apart, state_note
from .recent import Recent

__all__ = ["JaxBackend", "JaxModel", "output_logits"]

STEPS_KEPT = 8  # compiled steps (and Kronecker analyses) kept: one to three per model, the last models'


_LOGITS_FN_HINT = "pass logits_fn (model output -> logits array) to the backend: JaxBackend(logits_fn=...)"


def output_logits(output: Any, logits_fn: Callable[[Any], Any] | None = None) -> Any:
    """The logits array in what a model's apply function returned (``trak_core.outputs.select_logits``)."""
    import jax
    import numpy as np

    return select_logits(output, logits_fn, is_array=lambda value: isinstance(value, (jax.Array, np.ndarray)),
                         hint=_LOGITS_FN_HINT)


class JaxModel:
    """A JAX model: a pure function ``apply(params, inputs) -> outputs`` of shape (batch, n_outputs).

    ``inputs`` is an array, or for a dict batch (``{"input_ids": ..., "attention_mask": ...}``, as a
    tokenizer gives it) the dict of arrays less the labels' key. Language models return
    ``(batch, sequence, vocabulary)`` logits (``task="language_modeling"``).

    The outputs may also be a tuple, a mapping or an object holding the logits (see
    ``output_logits``, and ``JaxBackend(logits_fn=...)`` for other layouts).

    Wrapping the function lets ``trak_core.TRAK`` infer the ``"jax"`` backend from the model.
    For Flax ``linen``: ``JaxModel(module.apply)`` with checkpoints ``{"params": ...}``. For Flax
    ``nnx``: each checkpoint's ``(params, rest)`` of ``nnx.split(model, nnx.Param, ...)`` with
    ``apply = lambda state, x: nnx.merge(graphdef, *state)(x)`` and
    ``JaxBackend(params=lambda path, leaf: path.startswith("[0]"))`` (``rest``, the BatchNorm statistics,
    differs between checkpoints: closed over by ``apply``, one model's would serve all). For Equinox:
    ``eqx.partition`` the module into a params pytree and the static rest, joined by ``eqx.combine``.

    Parameters
    ----------
    apply : callable
        ``apply(params, inputs) -> outputs``, with ``params`` a checkpoint's pytree; traced under ``jax.jit``,
        on whole batches and, under ``jax.vmap``, on batches of one example.
    """

    def __init__(self, apply: Callable[[Any, Any], Any]) -> None:
        if not callable(apply):
            raise TrakTypeError(f"apply must be a function (params, inputs) -> outputs, got {type(apply).__name__}")
        self.apply = apply


class JaxBackend(Backend):
    """Per-example gradients for JAX models (``JaxModel`` or, with ``backend="jax"``, any apply function).

    Parameters
    ----------
    batch_size : int, optional
        Examples per compiled step, fixed: every batch is padded up to it (or split into chunks of it,
        the last padded), so the step compiles once. Default: the size ``S`` of the first batch seen
        of more than one example (or ``step_rows``), with a short chunk padded to the smallest of
        ``S``, ``ceil(S / 2)``, ``ceil(S / 4)``, ..., 1 that holds it (``trak_jax.batch.bucket``): at
        most ``ceil(log2(S)) + 1`` compilations, one per size a batch needs (after a one-example
        call, such as the Ray driver's first, ``S`` is the next batch's size).
    matmul_precision : {"float32", "tensorfloat32", "bfloat16", "highest", "high", "default"} or None
        ``jax.default_matmul_precision`` inside the step (the model's matrix products and
        convolutions, their gradients, and the product with a cached projection matrix). Default
        ``"float32"``: on GPUs JAX would otherwise multiply float32 in TF32 (10-bit mantissas),
        and gradients would differ from the other backends by about 1e-3. ``None`` keeps JAX's
        default (faster on GPUs, TF32-grade); ``"tensorfloat32"`` and ``"bfloat16"`` ask for it.
    logits_fn : callable, optional
        The apply function's output -> the logits array ``(batch, n_outputs)`` (``(batch, sequence,
        vocabulary)`` for language models), traced inside the jitted step. Default: the rule of
        ``output_logits`` (an array; a tuple's first element; a mapping's ``"logits"``; an
        object's ``.logits``). It runs on the whole batch and, under ``vmap``, on one example, so it
        must only select or reshape, not mix rows.
    params : sequence of str or callable, optional
        Leaves of the params pytree to attribute through: path strings (``jax.tree_util.keystr`` of
        each leaf's path, e.g. ``"[2]"`` or ``"['head']['kernel']"``) or a predicate ``(path, leaf)
        -> bool``. Default: all. The others enter the model as constants (not differentiated); the
        gradient vector holds the selected leaves in tree-leaf order, each flattened row-major.

    Attributes
    ----------
    step_rows : int or None
        ``S`` for steps made from now on where ``batch_size`` is ``None`` (default ``None``: the first batch's
        rows). ``TRAK.open`` and Ray workers set it, on a copy of the backend, to the training data's first
        batch's rows, so that they pad to the sizes of the process that featurized.
    compilations : int
        Traces of the step functions: how many times a step was (re)compiled.
    features_follow_params : bool
        ``True``: features are JAX arrays on the params' device, so ``TRAK.open`` takes their namespace from the
        params rather than from a one-row step (compiled for no real batch).

    Notes
    -----
    Dict batches: ``apply(params, inputs)`` receives the dict (less the labels' key) and
    ``jax.vmap`` maps over the first axis of every array in it; a short batch is padded in every
    array.
    """

    name = "jax"
    framework = "jax"
    features_follow_params = True
    extra = "jax"
    can_gradients = True
    has_fused_projection = True
    can_factorize = True
    step_rows: int | None = None  # also for a backend pickled before the attribute existed

    def __init__(self, batch_size: int | None = None, matmul_precision: str | None = "float32",
                 logits_fn: Callable[[Any], Any] | None = None,
                 params: Sequence[str] | Callable[[str, Any], bool] | None = None) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise TrakValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        choices = ("float32", "tensorfloat32", "bfloat16", "highest", "high", "default")
        if matmul_precision is not None and matmul_precision not in choices:
            raise TrakValueError(f"matmul_precision must be None or one of {choices}, got {matmul_precision!r}")
        if logits_fn is not None and not callable(logits_fn):
            raise TrakTypeError(f"logits_fn must be a function (model output -> logits array), got "
                                f"{type(logits_fn).__name__}")
        check_selection(params)
        self.batch_size, self.matmul_precision, self.logits_fn = batch_size, matmul_precision, logits_fn
        self.params, self.step_rows = params, None
        # (apply, task, project, selected) -> [jitted step, the step's size S]; bounded: the backend is one per
        # process, and each entry holds its apply (the user's model) alive
        self._steps: Recent = Recent(STEPS_KEPT)
        self._sizes: Any = weakref.WeakKeyDictionary()  # apply -> {rest of a step key: S}: see _step_size
        self.compilations = 0  # traces of the step function: how many times it was (re)compiled
        self._checks = OutputCheck()  # abstract traces of apply, per batch signature

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_steps"], state["_checks"] = Recent(STEPS_KEPT), OutputCheck()  # compiled steps and traces stay here
        state.pop("_sizes", None)  # made again on first use (_step_size): a WeakKeyDictionary does not pickle
        return state

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is a ``JaxModel`` (a bare apply function needs ``backend="jax"``)."""
        return isinstance(model, JaxModel)

    @staticmethod
    def _apply(model: Any) -> Callable:
        if isinstance(model, JaxModel):
            return model.apply
        if callable(model):
            return model
        raise TrakTypeError(f"the JAX backend needs a JaxModel or an apply(params, inputs) function, "
                            f"got {type(model).__name__}")

    def prepare(self, model: Any, checkpoint: Any) -> JaxCheckpoint:
        """A ``JaxCheckpoint``: the params pytree's leaves as JAX arrays, and the leaves selected by ``params``."""
        self._apply(model)
        return snapshot(checkpoint, self.params)

    def n_params(self, prepared: JaxCheckpoint) -> int:
        """Elements of the selected leaves (``params``)."""
        return prepared.n_params

    def structure(self, prepared: JaxCheckpoint) -> tuple:
        """See ``Backend.structure``: the pytree's structure, its leaves' shapes and the selected leaves' paths."""
        return prepared.structure

    def parameters_digest(self, prepared: JaxCheckpoint) -> str:
        """SHA-256 of every leaf, selected or not (a PRNG key by its bits), and of ``structure``."""
        import jax

        leaves = [jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
                  for leaf in jax.tree_util.tree_leaves(prepared.params)]  # PRNG keys (left out): their bits
        return parameters_digest([(f"{i}:{prepared.structure!r}" if i == 0 else str(i), leaf)
                                  for i, leaf in enumerate(leaves)])

    def check_stored_dtype(self, prepared: JaxCheckpoint, dtype: str) -> None:
        """Name the x64 setting where it differs from the one the store's features were made in (``batch``):
        with x64 off, float64 params are cast to float32 and their digest would blame other parameters."""
        check_stored_x64(prepared.dtype, dtype)

    def _step(self, apply: Callable, task: Any, project: bool, selected: tuple[int, ...] | None = None) -> Any:
        """``[jitted step, [apply, rest of its key, S or None]]`` of ``apply`` and ``task`` (``_step_size``);
        ``selected``: the indices of the leaves to differentiate (``None``: all)."""
        return self._steps.get_or_make((apply, task, project, selected), lambda: [
            self._make_step(apply, task, project, selected), [apply, (task, project, selected), None]])

    def _make_step(self, apply: Callable, task: Any, project: bool, selected: tuple[int, ...] | None) -> Any:
        """The jitted step of ``_step``."""
        import array_api_compat
        import jax
        import jax.numpy as jnp

        xp = array_api_compat.array_namespace(jnp.zeros(1))

        def per_example(params: Any) -> tuple[Callable, list]:
            """``f`` of one example as a function of the selected leaves (the others are constants)."""
            leaves, treedef = jax.tree_util.tree_flatten(params)
            indices = tuple(range(len(leaves))) if selected is None else selected

            def output(chosen: list, x: Any, y: Any) -> Any:
                full = list(leaves)
                for i, leaf in zip(indices, chosen):
                    full[i] = leaf
                one = jax.tree_util.tree_map(lambda value: value[None], x)
                out = output_logits(apply(jax.tree_util.tree_unflatten(treedef, full), one), self.logits_fn)
                out = jnp.reshape(out, (1, -1)) if task.logits_ndim == 2 else out
                return task.output(out, y[None], xp=xp)[0]

            return output, [leaves[i] for i in indices]

        def step(params: Any, inputs: Any, labels: Any, signs: Any, shared: Any) -> tuple[Any, Any]:
            self.compilations += 1  # runs only while tracing
            if self.matmul_precision is None:
                return traced(params, inputs, labels, signs, shared)
            with jax.default_matmul_precision(self.matmul_precision):  # read while tracing
                return traced(params, inputs, labels, signs, shared)

        def traced(params: Any, inputs: Any, labels: Any, signs: Any, shared: Any) -> tuple[Any, Any]:
            logits = output_logits(apply(params, inputs), self.logits_fn)
            if task.logits_ndim == 2 and logits.ndim == 1:
                logits = logits[:, None]
            out_to_loss = task.out_to_loss(logits, labels, xp=xp)
            output, chosen = per_example(params)
            alone, grads = jax.vmap(jax.value_and_grad(output), in_axes=(None, 0, 0))(chosen, inputs, labels)
            n = labels.shape[0]
            flat = jnp.concatenate([jnp.reshape(g, (n, -1)) for g in grads], axis=1)
            if project:  # half-precision gradients: float32 products and features (shared is float32)
                flat = (flat.astype(shared.dtype) * signs) @ shared
            together = task.output(logits, labels, xp=xp)  # each row's output in the batch: ``alone``'s where the
            return flat, out_to_loss, rows_apart(alone, together, logits)  # rows are apart

        return jax.jit(step)

    def _step_size(self, entry: list, n: int) -> int:
        """The size ``S`` of a step (``entry[1]``: ``[apply, rest of its key, S]``): ``batch_size``, else the size
        the step was given, else the size its key was given before it was dropped from the bounded cache and made
        again (kept per apply function while it lives: it took the calling batch's size, 1.7e-8 off the bits),
        else ``step_rows``, else its first batch of ``n > 1`` rows."""
        if self.batch_size is not None:
            return self.batch_size
        apply, rest, size = entry[1]
        try:
            sizes = self.__dict__.setdefault("_sizes", weakref.WeakKeyDictionary()).setdefault(apply, {})
        except TypeError:  # an apply that takes no weak reference: its size lives with its step only
            sizes = {}
        size = size or sizes.get(rest) or self.step_rows or n
        if size == 1 < n:  # the first call had one row (the Ray driver's template, a store's first row): S is the
            size = n  # first real batch's size, not one row per call
        entry[1][2] = sizes[rest] = size
        return size

    def _check_batch(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any) -> tuple:
        """``(inputs, labels, n)`` as JAX arrays on the params' device, checked against the model's output
        (``trak_jax.checks.OutputCheck``: ``apply`` is traced once per batch signature, not per batch)."""
        check_x64(prepared.dtype)
        given = labels  # as passed: a float64 NumPy array is float32 on the device with x64 off
        inputs, labels, n = device_batch(inputs, labels, prepared.device)
        self._checks.check(self._apply(model), self.logits_fn, prepared, inputs, labels, n, task, given)
        return inputs, labels, n

    def _run(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any,
             factors: tuple | None) -> tuple[Any, Any]:
        import jax
        import jax.numpy as jnp

        inputs, labels, n = self._check_batch(model, prepared, inputs, labels, task)
        selected = None if len(prepared.selected) == len(prepared.shapes) else prepared.selected
        entry = self._step(self._apply(model), task, factors is not None, selected)
        step, size = entry[0], self._step_size(entry, n)
        signs, shared = factors if factors is not None else (None, None)
        parts, weights, apart = [], [], []
        for x, y, rows, padded in chunks(inputs, labels, n, size, self.batch_size is None):  # short chunks padded
            # to a bucket of S (to S itself for a fixed batch_size): a few shapes, each compiled once
            try:
                outputs = step(prepared.params, x, y, signs, shared)
            except jax.errors.JAXTypeError as exc:
                raise not_jittable(exc) from None
            except Exception as exc:
                state_note(exc)
                raise
            apart.append(outputs[2])
            features, out_to_loss = crop(outputs[:2], rows, padded)
            parts.append(features)
            weights.append(out_to_loss)
        check_rows_apart(apart, prepared.dtype)  # once a batch: one read on the host, not one a chunk
        if len(parts) == 1:
            return parts[0], weights[0]
        return jnp.concatenate(parts), jnp.concatenate(weights)

    def gradients(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any,
                  task: Any) -> tuple[Any, Any]:
        """See ``Backend.gradients``: ``jax.vmap(jax.grad(f))`` in one jitted step, over padded chunks."""
        return self._run(model, prepared, inputs, labels, task, None)

    def features(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any, *,
                 k: int, seed: int, checkpoint: int, kind: str, precision: str = "float32") -> tuple[Any, Any] | None:
        """Projected features in one jitted step, or ``None`` when ``R`` does not fit the cache (or
        ``precision="fast"``, which the core's half-precision projection computes)."""
        if precision != "float32":
            return None
        import array_api_compat
        import jax.numpy as jnp
        from trak_core.projection import cached_factors

        check_x64(prepared.dtype)
        # half-precision params: float32 R, products and features (the signs are exact in any dtype)
        dtype = jnp.float32 if jnp.finfo(prepared.dtype).bits < 32 else prepared.dtype
        signs, shared, _ = cached_factors(prepared.n_params, k, seed=seed, checkpoint=checkpoint, kind=kind,
                                          offset=0, xp=array_api_compat.array_namespace(jnp.zeros(1)),
                                          device=prepared.device, dtype=dtype)
        if shared is None:
            return None
        return self._run(model, prepared, inputs, labels, task, (signs, shared))

    def factorized_plan(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any, *,
                        k: int, options: Any) -> Any:
        """The layers found in the model's jaxpr and their share of ``k`` (``trak_jax.kronecker``)."""
        from . import kronecker

        return kronecker.plan(self, model, prepared, inputs, labels, task, k=k, options=options)

    def factorized_features(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any, *,
                            k: int, seed: int, checkpoint: int, options: Any) -> tuple[Any, Any]:
        """Factorized features ``(n, k)`` and out-to-loss weights in one jitted step (``trak_jax.kronecker``)."""
        from . import kronecker

        return kronecker.features(self, model, prepared, inputs, labels, task, k=k, seed=seed, checkpoint=checkpoint,
                                  options=options)

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """``trak_core.project`` (on GPUs: float16 tensor-core products of a split input).

        Used when the shared matrix does not fit the projection cache (otherwise ``features``
        multiplies by the cached matrix inside the jitted step).
        """
        from trak_core.projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)
