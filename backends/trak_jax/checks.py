"""The model's output on a batch, checked against the task once per (shapes, dtypes, structure).

One job: trace ``apply`` abstractly (``jax.eval_shape``) to check the logits' and the task
output's shapes and the labels before the jitted step runs, with errors that name the fix. The
trace is cached per (apply, logits_fn, task, params structure and dtypes, batch shapes and dtypes),
so a batch of a shape already seen costs no trace of the model (tracing a large model's apply
takes longer than running its compiled step).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

from trak_core.errors import TrakCoreError, TrakTypeError, TrakValueError
from trak_core.tasks import CustomTask

from .recent import Recent

__all__ = ["OutputCheck", "check_rows_apart", "logits_source", "not_jittable", "rows_apart", "state_note"]

MODELS_KEPT = 8  # apply functions whose traces are kept (every batch signature of each)
_EXPECTED = {2: "(batch, n_outputs)", 3: "(batch, sequence, vocabulary)"}


_LINEN_INFERENCE = ("call it in inference mode, e.g. JaxModel(lambda variables, x: module.apply(variables, x, "
                    "train=False)) where its __call__ takes a train flag")
_FLAX_NOTES = {  # flax.errors class names (matched by name: flax is not imported) -> what it means here, the fix
    "TraceContextError": ("the model updates its state while gradients are taken (nnx BatchNorm statistics, Dropout "
                          "RNG counts): call model.eval() before nnx.split(model, nnx.Param, ...) (docs/jax.md)"),
    "ScopeCollectionNotFound": ("the checkpoint lacks a variable collection the Flax linen module reads: pass the "
                                "whole variables dict module.init returns ({'params': ...} and, with BatchNorm, "
                                "'batch_stats'), not variables['params']; leave the batch statistics out of the "
                                "gradients with JaxBackend(params=lambda path, leaf: path.startswith(\"['params']\")) "
                                "(docs/jax.md)"),
    "ModifyScopeVariableError": ("the Flax linen module updates a variable collection while gradients are taken "
                                 "(BatchNorm with use_running_average=False: training mode), which it may not here; "
                                 f"{_LINEN_INFERENCE}, or BatchNorm(use_running_average=True)"),
    "InvalidRngError": ("the Flax linen module asks for an RNG (Dropout with deterministic=False: training mode); "
                        f"attribution runs the model deterministically: {_LINEN_INFERENCE}, or "
                        "Dropout(deterministic=True)"),
}

# linen variables that do not fit the module: these also get the structure note, which lists the leaves
_FLAX_STRUCTURE = ("ScopeCollectionNotFound", "ScopeParamNotFoundError", "ScopeParamShapeError")


def state_note(exc: Exception) -> None:
    """Say what to do about a Flax error raised inside apply: a model that updates its own state under JAX's
    transforms or runs in training mode, or linen variables without their collections."""
    note = _FLAX_NOTES.get(type(exc).__name__)
    if note is not None and hasattr(exc, "add_note"):
        exc.add_note(f"trak-core: {note}")


# the largest difference ``rows_apart`` measures that is taken as rounding: float32 (and wider) models agree to about
# 1e-6, a float32 model computing in bfloat16 to about 1e-3; half-precision params round each op to 2^-8 (bfloat16)
ROWS_APART_TOLERANCE = {16: 0.25}
ROWS_APART_DEFAULT = 5e-2  # 20x the largest rounding measured (2.3e-3, a float32 CNN computing in bfloat16)


def rows_apart(alone: Any, together: Any, logits: Any) -> Any:
    """Inside the jitted step: the largest difference between an example's output alone (``alone``, under
    ``vmap``) and its row's in the batch (``together``), over the row's scale: ``1 + |output| + T max|logit|``
    (``T`` positions of a sequence's logits; finite logits only). The logits' scale, not the output's: a margin
    cancels, and its rounding grows with the logits (a float32 CNN computing in bfloat16 was 0.022 of its margins,
    1e-3 of this)."""
    import jax.numpy as jnp

    n = together.shape[0]
    positions = 1
    for size in logits.shape[1:-1]:
        positions *= size
    magnitudes = jnp.abs(jnp.reshape(logits, (n, -1)))  # a class masked with -inf adds no rounding: left out, else
    largest = jnp.max(jnp.where(jnp.isfinite(magnitudes), magnitudes, 0), axis=1).astype(together.dtype)  # inf scale
    return jnp.max(jnp.abs(alone - together) / (1 + jnp.abs(together) + positions * largest))


def check_rows_apart(differences: list, dtype: Any) -> None:
    """Raise where the model output of an example computed alone (under ``vmap``, where its gradient is taken) is not
    its row's output in the batch: ``apply`` mixes the batch's rows (batch statistics, dropout in training mode).

    Parameters
    ----------
    differences : list of array
        Each chunk's step's ``rows_apart`` (scalars; NaN where the outputs are not finite: checked after), read on
        the host together.
    dtype
        The params' dtype, which sets the tolerance (``ROWS_APART_TOLERANCE``).
    """
    import jax
    import numpy as np

    values = np.asarray(jax.device_get(differences), dtype=np.float64)  # after every chunk's step was dispatched
    values = values[~np.isnan(values)]
    value = float(values.max()) if values.size else 0.0
    if value > ROWS_APART_TOLERANCE.get(np.dtype(dtype).itemsize * 8, ROWS_APART_DEFAULT):
        raise TrakValueError(
            f"apply(params, inputs) does not treat the batch's rows independently: an example's model output computed "
            f"alone (as its per-example gradient is) differs from its row's output in the batch by {value:.3g} "
            "of the row's scale (its logits). The model uses batch statistics or random numbers: run it in "
            "inference mode (Flax NNX: model.eval() before nnx.split(model, nnx.Param, ...); linen: "
            "JaxModel(lambda variables, x: module.apply(variables, x, train=False)); Equinox: "
            "eqx.nn.inference_mode(model)) (docs/jax.md)")


def not_jittable(exc: Exception) -> TrakTypeError:
    """The error for an apply function that JAX cannot trace."""
    return TrakTypeError(f"the model's apply function is not jittable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]}). Write apply(params, inputs) with jax.numpy operations only: no "
                         "Python `if`/`for` on array values (use jnp.where or jax.lax.cond), no NumPy or float() on "
                         "traced arrays")


def logits_source(output: Any, logits_fn: Callable | None) -> str | None:
    """Where :func:`trak_core.outputs.select_logits` takes the logits from in ``output`` (``None``: it is the
    array itself, or ``logits_fn`` chose)."""
    import jax

    if logits_fn is not None or isinstance(output, jax.Array):
        return None
    kind = type(output).__name__
    if isinstance(output, Mapping):
        return f"output['logits'] of the {kind} apply returned"
    if hasattr(output, "logits"):
        return f"output.logits of the {kind} apply returned"
    if isinstance(output, (tuple, list)):
        return f"output[0], the first of the {len(output)} elements of the {kind} apply returned"
    return None


def _with_source(exc: TrakCoreError, source: str | None, shape: tuple) -> TrakCoreError:
    if source is None:
        return exc
    return type(exc)(f"{exc}. The logits were taken from {source} (shape {shape}); if they are another part of the "
                     "output, pass a function that picks them: JaxBackend(logits_fn=lambda output: output[1]) "
                     "(the index, key or attribute that holds them)")


def _structure_note(exc: Exception, paths: tuple) -> None:
    """Add a note to an error ``apply`` raised while traced: the params' structure may not be what it expects."""
    if not hasattr(exc, "add_note"):  # Python < 3.11
        return
    shown = ", ".join(paths[:8]) + (f", ... ({len(paths)} leaves)" if len(paths) > 8 else "")
    exc.add_note(f"trak-core: apply(params, inputs) raised this while JAX traced it on the batch; the checkpoint's "
                 f"params pytree must have the structure apply expects (its leaves here: {shown})")


class OutputCheck:
    """Cached abstract traces of ``apply`` on batches: the logits' shape and where they were taken from."""

    def __init__(self) -> None:
        self._seen: dict[tuple, tuple] = {}  # the tasks' checks
        # apply -> its traces: the last few models' only (each key holds its apply, the user's model, alive)
        self._traces: Recent = Recent(MODELS_KEPT)

    def __len__(self) -> int:
        return len(self._seen) + sum(len(traces) for traces in self._traces.values())

    def logits(self, apply: Callable, logits_fn: Callable | None, prepared: Any, inputs: Any) -> tuple:
        """``(logits ShapeDtypeStruct, source)`` of ``apply(prepared.params, inputs)``, traced once per signature."""
        import jax

        leaves, structure = jax.tree_util.tree_flatten(inputs)
        key = (logits_fn, prepared.treedef, prepared.shapes, prepared.dtypes, structure,
               tuple((leaf.shape, leaf.dtype) for leaf in leaves))
        traces = self._traces.get_or_make(apply, dict)
        if key not in traces:
            traces[key] = self._trace(apply, logits_fn, prepared, inputs)
        return traces[key]

    @staticmethod
    def _trace(apply: Callable, logits_fn: Callable | None, prepared: Any, inputs: Any) -> tuple:
        import jax

        from .backend import output_logits

        source: list = [None]

        def logits(params: Any, x: Any) -> Any:
            output = apply(params, x)
            source[0] = logits_source(output, logits_fn)
            return output_logits(output, logits_fn)

        try:
            shape = jax.eval_shape(logits, prepared.params, inputs)
        except jax.errors.JAXTypeError as exc:
            raise not_jittable(exc) from None
        except KeyError as exc:
            if isinstance(inputs, Mapping) and exc.args and str(exc.args[0]) not in map(str, inputs):
                raise TrakValueError(f"apply(params, inputs) looked up {exc.args[0]!r}, which the dict batch does "
                                     f"not have: its inputs are {sorted(inputs)} (the labels' key is taken "
                                     "out)") from None
            _structure_note(exc, prepared.paths)
            raise
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            if not isinstance(exc, TrakCoreError):
                _structure_note(exc, prepared.paths)
            raise
        except Exception as exc:
            state_note(exc)
            if type(exc).__name__ in _FLAX_STRUCTURE:
                _structure_note(exc, prepared.paths)
            raise
        return shape, source[0]

    def check(self, apply: Callable, logits_fn: Callable | None, prepared: Any, inputs: Any, labels: Any,
              n: int, task: Any, given: Any = None) -> None:
        """Raise unless the logits have the task's shape, the labels fit them and ``task.output`` gives ``(n,)``;
        a built-in task checks the NumPy labels ``given`` (as passed) where JAX changed their dtype (float64 to
        float32 with x64 off), so that its error names the dtype passed."""
        import array_api_compat
        import jax
        import numpy as np

        logits, source = self.logits(apply, logits_fn, prepared, inputs)
        shape, ndim = tuple(logits.shape), task.logits_ndim
        if not shape or shape[0] != n or (ndim == 2 and len(shape) not in (1, 2)) or \
                (ndim is not None and ndim != 2 and len(shape) != ndim):
            expected = _EXPECTED.get(ndim, "(batch, ...)")
            raise _with_source(TrakValueError(
                f"task {task.name!r} needs the model's output with shape {expected}, got {shape} for a batch of "
                f"{n}; make apply return one row per example (or pass logits_fn=)"
                + ("; per-token class scores (tagging, NER) take task='token_classification'"
                   if ndim == 2 and len(shape) == 3 and shape[0] == n else "")), source, shape)
        checked = labels
        if isinstance(task, CustomTask):  # the user's check sees the labels its task functions see
            pass
        elif isinstance(given, np.ndarray) and given.dtype != labels.dtype:
            checked = given  # float64 (int64) cast to float32 (int32): the error names the dtype passed
        elif np.dtype(labels.dtype).kind in "biu":  # class or token ids: checked in NumPy, with no small XLA
            checked = np.asarray(labels)  # programs to compile per batch shape
        try:
            task.check_labels(checked, shape[-1] if len(shape) > 1 else 1,
                              xp=array_api_compat.array_namespace(checked))
        except TrakCoreError as exc:
            raise _with_source(exc, source, shape) from None
        key = ("task", task, shape, logits.dtype, labels.shape, labels.dtype)
        if key not in self._seen:
            import jax.numpy as jnp

            xp = array_api_compat.array_namespace(jnp.zeros(1))
            columns = jax.ShapeDtypeStruct((n, 1), logits.dtype) if ndim == 2 and len(shape) == 1 else logits
            traced = ["output"]  # the task function being traced, for the error

            def both(z: Any, y: Any) -> tuple:
                out = task.output(z, y, xp=xp)
                traced[0] = "out_to_loss"
                return out, task.out_to_loss(z, y, xp=xp)

            try:
                out, _ = jax.eval_shape(both, columns, jax.ShapeDtypeStruct(labels.shape, labels.dtype))
            except jax.errors.JAXTypeError as exc:
                raise TrakTypeError(f"task {task.name!r}: {traced[0]}(logits, labels, xp) is not jittable "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0]}); write it with xp "
                                    "operations only: no Python `if` on array values (use xp.where), no float() "
                                    "or NumPy on traced arrays") from None
            self._seen[key] = tuple(getattr(out, "shape", ()))
        if self._seen[key] != (n,):
            raise TrakValueError(
                f"task {task.name!r}: output(logits, labels, xp) must return one value per example, shape ({n},) "
                f"for this batch of {n}, but returned shape {self._seen[key]}; index or reduce within each row "
                "(e.g. logits[:, 0] rather than logits[:, :1]) and do not sum over the batch")
