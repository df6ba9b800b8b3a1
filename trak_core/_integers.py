"""One job: read a value as a Python int where it is an integer (a NumPy integer or a 0-d integer array too),
never where it is a bool or a float. It imports nothing of trak-core, so every module can share it."""
from __future__ import annotations

import operator
from typing import Any


def as_integer(value: Any) -> int | None:
    """``value`` as a Python int when it is an integer (NumPy's too, not a bool), else ``None``.

    Parameters
    ----------
    value : Any
        What to read.

    Returns
    -------
    int or None
        The integer, or ``None`` for a bool, a float (``1.5``, also ``2.0``), a string or any other object
        without ``__index__``.
    """
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
