"""The on-disk store: the same numbers as memory, resume after SIGKILL, config checks, damage, full disk."""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import MLP, TRAK, TrakOSError  # noqa: E402
from trak_core.disk_store import StoreMismatchError  # noqa: E402
from tests_helpers import save_interrupted  # noqa: E402

N, BATCH = 9000, 700  # batches that do not align with the 4,096-row chunks


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)), rng.integers(0, 3, N)


def _batches(x, y):
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)]


def _run(store, checkpoints=2):
    x, y = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=store, progress=False)
    for c in range(checkpoints):
        trak.featurize(model.init(seed=c), _batches(x, y))
    return trak, trak.score([(x[:6], y[:6])])


def test_disk_store_gives_the_memory_store_numbers_bit_for_bit(tmp_path):
    _, memory = _run(None)
    trak, disk = _run(tmp_path / "store")
    assert np.array_equal(memory, disk)
    assert (tmp_path / "store" / "zarr.json").exists()
    _, reopened = _run(tmp_path / "store")  # every checkpoint complete: read back, nothing recomputed
    assert np.array_equal(reopened, memory)


SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from trak_core import MLP, TRAK
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9000, 5)), rng.integers(0, 3, 9000)
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=sys.argv[1], progress=False)
    def slow(batches):
        for b in batches:
            time.sleep(0.08)
            yield b
    for c in range(2):
        trak.featurize(model.init(seed=c), slow([(x[i:i + 700], y[i:i + 700]) for i in range(0, 9000, 700)]))
    print("finished")
""")


def test_killed_runs_resume_to_identical_scores(tmp_path):
    _, reference = _run(None)
    script = tmp_path / "featurize.py"
    script.write_text(SCRIPT)
    rng = np.random.default_rng(1)
    interrupted = 0
    for attempt in range(10):
        store = tmp_path / f"store{attempt}"
        process = subprocess.Popen([sys.executable, str(script), str(store)], stdout=subprocess.PIPE)
        time.sleep(float(rng.uniform(0.8, 2.6)))  # import + some chunks, then SIGKILL at a random moment
        process.send_signal(signal.SIGKILL)
        out, _ = process.communicate()
        interrupted += b"finished" not in out
        _, resumed = _run(store)
        assert np.array_equal(resumed, reference), f"attempt {attempt}"
    assert interrupted >= 8, f"only {interrupted} of 10 kills landed mid-run"


class _Killed(BaseException):
    """Stands for SIGKILL at one chosen instant (a BaseException: nothing in the library catches it)."""


def _killed_then_resumed(tmp_path, monkeypatch, owner, method, dies, after_kill=lambda: None):
    """Featurize into a store with ``owner.method`` raising :class:`_Killed` where ``dies(self, *args)`` says,
    (``after_kill()`` then looks at the store), then resume without it: the scores must equal an uninterrupted
    run's."""
    _, reference = _run(None)
    store = tmp_path / "store"
    real = getattr(owner, method)

    def then_die(self, *args, **kwargs):
        if dies(self, *args):
            raise _Killed
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, then_die)
    with pytest.raises(_Killed):
        _run(store)
    after_kill()
    monkeypatch.setattr(owner, method, real)
    _, resumed = _run(store)
    assert np.array_equal(resumed, reference)


@pytest.mark.parametrize("resize", [1, 2])
def test_kill_between_the_two_resizes_resumes_to_identical_scores(tmp_path, monkeypatch, resize):
    """A kill after ``features`` grew but before ``out_to_loss`` did (the window the SIGKILL test hits
    about once in 150 kills) must not leave ``out_to_loss`` short or its rows unwritten on resume."""
    import zarr

    calls = []

    def dies(array, *args):
        if array.path.endswith("out_to_loss"):
            calls.append(array.path)
            return len(calls) == resize
        return False

    _killed_then_resumed(tmp_path, monkeypatch, zarr.Array, "resize", dies)


def test_kill_between_creating_the_two_arrays_resumes_to_identical_scores(tmp_path, monkeypatch):
    """A kill after ``features`` was created but before ``out_to_loss`` was (seen once by the SIGKILL test)."""
    import zarr

    _killed_then_resumed(tmp_path, monkeypatch, zarr.Group, "create_array",
                         lambda group, name, *rest: name == "out_to_loss")


