"""The warnings trak-core issues: attributed to the caller's line, and said once per call where a batch loop repeats.

One job: ``warn``. A fixed ``stacklevel`` points at the user's line from one call path only: the same check runs
under ``featurize``, ``refit`` and the first ``score`` of a store reopened with ``TRAK.open``, at other depths, and
pointed into trak-core (or at ``sys:1``) from the others. ``warn`` instead attributes each warning to the frame that
called into trak-core (and its backends) from outside, so Python's default filter shows it once per line of the
user's code, and ``-W error`` and ``filterwarnings(module=...)`` see the user's module. Where that caller is a
thread's start (``threading.Thread(target=trak.score)``, ``ThreadPoolExecutor.submit(trak.score, ...)``): no user
line is on the thread's stack, and the warning names trak-core's line that warns, not ``threading.py``.
``once_per_call`` decorates a public call (``featurize``, ``score``): inside it, ``warn(..., once=True)`` says a
message once, not once per batch and gradient path.
"""
from __future__ import annotations

import contextvars
import functools
import sys
import warnings
from typing import Any, Callable, TypeVar

from ._progress import bars_cleared

__all__ = ["warn", "once_per_call", "LIBRARY_PACKAGES"]

F = TypeVar("F", bound=Callable[..., Any])

LIBRARY_PACKAGES = ("trak_core", "trak_torch", "trak_jax", "trak_cupy")
"""Top-level packages whose frames are trak-core's own (the core and the backends this repository ships)."""

_USER_FACING = ("trak_core.demo", "trak_core.compare", "trak_core.cli", "trak_core.__main__", "trak_core.testing")
"""Modules of trak-core that use it as a user does: a warning raised under them points at their lines."""

_DISPATCHERS = ("threading", "concurrent.futures", "multiprocessing", "asyncio")
"""Standard-library modules that call a function handed to them (a thread's target, an executor's job)."""

_said: contextvars.ContextVar[set | None] = contextvars.ContextVar("trak_core_said", default=None)


def _is_library(frame: object) -> bool:
    name = getattr(frame, "f_globals", {}).get("__name__", "") or ""
    return name.split(".", 1)[0] in LIBRARY_PACKAGES and not _in_module(frame, _USER_FACING)


def _in_module(frame: object, modules: tuple[str, ...]) -> bool:
    name = getattr(frame, "f_globals", {}).get("__name__", "") or ""
    return any(name == module or name.startswith(module + ".") for module in modules)


def _user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made in ``warn`` that names the caller of the outermost library
    frame: the user's line, past the frameworks' own frames (``vmap``, ``jit``) between trak-core's. Where that
    caller is a thread's or an executor's dispatch (``_DISPATCHERS``), the caller of ``warn``: trak-core's line."""
    frames = []
    frame = sys._getframe(2)  # the caller of ``warn``: stacklevel 2 of the warnings.warn call in ``warn``
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    outermost = max((i for i, f in enumerate(frames) if _is_library(f)), default=-1)
    if 0 <= outermost < len(frames) - 1 and _in_module(frames[outermost + 1], _DISPATCHERS):
        return 2  # Thread(target=trak.score): threading.py's line told the user nothing
    return outermost + 3  # frames[i] is stacklevel i + 2; its caller, i + 3


def warn(message: str, category: type[Warning] = UserWarning, *, once: bool = False) -> None:
    """Issue ``message`` as a ``category`` warning attributed to the user's line.

    Parameters
    ----------
    message : str
        The warning's text; it names the problem and what to do about it.
    category : type of Warning
        ``UserWarning`` for a setting or model the user can change, ``RuntimeWarning`` for numbers that may be off.
    once : bool
        Inside ``once_per_call``, say this message only the first time in the call (a check that runs per batch
        and per gradient path); outside one, always.
    """
    if once:
        said = _said.get()
        if said is not None:
            if (category, message) in said:
                return
            said.add((category, message))
    level = _user_stacklevel()
    with bars_cleared():  # on a line of its own, not appended to a progress bar's
        warnings.warn(message, category, stacklevel=level)


def once_per_call(method: F) -> F:
    """Decorate a public call (``featurize``, ``score``): inside it, ``warn(..., once=True)`` says each message once
    (a call made inside another: the outer call's scope). The wrapper is a frame of trak-core's own, so ``warn`` still
    names the line that made the call.

    Parameters
    ----------
    method : callable
        The function or method to scope.

    Returns
    -------
    callable
        ``method`` with the scope around each call.
    """
    @functools.wraps(method)
    def scoped(*args: Any, **kwargs: Any) -> Any:
        if _said.get() is not None:
            return method(*args, **kwargs)
        token = _said.set(set())
        try:
            return method(*args, **kwargs)
        finally:
            _said.reset(token)

    return scoped  # type: ignore[return-value]
