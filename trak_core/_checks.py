"""Argument and batch checks of ``trak_core.TRAK``, and how many gradient rows are projected together.

One job: validate what users pass, with errors that name the problem and the fix.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from . import kernel as kernel_ops
from ._certain_rows import check_certain_rows
from ._integers import as_integer as _integer
from ._namespace import device_of, namespace
from .backends import Backend, get_backend, infer_backend
from .backends.registry import check_backend_object
from .errors import TrakTypeError, TrakValueError, half_precision_hint

PROJECTION_GROUP_BYTES = 128 * 2**20  # per-example gradients projected together (at least one row)
ACCELERATOR_GROUP_BYTES = 16 * 2**30  # the same on GPUs: 256 rows of ResNet-18's 11.2M float32 gradients


def _check_proj_dim(proj_dim: Any) -> int | None:
    if proj_dim is None:
        return None
    value = _integer(proj_dim)
    if value is None or value <= 0:
        raise TrakValueError(f"proj_dim must be a positive integer (or None for no projection), got {proj_dim!r}")
    return value


def _check_seed(seed: Any) -> int:
    value = _integer(seed)
    if value is None or not 0 <= value < 2**64:
        raise TrakValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return value


def _rows(array: Any, what: str, where: str) -> int:
    if isinstance(array, Mapping):  # a dict batch (a tokenizer's or collator's output): every value has n rows
        if not array:
            raise TrakValueError(f"{where}: {what} is an empty mapping; a dict batch needs at least one array")
        constants = [key for key, value in array.items() if getattr(value, "shape", None) is None]
        if constants:
            key = constants[0]
            if isinstance(array[key], (list, tuple)):  # rows not made an array: a tokenizer without return_tensors
                raise TrakTypeError(f"{where}: {what}[{key!r}] is a {type(array[key]).__name__}, not an array: a dict "
                                    "batch holds arrays of the model's framework with one row per example; convert "
                                    f"it, e.g. torch.as_tensor(batch[{key!r}]), or ask the tokenizer for tensors "
                                    "(tokenizer(texts, padding=True, return_tensors='pt'))")
            raise TrakTypeError(f"{where}: {what}[{key!r}] is a {type(array[key]).__name__}, not an array with one "
                                "row per example: a dict batch holds per-example arrays only. Pass a constant keyword "
                                "argument through a wrapper module, e.g. forward(self, **batch): return "
                                f"self.model(**batch, {key}=...)")
        counts = {key: _rows(value, f"{what}[{key!r}]", where) for key, value in array.items()}
        if len(set(counts.values())) > 1:
            raise TrakValueError(f"{where}: the arrays of the dict batch have different numbers of rows {counts}; "
                                 "every key needs one row per example")
        return next(iter(counts.values()))
    shape = getattr(array, "shape", None)
    if not shape:
        raise TrakTypeError(f"{where}: {what} must be an array with one row per example, got {type(array).__name__}"
                            + (" of shape ()" if shape == () else "")
                            + (": the data yields single examples (a dataset, or zip(inputs, labels)?), not batches; "
                               "group them into batches, e.g. torch.utils.data.DataLoader(dataset, batch_size=..., "
                               "shuffle=False)" if shape == () or isinstance(array, (int, float)) else "")
                            + (": a model of several inputs takes them as a dict batch, called as model(**inputs): "
                               "e.g. {'a': a, 'b': b} for forward(self, a, b)"
                               if isinstance(array, (tuple, list)) and what == "inputs" else "")
                            + (": make it an array of the model's framework, e.g. torch.as_tensor(labels), "
                               "jax.numpy.asarray(labels) or numpy.asarray(labels)"
                               if isinstance(array, (tuple, list)) and what != "inputs" else ""))
    return int(shape[0])


UNCACHED_GROUP_BYTES = 2**30  # gradients per group when the projection matrix is not cached


def projection_group_rows(n_params: int, itemsize: int, proj_dim: int | None = None, *,
                          accelerator: bool = False) -> int:
    """Rows of gradients projected together: a power of two up to 4,096 within ``PROJECTION_GROUP_BYTES``
    (``ACCELERATOR_GROUP_BYTES`` on GPUs, where matrix units need many rows to be busy).

    When the projection matrix is too large for the projection cache, every group pays for making or
    unpacking it (as long as the product itself on a CPU), so groups then hold up to 256 rows within
    ``UNCACHED_GROUP_BYTES`` (1 GiB), and at least 64 whatever their size in bytes. Groups of rows
    that arrive as one batch are slices of it, not copies.
    """
    from .projection import dense_fits

    budget = ACCELERATOR_GROUP_BYTES if accelerator else PROJECTION_GROUP_BYTES
    rows = max(1, budget // max(1, n_params * itemsize))
    rows = min(4096, 1 << (rows.bit_length() - 1))
    if proj_dim is not None and not dense_fits(n_params, proj_dim, itemsize):
        # every group makes or unpacks the whole matrix: amortize it over up to 256 rows (at most ~1 GiB of gradients)
        wide = max(64, min(256, UNCACHED_GROUP_BYTES // max(1, n_params * itemsize)))
        rows = max(rows, 1 << (wide.bit_length() - 1))
    return rows


def take_rows(inputs: Any, start: int, stop: int) -> Any:
    """Rows ``start .. stop-1`` of a batch's inputs: an array, or every array of a dict batch."""
    if isinstance(inputs, Mapping):
        return {key: value[start:stop, ...] for key, value in inputs.items()}
    return inputs[start:stop, ...]


