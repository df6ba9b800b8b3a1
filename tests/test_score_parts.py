"""``load_scores(name, rows=..., targets=...)``: part of a saved score set, read from only the chunks that hold its
rows, each checked against its own checksum. A user with 1,000,000 rows x 10,000 targets (40 GB float32) read the
whole set to look at some rows. References: NumPy slicing of the array that was saved, ``hashlib`` over its bytes,
the in-memory estimator's scores, and the previous release of trak-core reading and writing the same store."""
import collections
import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

import trak_core.store_report as store_report  # noqa: E402
from trak_core import MLP, TRAK  # noqa: E402
from trak_core.disk_store import DiskStore  # noqa: E402
from trak_core.errors import StoreDamagedError, TrakTypeError, TrakValueError  # noqa: E402
from trak_core.store import KERNEL_CHUNK_ROWS as ROWS  # noqa: E402

N, M = 3 * ROWS + 5, 7  # three whole chunks of rows and a fourth of 5 rows
PREVIOUS = "c2f1947d75f4597014969a5c9029a7601116417b"  # the last commit before per-chunk checksums
PARTS = [(slice(10, 20), None), (slice(ROWS - 3, ROWS + 4), [6, 0, 6]), ([5, 3 * ROWS + 2, 3, 5, -1], None),
         (np.array([2 * ROWS + 1], dtype=np.int32), slice(1, 5, 2)), (slice(None, None, -997), slice(None, None, -1)),
         (None, [2]), (range(ROWS, ROWS + 2), [-1]), ([], None), (slice(5, 2), [0]), (slice(-3, None), None),
         (slice(0, 10 * N), slice(-100, 100))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A store of N training examples with two score sets of M targets (``score(save_as=)``'s float64, and the same
    in float32) and the arrays saved in them."""
    path = tmp_path_factory.mktemp("parts") / "store"
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(N, 5)), rng.integers(0, 3, N)
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=8, store=path, progress=False)
    trak.featurize(model.init(seed=0), [(x[i:i + 2048], y[i:i + 2048]) for i in range(0, N, 2048)])
    scores = trak.score([(x[:M], y[:M])], save_as="f64")
    trak.store.save_scores("f32", scores.astype(np.float32))
    return path, {"f64": scores, "f32": scores.astype(np.float32)}


def _copy(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "store")
    return tmp_path / "store"


def _reference(values, rows, targets):
    return values[slice(None) if rows is None else rows][:, slice(None) if targets is None else targets]


@contextlib.contextmanager
def chunk_reads(set_path):
    """``{chunk file relative to the set: times opened for reading}`` while the block runs (zarr's LocalStore
    reads every file through ``pathlib.Path.open``)."""
    counts, original, root = collections.Counter(), pathlib.Path.open, (pathlib.Path(set_path) / "c").resolve()

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


def _drop_chunk_checksums(set_path):
    """The set as a release before per-chunk checksums saved it: the same array, no ``checksums`` attribute."""
    metadata = pathlib.Path(set_path) / "zarr.json"
    document = json.loads(metadata.read_text())
    del document["attributes"]["checksums"]
    metadata.write_text(json.dumps(document))


@pytest.mark.parametrize("name", ["f32", "f64"])
@pytest.mark.parametrize("rows, targets", PARTS)
def test_a_part_equals_numpy_slicing_of_the_saved_array(saved, name, rows, targets):
    path, values = saved
    got = DiskStore(path).load_scores(name, rows=rows, targets=targets)
    expected = _reference(values[name], rows, targets)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_checksums_are_written_per_chunk_beside_the_whole_sets(saved):
    """``checksums`` hash each 4,096-row block's bytes; ``sha256`` (all a previous release reads) the whole set's."""
    path, values = saved
    attributes = json.loads((path / "scores" / "f32" / "zarr.json").read_text())["attributes"]
    blocks = [values["f32"][start:start + ROWS] for start in range(0, N, ROWS)]
    assert attributes["checksums"] == {str(c): hashlib.sha256(block.tobytes()).hexdigest()
                                       for c, block in enumerate(blocks)}
    assert attributes["sha256"] == hashlib.sha256(values["f32"].tobytes()).hexdigest()
    assert list(attributes)[-1] == "sha256"


@pytest.mark.parametrize("rows, targets, chunks", [
    (slice(ROWS + 4, ROWS + 100), None, {1}), ([5, 3 * ROWS + 2, 7], [0], {0, 3}), (slice(2 * ROWS - 1, 2 * ROWS + 1),
                                                                                 slice(0, 1), {1, 2}),
    (None, [3], {0, 1, 2, 3}), ([], None, set()), (slice(None), [], set())])
def test_a_part_reads_only_the_chunks_that_hold_its_rows(saved, rows, targets, chunks):
    path, values = saved
    store = DiskStore(path)
    with chunk_reads(path / "scores" / "f32") as counts:
        got = store.load_scores("f32", rows=rows, targets=targets)
    assert dict(counts) == {f"{c}/0": 1 for c in chunks}  # each once, none other
    assert np.array_equal(got, _reference(values["f32"], rows, targets))
    with chunk_reads(path / "scores" / "f32") as counts:
        store.load_scores("f32")
    assert dict(counts) == {f"{c}/0": 1 for c in range(4)}  # the whole set: every chunk once, as before


def test_a_set_saved_without_per_chunk_checksums_is_read_whole_and_checked_first(saved, tmp_path):
    """The documented fallback: every chunk read once (one at a time), the whole set's sha256 checked, then the part;
    damage in a chunk the part does not hold is still found."""
    path, values = saved
    path = _copy(saved, tmp_path)
    _drop_chunk_checksums(path / "scores" / "f64")
    store = DiskStore(path)
    for rows, targets in PARTS:
        assert np.array_equal(store.load_scores("f64", rows=rows, targets=targets),
                              _reference(values["f64"], rows, targets))
    with chunk_reads(path / "scores" / "f64") as counts:
        store.load_scores("f64", rows=slice(3, 9), targets=[1])
    assert dict(counts) == {f"{c}/0": 1 for c in range(4)}
    shutil.copyfile(path / "scores" / "f64" / "c" / "0" / "0", path / "scores" / "f64" / "c" / "2" / "0")
    with pytest.raises(StoreDamagedError, match=r"scores 'f64' in .* are damaged \(checksum mismatch\); score again "
                                                r"with save_as= another name, or delete the directory scores/f64"):
        store.load_scores("f64", rows=slice(3, 9))


@pytest.mark.parametrize("damage", ["copied", "deleted", "truncated"])
def test_a_damaged_chunk_read_by_a_part_is_named_and_the_others_read(saved, tmp_path, damage):
    """Chunk 1 replaced by chunk 0's file (it decodes, to other values), deleted (read as zarr's fill value, 0) or
    cut short (it cannot be decoded)."""
    path, values = saved
    path = _copy(saved, tmp_path)
    chunk = path / "scores" / "f32" / "c" / "1" / "0"
    if damage == "copied":
        shutil.copyfile(path / "scores" / "f32" / "c" / "0" / "0", chunk)
    elif damage == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:20])
    store = DiskStore(path)
    what = r"cannot be read: .*" if damage == "truncated" else "checksum mismatch"
    with pytest.raises(StoreDamagedError, match=rf"scores 'f32' in .* are damaged \(chunk 1, rows 4096 to 8191(:|,) "
                                                rf"{what}\); score again with save_as= another name, or delete the "
                                                r"directory scores/f32 in .* and score again with save_as='f32'"):
        store.load_scores("f32", rows=[0, ROWS + 7])
    assert np.array_equal(store.load_scores("f32", rows=slice(2 * ROWS, N)), values["f32"][2 * ROWS:])
    with pytest.raises(StoreDamagedError, match=r"scores 'f32' in .* are damaged"):
        store.load_scores("f32")  # the whole set, as before (a StoreDamagedError is a TrakValueError)


def test_verify_checks_each_chunk_against_its_own_checksum_too(saved, tmp_path):
    """``trak-core store --verify`` read each set whole against ``sha256`` alone: a set whose per-chunk checksum
    was damaged, so that every part holding that chunk is refused, was reported intact. It now checks both, reading
    each chunk once (the whole read, which checks ``sha256``, still returns the set)."""
    path, values = saved
    path = _copy(saved, tmp_path)
    metadata = path / "scores" / "f64" / "zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"]["checksums"]["2"] = "0" * 64
    metadata.write_text(json.dumps(document))
    with chunk_reads(path / "scores" / "f32") as intact, chunk_reads(path / "scores" / "f64") as damaged:
        report = store_report.describe(str(path), verify=True)
    assert dict(intact) == {f"{c}/0": 1 for c in range(4)} and dict(damaged) == {f"{c}/0": 1 for c in range(3)}
    rows = {s["name"]: s for s in report["scores"]}
    assert report["damaged"] and rows["f32"]["damaged"] is None
    assert re.search(r"scores 'f64' in .* are damaged \(chunk 2, rows 8192 to 12287: checksum mismatch\)",
                     rows["f64"]["damaged"])
    assert np.array_equal(DiskStore(path).load_scores("f64"), values["f64"])
    with pytest.raises(StoreDamagedError, match="chunk 2, rows 8192 to 12287: checksum mismatch"):
        DiskStore(path).load_scores("f64", rows=[2 * ROWS])
    _drop_chunk_checksums(path / "scores" / "f64")  # a set saved before them: sha256 alone, as before
    assert not store_report.describe(str(path), verify=True)["damaged"]
    shutil.copyfile(path / "scores" / "f64" / "c" / "0" / "0", path / "scores" / "f64" / "c" / "3" / "0")
    report = store_report.describe(str(path), verify=True)
    assert "scores 'f64' in" in report["scores"][1]["damaged"]
    assert "are damaged (checksum mismatch)" in report["scores"][1]["damaged"]


@pytest.mark.parametrize("argument, value, error, message", [
    ("rows", [0, N], TrakValueError, rf"rows: index {N} is out of range for {N} training rows \(valid: -{N} to "),
    ("rows", [-N - 1], TrakValueError, "out of range"),
    ("targets", [M], TrakValueError, rf"targets: index {M} is out of range for {M} targets"),
    ("rows", [1.0, 2.0], TrakTypeError, r"rows must be a slice .* got list of dtype float64; round the values"),
    ("rows", slice(0, 2.5), TrakTypeError, r"a slice's start, stop and step must be integers"),
    ("targets", slice(0, 5, 0), TrakValueError, r"targets=slice\(0, 5, 0\): a slice's step cannot be zero"),
    ("rows", np.zeros((2, 3), dtype=int), TrakValueError, r"rows must be 1-D .* shape \(2, 3\)"),
    ("rows", np.ones(N, dtype=bool), TrakTypeError, r"boolean mask; pass .* rows=np\.flatnonzero\(mask\)"),
    ("rows", 3, TrakTypeError, r"rows=3 is a single index; pass rows=\[3\]"),
    ("targets", "all", TrakTypeError, "targets must be a slice"),
])
def test_bad_rows_or_targets_are_refused_before_any_chunk_is_read(saved, argument, value, error, message):
    path, _ = saved
    with chunk_reads(path / "scores" / "f32") as counts:
        with pytest.raises(error, match=message):
            DiskStore(path).load_scores("f32", **{argument: value})
    assert not counts


def test_the_estimator_reads_parts_equal_to_the_in_memory_scores(tmp_path):
    """TRAK.load_scores against an estimator that never had a store; an in-memory store still says where sets live,
    and a custom store whose load_scores takes the name alone still serves whole sets."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    model = MLP(5, 4, 3)
    stored, memory = TRAK(model, proj_dim=16, store=tmp_path / "s", progress=False), TRAK(model, proj_dim=16,
                                                                                              progress=False)
    for trak in (stored, memory):
        trak.featurize(model.init(seed=0), [(x[:30], y[:30]), (x[30:], y[30:])])
    stored.score([(x[:9], y[:9])], save_as="run")
    expected = memory.score([(x[:9], y[:9])])
    opened = TRAK.open(tmp_path / "s", model, [model.init(seed=0)])
    part = opened.load_scores("run", rows=[59, 0, 17], targets=slice(2, 8, 3))
    np.testing.assert_allclose(part, expected[[59, 0, 17]][:, 2:8:3], rtol=1e-5, atol=1e-8)
    assert np.array_equal(part, opened.load_scores("run")[[59, 0, 17]][:, 2:8:3])
    with pytest.raises(TrakValueError, match="saved scores live in on-disk stores"):
        memory.load_scores("run", rows=slice(0, 2))

    from trak_core.store import MemoryStore

    class NameOnly(MemoryStore):
        def load_scores(self, name):
            return np.full((2, 2), 7.0)

    custom = TRAK(model, proj_dim=16, store=NameOnly(), progress=False)
    assert np.array_equal(custom.load_scores("any"), np.full((2, 2), 7.0))


