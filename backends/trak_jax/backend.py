"""The JAX backend object: per-example gradients and projection in one jitted step.

The featurize step ``(params, inputs, labels, signs, R) -> (features, out_to_loss)`` is one
``jax.jit`` function: ``jax.vmap(jax.grad(f))`` over the batch (over every array of a dict batch),
with respect to the selected leaves of ``params`` (``JaxBackend(params=...)``; the others enter as
constants), ravel in the canonical order,
flip by the checkpoint's row signs and multiply by the shared matrix ``R`` made by
:func:`trak_core.projection.cached_factors` (the reference projection, cached). Batches are padded
to a fixed size, so the step compiles once per (model, task, shapes), not once per batch.
When ``R`` does not fit the projection cache, the jitted step returns gradients and the core
projects them block by block.

The logits are taken from what the apply function returns by :func:`output_logits`, with the
shape the task asks for (``task.logits_ndim``: ``(n, n_outputs)`` or ``(n, sequence, vocabulary)``).

dtypes: with ``jax_enable_x64`` off, JAX has no float64, so features, the kernel and its
factorization are float32; with it on, float64 params give float64 features and a float64 kernel.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

from trak_core.backends import Backend
from trak_core.errors import TrakTypeError, TrakValueError
from trak_core.fingerprints import parameters_digest
from trak_core.outputs import select_logits

from .checkpoint import JaxCheckpoint, check_selection, snapshot

__all__ = ["JaxBackend", "JaxModel", "output_logits"]


_LOGITS_FN_HINT = "pass logits_fn (model output -> logits array) to the backend: JaxBackend(logits_fn=...)"


def output_logits(output: Any, logits_fn: Callable[[Any], Any] | None = None) -> Any:
    """The logits array in what a model's apply function returned (:func:`trak_core.outputs.select_logits`)."""
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
    :func:`output_logits`, and ``JaxBackend(logits_fn=...)`` for other layouts).

    Wrapping the function lets :class:`trak_core.TRAK` infer the ``"jax"`` backend from the model.
    For Flax ``linen``: ``JaxModel(module.apply)`` with checkpoints ``{"params": ...}``. For Flax
    ``nnx`` and Equinox: split the module into a static graph and a params pytree and pass
    ``apply = lambda params, x: nnx.merge(graphdef, params)(x)`` (or ``eqx.combine``).
    """

    def __init__(self, apply: Callable[[Any, Any], Any]) -> None:
        if not callable(apply):
            raise TrakTypeError(f"apply must be a function (params, inputs) -> outputs, got {type(apply).__name__}")
        self.apply = apply


def _tree_rows(inputs: Any, start: int, stop: int) -> Any:
    """Rows ``start .. stop-1`` of an array or of every array of a dict batch."""
    if isinstance(inputs, Mapping):
        return {key: value[start:stop] for key, value in inputs.items()}
    return inputs[start:stop]


def _pad(value: Any, size: int) -> Any:
    """``value`` with copies of its first row appended up to ``size`` rows (same shapes: no recompilation)."""
    import jax.numpy as jnp

    rows = value.shape[0]
    return value if rows == size else jnp.concatenate([value, jnp.repeat(value[:1], size - rows, axis=0)])


_EXPECTED = {2: "(batch, n_outputs)", 3: "(batch, sequence, vocabulary)"}


def _logits_shape_error(task: Any, shape: tuple, n: int) -> TrakValueError:
    expected = _EXPECTED.get(task.logits_ndim, "(batch, ...)")
    return TrakValueError(f"task {task.name!r} needs the model's output with shape {expected}, got {shape} for a "
                          f"batch of {n}; make apply return one row per example (or pass logits_fn=)")


def _not_jittable(exc: Exception) -> TypeError:
    return TypeError(f"the model's apply function is not jittable ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                     "Write apply(params, inputs) with jax.numpy operations only: no Python `if`/`for` on "
                     "array values (use jnp.where or jax.lax.cond), no NumPy or float() on traced arrays")


class JaxBackend(Backend):
    """Per-example gradients for JAX models (:class:`JaxModel` or, with ``backend="jax"``, any apply function).

    Parameters
    ----------
    batch_size : int, optional
        Examples per compiled step; batches are padded up to it (or split), so the step compiles
        once. Default: the size of the first batch seen of more than one example (after a
        one-example call, such as the Ray driver's first, the step compiles once more).
    matmul_precision : str or None
        ``jax.default_matmul_precision`` inside the step (the model's matrix products and
        convolutions, their gradients, and the product with a cached projection matrix). Default
        ``"float32"``: on GPUs JAX would otherwise multiply float32 in TF32 (10-bit mantissas),
        and gradients would differ from the other backends by about 1e-3. ``None`` keeps JAX's
        default (faster on GPUs, TF32-grade); ``"tensorfloat32"`` and ``"bfloat16"`` ask for it.
    logits_fn : callable, optional
        The apply function's output -> the logits array ``(batch, n_outputs)`` (``(batch, sequence,
        vocabulary)`` for language models), traced inside the jitted step. Default: the rule of
        :func:`output_logits` (an array; a tuple's first element; a mapping's ``"logits"``; an
        object's ``.logits``). It runs on the whole batch and, under ``vmap``, on one example, so it
        must only select or reshape, not mix rows.
    params : sequence of str or callable, optional
        Leaves of the params pytree to attribute through: path strings (``jax.tree_util.keystr`` of
        each leaf's path, e.g. ``"[2]"`` or ``"['head']['kernel']"``) or a predicate ``(path, leaf)
        -> bool``. Default: all. The others enter the model as constants (not differentiated); the
        gradient vector holds the selected leaves in tree-leaf order, each flattened row-major.

    Notes
    -----
    Dict batches: ``apply(params, inputs)`` receives the dict (less the labels' key) and
    ``jax.vmap`` maps over the first axis of every array in it; a short batch is padded in every
    array.
    """

    name = "jax"
    framework = "jax"
    extra = "jax"
    can_gradients = True
    has_fused_projection = True
    can_factorize = True

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
        self.params = params
        self._steps: dict[tuple, Any] = {}  # (apply, task, project, selected) -> [jitted step, compiled batch size]
        self.compilations = 0  # traces of the step function: how many times it was (re)compiled

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_steps"] = {}  # compiled steps stay in their process
        return state

    def owns(self, model: Any) -> bool:
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
        self._apply(model)
        return snapshot(checkpoint, self.params)

    def n_params(self, prepared: JaxCheckpoint) -> int:
        return prepared.n_params

    def structure(self, prepared: JaxCheckpoint) -> tuple:
        return prepared.structure

    def parameters_digest(self, prepared: JaxCheckpoint) -> str:
        import jax

        leaves = jax.tree_util.tree_leaves(prepared.params)
        return parameters_digest([(f"{i}:{prepared.structure!r}" if i == 0 else str(i), leaf)
                                  for i, leaf in enumerate(leaves)])

    def _step(self, apply: Callable, task: Any, project: bool, selected: tuple[int, ...] | None = None) -> Any:
        """``[jitted step, compiled batch size]`` of ``apply`` and ``task``; ``selected``: the indices of the
        leaves to differentiate (``None``: all)."""
        key = (apply, task, project, selected)
        if key not in self._steps:
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
                grads = jax.vmap(jax.grad(output), in_axes=(None, 0, 0))(chosen, inputs, labels)
                n = labels.shape[0]
                flat = jnp.concatenate([jnp.reshape(g, (n, -1)) for g in grads], axis=1)
                if project:
                    flat = (flat * signs) @ shared
                return flat, out_to_loss

            self._steps[key] = [jax.jit(step), self.batch_size]
        return self._steps[key]

    def _check_batch(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any) -> tuple:
        """``(inputs, labels, n)`` as JAX arrays on the params' device, checked against the model's output."""
        import array_api_compat
        import jax
        import jax.numpy as jnp

        if isinstance(inputs, Mapping):
            if not inputs:
                raise TrakValueError("the dict batch has no inputs (only the labels); apply needs at least one array")
            named = [(f"inputs[{key!r}]", value) for key, value in inputs.items()]
        else:
            named = [("inputs", inputs)]
        arrays = []
        for what, value in named + [("labels", labels)]:
            if type(value).__module__.split(".")[0] == "torch":
                raise TrakTypeError(f"{what} are torch tensors: the JAX backend takes JAX or NumPy arrays; convert "
                                    "with jnp.asarray(tensor.cpu().numpy()) or use backend='torch'")
            try:
                array = jnp.asarray(value)
            except TypeError as exc:
                raise TrakTypeError(f"{what} must be a JAX or NumPy array, got {type(value).__name__} "
                                    f"({str(exc).splitlines()[0]})") from None
            if array.ndim == 0:
                raise TrakValueError(f"{what} must have one row per example, got a scalar")
            arrays.append(jax.device_put(array, prepared.device))
        n = arrays[0].shape[0]  # rows: the first array's
        for (what, _), array in zip(named + [("labels", labels)], arrays):
            if array.shape[0] != n:
                raise TrakValueError(f"{what} has {array.shape[0]} rows but {named[0][0]} has {n}; every array of "
                                     "a batch needs one row per example")
        *values, labels = arrays
        inputs = dict(zip(inputs, values)) if isinstance(inputs, Mapping) else values[0]
        apply = self._apply(model)
        try:
            shape = jax.eval_shape(lambda params, x: output_logits(apply(params, x), self.logits_fn),
                                   prepared.params, inputs)
        except jax.errors.JAXTypeError as exc:
            raise _not_jittable(exc) from None
        except KeyError as exc:
            if not isinstance(inputs, Mapping):
                raise
            raise TrakValueError(f"apply(params, inputs) looked up {exc.args[0]!r}, which the dict batch does not "
                                 f"have: its inputs are {sorted(inputs)} (the labels' key is taken out)") from None
        shape = tuple(shape.shape)
        ndim = task.logits_ndim
        if not shape or shape[0] != n or (ndim == 2 and len(shape) not in (1, 2)) or \
                (ndim is not None and ndim != 2 and len(shape) != ndim):
            raise _logits_shape_error(task, shape, n)
        n_outputs = shape[-1] if len(shape) > 1 else 1
        task.check_labels(labels, n_outputs, xp=array_api_compat.array_namespace(labels))
        return inputs, labels, n

    def _run(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any,
             factors: tuple | None) -> tuple[Any, Any]:
        import jax
        import jax.numpy as jnp

        inputs, labels, n = self._check_batch(model, prepared, inputs, labels, task)
        selected = None if len(prepared.selected) == len(prepared.shapes) else prepared.selected
        entry = self._step(self._apply(model), task, factors is not None, selected)
        step, size = entry[0], entry[1] or n
        if self.batch_size is None and size == 1 < n:  # the first call had one row (the Ray driver's template, a
            size = n  # store's first row): compile once more for a real batch rather than run it a row per call
        entry[1] = size  # later batches are padded up to (or split into) the first real batch's size
        signs, shared = factors if factors is not None else (None, None)
        parts, weights = [], []
        for start in range(0, n, size):
            x, y = _tree_rows(inputs, start, start + size), labels[start:start + size]
            rows = y.shape[0]
            if rows < size:  # pad every array with copies of its first row: same shapes, no recompilation
                x, y = jax.tree_util.tree_map(lambda value: _pad(value, size), x), _pad(y, size)
            try:
                features, out_to_loss = step(prepared.params, x, y, signs, shared)
            except jax.errors.JAXTypeError as exc:
                raise _not_jittable(exc) from None
            parts.append(features[:rows])
            weights.append(out_to_loss[:rows])
        return jnp.concatenate(parts), jnp.concatenate(weights)

    def gradients(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any,
                  task: Any) -> tuple[Any, Any]:
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

        xp = array_api_compat.array_namespace(jnp.zeros(1, dtype=prepared.dtype))
        signs, shared, _ = cached_factors(prepared.n_params, k, seed=seed, checkpoint=checkpoint, kind=kind,
                                          offset=0, xp=xp, device=prepared.device, dtype=prepared.dtype)
        if shared is None:
            return None
        return self._run(model, prepared, inputs, labels, task, (signs, shared))

    def factorized_plan(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any, *,
                        k: int, options: Any) -> Any:
        """The layers found in the model's jaxpr and their share of ``k`` (:mod:`trak_jax.kronecker`)."""
        from . import kronecker

        return kronecker.plan(self, model, prepared, inputs, labels, task, k=k, options=options)

    def factorized_features(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any, *,
                            k: int, seed: int, checkpoint: int, options: Any) -> tuple[Any, Any]:
        """Factorized features ``(n, k)`` and out-to-loss weights in one jitted step (:mod:`trak_jax.kronecker`)."""
        from . import kronecker

        return kronecker.features(self, model, prepared, inputs, labels, task, k=k, seed=seed, checkpoint=checkpoint,
                                  options=options)

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """:func:`trak_core.project` (on GPUs: float16 tensor-core products of a split input).

        Used when the shared matrix does not fit the projection cache (otherwise :meth:`features`
        multiplies by the cached matrix inside the jitted step).
        """
        from trak_core.projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)
