"""Round trips of each call that reads a store at a URL: on an object store every fsspec call (a listing, a read, an
``exists`` or ``isdir``) is a request, so each call reads every ``zarr.json`` and every chunk it needs once, lists each
folder at most once, and asks nothing a listing told already (``disk_listing.reading``, ``disk_tree.UrlPath``). Counted
on a ``memory://`` store by wrapping fsspec's ``MemoryFileSystem``, under both zarr's asynchronous wrapper of it and the
synchronous filesystem trak-core's own checks use; the counts are compared with the closed form (how many files and
folders the call needs), and the scores with those of an estimator that never had a store."""
import collections
import contextlib
import threading
import uuid

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")
fsspec = pytest.importorskip("fsspec", reason="fsspec is not installed: zarr opens no URL store without it")

from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper  # noqa: E402
from fsspec.implementations.memory import MemoryFileSystem  # noqa: E402

from trak_core import MLP, TRAK, StoreDamagedError, store_report  # noqa: E402

N, CHECKPOINTS, SETS = 60, 12, 3
QUERIES = ("cat_file", "cat", "cat_ranges", "info", "ls", "exists", "isdir", "isfile", "find", "glob", "walk")
_counting: dict = {}  # "root", "counts" while a ``requests`` block runs
_depth = threading.local()  # a call inside another (isdir calls info) is one request: the outer one is counted


def _counted(name, method):
    def wrapper(self, path=None, *args, **kwargs):
        if getattr(_depth, "n", 0) == 0 and _counting and path is not None:
            first = str(path[0] if isinstance(path, (list, tuple)) else path).strip("/")
            root = _counting["root"]
            if first == root or first.startswith(root + "/"):
                _counting["counts"][(name, first[len(root):].strip("/") or ".")] += 1
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            return method(self, path, *args, **kwargs) if path is not None else method(self, *args, **kwargs)
        finally:
            _depth.n -= 1
    return wrapper


@pytest.fixture(scope="module")
def wrapped():
    """``MemoryFileSystem`` counting, before any store is opened: zarr's asynchronous wrapper binds the methods of the
    filesystem it wraps when it is made, so a later patch would miss the reads of a group opened before."""
    originals = {name: getattr(MemoryFileSystem, name) for name in QUERIES}
    for name, method in originals.items():
        setattr(MemoryFileSystem, name, _counted(name, method))
    # fsspec before 2025 keeps one wrapper per filesystem across stores (cachable), its methods bound when it was made
    AsyncFileSystemWrapper.clear_instance_cache()
    yield
    for name, method in originals.items():
        setattr(MemoryFileSystem, name, method)


@contextlib.contextmanager
def requests(root):
    """``{(method, key relative to root): calls}`` of every fsspec query of the store at ``root`` in the block."""
    counts = collections.Counter()
    _counting.update(root=root.strip("/"), counts=counts)
    try:
        yield counts
    finally:
        _counting.clear()


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)), rng.integers(0, 3, N)


@pytest.fixture(scope="module")
def store(wrapped):
    """A ``memory://`` store of ``CHECKPOINTS`` checkpoints and ``SETS`` score sets, and the scores of an estimator
    that featurized the same data in memory (the independent reference)."""
    root = f"/url-reads-{uuid.uuid4().hex}/store"
    x, y = _data()
    model = MLP(5, 4, 3)
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, N, 20)]
    writer, memory = (TRAK(model, proj_dim=16, store=store, progress=False) for store in (f"memory:/{root}", None))
    for c in range(CHECKPOINTS):
        writer.featurize(model.init(seed=c), batches)
        memory.featurize(model.init(seed=c), batches)
    sets = [[(x[s:s + 3], y[s:s + 3])] for s in range(SETS)]
    for s in range(SETS):
        writer.score(sets[s], save_as=f"set{s}")
    targets = [(x[:7], y[:7])]
    yield {"root": root, "url": f"memory:/{root}", "model": model, "targets": targets, "memory": memory.score(targets),
           "sets": [memory.score(batch) for batch in sets]}
    fsspec.filesystem("memory").rm(root, recursive=True)


def _checkpoints(store):
    return [store["model"].init(seed=c) for c in range(CHECKPOINTS)]


def _split(counts):
    """``(reads, listings, other queries)``: ``{key: n}`` read, ``{folder: n}`` listed, ``{(method, key): n}``."""
    reads, listings, other = collections.Counter(), collections.Counter(), collections.Counter()
    for (method, key), n in counts.items():
        if method == "cat_file":
            reads[key] += n
        elif method == "ls":
            listings[key] += n
        else:
            other[(method, key)] += n
    return reads, listings, other