@pytest.mark.parametrize("write", [1, 2])
def test_kill_inside_the_stores_first_metadata_write_resumes(tmp_path, monkeypatch, write):
    """A kill after zarr wrote the store's ``zarr.json`` to its temporary file but before renaming it into place
    (write 1: the group's creation; 2: the configuration's attributes) left ``zarr.<hex>.partial`` in the store's
    directory, and the rerun refused it as "not a trak-core store": the store could never be resumed. The rerun,
    finishing the checkpoint, deletes the file."""
    calls = []

    def dies(path, target, *rest):
        if path.name.endswith(".partial") and pathlib.Path(target) == tmp_path / "store" / "zarr.json":
            calls.append(target)
            return len(calls) == write
        return False

    def left():
        assert list((tmp_path / "store").glob("*.partial")), "the kill should leave zarr's temporary file behind"

    _killed_then_resumed(tmp_path, monkeypatch, pathlib.Path, "replace", dies, left)
    assert list((tmp_path / "store").glob("*.partial")) == []


@pytest.mark.parametrize("key", ["lambda_reg", "lambda_setting"])
def test_kill_while_a_checkpoint_is_marked_complete_keeps_its_lambda(tmp_path, monkeypatch, key):
    """zarr writes ``attrs.update`` one key at a time: ``complete`` landed before ``lambda_reg`` and
    ``lambda_setting``, and a kill between left a complete checkpoint without them. The rerun skips a complete
    checkpoint, so they were never written: ``TRAK.open`` factorized it with ``"auto"`` instead of the 0.5 it was
    featurized with (other scores), and took ``"auto"`` as the store's setting for checkpoints featurized later."""
    import zarr

    x, y = _data()
    model = MLP(5, 4, 3)

    def run(store):
        trak = TRAK(model, proj_dim=32, store=store, lambda_reg=0.5, progress=False)
        trak.featurize(model.init(seed=0), _batches(x, y))
        return trak

    run(tmp_path / "reference")
    reference = TRAK.open(tmp_path / "reference", model, [model.init(seed=0)], progress=False)
    real = zarr.core.attributes.Attributes.__setitem__

    def then_die(self, name, value):
        if name == key:
            raise _Killed
        return real(self, name, value)

    monkeypatch.setattr(zarr.core.attributes.Attributes, "__setitem__", then_die)
    with pytest.raises(_Killed):
        run(tmp_path / "store")
    monkeypatch.setattr(zarr.core.attributes.Attributes, "__setitem__", real)
    run(tmp_path / "store")  # the same calls again: it resumes
    opened = TRAK.open(tmp_path / "store", model, [model.init(seed=0)], progress=False)
    assert opened.lambda_reg == reference.lambda_reg == 0.5 and opened.lambdas == reference.lambdas
    assert np.array_equal(opened.score([(x[:6], y[:6])]), reference.score([(x[:6], y[:6])]))


def test_other_configuration_is_refused_and_nothing_is_overwritten(tmp_path):
    store = tmp_path / "store"
    _run(store)
    manifest = (store / "zarr.json").read_bytes()
    x, y = _data()
    model = MLP(5, 4, 3)
    with pytest.raises(StoreMismatchError, match=r"proj_dim: stored 32, now 64.*seed: stored 0, now 1"):
        TRAK(model, proj_dim=64, seed=1, store=store, progress=False).featurize(model.init(seed=0), _batches(x, y))
    assert (store / "zarr.json").read_bytes() == manifest


def test_other_data_size_or_dtype_is_refused(tmp_path):
    store = tmp_path / "store"
    _run(store, checkpoints=1)
    x, y = _data()
    model = MLP(5, 4, 3)
    manifest = (store / "c0" / "zarr.json").read_bytes()
    with pytest.raises(StoreMismatchError, match="has 8999 examples, but the store at .* featurized on n_train=9000"):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), [(x[:-1], y[:-1])])
    with pytest.raises(StoreMismatchError, match=r"rows 0\.\.4095 \(data_checksums chunk 0\)"):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0), [(x[1:], y[1:])])
    with pytest.raises(StoreMismatchError, match=r"rows 4096\.\.8191 \(data_checksums chunk 1\)"):
        shuffled = np.r_[0:4096, np.random.default_rng(1).permutation(np.arange(4096, 9000))]
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=0),
                                                                        [(x[shuffled], y[shuffled])])
    with pytest.raises(StoreMismatchError, match=r"checkpoint 0 in .* other parameters \(parameters_sha256"):
        TRAK(model, proj_dim=32, store=store, progress=False).featurize(model.init(seed=5), _batches(x, y))
    assert (store / "c0" / "zarr.json").read_bytes() == manifest  # nothing was written
    other = tmp_path / "other"
    TRAK(model, proj_dim=32, store=other, progress=False).featurize(model.init(seed=0), [(x[:10], y[:10])])
    with pytest.raises(StoreMismatchError, match="parameters_sha256.*cast to another dtype.*stored as float64"):
        TRAK(model, proj_dim=32, store=other, progress=False).featurize(
            model.init(seed=0).astype(np.float32), [(x[:10].astype(np.float32), y[:10])])


