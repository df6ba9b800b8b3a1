"""Each call that reads an on-disk store reads every ``zarr.json`` of it once (``trak_core.disk_listing``): on a
network filesystem or an object store each read is a round trip. Counted by patching ``pathlib.Path.open``, through
which zarr's ``LocalStore`` and trak-core's own checks read every file; the scores are checked against an estimator
that never touched the store."""
import collections
import contextlib
import pathlib

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

import trak_core.store_report as store_report  # noqa: E402
from trak_core import MLP, TRAK  # noqa: E402

N, CHECKPOINTS, SETS = 60, 12, 3


@contextlib.contextmanager
def reads(root):
    """``{path relative to root: times opened for reading}`` of the files under ``root`` while the block runs."""
    counts, original, root = collections.Counter(), pathlib.Path.open, pathlib.Path(root).resolve()

    def counting(self, mode="r", *args, **kwargs):
        if not set(mode) & set("wax+"):
            with contextlib.suppress(ValueError):
                counts[pathlib.Path(self).resolve().relative_to(root).as_posix()] += 1
        return original(self, mode, *args, **kwargs)

    pathlib.Path.open = counting
    try:
        yield counts
    finally:
        pathlib.Path.open = original


def _metadata(counts):
    return {path: n for path, n in counts.items() if path.endswith("zarr.json")}


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)), rng.integers(0, 3, N)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of ``CHECKPOINTS`` checkpoints and ``SETS`` saved score sets, with the scores of the estimator that
    wrote it (in memory too, for the reference) and those of one that never had a store."""
    path = tmp_path_factory.mktemp("reads") / "store"
    x, y = _data()
    model = MLP(5, 4, 3)
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, N, 20)]
    writer = TRAK(model, proj_dim=16, store=path, progress=False)
    memory = TRAK(model, proj_dim=16, progress=False)
    for c in range(CHECKPOINTS):
        writer.featurize(model.init(seed=c), batches)
        memory.featurize(model.init(seed=c), batches)
    for s in range(SETS):
        writer.score([(x[s:s + 3], y[s:s + 3])], save_as=f"set{s}")
    targets = [(x[:7], y[:7])]
    return path, model, targets, writer.score(targets), memory.score(targets)


def _files(path):
    """Every metadata file of the store, as a path relative to it."""
    return {file.relative_to(path).as_posix() for file in path.rglob("zarr.json")}


def test_open_and_first_score_read_each_metadata_file_once(store):
    path, model, targets, written, in_memory = store
    checkpoints = [model.init(seed=c) for c in range(CHECKPOINTS)]
    with reads(path) as counts:
        opened = TRAK.open(path, model, checkpoints)
    read = _metadata(counts)
    # the root, and each checkpoint's group, features and out-to-loss weights: 1 + 3 per checkpoint, each once
    assert len(read) == 1 + 3 * CHECKPOINTS
    assert set(read) == {"zarr.json"} | {f"c{c}/{name}zarr.json" for c in range(CHECKPOINTS)
                                         for name in ("", "features/", "out_to_loss/")}
    assert max(read.values()) == 1, sorted(item for item in read.items() if item[1] > 1)[:5]
    with reads(path) as counts:
        scores = opened.score(targets)
    read = _metadata(counts)
    # each checkpoint's features, kernel, out-to-loss weights and group (marked loaded), each once
    assert len(read) == 4 * CHECKPOINTS and max(read.values()) == 1, read
    assert np.array_equal(scores, written)  # bit for bit as the estimator that wrote the store
    np.testing.assert_allclose(scores, in_memory, rtol=1e-5, atol=1e-8)  # and as one that never had a store


@pytest.mark.parametrize("verify", [False, True])
def test_the_report_reads_each_metadata_file_once(store, verify):
    path = store[0]
    with reads(path) as counts:
        report = store_report.describe(str(path), verify=verify)
    read = _metadata(counts)
    assert [s["name"] for s in report["scores"]] == [f"set{s}" for s in range(SETS)]
    assert report["complete"] == list(range(CHECKPOINTS)) and not report["damaged"]
    scores = {"scores/zarr.json"} | {f"scores/set{s}/zarr.json" for s in range(SETS)}
    kernels = {f"c{c}/kernel/zarr.json" for c in range(CHECKPOINTS)}
    # the scores group's zarr.json once, not once per set; the kernels are read by --verify only
    assert set(read) == (_files(path) if verify else _files(path) - kernels)
    assert scores <= set(read) and max(read.values()) == 1, sorted(item for item in read.items() if item[1] > 1)[:5]


def test_saved_scores_read_the_scores_group_once(store):
    path, model = store[0], store[1]
    opened = TRAK.open(path, model, {0: model.init(seed=0)})
    with reads(path) as counts:
        assert opened.saved_scores() == [f"set{s}" for s in range(SETS)]
    assert _metadata(counts) == {"scores/zarr.json": 1, **{f"scores/set{s}/zarr.json": 1 for s in range(SETS)}}
    with reads(path) as counts:
        loaded = opened.load_scores("set1")
    assert _metadata(counts) == {"scores/zarr.json": 1, "scores/set1/zarr.json": 1}
    x, y = _data()
    reference = TRAK.open(path, model, [model.init(seed=c) for c in range(CHECKPOINTS)])
    assert np.array_equal(loaded, reference.score([(x[1:4], y[1:4])]))


def test_each_call_reads_the_store_again(store):
    """Nothing is kept from one call to the next: a second open reads every file again (another process may have
    written the store in between), and a checkpoint deleted meanwhile is seen by the next call."""
    path, model = store[0], store[1]
    checkpoints = [model.init(seed=c) for c in range(CHECKPOINTS)]
    counts = []
    for _ in range(2):
        with reads(path) as read:
            TRAK.open(path, model, checkpoints)
        counts.append(_metadata(read))
    assert counts[0] == counts[1] and len(counts[0]) == 1 + 3 * CHECKPOINTS
    def states():
        return {s["name"]: s["state"] for s in store_report.describe(str(path))["scores"]}

    assert states() == {f"set{s}": "finished" for s in range(SETS)}
    metadata = path / "scores" / "set2" / "zarr.json"
    saved = metadata.read_bytes()
    metadata.unlink()  # as another process might, between two calls
    try:
        assert states()["set2"] == "damaged"
    finally:
        metadata.write_bytes(saved)
    assert states()["set2"] == "finished"


def test_an_error_read_once_is_raised_with_each_lookups_traceback():
    """A lookup that failed is raised again from the snapshot: the same exception object re-raised grew its traceback
    by each lookup's frames (11 frames after 3 lookups where one lookup shows 3)."""
    import traceback

    from trak_core.disk_listing import lookup, reading

    class Group:
        store, path = object(), ""

        def __getitem__(self, name):
            raise KeyError(name)

    def frames(group):
        try:
            lookup(group, "x")
        except KeyError as exc:
            return len(traceback.extract_tb(exc.__traceback__))

    group = Group()
    alone = frames(group)  # outside a snapshot: zarr's own lookup each time
    with reading():
        assert [frames(group) for _ in range(3)] == [alone] * 3