def _nodes(checkpoint_arrays=("features", "out_to_loss"), sets=range(SETS), scores=True, root=True):
    """The metadata files of the named nodes, as keys relative to the store."""
    found = {"zarr.json"} if root else set()
    for c in range(CHECKPOINTS):
        found |= {f"c{c}/zarr.json"} | {f"c{c}/{name}/zarr.json" for name in checkpoint_arrays}
    if scores:
        found |= {"scores/zarr.json"} | {f"scores/set{s}/zarr.json" for s in sets}
    return found


def _chunks(names):
    """The one chunk of each named array of every checkpoint (``N`` rows: one chunk of rows)."""
    shapes = {"features": "c/0/0", "out_to_loss": "c/0", "kernel": "c/0/0"}
    return {f"c{c}/{name}/{shapes[name]}" for c in range(CHECKPOINTS) for name in names}


def _once(reads):
    assert max(reads.values(), default=1) == 1, sorted(item for item in reads.items() if item[1] > 1)[:5]


def test_open_and_first_score_make_one_request_per_file(store):
    """TRAK.open: 1 + 3 C metadata files and the first chunk of each checkpoint's two arrays (its checksum), once each,
    and one listing of the store (which checkpoints there are, shared by the damage checks); the first score: each
    checkpoint's 4 metadata files and 3 chunks, no listing. Nothing else is asked (no exists, isdir, info)."""
    with requests(store["root"]) as counts:
        opened = TRAK.open(store["url"], store["model"], _checkpoints(store))
    reads, listings, other = _split(counts)
    assert set(reads) == _nodes(scores=False) | _chunks(("features", "out_to_loss"))
    assert sum(reads.values()) == 1 + 5 * CHECKPOINTS
    _once(reads)
    assert listings == {".": 1} and not other, (listings, other)
    with requests(store["root"]) as counts:
        scores = opened.score(store["targets"])
    reads, listings, other = _split(counts)
    assert set(reads) == _nodes(("features", "out_to_loss", "kernel"), root=False, scores=False) | _chunks(
        ("features", "out_to_loss", "kernel"))
    assert sum(reads.values()) == 7 * CHECKPOINTS
    _once(reads)
    assert not listings and not other, (listings, other)
    np.testing.assert_allclose(scores, store["memory"], rtol=1e-5, atol=1e-8)  # as one that never had a store


@pytest.mark.parametrize("verify", [False, True])
def test_the_report_makes_one_request_per_file_and_folder(store, verify):
    """``trak-core store``: every metadata file but the kernels' (--verify: every one, and every chunk), once each;
    two listings (the store's checkpoints, the saved sets), each once."""
    with requests(store["root"]) as counts:
        report = store_report.describe(store["url"], verify=verify)
    assert report["complete"] == list(range(CHECKPOINTS)) and not report["damaged"]
    assert [s["name"] for s in report["scores"]] == [f"set{s}" for s in range(SETS)]
    reads, listings, other = _split(counts)
    arrays = ("features", "out_to_loss", "kernel") if verify else ("features", "out_to_loss")
    chunks = _chunks(arrays) | {f"scores/set{s}/c/0/0" for s in range(SETS)} if verify else set()
    assert set(reads) == _nodes(arrays) | chunks
    assert sum(reads.values()) == 2 + SETS + (7 * CHECKPOINTS + SETS if verify else 3 * CHECKPOINTS)
    _once(reads)
    assert listings == {".": 1, "scores": 1} and not other, (listings, other)


