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
