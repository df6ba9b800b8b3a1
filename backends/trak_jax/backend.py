"""The JAX backend object: per-example gradients and projection in one jitted step.

The featurize step ``(params, inputs, labels, signs, R) -> (features, out_to_loss)`` is one
``jax.jit`` function: ``jax.vmap(jax.grad(f))`` over the batch, ravel in the canonical order,
flip by the checkpoint's row signs and multiply by the shared matrix ``R`` made by
:func:`trak_core.projection.cached_factors` (the reference projection, cached). Batches are padded
to a fixed size, so the step compiles once per (model, task, shapes), not once per batch.
When ``R`` does not fit the projection cache, the jitted step returns gradients and the core
projects them block by block.

dtypes: with ``jax_enable_x64`` off, JAX has no float64, so features, the kernel and its
factorization are float32; with it on, float64 params give float64 features and a float64 kernel.
"""
from __future__ import annotations

from typing import Any, Callable

from .checkpoint import JaxCheckpoint, snapshot

__all__ = ["JaxBackend", "JaxModel"]


class JaxModel:
    """A JAX model: a pure function ``apply(params, inputs) -> outputs`` of shape (batch, n_outputs).

    Wrapping the function lets :class:`trak_core.TRAK` infer the ``"jax"`` backend from the model.
    For Flax ``linen``: ``JaxModel(module.apply)`` with checkpoints ``{"params": ...}``. For Flax
    ``nnx`` and Equinox: split the module into a static graph and a params pytree and pass
    ``apply = lambda params, x: nnx.merge(graphdef, params)(x)`` (or ``eqx.combine``).
    """

    def __init__(self, apply: Callable[[Any, Any], Any]) -> None:
        if not callable(apply):
            raise TypeError(f"apply must be a function (params, inputs) -> outputs, got {type(apply).__name__}")
        self.apply = apply


def _not_jittable(exc: Exception) -> TypeError:
    return TypeError(f"the model's apply function is not jittable ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
                     "Write apply(params, inputs) with jax.numpy operations only: no Python `if`/`for` on "
                     "array values (use jnp.where or jax.lax.cond), no NumPy or float() on traced arrays")


class JaxBackend:
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
    """

    name = "jax"
    framework = "jax"
    extra = "jax"
    can_gradients = True
    has_fused_projection = True

    def __init__(self, batch_size: int | None = None, matmul_precision: str | None = "float32") -> None:
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        choices = ("float32", "tensorfloat32", "bfloat16", "highest", "high", "default")
        if matmul_precision is not None and matmul_precision not in choices:
            raise ValueError(f"matmul_precision must be None or one of {choices}, got {matmul_precision!r}")
        self.batch_size, self.matmul_precision = batch_size, matmul_precision
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
        raise TypeError(f"the JAX backend needs a JaxModel or an apply(params, inputs) function, "
                        f"got {type(model).__name__}")

    def prepare(self, model: Any, checkpoint: Any) -> JaxCheckpoint:
        self._apply(model)
        return snapshot(checkpoint)

    def n_params(self, prepared: JaxCheckpoint) -> int:
        return prepared.n_params

    def structure(self, prepared: JaxCheckpoint) -> tuple:
        return prepared.structure

    def _step(self, apply: Callable, task: Any, project: bool) -> Any:
        key = (apply, task, project)
        if key not in self._steps:
            import array_api_compat
            import jax
            import jax.numpy as jnp

            xp = array_api_compat.array_namespace(jnp.zeros(1))

            def output(params: Any, x: Any, y: Any) -> Any:
                out = apply(params, x[None])
                return task.output(jnp.reshape(out, (1, -1)), y[None], xp=xp)[0]

            def step(params: Any, inputs: Any, labels: Any, signs: Any, shared: Any) -> tuple[Any, Any]:
                self.compilations += 1  # runs only while tracing
                if self.matmul_precision is None:
                    return traced(params, inputs, labels, signs, shared)
                with jax.default_matmul_precision(self.matmul_precision):  # read while tracing
                    return traced(params, inputs, labels, signs, shared)

            def traced(params: Any, inputs: Any, labels: Any, signs: Any, shared: Any) -> tuple[Any, Any]:
                logits = apply(params, inputs)
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
                raise TypeError(f"{what} are torch tensors: the JAX backend takes JAX or NumPy arrays; convert "
                                "with jnp.asarray(tensor.cpu().numpy()) or use backend='torch'")
        inputs = jax.device_put(jnp.asarray(inputs), prepared.device)
        labels = jax.device_put(jnp.asarray(labels), prepared.device)
        try:
            shape = jax.eval_shape(self._apply(model), prepared.params, inputs)
        except jax.errors.JAXTypeError as exc:
            raise _not_jittable(exc) from None
        if len(shape.shape) not in (1, 2) or shape.shape[0] != inputs.shape[0]:
            raise ValueError(f"the model's output must have shape (batch, n_outputs), got {tuple(shape.shape)} "
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