def _check_lengths(inputs: Any, labels: Any, where: str) -> int:
    n_inputs, n_labels = _rows(inputs, "inputs", where), _rows(labels, "labels", where)
    if n_inputs != n_labels:
        raise TrakValueError(f"{where}: inputs have {n_inputs} rows but labels have {n_labels}; "
                             "each batch needs one label per example")
    return n_inputs


def _check_weights(out_to_loss: Any, where: str, n: int | None = None, backend: str | None = None,
                   shape_only: bool = False) -> None:
    """One weight per example (``n`` of them), each finite (unless ``shape_only``)."""
    if n is not None and tuple(getattr(out_to_loss, "shape", ())) != (n,):
        raise TrakValueError(f"{where}: backend {backend!r} returned out-to-loss weights of shape "
                             f"{tuple(getattr(out_to_loss, 'shape', ()))} for {n} examples; expected ({n},), one "
                             "weight per example (a backend defect: see the contract in docs/backends.md)")
    if shape_only or _all_finite(out_to_loss):
        return
    xp = namespace(out_to_loss)
    finite = xp.isfinite(out_to_loss)
    if not bool(xp.all(finite)):
        rows = [i for i in range(finite.shape[0]) if not bool(finite[i])]
        raise TrakValueError(f"{where}: the out-to-loss weights of rows {rows[:10]}{' ...' if len(rows) > 10 else ''} "
                             "are NaN or inf: the model's outputs or the labels there are not finite; check those "
                             "rows of the inputs and labels (NaN/inf values) and the checkpoint's weights")


def weights_like(values: Any, out_to_loss: Any) -> Any:
    """A backend's out-to-loss weights in the namespace and on the device of its ``values`` (gradients or features):
    a plug-in that returned them through another framework (NumPy weights beside torch gradients) crashed when the
    batches' weights were joined, with a bare ``TypeError``; they are ``(n,)``, so the copy is cheap."""
    from .fingerprints import to_numpy

    xp = namespace(values)
    if namespace(out_to_loss) is xp:
        return out_to_loss
    return xp.asarray(to_numpy(out_to_loss), device=device_of(values))


def _check_features(features: Any, where: str, gradients_dtype: Any = None, out_to_loss: Any = None,
                    task: Any = None, first_row: int | None = None) -> None:
    """Non-finite per-example gradients show in their projection: every column mixes every gradient entry
    with a non-zero coefficient, so one reduction over (n, k) features replaces one over (n, p) gradients.
    ``gradients_dtype``: the gradients' dtype; for half precision the error names its range (float16's largest
    value is 65,504: gradients of finite inputs and weights overflow it). ``out_to_loss`` and ``task``: the rows'
    weights and the estimator's task, to name rows of ``p_y = 1`` exactly (``check_certain_rows``; ``first_row``:
    the training row of the first, where the features span batches)."""
    if not _all_finite(features):
        check_certain_rows(features, out_to_loss, task, where, first_row)
        raise TrakValueError(f"{where}: the per-example gradients (seen through their projected features) contain "
                             "NaN or inf; check the inputs (NaN/inf values), the checkpoint's weights, and the "
                             f"learning rate that produced them{_half_range(features, gradients_dtype)}")


def _half_range(features: Any, gradients_dtype: Any) -> str:
    """For float16 gradients, what their range means for non-finite features, with the fix; else ``""``."""
    if gradients_dtype is None:
        return ""
    try:
        info = namespace(features).finfo(gradients_dtype)
    except (TypeError, ValueError):  # not a dtype of the features' namespace
        return ""
    return half_precision_hint(gradients_dtype, info)


def _all_finite(*arrays: Any) -> bool:
    """Whether every entry of ``arrays`` is finite, from one sum of each: a NaN or inf entry makes the total NaN or
    inf, and a total that overflowed from finite entries is told apart by ``isfinite``. One reduction per array
    costs JAX one small compiled program per new batch shape (an ``isfinite`` then ``all`` cost two)."""
    if math.isfinite(sum(float(namespace(a).sum(a)) for a in arrays)):
        return True
    return all(bool(namespace(a).all(namespace(a).isfinite(a))) for a in arrays)


