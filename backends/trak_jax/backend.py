"""The JAX backend object: per-example gradients and projection in one jitted step.

The featurize step ``(params, inputs, labels, signs, R) -> (features, out_to_loss)`` is one
``jax.jit`` function: ``jax.vmap(jax.grad(f))`` over the batch, ravel in the canonical order,
flip by the checkpoint's row signs and multiply by the shared matrix ``R`` made by
:func:`trak_core.projection.cached_factors` (the reference projection, cached). Batches are padded
to a fixed size, so the step compiles once per (model, task, shapes), not once per batch.
When ``R`` does not fit the projection cache, the jitted step returns gradients and the core
projects them block by block.

The logits are taken from what the apply function returns by :func:`output_logits`.

dtypes: with ``jax_enable_x64`` off, JAX has no float64, so features, the kernel and its
factorization are float32; with it on, float64 params give float64 features and a float64 kernel.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from trak_core.backends import Backend
from trak_core.fingerprints import parameters_digest

from .checkpoint import JaxCheckpoint, snapshot
from trak_core.errors import TrakTypeError, TrakValueError

__all__ = ["JaxBackend", "JaxModel", "output_logits"]


_LOGITS_FN_HINT = "pass logits_fn (model output -> logits array) to the backend: JaxBackend(logits_fn=...)"


def output_logits(output: Any, logits_fn: Callable[[Any], Any] | None = None) -> Any:
    """The logits array in what a model's apply function returned (called while tracing).

    With ``logits_fn``, ``logits_fn(output)``. Otherwise: an array is used as is; a mapping (a dict,
    a Flax ``ModelOutput``) gives its ``"logits"`` key; another object with a ``logits`` attribute
    (a named tuple, a dataclass) gives that; a tuple or list gives its first element. Anything else
    is a ``TypeError`` that asks for a ``logits_fn``.
    """
    import jax
    import numpy as np

    arrays = (jax.Array, np.ndarray)
    if logits_fn is not None:
        logits = logits_fn(output)
        source = "logits_fn(output)"
    elif isinstance(output, arrays):
        return output
    elif isinstance(output, Mapping):
        if "logits" not in output:
            raise TrakTypeError(f"the model's output is a mapping ({type(output).__name__}) with keys {list(output)} "
                            f"and no 'logits'; {_LOGITS_FN_HINT}, e.g. logits_fn=lambda output: output[KEY]")
        logits, source = output["logits"], f"output['logits'] of a {type(output).__name__}"
    elif hasattr(output, "logits"):
        logits, source = output.logits, f"output.logits of a {type(output).__name__}"
    elif isinstance(output, (tuple, list)) and len(output) > 0:
        logits, source = output[0], f"output[0] of a {type(output).__name__}"
    else:
        raise TrakTypeError(f"the model's output has type {type(output).__name__}; expected an array, a tuple or "
                        f"list, a mapping with 'logits' or an object with .logits; {_LOGITS_FN_HINT}")
    if not isinstance(logits, arrays):
        raise TrakTypeError(f"{source} has type {type(logits).__name__}, not an array; {_LOGITS_FN_HINT}")
    return logits


class JaxModel:
    """A JAX model: a pure function ``apply(params, inputs) -> outputs`` of shape (batch, n_outputs).

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
        once. Default: the size of the first batch seen.
    matmul_precision : str or None
        ``jax.default_matmul_precision`` inside the step (the model's matrix products and
        convolutions, their gradients, and the product with a cached projection matrix). Default
        ``"float32"``: on GPUs JAX would otherwise multiply float32 in TF32 (10-bit mantissas),
        and gradients would differ from the other backends by about 1e-3. ``None`` keeps JAX's
        default (faster on GPUs, TF32-grade); ``"tensorfloat32"`` and ``"bfloat16"`` ask for it.
    logits_fn : callable, optional
        The apply function's output -> the logits array ``(batch, n_outputs)``, traced inside the
        jitted step. Default: the rule of :func:`output_logits` (an array; a tuple's first element;
        a mapping's ``"logits"``; an object's ``.logits``). It runs on the whole batch and, under
        ``vmap``, on one example, so it must only select or reshape, not mix rows.
    """

    name = "jax"
    framework = "jax"
    extra = "jax"
    can_gradients = True
    has_fused_projection = True

    def __init__(self, batch_size: int | None = None, matmul_precision: str | None = "float32",
                 logits_fn: Callable[[Any], Any] | None = None) -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise TrakValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        choices = ("float32", "tensorfloat32", "bfloat16", "highest", "high", "default")
        if matmul_precision is not None and matmul_precision not in choices:
            raise TrakValueError(f"matmul_precision must be None or one of {choices}, got {matmul_precision!r}")
        if logits_fn is not None and not callable(logits_fn):
            raise TrakTypeError(f"logits_fn must be a function (model output -> logits array), got "
                            f"{type(logits_fn).__name__}")
        self.batch_size, self.matmul_precision, self.logits_fn = batch_size, matmul_precision, logits_fn
        self._steps: dict[tuple, Any] = {}  # (apply, task, project) -> [jitted step, compiled batch size]
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
        return snapshot(checkpoint)

    def n_params(self, prepared: JaxCheckpoint) -> int:
        return prepared.n_params

    def structure(self, prepared: JaxCheckpoint) -> tuple:
        return prepared.structure

    def parameters_digest(self, prepared: JaxCheckpoint) -> str:
        import jax

        leaves = jax.tree_util.tree_leaves(prepared.params)
        return parameters_digest([(f"{i}:{prepared.structure!r}" if i == 0 else str(i), leaf)
                                  for i, leaf in enumerate(leaves)])

    def _step(self, apply: Callable, task: Any, project: bool) -> Any:
        key = (apply, task, project)
        if key not in self._steps:
            import array_api_compat
            import jax
            import jax.numpy as jnp

            xp = array_api_compat.array_namespace(jnp.zeros(1))

            def output(params: Any, x: Any, y: Any) -> Any:
                out = output_logits(apply(params, x[None]), self.logits_fn)
                return task.output(jnp.reshape(out, (1, -1)), y[None], xp=xp)[0]

            def step(params: Any, inputs: Any, labels: Any, signs: Any, shared: Any) -> tuple[Any, Any]:
                self.compilations += 1  # runs only while tracing
                if self.matmul_precision is None:
                    return traced(params, inputs, labels, signs, shared)
                with jax.default_matmul_precision(self.matmul_precision):  # read while tracing
                    return traced(params, inputs, labels, signs, shared)

            def traced(params: Any, inputs: Any, labels: Any, signs: Any, shared: Any) -> tuple[Any, Any]:
                logits = output_logits(apply(params, inputs), self.logits_fn)
                if logits.ndim == 1:
                    logits = logits[:, None]
                out_to_loss = task.out_to_loss(logits, labels, xp=xp)
                grads = jax.vmap(jax.grad(output), in_axes=(None, 0, 0))(params, inputs, labels)
                flat = jnp.concatenate([jnp.reshape(g, (inputs.shape[0], -1))
                                        for g in jax.tree_util.tree_leaves(grads)], axis=1)
                if project:
                    flat = (flat * signs) @ shared
                return flat, out_to_loss

            self._steps[key] = [jax.jit(step), self.batch_size]
        return self._steps[key]

    def _check_batch(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any) -> tuple:
        import array_api_compat
        import jax
        import jax.numpy as jnp

        for what, value in (("inputs", inputs), ("labels", labels)):
            if type(value).__module__.split(".")[0] == "torch":
                raise TrakTypeError(f"{what} are torch tensors: the JAX backend takes JAX or NumPy arrays; convert "
                                "with jnp.asarray(tensor.cpu().numpy()) or use backend='torch'")
        inputs = jax.device_put(jnp.asarray(inputs), prepared.device)
        labels = jax.device_put(jnp.asarray(labels), prepared.device)
        apply = self._apply(model)
        try:
            shape = jax.eval_shape(lambda params, x: output_logits(apply(params, x), self.logits_fn),
                                   prepared.params, inputs)
        except jax.errors.JAXTypeError as exc:
            raise _not_jittable(exc) from None
        if len(shape.shape) not in (1, 2) or shape.shape[0] != inputs.shape[0]:
            raise TrakValueError(f"the model's output must have shape (batch, n_outputs), got {tuple(shape.shape)} "
                             f"for a batch of {inputs.shape[0]}")
        n_outputs = 1 if len(shape.shape) == 1 else shape.shape[1]
        task.check_labels(labels, n_outputs, xp=array_api_compat.array_namespace(labels))
        return inputs, labels

    def _run(self, model: Any, prepared: JaxCheckpoint, inputs: Any, labels: Any, task: Any,
             factors: tuple | None) -> tuple[Any, Any]:
        import jax.numpy as jnp

        inputs, labels = self._check_batch(model, prepared, inputs, labels, task)
        n = inputs.shape[0]
        entry = self._step(self._apply(model), task, factors is not None)
        step, size = entry[0], entry[1] or n
        entry[1] = size  # later batches are padded up to (or split into) the first batch's size
        signs, shared = factors if factors is not None else (None, None)
        parts, weights = [], []
        for start in range(0, n, size):
            x, y = inputs[start:start + size], labels[start:start + size]
            rows = x.shape[0]
            if rows < size:  # pad with copies of the first row: same shapes, no recompilation
                x = jnp.concatenate([x, jnp.repeat(x[:1], size - rows, axis=0)])
                y = jnp.concatenate([y, jnp.repeat(y[:1], size - rows, axis=0)])
            try:
                features, out_to_loss = step(prepared.params, x, y, signs, shared)
            except Exception as exc:
                import jax

                if isinstance(exc, jax.errors.JAXTypeError):
                    raise _not_jittable(exc) from None
                raise
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

    def project(self, grads: Any, k: int, *, seed: int, checkpoint: int, kind: str,
                precision: str = "float32") -> Any:
        """:func:`trak_core.project` (on GPUs: float16 tensor-core products of a split input).

        Used when the shared matrix does not fit the projection cache (otherwise :meth:`features`
        multiplies by the cached matrix inside the jitted step).
        """
        from trak_core.projection import project

        return project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)
