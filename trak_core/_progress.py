"""Progress bars when tqdm is installed (an optional dependency); a no-op otherwise.

trak-core's own messages do not land on a bar's line: its warnings (``trak_core.notices.warn``) clear the bars on the
terminal and draw them again after, and a record of the ``trak_core`` logger clears them (they are drawn again at
their next step), so a message starts a line of its own instead of being appended to ``... 3/20 [00:01<00:05]``.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, enabled: bool | None, total: int | None = None) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar (to stderr) when ``enabled`` and tqdm is importable.

    ``enabled=None`` means: when stderr is a terminal or the code runs in a Jupyter kernel (whose stderr is not a
    terminal, but shows bars). ``enabled=True`` without tqdm warns once that no bars are shown. ``total``: the number
    of items, else ``len(iterable)`` where it has one (pass ``length_of(data)`` when wrapping a generator over
    ``data``).
    """
    asked = enabled
    if enabled is None:
        enabled = sys.stderr.isatty() or _in_notebook()
    if total is None:
        total = length_of(iterable)
    if not enabled:
        return iterable
    try:
        from tqdm.std import tqdm
    except ImportError:
        if asked and not _said_no_tqdm:
            _said_no_tqdm.append(True)
            from .notices import warn

            warn("progress=True shows progress bars with tqdm, which is not installed: pip install tqdm (or the "
                 "'demo' extra); no bars are shown")
        return iterable
    if _in_notebook():
        tqdm = _notebook_bar(tqdm)
    logging.getLogger("trak_core").addFilter(_CLEAR_BARS)  # once (addFilter skips a filter it holds)
    return tqdm(iterable, desc=desc, total=total, leave=False)


_said_no_tqdm: list[bool] = []  # the missing-tqdm warning, once per process


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter (IPython) kernel: its output area shows bars, though stderr is no terminal."""
    if "ipykernel" not in sys.modules:
        return False
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return getattr(shell, "kernel", None) is not None


def _notebook_bar(text_bar: Any) -> Any:
    """tqdm's widget bar where ipywidgets is installed (tqdm.auto's choice), else its text bar (tqdm.auto warns
    "IProgress not found" there, and falls back to the text bar)."""
    try:
        import ipywidgets  # noqa: F401
        from tqdm.notebook import tqdm
    except ImportError:
        return text_bar
    return tqdm


def _live_bars() -> list:
    """tqdm's bars drawn now on stdout or stderr (tqdm is imported only where a bar was made, or by the user)."""
    cls = getattr(sys.modules.get("tqdm.std"), "tqdm", None)
    instances = getattr(cls, "_instances", None)
    if not instances:
        return []
    lock = getattr(cls, "_lock", None)  # tqdm adds and drops bars under it: another thread's new bar otherwise
    with lock if lock is not None else contextlib.nullcontext():  # raised "Set changed size during iteration"
        bars = list(instances)
    return [bar for bar in bars if hasattr(bar, "start_t") and not bar.disable and bar.fp in (sys.stdout, sys.stderr)]


@contextlib.contextmanager
def bars_cleared() -> Iterator[None]:
    """Around a message written to the terminal: the bars are cleared before it and drawn again after it."""
    if not _live_bars():
        yield
        return
    from tqdm.std import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        yield


class _ClearBars(logging.Filter):
    """On the ``trak_core`` logger once a bar was made: a record's line starts on a cleared line (each bar is drawn
    again at its next step). It filters nothing out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _to_terminal(record):  # a record that goes to a file only: the bars are left as drawn (no flicker)
            for bar in _live_bars():
                bar.clear()
        return True


def _to_terminal(record: logging.LogRecord) -> bool:
    """Whether a handler that takes ``record`` writes to stdout or stderr: those of its logger and the loggers it
    propagates to, at the record's level (``logging.lastResort``, to stderr, where there are none at all)."""
    logger: Any = logging.getLogger(record.name)
    found = False
    while logger is not None:
        for handler in logger.handlers:
            found = True
            if record.levelno >= handler.level and not isinstance(handler, logging.FileHandler) and \
                    getattr(handler, "stream", None) in (sys.stdout, sys.stderr):
                return True
        logger = logger.parent if logger.propagate else None
    last = logging.lastResort
    return not found and last is not None and record.levelno >= last.level


_CLEAR_BARS = _ClearBars()


def length_of(data: Any) -> int | None:
    """``len(data)`` when ``data`` has one (a list, a ``DataLoader``), else ``None`` (a generator)."""
    try:
        return len(data)
    except TypeError:
        return None