def _check_finite(values: Any, out_to_loss: Any, where: str, what: str, backend: str | None = None,
                  gradients_dtype: Any = None, task: Any = None, first_row: int | None = None) -> None:
    _check_weights(out_to_loss, where, values.shape[0], backend, shape_only=True)
    if _all_finite(values, out_to_loss):
        return
    _check_weights(out_to_loss, where)  # names the rows whose weights are not finite
    if not _all_finite(values):
        check_certain_rows(values, out_to_loss, task, where, first_row)
        raise TrakValueError(f"{where}: the {what} contain NaN or inf; check the inputs (NaN/inf values), "
                             "the checkpoint's weights, and the learning rate that produced them"
                             f"{_half_range(values, gradients_dtype)}")


def check_backend_array(values: Any, shape: tuple[int, ...], dtype: Any, where: str, what: str, backend: str,
                        hint: str = "") -> None:
    """A backend's output has the contract's shape and dtype (``dtype=None``: any real floating dtype)."""
    import array_api_compat

    xp = namespace(values)
    got = tuple(values.shape)
    if got != shape:
        raise TrakValueError(f"{where}: backend {backend!r} returned {what} of shape {got}; expected {shape}{hint} (a "
                             "backend defect: see the contract in docs/backends.md)")
    if dtype is not None and values.dtype != dtype or not array_api_compat.is_array_api_obj(values) or \
            not xp.isdtype(values.dtype, "real floating"):
        raise TrakValueError(f"{where}: backend {backend!r} returned {what} of dtype {values.dtype}; expected "
                             f"{dtype if dtype is not None else 'a real floating dtype'} (a backend defect: see "
                             "the contract in docs/backends.md)")


def check_gradient_precision(grads: Any, prepared: Any, where: str, backend: str) -> None:
    """Refuse gradients of fewer bits than every floating dtype of the checkpoint's snapshot ``prepared``.

    A backend's gradients are in its checkpoint's dtype (the conformance suite's contract): float32 gradients of a
    float64 checkpoint gave float32 features and scores, with no word. The snapshot's dtypes are its own ``dtype``
    attribute (the torch and JAX snapshots': the attributed parameters') and its arrays' (in mappings, sequences and
    attributes, as ``prepare`` returns them); one of no more bits than the gradients' accepts them, so a model of
    mixed dtypes, half precision (float16, bfloat16) and a snapshot without arrays are never refused.

    Parameters
    ----------
    grads : array
        The gradients ``backend.gradients`` returned (a real floating dtype, checked before).
    prepared : object
        What ``backend.prepare`` returned for the checkpoint.
    where, backend : str
        The batch, and the backend's name, for the message.

    Raises
    ------
    TrakTypeError
        If every floating dtype found in ``prepared`` has more bits than the gradients'.
    """
    bits = namespace(grads).finfo(grads.dtype).bits
    lowest = _lowest_dtype_above(prepared, bits, namespace(grads))
    if lowest is None:
        return
    raise TrakTypeError(f"{where}: backend {backend!r} returned per-example gradients of dtype {grads.dtype} for a "
                        f"checkpoint whose parameters are {lowest}: expected {lowest}, the checkpoint's dtype (the "
                        "lower precision would carry into the features and scores); compute the gradients in the "
                        f"parameters' dtype, or featurize a checkpoint cast to {grads.dtype} (a backend defect: see "
                        "the contract in docs/backends.md)")


def _lowest_dtype_above(prepared: Any, bits: int, xp: Any, budget: int = 1000) -> Any:
    """The lowest real floating dtype in ``prepared`` (its own ``dtype`` attribute, its arrays'), if every one found
    has more than ``bits`` bits; ``None`` where one has no more, none is found, or ``budget`` objects were visited
    first. A dtype its namespace cannot read (another framework's, a PRNG key's) is passed over."""
    import array_api_compat

    lowest, stack, seen = None, [(prepared, 0)], set()
    while stack:
        value, depth = stack.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float)) or value is None:
            continue
        seen.add(id(value))
        if len(seen) > budget:
            return None
        array = array_api_compat.is_array_api_obj(value)
        try:
            declared = value.dtype if array else getattr(value, "dtype", None)
            reader = namespace(value) if array else xp
            found = reader.finfo(declared).bits if reader.isdtype(declared, "real floating") else None
        except Exception:  # not a dtype this namespace reads
            found = None
        if found is not None and found <= bits:
            return None
        if found is not None and (lowest is None or found < lowest[1]):
            lowest = (declared, found)
        if array or depth >= 6:
            continue
        children = (value.values() if isinstance(value, Mapping) else value if isinstance(value, (list, tuple)) else
                    vars(value).values() if hasattr(value, "__dict__") else ())
        stack.extend((child, depth + 1) for child in reversed(list(children)))
    return None if lowest is None else lowest[0]


