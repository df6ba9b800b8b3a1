"""A store's rows match its training data: a resumed checkpoint on shorter data, or a later checkpoint on longer
data, is refused before anything is written, and the run then resumes to the uninterrupted numbers.

An audit found both silently wrong: checkpoint 0 resumed on data cut at a 4,096-row chunk boundary kept the earlier
run's extra rows in its kernel (scores 20% off, no error), and checkpoint 1 on longer data wrote its extra rows before
the error said "nothing was overwritten" (the store then could not be scored).
"""
import json

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import MLP, TRAK, StoreMismatchError  # noqa: E402

N, BATCH = 9000, 700


def _data(n=N):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 5)), rng.integers(0, 3, n)


def _batches(x, y, stop_after=None):
    for b, i in enumerate(range(0, x.shape[0], BATCH)):
        if stop_after is not None and b == stop_after:
            raise KeyboardInterrupt  # the user stops the run
        yield x[i:i + BATCH], y[i:i + BATCH]


def _rows_done(store, index):
    return json.loads((store / f"c{index}" / "zarr.json").read_text())["attributes"]["rows_done"]


def _reference(x, y, checkpoints):
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, progress=False)
    for c in range(checkpoints):
        trak.featurize(model.init(seed=c), _batches(x, y))
    return trak.score([(x[:6], y[:6])])


@pytest.mark.parametrize("cut", [4096, 6000])  # on a chunk boundary (was accepted), and inside a chunk
def test_a_checkpoint_resumed_on_shorter_data_is_refused(tmp_path, cut):
    x, y = _data()
    store, model = tmp_path / "store", MLP(5, 4, 3)
    with pytest.raises(KeyboardInterrupt):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), _batches(x, y, 12))
    assert _rows_done(store, 0) == 8192  # 12 batches of 700: two whole chunks written
    with pytest.raises(StoreMismatchError, match=rf"has {cut} examples, but this checkpoint in .* already holds "
                                                 r"features of 8192 rows from an earlier run on longer data"):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), _batches(x[:cut],
                                                                                                    y[:cut]))
    assert _rows_done(store, 0) == 8192
    trak = TRAK(model, proj_dim=32, store=store, progress=False)  # resumed on the run's own data: nothing was lost
    trak.featurize(model.init(seed=0), _batches(x, y))
    assert trak.self_influence().shape == (N,)
    assert np.array_equal(trak.score([(x[:6], y[:6])]), _reference(x, y, 1))


def test_a_later_checkpoint_on_longer_data_writes_no_row(tmp_path):
    x, y = _data(8192)
    extra_x, extra_y = np.random.default_rng(1).normal(size=(4096, 5)), np.zeros(4096, dtype=y.dtype)
    longer, labels = np.r_[x, extra_x], np.r_[y, extra_y]  # the same data, extended
    store, model = tmp_path / "store", MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=store, progress=False)
    trak.featurize(model.init(seed=0), _batches(x, y))
    with pytest.raises(StoreMismatchError,
                       match=r"more than 8192 examples, but the store at .* n_train=8192 .*nothing was overwritten"):
        trak.featurize(model.init(seed=1), _batches(longer, labels))
    assert _rows_done(store, 1) <= 8192  # was 12,288: the extra rows had been written
    trak.featurize(model.init(seed=1), _batches(x, y))
    reopened = TRAK.open(store, model, [model.init(seed=c) for c in range(2)], progress=False)
    assert reopened.self_influence(checkpoints=[1]).shape == (8192,)
    assert np.array_equal(reopened.score([(x[:6], y[:6])]), _reference(x, y, 2))


def test_a_checkpoint_added_with_another_lambda_is_refused(tmp_path):
    x, y = _data(500)
    store, model = tmp_path / "store", MLP(5, 4, 3)
    written = TRAK(model, proj_dim=32, store=store, progress=False)  # lambda "auto"
    for c in range(2):
        written.featurize(model.init(seed=c), _batches(x, y))
    later = TRAK(model, proj_dim=32, store=store, progress=False, lambda_reg=0.5)
    for c in range(2):  # the stored checkpoints: checked, and scored at 0.5 in this session
        later.featurize(model.init(seed=c), _batches(x, y))
    assert later.lambdas == [0.5, 0.5]
    with pytest.raises(StoreMismatchError, match=r"featurized with lambda_reg='auto', and this estimator has "
                                                 r"lambda_reg=0\.5: checkpoint 2 would be stored"):
        later.featurize(model.init(seed=2), _batches(x, y))  # was stored at 0.5 beside two "auto" checkpoints
    assert not (store / "c2" / "features").exists()  # refused before any row was written
    later.refit("auto")  # the way the message gives: the store's setting, then refit to score with another
    later.featurize(model.init(seed=2), _batches(x, y))
    later.refit(0.5)
    reopened = TRAK.open(store, model, [model.init(seed=c) for c in range(3)], progress=False)
    reference = TRAK(model, proj_dim=32, progress=False)
    for c in range(3):
        reference.featurize(model.init(seed=c), _batches(x, y))
    assert reopened.lambdas == reference.lambdas and len(set(reference.lambdas)) == 3  # each its own "auto" lambda
    assert np.array_equal(reopened.score([(x[:6], y[:6])]), reference.score([(x[:6], y[:6])]))
    reference.refit(0.5)
    assert np.array_equal(later.score([(x[:6], y[:6])]), reference.score([(x[:6], y[:6])]))


