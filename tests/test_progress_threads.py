"""trak-core's warnings and log records look for the progress bars drawn (to clear them first): tqdm's set of bars,
which other threads change as they make and close bars (their own or trak-core's)."""
import io
import threading
import weakref

import pytest

tqdm_std = pytest.importorskip("tqdm.std", reason="tqdm is not installed: no bars to clear")

from trak_core import notices  # noqa: E402


def test_a_warning_while_another_thread_makes_a_bar(monkeypatch):
    """A bar made by another thread while the bars were being listed: "Set changed size during iteration" raised
    from trak-core's warning (or log record) in place of the warning."""
    tqdm = tqdm_std.tqdm
    drawn = tqdm(range(3), file=io.StringIO(), leave=False)  # a bar exists, so tqdm's set and lock do
    made = []

    class Racing(weakref.WeakSet):
        """tqdm's set of bars, with another thread making a bar while it is first listed (once: tqdm lists it
        too, when a bar closes)."""

        def __iter__(self):
            iterator = super().__iter__()
            first = next(iterator, None)
            if first is None:
                return
            yield first
            if not made:
                other = threading.Thread(target=lambda: made.append(tqdm(range(3), file=io.StringIO(), leave=False)))
                other.start()
                other.join(0.5)  # it waits for tqdm's lock where the listing holds it
            yield from iterator

    monkeypatch.setattr(tqdm, "_instances", Racing(tqdm._instances))
    try:
        with pytest.warns(UserWarning, match="said"):
            notices.warn("said")
    finally:
        for bar in made + [drawn]:
            bar.close()


def test_a_log_record_clears_the_bars_only_where_it_reaches_the_terminal(tmp_path, monkeypatch):
    """The filter on the ``trak_core`` logger cleared every live bar for each record, even where the logs went to a
    file only: the bars flickered on the terminal with nothing written there. Counted: clears of a live bar on
    stderr for one record each, to a file only (0), to stderr (1), and below a stderr handler's level (0)."""
    import logging
    import sys

    from trak_core import _progress

    cleared = []
    bar = tqdm_std.tqdm(range(3), file=sys.stderr, leave=False)
    monkeypatch.setattr(bar, "clear", lambda *a, **k: cleared.append(1))
    logger = logging.getLogger("trak_core")
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "disabled", False)  # another test's logging configuration may have disabled it
    monkeypatch.setattr(logging.root.manager, "disable", 0)
    monkeypatch.setattr(logger, "filters", [_progress._CLEAR_BARS])  # the filter under test alone
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it empties the logger's cache of levels
    try:
        to_file = logging.FileHandler(tmp_path / "trak.log")
        logger.handlers = [to_file]
        logger.info("to the file only")
        to_file.close()
        assert "to the file only" in (tmp_path / "trak.log").read_text() and cleared == []
        to_stderr = logging.StreamHandler(sys.stderr)
        logger.handlers = [to_stderr]
        logger.info("to the terminal")
        assert cleared == [1]
        to_stderr.setLevel(logging.WARNING)
        logger.info("below the terminal handler's level")
        assert cleared == [1]
    finally:
        logger.setLevel(level)
        bar.close()
