"""Which rows or target columns of a saved score set to read: ``load_scores(name, rows=..., targets=...)``.

One job: check a ``rows=`` or ``targets=`` argument against the length of its axis and give it one form, a
slice with its bounds resolved or a 1-D array of non-negative positions, so that a store reads it as NumPy slices
it (``values[rows][:, targets]``). It imports no framework and nothing of the store, so any store can share it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._integers import as_integer
from .errors import TrakTypeError, TrakValueError

__all__ = ["selection", "positions"]

_FORMS = "a slice (rows=slice(0, 1000)) or a 1-D array of integers (rows=np.array([3, 7]))"


def _forms(what: str) -> str:
    return _FORMS.replace("rows=", f"{what}=")


def _checked_slice(index: slice, length: int, what: str) -> slice:
    bounds = (index.start, index.stop, index.step)
    if any(bound is not None and as_integer(bound) is None for bound in bounds):
        raise TrakTypeError(f"{what}={index!r}: a slice's start, stop and step must be integers or None; "
                            f"pass {_forms(what)}")
    if index.step is not None and as_integer(index.step) == 0:
        raise TrakValueError(f"{what}={index!r}: a slice's step cannot be zero; use step=1 (or leave it out) to take "
                             "every one, step=k to take every k-th")
    start, stop, step = index.indices(length)  # NumPy's slicing: bounds past either end are clipped, never an error
    if start < 0:  # a negative step from before row 0: nothing
        return slice(0, 0, step)
    return slice(start, None if stop < 0 else stop, step)  # -1: before row 0 (a negative step), not the last row


def _checked_array(index: Any, length: int, what: str) -> np.ndarray:
    empty_sequence = isinstance(index, (list, tuple, range)) and len(index) == 0
    try:
        values = np.asarray(index) if not empty_sequence else np.empty(0, dtype=np.intp)
    except Exception:  # an array on an accelerator, or objects NumPy cannot hold
        from .fingerprints import to_numpy

        try:
            values = to_numpy(index)
        except Exception:
            raise TrakTypeError(f"{what} must be {_forms(what)}, got {type(index).__name__}") from None
    if values.dtype == np.bool_:
        raise TrakTypeError(f"{what} is a boolean mask; pass the positions it selects, {what}=np.flatnonzero(mask)")
    single = as_integer(index) if values.ndim == 0 else None
    if single is not None:
        raise TrakTypeError(f"{what}={single} is a single index; pass {what}=[{single}] (the result keeps both axes)")
    if not np.issubdtype(values.dtype, np.integer):
        raise TrakTypeError(f"{what} must be {_forms(what)}, got {type(index).__name__} of dtype {values.dtype}"
                            + ("; round the values and cast them with .astype(int)"
                               if np.issubdtype(values.dtype, np.floating) else ""))
    if values.ndim != 1:
        raise TrakValueError(f"{what} must be 1-D (positions along one axis), got an array of shape {values.shape}; "
                             f"pass {what}=np.ravel(...) for its positions in order, or one row of it")
    if values.size and (values.min() < -length or values.max() >= length):
        bad = values[(values < -length) | (values >= length)][0]
        raise TrakValueError(f"{what}: index {int(bad)} is out of range for {length} "
                             f"{'training rows' if what == 'rows' else 'targets'} (valid: {-length} to {length - 1}, "
                             "negative ones counting from the end)")
    return np.where(values < 0, values + length, values).astype(np.intp, copy=False)


def selection(index: Any, length: int, what: str = "rows") -> slice | np.ndarray:
    """``index`` checked against an axis of ``length`` and given one form.

    Parameters
    ----------
    index : None, slice or array_like of int
        ``None`` (the whole axis), a slice (NumPy's meaning: negative bounds count from the end, bounds past an end
        are clipped, any non-zero step) or a 1-D array of integer positions (negative ones count from the end;
        repeats and any order are kept). A list, a tuple, a ``range``, or an array of any framework.
    length : int
        The length of the axis.
    what : str
        The argument's name, for messages (``"rows"`` or ``"targets"``).

    Returns
    -------
    slice or numpy.ndarray
        A slice with integer ``start`` and ``step`` and a ``stop`` in ``[0, length]`` (``None`` where a negative
        step runs past row 0), which takes what ``index`` takes, or an ``intp`` array of positions in
        ``[0, length)``.

    Raises
    ------
    TrakTypeError
        A float, boolean or other non-integer index, or a single integer.
    TrakValueError
        A step of zero, an array that is not 1-D, or a position out of range.
    """
    if index is None:
        return slice(0, length, 1)
    if isinstance(index, slice):
        return _checked_slice(index, length, what)
    if isinstance(index, (str, bytes, dict, set)):
        raise TrakTypeError(f"{what} must be {_forms(what)}, got {type(index).__name__}")
    return _checked_array(index, length, what)


def positions(chosen: slice | np.ndarray) -> np.ndarray:
    """The positions a ``selection`` takes, in order, as an ``intp`` array."""
    if isinstance(chosen, slice):
        return np.arange(chosen.start, -1 if chosen.stop is None else chosen.stop, chosen.step, dtype=np.intp)
    return chosen