def test_saved_and_loaded_scores_make_one_request_per_file(store):
    """saved_scores: the scores group's and each set's metadata, one listing of the sets; load_scores: the group's
    and the set's metadata and its chunk, no listing (a set zarr opens is there). The values are the in-memory
    estimator's."""
    opened = TRAK.open(store["url"], store["model"], {0: store["model"].init(seed=0)})
    with requests(store["root"]) as counts:
        assert opened.saved_scores() == [f"set{s}" for s in range(SETS)]
    reads, listings, other = _split(counts)
    assert reads == {"scores/zarr.json": 1, **{f"scores/set{s}/zarr.json": 1 for s in range(SETS)}}
    assert listings == {"scores": 1} and not other, (listings, other)
    with requests(store["root"]) as counts:
        loaded = opened.load_scores("set1")
    reads, listings, other = _split(counts)
    assert reads == {"scores/zarr.json": 1, "scores/set1/zarr.json": 1, "scores/set1/c/0/0": 1}
    assert not listings and not other, (listings, other)
    np.testing.assert_allclose(loaded, store["sets"][1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_damaged_checkpoint_is_named_reading_its_file_once_more(store, how):
    """A damaged ``c5/features/zarr.json``: TRAK.open names it having read each metadata file once, the damaged one
    once more (zarr cannot parse it or finds none; trak-core's check reads it to say what is wrong), and listed
    each folder at most once (a deleted file: its folder's listing tells that the array's chunks are there)."""
    fs, key = fsspec.filesystem("memory"), f"{store['root']}/c5/features/zarr.json"
    raw = fs.cat_file(key)
    fs.rm_file(key) if how == "deleted" else fs.pipe_file(key, raw[:30])
    try:
        with requests(store["root"]) as counts:
            with pytest.raises(StoreDamagedError, match=r"checkpoint 5 in .* is damaged: its metadata .*"
                                                        r"c5/features/zarr\.json"):
                TRAK.open(store["url"], store["model"], _checkpoints(store))
        reads, listings, other = _split(counts)
        assert reads.pop("c5/features/zarr.json") == 2
        _once(reads)
        expected = {".": 1, "c5/features": 1} if how == "deleted" else {".": 1}
        assert listings == expected and not other, (listings, other)
    finally:
        fs.pipe_file(key, raw)


def test_each_call_asks_the_url_store_again(store):
    """Nothing is kept from one call to the next: a second call makes the same requests, and a set whose metadata
    another process deleted between two calls is seen by the next one, and again once the file is back."""
    def states():
        return {s["name"]: s["state"] for s in store_report.describe(store["url"])["scores"]}

    made = []
    for _ in range(2):
        with requests(store["root"]) as counts:
            TRAK.open(store["url"], store["model"], _checkpoints(store))
        made.append(dict(counts))
    assert made[0] == made[1] and made[0][("ls", ".")] == 1
    assert states() == {f"set{s}": "finished" for s in range(SETS)}
    fs, key = fsspec.filesystem("memory"), f"{store['root']}/scores/set2/zarr.json"
    saved = fs.cat_file(key)
    fs.rm_file(key)  # as another process might, between two calls
    try:
        assert states()["set2"] == "damaged"
    finally:
        fs.pipe_file(key, saved)
    assert states()["set2"] == "finished"


def test_a_set_named_as_its_folder_is_listed(store):
    """A set saved as ``scores`` (the name of the folder of the sets) was left out of a URL store's listing (an entry
    named as the folder was taken for the folder itself): saved_scores() missed it and load_scores said "no scores
    named". Now it is listed and reads back as the in-memory estimator scores."""
    x, y = _data()
    opened = TRAK.open(store["url"], store["model"], _checkpoints(store))
    batch = [(x[10:12], y[10:12])]
    try:
        opened.score(batch, save_as="scores")
        assert opened.saved_scores() == ["scores"] + [f"set{s}" for s in range(SETS)]
        memory = TRAK(store["model"], proj_dim=16, progress=False)
        for c in range(CHECKPOINTS):
            memory.featurize(store["model"].init(seed=c), [(x[i:i + 20], y[i:i + 20]) for i in range(0, N, 20)])
        np.testing.assert_allclose(opened.load_scores("scores"), memory.score(batch), rtol=1e-5, atol=1e-8)
    finally:
        fsspec.filesystem("memory").rm(f"{store['root']}/scores/scores", recursive=True)


def test_an_entry_named_as_its_folder_is_not_taken_from_the_folder_itself(store):
    """exists/is_dir answered from a folder's listing left the folder itself in, which iterdir leaves out: a file
    lists itself (fsspec's MemoryFileSystem, s3fs) and an object store's folder marker (``folder/``) names the folder,
    so ``<folder>/<its own name>`` was taken to be there. Now the listing says what the filesystem says."""
    from trak_core.disk_listing import reading
    from trak_core.disk_tree import UrlPath, store_tree

    fs = fsspec.filesystem("memory")
    with reading():
        file = store_tree(store["url"]) / "c0" / "zarr.json"
        assert file.entries() == []  # a file: no entries (its listing names itself)
        assert (file / "zarr.json").exists() is fs.exists(f"{file.path}/zarr.json") is False

    class Marker(MemoryFileSystem):
        """A folder marker listed first, as an object store lists a key ``folder/``."""
        protocol = "memory-with-markers"

        def ls(self, path, detail=True, **kwargs):
            found = super().ls(path, detail=detail, **kwargs)
            path = self._strip_protocol(path)
            return ([{"name": f"{path}/", "type": "file", "size": 0}] + list(found)) if self.isdir(path) else found

    marked = Marker(skip_instance_cache=True)
    with reading():
        scores = UrlPath(marked, f"{store['root']}/scores")
        assert sorted(entry.name for entry in scores.entries()) == [f"set{s}" for s in range(SETS)] + ["zarr.json"]
        assert not (scores / "scores").exists() and not (scores / "scores").is_dir()
        assert (scores / "set0").exists() and (scores / "set0").is_dir()