def test_damaged_chunk_is_detected_and_recomputed(tmp_path):
    store = tmp_path / "store"
    _, reference = _run(store)
    chunk = store / "c1" / "features" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:50])  # truncated
    x, y = _data()
    with pytest.raises(StoreMismatchError, match="checkpoint 1 in .* is damaged .* redoes the damaged rows only"):
        TRAK.open(store, MLP(5, 4, 3), [MLP(5, 4, 3).init(seed=c) for c in range(2)])  # was "incomplete or has no..."
    trak = TRAK(MLP(5, 4, 3), proj_dim=32, store=store, progress=False)
    trak.featurize(MLP(5, 4, 3).init(seed=0), _batches(x, y))
    trak.featurize(MLP(5, 4, 3).init(seed=1), _batches(x, y))  # recomputes chunk 1 and what follows
    assert np.array_equal(trak.score([(x[:6], y[:6])]), reference)
    chunk.write_bytes(b"\x00" * len(chunk.read_bytes()))
    with pytest.raises(ValueError, match="run featurize for this checkpoint again"):
        trak.score([(x[:6], y[:6])])


def test_full_disk_is_a_clear_error_and_resumes(tmp_path, monkeypatch):
    import zarr

    store = tmp_path / "store"
    _, reference = _run(None)
    original = zarr.Array.__setitem__
    calls = {"n": 0}

    def failing(self, key, value):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        return original(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing)
    with pytest.raises(OSError, match="chunks written before are intact"):
        _run(store)
    monkeypatch.setattr(zarr.Array, "__setitem__", original)
    _, resumed = _run(store)
    assert np.array_equal(resumed, reference)


def test_unwritable_directory(tmp_path, monkeypatch):
    def refuse(self, data):
        raise PermissionError(13, "Permission denied")

    trak = TRAK(MLP(5, 4, 3), proj_dim=8, store=tmp_path / "ro", progress=False)
    assert not os.path.exists(tmp_path / "ro")  # opening creates nothing; the first write does
    monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
    x, y = _data()
    with pytest.raises(TrakOSError, match="is not writable"):
        trak.featurize(MLP(5, 4, 3).init(seed=0), [(x[:10], y[:10])])


def test_store_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("not a store")
    with pytest.raises(TrakOSError, match="is a file, not a directory"):
        TRAK(MLP(5, 4, 3), store=tmp_path / "file", progress=False)


def test_scores_are_saved_and_never_overwritten(tmp_path):
    store = tmp_path / "store"
    trak, scores = _run(store)
    x, y = _data()
    again = trak.score([(x[:6], y[:6])], save_as="first-six")
    assert np.array_equal(trak.store.load_scores("first-six"), again)
    assert np.array_equal(again, scores)
    consumed = []

    def targets():  # each refusal comes before any target is scored (they came after all of them before)
        consumed.append(1)
        yield x[:2], y[:2]

    with pytest.raises(ValueError, match="already exist"):
        trak.score(targets(), save_as="first-six")
    assert trak.store.load_scores("first-six").shape == (N, 6)
    with pytest.raises(ValueError, match="on-disk store"):
        _run(None)[0].score(targets(), save_as="x")
    for bad in ("..", ".", "", " ", "a/b", "__meta", " padded"):  # '..' reached zarr's own ValueError before
        with pytest.raises(ValueError, match="save_as needs a plain name"):
            trak.score(targets(), save_as=bad)
    assert consumed == []
    assert trak.saved_scores() == ["first-six"]


def test_an_interrupted_save_as_is_not_listed_and_its_name_is_reused(tmp_path, monkeypatch):
    """A kill while ``save_as`` writes (after the array is created, before its data and checksum) left a name that
    was listed, refused by ``save_as`` ("already exist") and unreadable ("damaged ... score again")."""
    x, y = _data()
    _, reference = _run(None, checkpoints=1)
    trak, _ = _run(tmp_path / "store", checkpoints=1)
    save_interrupted(monkeypatch, trak, [(x[:6], y[:6])], "run", _Killed)
    assert (tmp_path / "store" / "scores" / "run" / "zarr.json").exists()  # the interrupted set is on disk
    assert trak.saved_scores() == []  # was ['run']
    with pytest.raises(ValueError, match=r"'run' .* never finished .*score again with save_as='run'"):
        trak.load_scores("run")
    assert np.array_equal(trak.score([(x[:6], y[:6])], save_as="run"), reference)  # was "already exist"
    assert trak.saved_scores() == ["run"]
    with pytest.raises(ValueError, match="already exist"):  # a finished set is still never overwritten
        trak.score([(x[:2], y[:2])], save_as="run")
    assert np.array_equal(TRAK.open(tmp_path / "store", MLP(5, 4, 3), [MLP(5, 4, 3).init(seed=0)]).load_scores("run"),
                          reference)


