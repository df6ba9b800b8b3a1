"""Finding the logits in what a model returns: one rule for every framework backend.

One job: ``select_logits``. Models return a tensor, a tuple (logits first), a mapping or a
Hugging Face ``ModelOutput`` (``"logits"``), or an object with ``.logits``; backends call this with
their framework's array test, so the rule and its errors are the same in torch and JAX.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .errors import TrakTypeError
from .notices import warn

__all__ = ["select_logits"]


def select_logits(output: Any, logits_fn: Callable[[Any], Any] | None, *, is_array: Callable[[Any], bool],
                  hint: str, array: str = "array") -> Any:
    """The logits array in ``output``.

    Parameters
    ----------
    output
        What the model's forward (or apply) function returned.
    logits_fn : callable or None
        A user's ``output -> logits``; when given, it alone decides.
    is_array : callable
        Whether a value is an array of the backend's framework.
    hint : str
        How to pass ``logits_fn`` to this backend, for the errors.
    array : str
        What the framework calls its arrays ("tensor" for torch), for the errors.

    Returns
    -------
    array
        With ``logits_fn``, ``logits_fn(output)``. Otherwise: an array as it is; a mapping's
        ``"logits"``; another object's ``.logits`` attribute (a named tuple, a dataclass); a tuple's
        or list's first element.

    Raises
    ------
    TrakTypeError
        For anything else, or when what was selected is not an array; the message names the type
        and asks for ``logits_fn``.
    """
    if logits_fn is not None:
        logits, source = logits_fn(output), "logits_fn(output)"
    elif is_array(output):
        return output
    elif isinstance(output, Mapping):
        if "logits" not in output:
            raise TrakTypeError(f"the model's output is a mapping ({type(output).__name__}) with keys {list(output)} "
                                f"and no 'logits'; {hint}, e.g. logits_fn=lambda output: output[KEY]")
        logits, source = output["logits"], f"output['logits'] of a {type(output).__name__}"
    elif hasattr(output, "logits"):
        logits, source = output.logits, f"output.logits of a {type(output).__name__}"
    elif isinstance(output, (tuple, list)) and len(output) > 0:
        logits, source = output[0], f"output[0] of a {type(output).__name__}"
        rows = [value.shape[0] for value in output if is_array(value) and len(getattr(value, "shape", ())) >= 1]
        if len(rows) > 1 and is_array(logits) and rows.count(rows[0]) > 1:  # (features, logits) would be taken
            warn(f"the model returns a {type(output).__name__} of several batch-shaped {array}s: trak-core "
                 f"takes the first as the logits; if they are another one, {hint}", UserWarning, once=True)
    else:
        article = "an" if array[0] in "aeiou" else "a"
        raise TrakTypeError(f"the model's output has type {type(output).__name__}; expected {article} {array}, a tuple "
                            f"or list, a mapping with 'logits' or an object with .logits; {hint}")
    if not is_array(logits):
        raise TrakTypeError(f"{source} has type {type(logits).__name__}, not a{'n' if array[0] in 'aeiou' else ''} "
                            f"{array}; {hint}")
    return logits