def _previous_release(tmp_path):
    """trak_core as of ``PREVIOUS`` (``git archive``), or skip where the checkout has no such commit."""
    repository = pathlib.Path(__file__).resolve().parents[1]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    archive = subprocess.run(["git", "-C", str(repository), "archive", PREVIOUS, "trak_core"], capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {PREVIOUS[:8]} is not in this checkout (a shallow clone)")
    target = tmp_path / "previous"
    target.mkdir()
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def test_the_previous_release_reads_new_sets_and_new_code_reads_its_sets(saved, tmp_path):
    """A store shared by both versions: the previous release lists and reads (and checks) a set saved now, ignoring
    ``checksums``; it saves a set of its own, which this version reads whole and in parts."""
    previous = _previous_release(tmp_path)
    path, values = saved
    path = _copy(saved, tmp_path)
    np.save(tmp_path / "old.npy", values["f32"][:ROWS + 9])
    script = ("import sys, numpy as np, trak_core\n"
              f"assert trak_core.__file__.startswith({str(previous)!r}), trak_core.__file__\n"
              "from trak_core.disk_store import DiskStore\n"
              f"store = DiskStore({str(path)!r})\n"
              "print(store.score_names())\n"
              "np.save(sys.argv[1], store.load_scores('f32'))\n"
              f"store.save_scores('old', np.load({str(tmp_path / 'old.npy')!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(previous)}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "read.npy")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # cwd: not this checkout's trak_core
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "['f32', 'f64']"
    assert np.array_equal(np.load(tmp_path / "read.npy"), values["f32"])
    attributes = json.loads((path / "scores" / "old" / "zarr.json").read_text())["attributes"]
    assert "checksums" not in attributes and "sha256" in attributes  # the old format, as the old release writes it
    store = DiskStore(path)
    assert np.array_equal(store.load_scores("old"), values["f32"][:ROWS + 9])
    part = store.load_scores("old", rows=[ROWS + 8, 1], targets=[3])
    assert np.array_equal(part, values["f32"][[ROWS + 8, 1]][:, [3]])


def test_parts_of_a_set_at_a_url_are_read_and_checked(saved):
    """The same reads through fsspec (a ``memory://`` store, as an object store): parts equal NumPy's, a damaged
    chunk is named, the others read."""
    fsspec = pytest.importorskip("fsspec", reason="fsspec is not installed: zarr opens no URL store without it")
    path, values = saved
    fs, root = fsspec.filesystem("memory"), f"/parts-{os.getpid()}/store"
    for file in path.rglob("*"):
        if file.is_file():
            fs.pipe_file(f"{root}/{file.relative_to(path).as_posix()}", file.read_bytes())
    try:
        store = DiskStore(f"memory://{root}")
        for rows, targets in PARTS:
            assert np.array_equal(store.load_scores("f64", rows=rows, targets=targets),
                                  _reference(values["f64"], rows, targets))
        fs.pipe_file(f"{root}/scores/f64/c/1/0", fs.cat_file(f"{root}/scores/f64/c/0/0"))
        with pytest.raises(StoreDamagedError, match=r"scores 'f64' in memory://.* are damaged \(chunk 1, rows 4096 to "
                                                    r"8191: checksum mismatch\)"):
            DiskStore(f"memory://{root}").load_scores("f64", rows=[ROWS])
        part = DiskStore(f"memory://{root}").load_scores("f64", rows=slice(2 * ROWS, None), targets=[0])
        assert np.array_equal(part, values["f64"][2 * ROWS:, [0]])
    finally:
        fs.rm(root, recursive=True)