def test_fsspec_urls(tmp_path):
    pytest.importorskip("fsspec", reason="fsspec is not installed")
    _, memory = _run(None)
    _, scores = _run(f"file://{tmp_path / 'url-store'}")
    assert np.array_equal(scores, memory)
    assert (tmp_path / "url-store" / "zarr.json").exists()
    _, escaped = _run(f"file://{tmp_path / 'url%20store' / 'nested'}")  # folders made; not percent-decoded, as
    assert np.array_equal(escaped, memory)  # fsspec kept it: stores written through it are found again
    assert (tmp_path / "url%20store" / "nested" / "zarr.json").exists() and not (tmp_path / "url store").exists()


def test_a_store_path_under_the_home_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    trak, scores = _run("~/stores/run")
    assert (tmp_path / "home" / "stores" / "run" / "c0").is_dir() and not (tmp_path / "~").exists()
    model = MLP(5, 4, 3)
    x, y = _data()
    reopened = TRAK.open("~/stores/run", model, [model.init(seed=c) for c in range(trak.n_checkpoints)])
    np.testing.assert_array_equal(reopened.score([(x[:6], y[:6])]), scores)


def test_a_relative_store_path_is_fixed_when_given(tmp_path, monkeypatch):
    """After os.chdir a relative store= path still names the same store: it followed the current directory
    (a false "chunk is damaged", an empty list of saved scores, stray files written in the new directory)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    x, y = _data()
    model = MLP(5, 4, 3)
    monkeypatch.chdir(tmp_path / "a")
    trak = TRAK(model, proj_dim=16, store="store", progress=False)
    trak.featurize(model.init(seed=0), [(x[:300], y[:300])])
    expected = trak.score([(x[:4], y[:4])], save_as="first")
    monkeypatch.chdir(tmp_path / "b")
    assert np.array_equal(trak.score([(x[:4], y[:4])]), expected)
    assert trak.saved_scores() == ["first"]
    monkeypatch.chdir(tmp_path / "a")
    opened = TRAK.open("store", model, [model.init(seed=0)])
    monkeypatch.chdir(tmp_path / "b")
    assert np.array_equal(opened.score([(x[:4], y[:4])]), expected)
    assert np.array_equal(opened.load_scores("first"), expected)
    assert list((tmp_path / "b").iterdir()) == []


def test_saving_and_loading_scores_hold_a_chunk_at_a_time(tmp_path):
    """save_as copied the whole score matrix twice (zarr's encode of everything at once, and bytes for the
    checksum): 2.0x the result above it; load_scores peaked at 2.9x. Now a chunk of rows at a time (tracemalloc:
    0.25x and 1.7x for 4 chunks)."""
    import tracemalloc

    from trak_core.disk_store import DiskStore

    store = DiskStore(tmp_path / "store")
    store.writable()
    scores = np.random.default_rng(0).standard_normal((4 * 4096, 300)).astype(np.float32)
    tracemalloc.start()
    try:
        store.save_scores("big", scores)
        saving = tracemalloc.get_traced_memory()[1] / scores.nbytes
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        loaded = store.load_scores("big")
        loading = (tracemalloc.get_traced_memory()[1] - before) / scores.nbytes
    finally:
        tracemalloc.stop()
    assert np.array_equal(loaded, scores)
    assert saving < 0.6 and loading < 2.5, (saving, loading)  # 1.73 alone; 2.21 once in a CI worker (tracemalloc
    # counts every thread's allocations), against 2.0 and 2.9 before


def test_a_relative_file_url_is_fixed_when_given(tmp_path, monkeypatch):
    """``file://relstore`` followed the working directory of whoever opened it (Ray workers: GroupNotFoundError)."""
    from trak_core.disk_store import DiskStore

    monkeypatch.chdir(tmp_path)
    assert DiskStore("file://relstore").location == f"file://{tmp_path / 'relstore'}"
    assert DiskStore("file:///abs/store").location == "file:///abs/store"
    # RFC 8089's form naming the local host was taken for the relative folder ./localhost/abs/store
    assert DiskStore("file://localhost/abs/store").location == "file:///abs/store"