def _check_lambda(lambda_reg: Any) -> float | str:
    if isinstance(lambda_reg, str):
        if lambda_reg != "auto":
            raise TrakValueError(f"lambda_reg must be 'auto' or a number >= 0, got {lambda_reg!r}")
        return lambda_reg
    return kernel_ops.check_lambda(lambda_reg)


def _resolve_backend(backend: str | Backend | None, model: Any) -> Backend:
    if backend is None:
        return infer_backend(model)
    if isinstance(backend, str):
        return get_backend(backend)
    if isinstance(backend, Backend):  # as register_backend: a store records its name, and reopens by it
        return check_backend_object(backend)
    raise TrakTypeError(f"backend must be a name, a Backend object or None, got {type(backend).__name__}")


def chosen_entries(store: Any, checkpoints: Sequence[int] | None) -> list:
    """The entries of ``store`` at ``checkpoints`` (all of them for ``None``), with a clear error for bad indices.

    Indices are the checkpoints' own (``entry.index``): their positions in the store, except in one opened with some
    of its checkpoints (``TRAK.open`` with a mapping).
    """
    if checkpoints is None:
        return list(store)
    if isinstance(checkpoints, (str, bytes)):  # ['02'] is refused too: indices are integers
        raise TrakTypeError(f"checkpoints must be a sequence of checkpoint indices, got the string {checkpoints!r}: "
                            "pass a list of integers, e.g. checkpoints=[0, 2]")
    if not hasattr(checkpoints, "__iter__"):
        raise TrakTypeError(f"checkpoints must be a sequence of checkpoint indices, got {checkpoints!r}: pass "
                            f"[{checkpoints!r}] for one checkpoint")
    by_index = {entry.index: entry for entry in store}
    chosen = []
    for c in checkpoints:
        c = _integer(c)  # ints, NumPy integers, 0-d integer arrays; not bools (True was checkpoint 1)
        if c is None or c not in by_index:
            chosen = []
            break
        chosen.append(c)
    if not chosen:
        held = sorted(by_index)
        which = (f"indices in [0, {len(held) - 1}]" if held == list(range(len(held))) else
                 f"indices of the checkpoints this estimator opened, {held}")
        booleans = any(isinstance(c, bool) for c in checkpoints)
        raise TrakValueError(f"checkpoints must be a non-empty sequence of {which}, got {checkpoints!r}"
                             + ("; booleans are not indices: for a mask, pass [i for i, keep in enumerate(mask) if "
                                "keep]" if booleans else ""))
    repeated = sorted({c for c in chosen if chosen.count(c) > 1})
    if repeated:
        raise TrakValueError(f"checkpoints lists {', '.join(map(str, repeated))} more than once ({checkpoints!r}): "
                             "each checkpoint counts once in the ensemble; pass each index once")
    return [by_index[c] for c in chosen]


def _first_line(error: BaseException) -> str:
    """An error's first non-blank line, at most 200 characters; ``"no message"`` for one without
    (``KeyboardInterrupt()``)."""
    return next((line.strip()[:200] for line in str(error).splitlines() if line.strip()), "no message")


def check_scorable(store: Any, last_error: BaseException | None, what: str, *,
                   missing: BaseException | None = None) -> None:
    """Refuse ``what`` (a method needing features) on an estimator with no featurized checkpoint, saying why; and,
    for an ensemble of every checkpoint, after the featurize of a new checkpoint failed (``missing``, its error;
    not one refused as a duplicate or as no checkpoint of this model): the ensemble would lack it, unsaid."""
    if len(store):
        if missing is not None:
            held = [entry.index for entry in store]
            raise TrakValueError(f"{what}: the last featurize failed ({type(missing).__name__}: "
                                 f"{_first_line(missing)}), "
                                 "so an ensemble of every checkpoint would lack that one: featurize it again (an "
                                 "on-disk store resumes where it stopped), or pass checkpoints="
                                 f"{held} to use the {len(held)} featurized")
        return
    message = f"{what} called before any featurize(): featurize every checkpoint first"
    if last_error is not None:
        message += f"; the last featurize failed ({type(last_error).__name__}: {_first_line(last_error)})"
    else:
        complete = getattr(store, "complete_checkpoints", lambda: list(range(store.stored_checkpoints())))()
        if complete:  # featurized apart, maybe with gaps
            held = f"{len(complete)} complete checkpoints" if complete == list(range(len(complete))) else \
                f"complete checkpoints {complete}"
            message += (f"; the store at {store.location} holds {held}: TRAK.open(path, model, checkpoints) loads "
                        "them without the training data")
    raise TrakValueError(message)
