"""Errors located in the checkpoint and batch they happened in.

One job: :func:`located`, the context that ``TRAK``'s featurizing (``trak_core._featurizer``) wraps each backend
call in, so that an error names where it came from without changing the type of one the model raised.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from .errors import TrakCoreError

__all__ = ["located"]


@contextmanager
def located(where: str, backend: str | None = None, inputs: Any = None) -> Iterator[None]:
    """Prefix a backend's ``TrakCoreError`` with the checkpoint and batch it happened in.

    Any other exception (the model's own, such as a shape mismatch in its ``forward``) keeps its type
    and message and gets a note (PEP 678, Python 3.11+) naming the checkpoint, the batch, the shapes of its
    inputs and the backend.
    """
    try:
        yield
    except TrakCoreError as exc:
        if str(exc).startswith(where):
            raise
        located_error = type(exc).__new__(type(exc))
        located_error.args = (f"{where}: {exc}",) + exc.args[1:]
        raise located_error.with_traceback(exc.__traceback__) from exc
    except Exception as exc:
        note = f"trak-core: raised in {where}" + (f" (inputs {_shapes(inputs)})" if inputs is not None else "") + (
            f", in backend {backend!r} (the model's forward and its per-example gradients; it may run the model on "
            "the batch's first examples alone first, to check its fast path)" if backend else "")
        if hasattr(exc, "add_note") and note not in getattr(exc, "__notes__", ()):
            exc.add_note(note)
        raise


def _shapes(inputs: Any) -> str:
    """The shapes of a batch's inputs: ``(10, 60)``, or ``{'input_ids': (8, 12), ...}`` for a dict batch."""
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{key!r}: {tuple(getattr(v, 'shape', ()))}" for key, v in inputs.items()) + "}"
    return str(tuple(getattr(inputs, "shape", ())))