@pytest.mark.parametrize("bad, why", [("zarr.json", r"the store's own metadata file \(zarr.json\)"),
                                      ("x" * 256, r"256 bytes long in UTF-8, more than a file name holds \(255\)"),
                                      ("é" * 128, r"256 bytes long in UTF-8, more than a file name holds \(255\)")])
def test_a_save_as_name_the_file_system_refuses_is_refused_before_scoring(tmp_path, bad, why):
    """'zarr.json' (the scores group's own metadata file) and names over 255 bytes passed the name check and failed
    in zarr only after every target was scored (FileExistsError, OSError 'File name too long'): the scores were
    lost. They are refused before any target is scored; a 255-byte name is saved and read back bit for bit."""
    trak, scores = _run(tmp_path / "store")
    x, y = _data()
    consumed = []

    def targets():
        consumed.append(1)
        yield x[:6], y[:6]

    with pytest.raises(ValueError, match=f"save_as needs a plain name such as 'run-1': .* is {why}; choose another"):
        trak.score(targets(), save_as=bad)
    assert consumed == [] and trak.saved_scores() == []
    longest = "y" * 255
    assert np.array_equal(trak.score(targets(), save_as=longest), scores)
    assert np.array_equal(trak.load_scores(longest), scores) and trak.saved_scores() == [longest]


def test_finishing_a_checkpoint_deletes_what_killed_zarr_writes_left(tmp_path):
    """A kill during a zarr write leaves ``<name>.<32 hex>.partial`` (zarr writes each file so, then renames it):
    they stayed in the store for good. The rerun that finishes the checkpoint deletes those of its group and the
    root's; a user's file and those of another group are left, and the scores are those of an uninterrupted run."""
    import trak_core

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.integers(0, 3, 200)
    model = trak_core.MLP(5, 4, 3)
    path = tmp_path / "store"
    first = trak_core.TRAK(model, proj_dim=16, store=path, progress=False)
    first.featurize(model.init(seed=0), [(x[:100], y[:100]), (x[100:], y[100:])])
    hexes = iter(f"{i:032x}" for i in range(1, 100))
    left = [path / f"zarr.{next(hexes)}.partial", path / "c0" / "features" / "c" / "0" / f"0.{next(hexes)}.partial",
            path / "c0" / f"zarr.{next(hexes)}.partial"]
    kept = [path / "c1" / "notes.partial", path / "scores" / "other" / f"zarr.{next(hexes)}.partial"]
    for file in left + kept:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"cut short")
    import json

    meta = json.loads((path / "c0" / "zarr.json").read_text())
    meta["attributes"]["complete"] = False  # as a kill before the last write of the checkpoint leaves it
    (path / "c0" / "zarr.json").write_text(json.dumps(meta))
    rerun = trak_core.TRAK(model, proj_dim=16, store=path, progress=False)
    rerun.featurize(model.init(seed=0), [(x[:100], y[:100]), (x[100:], y[100:])])
    assert [file for file in left if file.exists()] == []
    assert all(file.exists() for file in kept)
    assert np.array_equal(rerun.score([(x[:5], y[:5])]), first.score([(x[:5], y[:5])]))
    scores = path / "scores" / "run"
    scores.mkdir(parents=True)
    (scores / f"zarr.{next(hexes)}.partial").write_bytes(b"cut short")
    rerun.score([(x[:5], y[:5])], save_as="run")
    assert list(scores.rglob("*.partial")) == []


def test_a_set_name_that_a_case_insensitive_disk_would_match_is_not_loaded(tmp_path, monkeypatch):
    """On a case-insensitive disk (macOS, Windows) zarr opens ``scores/RUN1`` for the set saved as ``run1``. Looking a
    set up before listing the sets (62876ba) loaded run1's scores for ``load_scores("RUN1")``; a local store lists
    its sets first, as before. The disk's matching is imitated here: lookups of set names ignore case."""
    import trak_core.disk_layout as layout
    import trak_core.disk_scores as disk_scores

    trak, scores = _run(tmp_path / "store", checkpoints=1)
    x, y = _data()
    trak.score([(x[:6], y[:6])], save_as="run1")
    lookup = layout.member

    def any_case(group, name):
        return lookup(group, name.lower() if group.path.endswith("scores") else name)

    monkeypatch.setattr(disk_scores, "member", any_case)
    assert np.array_equal(trak.load_scores("run1"), scores)
    from trak_core import TrakValueError

    with pytest.raises(TrakValueError, match=r"no scores named 'RUN1' in .*; saved: \['run1'\]"):
        trak.load_scores("RUN1")
