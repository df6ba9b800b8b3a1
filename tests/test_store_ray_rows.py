"""A Ray featurization stopped partway, then rerun into the same store: the rows stored match the data, or the data is
refused before anything is written; the rerun gives a fresh run's numbers bit for bit.

An audit found a Ray run that failed on a NaN example, rerun on the data without it (9,000 -> 8,999 rows), "damaged
(checksum mismatch)" at every rerun: the arrays kept the first run's 9,000 rows, the last chunk's checksum covered 807.
"""
import json

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed: featurization on Ray actors is not exercised")
pytest.importorskip("zarr", reason="zarr is not installed: the Ray executor needs an on-disk store")

from test_ray_executor import ray_cluster  # noqa: E402, F401  (the local Ray cluster those tests start)

from trak_core import MLP, TRAK, StoreMismatchError  # noqa: E402
from trak_core.executors import RayExecutor  # noqa: E402

N, BATCH = 9000, 700


class _Killed(BaseException):
    """Stands for SIGKILL of the driver at one chosen instant (nothing in the library catches it)."""


def _data(n=N):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 5)), rng.integers(0, 3, n)


def _batches(x, y):
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]


def _reference(x, y):
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, progress=False)
    trak.featurize(model.init(seed=0), _batches(x, y))
    return trak.score([(x[:6], y[:6])])


def _featurize(store, x, y, ray):
    model = MLP(5, 4, 3)
    executor = RayExecutor(num_workers=2) if ray else None
    trak = TRAK(model, proj_dim=32, store=store, executor=executor, progress=False)
    try:
        trak.featurize(model.init(seed=0), _batches(x, y))
        return trak.score([(x[:6], y[:6])]), trak.self_influence().shape
    finally:
        if executor is not None:
            executor.close()


@pytest.mark.parametrize("ray", [True, False], ids=["ray", "one-process"])
def test_a_failed_ray_run_resumes_on_the_data_without_the_failing_example(ray_cluster, tmp_path, ray):  # noqa: F811
    x, y = _data()
    bad = x.copy()
    bad[8500, 0] = np.nan  # its features are not finite: the shard of rows 8192..8999 fails
    store = tmp_path / "store"
    with pytest.raises(Exception, match="NaN or inf"):
        _featurize(store, bad, y, ray=True)
    keep = np.arange(N) != 8500
    scores, rows = _featurize(store, x[keep], y[keep], ray)  # was "chunk 2 ... is damaged", at every rerun
    assert rows == (N - 1,)
    assert np.array_equal(scores, _reference(x[keep], y[keep]))


def test_a_ray_run_killed_before_recording_its_rows_resumes_on_the_same_data(ray_cluster, tmp_path,  # noqa: F811
                                                                              monkeypatch):
    from trak_core.disk_writer import DiskWriter

    x, y = _data()
    store = tmp_path / "store"
    monkeypatch.setattr(DiskWriter, "record_rows", lambda self, checksums, rows: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):  # every shard written, none recorded
        _featurize(store, x, y, ray=True)
    monkeypatch.undo()
    scores, rows = _featurize(store, x, y, ray=True)
    assert rows == (N,)
    assert np.array_equal(scores, _reference(x, y))


def test_a_ray_checkpoint_with_all_its_rows_stored_refuses_longer_data(ray_cluster, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    """Killed after every row was recorded, before the checkpoint was complete: a Ray rerun on longer data wrote its
    extra rows from row 9,000 into chunk 2 with a checksum of those rows only ("damaged" from then on)."""
    from trak_core.disk_store import DiskStore

    x, y = _data()
    store = tmp_path / "store"
    monkeypatch.setattr(DiskStore, "add", lambda self, entry: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        _featurize(store, x, y, ray=True)
    monkeypatch.undo()
    manifest = (store / "c0" / "zarr.json").read_bytes()
    assert json.loads(manifest)["attributes"]["rows_done"] == N
    with pytest.raises(StoreMismatchError, match=r"has 9500 examples, but this checkpoint .* n_train=9000 .*resume it"):
        _featurize(store, np.r_[x, x[:500]], np.r_[y, y[:500]], ray=True)
    assert (store / "c0" / "zarr.json").read_bytes() == manifest  # nothing was written
    scores, _ = _featurize(store, x, y, ray=True)
    assert np.array_equal(scores, _reference(x, y))