def test_checking_a_stored_checkpoints_data_shows_a_bar(tmp_path, monkeypatch):
    import trak_core._featurizer
    from trak_core._progress import progress

    bars = []

    def recording(iterable, *, desc, enabled, total=None):
        bars.append((desc, enabled, total))
        return progress(iterable, desc=desc, enabled=False, total=total)

    x, y = _data(2000)
    model = MLP(5, 4, 3)
    TRAK(model, proj_dim=32, store=tmp_path / "store", progress=False).featurize(model.init(seed=0), _batches(x, y))
    monkeypatch.setattr(trak_core._featurizer, "progress", recording)
    data = list(_batches(x, y))
    TRAK(model, proj_dim=32, store=tmp_path / "store", progress=True).featurize(model.init(seed=0), data)
    assert len(data) == 3 and bars == [("check checkpoint 0's data", True, 3)]  # was no bar at all


def test_after_a_refit_the_message_says_how_to_add_a_checkpoint(tmp_path):
    x, y = _data(500)
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", progress=False)
    for c in range(2):
        trak.featurize(model.init(seed=c), _batches(x, y))
    trak.refit(0.5)  # in one process: the store's checkpoints keep "auto"
    with pytest.raises(StoreMismatchError, match=r"refit\('auto'\) first if a refit changed it\), then refit\(0\.5\)"):
        trak.featurize(model.init(seed=2), _batches(x, y))
    trak.refit("auto")
    trak.featurize(model.init(seed=2), _batches(x, y))
    trak.refit(0.5)
    assert trak.lambdas == [0.5] * 3


class _Killed(BaseException):
    """Stands for SIGKILL at one chosen instant (a BaseException: nothing in the library catches it)."""


def test_a_checkpoint_with_all_its_rows_stored_is_refused_on_other_data(tmp_path, monkeypatch):
    """Killed after its last chunk was written, before it was complete: the rerun's data must be that run's. Data
    with rows appended raised "internal: a chunk may only follow whole chunks"; another last row was accepted."""
    from trak_core.disk_store import DiskStore

    x, y = _data()
    store, model = tmp_path / "store", MLP(5, 4, 3)
    monkeypatch.setattr(DiskStore, "add", lambda self, entry: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), _batches(x, y))
    monkeypatch.undo()
    assert _rows_done(store, 0) == N
    manifest = (store / "c0" / "zarr.json").read_bytes()
    last_label = y.copy()
    last_label[-1] = (y[-1] + 1) % 3
    for data, message in [((np.r_[x, x[:500]], np.r_[y, y[:500]]), r"more than 9000 examples, but this checkpoint"),
                          ((x[:-1], y[:-1]), r"has 8999 examples, but this checkpoint"),
                          ((x, last_label), r"rows 8192\.\.8999 \(data_checksums chunk 2\)")]:
        with pytest.raises(StoreMismatchError, match=message + r".*(n_train=9000.*resume it|nothing was overwritten)"):
            TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), _batches(*data))
        assert (store / "c0" / "zarr.json").read_bytes() == manifest  # nothing was written
    trak = TRAK(model, proj_dim=32, store=store, progress=False)
    trak.featurize(model.init(seed=0), _batches(x, y))  # that run's data: resumed
    assert np.array_equal(trak.score([(x[:6], y[:6])]), _reference(x, y, 1))


def test_rows_grown_but_never_recorded_are_cut_when_the_data_is_shorter(tmp_path, monkeypatch):
    """Killed after the arrays grew for the last chunk (rows 8192..8999), before it was written: a rerun on data one
    row shorter (accepted: only two whole chunks were stored) kept the 9,000-row arrays and was "damaged" forever."""
    import zarr

    x, y = _data()
    store, model = tmp_path / "store", MLP(5, 4, 3)
    original = zarr.Array.__setitem__

    def killed(self, key, value):
        if self.path == "c0/features" and isinstance(key, slice) and key.start == 8192:
            raise _Killed
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", killed)
    with pytest.raises(_Killed):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), _batches(x, y))
    monkeypatch.undo()
    assert _rows_done(store, 0) == 8192
    trak = TRAK(model, proj_dim=32, store=store, progress=False)
    trak.featurize(model.init(seed=0), _batches(x[:-1], y[:-1]))
    assert trak.self_influence().shape == (N - 1,)
    assert np.array_equal(trak.score([(x[:6], y[:6])]), _reference(x[:-1], y[:-1], 1))
