"""Ctrl-C while zarr writes: zarr 3 writes from an IO thread of its own, and a write that the interrupt cut short
kept running there. On a slow filesystem it landed after the rerun had finished the checkpoint, and rolled the
checkpoint back to "nothing stored" (``complete`` and ``rows_done`` gone): the next run featurized it again."""
import asyncio
import json
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

import zarr.storage  # noqa: E402

from trak_core import MLP, TRAK  # noqa: E402

N, BATCH, DELAY = 5000, 700, 0.6


def _batches():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 5)), rng.integers(0, 3, N)
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)]


@pytest.fixture
def interrupt_at(monkeypatch):
    """Writes of ``key`` (default ``c0/zarr.json``, the checkpoint's attributes): the ``n``-th sends Ctrl-C to the
    main thread, then takes ``DELAY`` seconds to land, as on a slow network filesystem."""
    original, state = zarr.storage.LocalStore.set, {"count": 0, "at": None, "key": "c0/zarr.json"}
    main = threading.main_thread().ident

    async def slow_set(self, key, value, *args, **kwargs):
        if key == state["key"] and state["at"] is not None:
            state["count"] += 1
            if state["count"] == state["at"]:
                state["at"] = None
                signal.pthread_kill(main, signal.SIGINT)
                await asyncio.sleep(DELAY)
        return await original(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", slow_set)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield lambda n, key="c0/zarr.json": state.update(at=n, key=key)
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("at", [2, 4])
def test_an_interrupted_write_lands_before_featurize_returns(tmp_path, interrupt_at, at):
    store, batches, model = tmp_path / "store", _batches(), MLP(5, 4, 3)
    reference = TRAK(model, proj_dim=32, progress=False)
    reference.featurize(model.init(seed=0), batches)
    interrupt_at(at)
    with pytest.raises(KeyboardInterrupt):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), batches)
    TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), batches)  # the rerun
    time.sleep(DELAY + 0.4)  # a write left running would land by now
    attributes = json.loads((store / "c0" / "zarr.json").read_text())["attributes"]
    assert attributes.get("complete") is True and attributes.get("rows_done") == N, attributes
    opened = TRAK.open(store, model, [model.init(seed=0)], progress=False)
    targets = [batches[0][0][:6], batches[0][1][:6]]
    assert np.allclose(opened.score([targets]), reference.score([targets]), rtol=1e-10, atol=0)


def test_an_interrupted_score_save_lands_before_score_returns(tmp_path, interrupt_at):
    """The same for ``save_as``: the interrupted set's metadata (six targets) landed over the rerun's (four), and
    the saved scores read back as damaged."""
    store, batches, model = tmp_path / "store", _batches(), MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=store, progress=False)
    trak.featurize(model.init(seed=0), batches)
    interrupt_at(1, key="scores/run/zarr.json")  # the array's creation: no chunk or checksum follows
    with pytest.raises(KeyboardInterrupt):
        trak.score([(batches[0][0][:6], batches[0][1][:6])], save_as="run")
    expected = trak.score([(batches[1][0][:4], batches[1][1][:4])], save_as="run")  # other targets, same name
    time.sleep(DELAY + 0.4)
    assert np.array_equal(TRAK.open(store, model, [model.init(seed=0)]).load_scores("run"), expected)


def test_a_refused_featurize_after_an_interrupted_one_still_guards_the_ensemble(tmp_path):
    """The notebook flow: Ctrl-C inside checkpoint 1, then the same cell again on the same estimator. Its first call
    (checkpoint 0) is refused as a duplicate, and that refusal cleared the record of the interrupted checkpoint:
    ``score`` then ensembled checkpoint 0 alone, unsaid, instead of refusing as after the interrupt itself."""
    batches, model = _batches(), MLP(5, 4, 3)
    checkpoints = [model.init(seed=0), model.init(seed=1)]
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", progress=False)
    trak.featurize(checkpoints[0], batches)

    def interrupted():
        yield batches[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trak.featurize(checkpoints[1], interrupted())
    with pytest.raises(Exception, match="same parameters as checkpoint 0.*featurize of checkpoint 1 did not finish"):
        trak.featurize(checkpoints[0], batches)  # the cell's loop again, from its first checkpoint
    targets = [(batches[0][0][:6], batches[0][1][:6])]
    with pytest.raises(Exception, match="would lack that one"):
        trak.score(targets)
    trak.featurize(checkpoints[1], batches)  # the interrupted one again: it resumes, and the ensemble is whole
    reference = TRAK(model, proj_dim=32, progress=False)
    for checkpoint in checkpoints:
        reference.featurize(checkpoint, batches)
    assert np.array_equal(trak.score(targets), reference.score(targets))


def test_two_calls_failing_at_once_do_not_wait_for_each_other():
    """Each failing featurize or save_as waits for zarr's writes in flight (``settle``) with a task on zarr's loop
    that waited for every other task there, the other thread's waiting task too: two calls into two stores that
    failed at the same moment (threads, ``docs/store.md``) each waited for the other, and both hung for the whole
    60 s timeout before a warning that writes were "still running"."""
    from zarr.core.sync import _get_loop

    from trak_core import _zarr_io

    loop, release = _get_loop(), threading.Event()
    loop.call_soon_threadsafe(release.wait, 10)  # hold the loop: both threads' waiting tasks start in one step
    seconds = []

    def failed_call():
        start = time.perf_counter()
        _zarr_io.settle(timeout=5)
        seconds.append(time.perf_counter() - start)

    threads = [threading.Thread(target=failed_call) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # both have handed their task to the held loop
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(seconds) == 2 and max(seconds) < 3, seconds
