"""Stores at URLs (``memory://``, ``file://``; ``s3://`` and the like go the same way through fsspec): damaged metadata
and two runs at one index, which a local store handled and a URL store did not. A truncated or zeroed ``zarr.json``
of a checkpoint raised zarr's raw ``JSONDecodeError`` (``UnicodeDecodeError`` for a zeroed one) naming no file, from
``TRAK.open``, from featurizing again (the fix) and from ``trak-core store``, or (``file://``) "checkpoint 1 is not
complete" and a ``--verify`` that found nothing; a damaged root ``zarr.json`` made the store "no trak-core store", and
featurizing wrote a new root over a deleted one; a damaged score set raised a raw JSON error or was "no scores named".
Two runs at one index of a ``file://`` store both wrote it (no claim). Each test checks the error's class and the file
it names, and that the scores after the fix equal those of one process featurizing in memory (no store at all)."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")
fsspec = pytest.importorskip("fsspec", reason="fsspec is not installed: zarr opens no URL store without it")

from trak_core import MLP, TRAK, StoreDamagedError, StoreMismatchError, TrakOSError  # noqa: E402
from trak_core import cli, store_report  # noqa: E402
from tests_helpers import STORE_ROWS, store_data, store_targets  # noqa: E402

N, BATCH = STORE_ROWS, 100
SCHEMES = ["memory", "file"]


_data, _targets = store_data, store_targets


def _batches():
    x, y = _data()
    return [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)]


def _featurize(store, checkpoints=2):
    """The same calls every time (``store=None``: in memory, the independent reference)."""
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=16, store=store, progress=False)
    for c in range(checkpoints):
        trak.featurize(model.init(seed=c), _batches())
    return trak


def _open(store, checkpoints=(0, 1)):
    return TRAK.open(store, MLP(5, 4, 3), {c: MLP(5, 4, 3).init(seed=c) for c in checkpoints})


def _close(actual, expected):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def reference():
    """Scores of one process featurizing in memory: both checkpoints, checkpoint 0 alone, and the set ``s2``."""
    return {"both": _featurize(None).score(_targets()), "first": _featurize(None, 1).score(_targets()),
            "s2": _featurize(None).score(_targets(slice(6, 9)))}


class Store:
    """A store at a URL of ``scheme``: its ``url``, how a file in it is named in errors, and its files' bytes."""

    def __init__(self, scheme, tmp_path):
        self.scheme = scheme
        if scheme == "memory":  # fsspec's MemoryFileSystem: one per process, so a name of its own per test
            self.fs, self.root = fsspec.filesystem("memory"), f"/{tmp_path.parent.name}-{tmp_path.name}/store"
            self.url = f"memory:/{self.root}"
        else:
            self.fs, self.root = fsspec.filesystem("file"), str(tmp_path / "store")
            self.url = f"file://{self.root}"

    def named(self, member):
        """How errors name ``member/zarr.json``: the URL of a ``memory://`` store, the local file of ``file://``."""
        base = self.url if self.scheme == "memory" else self.root
        return f"{base}/{member}/zarr.json".replace("/./", "/")

    def damage(self, member, how):
        key = f"{self.root}/{member}/zarr.json".replace("/./", "/")
        raw = self.fs.cat_file(key)
        if how == "deleted":
            self.fs.rm_file(key)
        else:
            self.fs.pipe_file(key, raw[:30] if how == "truncated" else b"\0" * len(raw))
        return raw

    def put_back(self, member, raw):
        self.fs.pipe_file(f"{self.root}/{member}/zarr.json".replace("/./", "/"), raw)

    def snapshot(self):
        return {key: self.fs.cat_file(key) for key in sorted(self.fs.find(self.root))}

    def remove(self):
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


@pytest.fixture(params=SCHEMES)
def store(request, tmp_path):
    """A finished store at a URL: two checkpoints and the score sets ``s1`` and ``s2``."""
    made = Store(request.param, tmp_path)
    trak = _featurize(made.url)
    trak.score(_targets(), save_as="s1")
    trak.score(_targets(slice(6, 9)), save_as="s2")
    yield made
    made.remove()


@pytest.mark.parametrize("how", ["truncated", "zeroed", "deleted"])
@pytest.mark.parametrize("member", ["c1", "c1/features", "c1/out_to_loss"])
def test_a_damaged_checkpoint_at_a_url_is_named_then_redone(store, reference, member, how):
    """TRAK.open raised zarr's JSONDecodeError (memory://) or "checkpoint 1 is not complete" (file://), and featurizing
    again raised the JSON error: now a StoreDamagedError names the file, nothing is written, checkpoint 0 still
    opens, and the same featurize calls redo checkpoint 1 to the in-memory scores."""
    store.damage(member, how)
    before = store.snapshot()
    with pytest.raises(StoreDamagedError, match=r"checkpoint 1 in .* is damaged: its metadata") as raised:
        _open(store.url)
    assert isinstance(raised.value, StoreMismatchError)  # as a local store's
    assert store.named(member) in str(raised.value) and "featurize it again" in str(raised.value)
    assert store.snapshot() == before  # nothing was written
    _close(_open(store.url, (0,)).score(_targets()), reference["first"])
    _close(_featurize(store.url).score(_targets()), reference["both"])  # redone
    _close(_open(store.url).score(_targets()), reference["both"])
    _close(_open(store.url).load_scores("s2"), reference["s2"])


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_url_store_whose_root_metadata_is_damaged_is_named_and_left_alone(store, reference, how):
    """A truncated root zarr.json gave "no trak-core store" (TRAK.open, trak-core store) and zarr's JSON error
    (featurize); a deleted one "no trak-core store", and featurize wrote a new root beside the old checkpoints.
    Now each names the file and changes nothing; with the file put back, the store scores as before."""
    raw = store.damage(".", how)
    before = store.snapshot()
    for call in (lambda: _open(store.url), lambda: _featurize(store.url), lambda: store_report.describe(store.url)):
        with pytest.raises(StoreDamagedError, match="store at .* is damaged: its root metadata") as raised:
            call()
        assert store.named(".") in str(raised.value) and "changed nothing" in str(raised.value)
    assert store.snapshot() == before
    store.put_back(".", raw)
    _close(_open(store.url).score(_targets()), reference["both"])


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_a_damaged_score_set_at_a_url_is_named(store, reference, how):
    """load_scores raised zarr's JSONDecodeError (memory://) or "no scores named 's1'" (file://), and save_as of the
    name was not refused as damaged. Now the set is named with its file; the other set reads."""
    store.damage("scores/s1", how)
    trak = _open(store.url)
    with pytest.raises(StoreDamagedError, match=r"scores 's1' .* are damaged: their metadata") as raised:
        trak.load_scores("s1")
    assert store.named("scores/s1") in str(raised.value)
    with pytest.raises(StoreDamagedError, match="scores 's1'"):
        trak.score(_targets(), save_as="s1")  # never written over
    assert trak.saved_scores() == ["s2"]
    _close(trak.load_scores("s2"), reference["s2"])
    report = store_report.describe(store.url, verify=True)
    assert [(s["name"], s["state"]) for s in report["scores"]] == [("s1", "damaged"), ("s2", "finished")]
    assert report["damaged"] and store.named("scores/s1") in report["scores"][0]["damaged"]


def test_the_damaged_scores_group_at_a_url_is_named(store, reference):
    """A truncated scores/zarr.json made TRAK.open raise zarr's JSONDecodeError (memory://) and load_scores say "no
    scores named" (file://). Now scoring works, and reading a set names the file; written back, every set reads."""
    store.damage("scores", "truncated")
    trak = _open(store.url)
    _close(trak.score(_targets()), reference["both"])
    with pytest.raises(StoreDamagedError, match="the saved scores in .* cannot be read") as raised:
        trak.load_scores("s2")
    assert store.named("scores") in str(raised.value)
    store.put_back("scores", b'{"attributes": {}, "zarr_format": 3, "node_type": "group"}')  # as the message says
    _close(_open(store.url).load_scores("s2"), reference["s2"])


def test_verify_names_a_damaged_checkpoint_at_a_url(store, reference, capsys):
    """``trak-core store URL --verify`` printed a JSONDecodeError traceback (memory://) or listed checkpoint 1 as
    missing and exited 0 (file://). Now it lists it as damaged, names the file, exits 1; redone, it is clean."""
    store.damage("c1", "truncated")
    cli.main(["store", store.url])  # without --verify: listed, exit status 0
    assert "damaged" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["store", store.url, "--verify"])
    assert stop.value.code == 1
    assert f"DAMAGED: its metadata {store.named('c1')}" in capsys.readouterr().out
    report = store_report.describe(store.url, verify=True)
    assert [(c["index"], c["state"]) for c in report["checkpoints"]] == [(0, "complete"), (1, "damaged")]
    assert report["missing"] == [] and report["opens"] == [0]
    _close(_featurize(store.url).score(_targets()), reference["both"])  # redone
    assert store_report.describe(store.url, verify=True)["damaged"] is False


def _sleeper():
    """Another process running on this host, to be named in a checkpoint's run record."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _record_run(store, process, complete=True):
    """Checkpoint 1's run record names ``process`` on this host (``complete=False``: and it is not complete)."""
    group = f"{store.root}/c1/zarr.json"
    meta = json.loads(store.fs.cat_file(group))
    if not complete:
        meta["attributes"].pop("complete")
    meta["attributes"]["run"] = {"host": socket.gethostname(), "pid": process.pid, "started": time.time()}
    store.fs.pipe_file(group, json.dumps(meta).encode())


def test_a_memory_url_checkpoint_a_live_process_records_is_refused(tmp_path, reference):
    """A store at a URL other than file:// has no directory to lock: a run at an index whose run record names
    another live process on this host was let write beside it. Now it is refused naming that process, writes
    nothing, and once that process is gone the same call resumes to the in-memory scores."""
    store = Store("memory", tmp_path)
    try:
        _featurize(store.url)
        sleeper = _sleeper()
        try:
            _record_run(store, sleeper, complete=False)  # checkpoint 1 being written by the sleeper, as it tells
            before = store.snapshot()
            with pytest.raises(TrakOSError, match=rf"checkpoint 1 in {store.url} is being featurized by another "
                                                  rf"process now \(pid {sleeper.pid} on "):
                _featurize(store.url)
            assert store.snapshot() == before
        finally:
            sleeper.kill()
            sleeper.wait()
        _close(_featurize(store.url).score(_targets()), reference["both"])  # resumed: its rows are verified
    finally:
        store.remove()


def test_a_damaged_memory_url_checkpoint_a_live_process_records_is_not_redone(tmp_path, reference):
    """Redoing a damaged checkpoint deletes its unreadable zarr.json files: at a URL it is refused (nothing deleted)
    while the checkpoint's run record names another live process on this host, and redone once it is gone."""
    store = Store("memory", tmp_path)
    try:
        _featurize(store.url)
        sleeper = _sleeper()
        try:
            _record_run(store, sleeper)
            store.damage("c1/features", "truncated")
            before = store.snapshot()
            with pytest.raises(TrakOSError, match=rf"being featurized by another process now \(pid {sleeper.pid} "):
                _featurize(store.url)
            assert store.snapshot() == before
        finally:
            sleeper.kill()
            sleeper.wait()
        _close(_featurize(store.url).score(_targets()), reference["both"])
    finally:
        store.remove()


def test_a_second_run_at_an_index_of_a_file_url_store_is_refused(tmp_path):
    """Two processes featurizing checkpoint 1 of a ``file://`` store at once: the second wrote the whole checkpoint
    beside the first (no claim at a URL). Now it takes the local flock and is refused naming the first, writing
    nothing; the first finishes, and the store scores as one process in memory."""
    same_index = pytest.importorskip("test_store_same_index")
    model, data, targets = same_index.model, same_index.DATA, same_index.TARGETS
    local = tmp_path / "store"
    url = f"file://{local}"
    trak = TRAK(model, proj_dim=32, progress=False)
    for seed in range(2):
        trak.featurize(model.init(seed=seed), data)
    expected = np.asarray(trak.score(targets))
    TRAK(model, proj_dim=32, progress=False, store=url).featurize(model.init(seed=0), data, index=0)
    job = same_index._job(tmp_path, url, 1, "hold")
    try:
        (tmp_path / "go").touch()
        same_index._wait_for(tmp_path / "go-held", job)
        before = (local / "c1" / "zarr.json").read_bytes()
        with pytest.raises(TrakOSError, match=rf"checkpoint 1 in {url} is being featurized by another process now "
                                              rf"\(pid {job.pid} on "):
            TRAK(model, proj_dim=32, progress=False, store=url).featurize(model.init(seed=1), data, index=1)
        assert (local / "c1" / "zarr.json").read_bytes() == before  # nothing was written
        (tmp_path / "go-release").touch()
        assert job.wait(timeout=300) == 0, job.stderr.read()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    opened = TRAK.open(url, model, [model.init(seed=s) for s in range(2)], progress=False)
    _close(opened.score(targets), expected)
    assert not any(name.endswith(".partial") for name in os.listdir(local / "c1"))


def test_url_members_named_as_their_folder_are_listed(tmp_path, reference):
    """The listing of a folder at a URL (``disk_tree.UrlPath.iterdir``) left out every entry named as the folder
    itself (meant for the folder, which some filesystems list): a score set named ``scores`` was not listed (``no
    scores named``), and checkpoint 0 of a store at ``memory://.../c0`` was taken for missing. Reference: the store
    in memory."""
    made = Store("memory", tmp_path)
    url = f"{made.url}/c0"
    try:
        trak = _featurize(url)
        trak.score(_targets(slice(6, 9)), save_as="scores")
        assert trak.saved_scores() == ["scores"]
        _close(trak.load_scores("scores"), reference["s2"])
        assert store_report.describe(url)["complete"] == [0, 1]
        _close(_open(url).score(_targets()), reference["both"])
    finally:
        made.remove()


def test_zarr_v2_data_at_a_url_is_refused_as_in_a_directory(tmp_path):
    """Featurizing into a URL that holds another's zarr v2 group wrote a whole v2-format store into it, which reading
    calls (zarr v3 only) then took for no store; a local directory refused it. Now the same refusal, nothing
    written; a fresh URL beside it is written and scores as an in-memory TRAK."""
    import zarr

    url = f"memory://v2-{tmp_path.name}"
    zarr.open_group(url, mode="w", zarr_format=2).attrs["theirs"] = 1
    fs = fsspec.filesystem("memory")
    before = sorted(fs.find(url[len("memory://"):]))
    with pytest.raises(TrakOSError, match=r"holds zarr v2 data; trak-core writes only into its own stores and "
                                          "changed nothing"):
        _featurize(url, checkpoints=1)
    assert sorted(fs.find(url[len("memory://"):])) == before
    fresh = f"memory://v3-{tmp_path.name}"
    _featurize(fresh, checkpoints=1)
    _close(_open(fresh, (0,)).score(_targets()), _featurize(None, checkpoints=1).score(_targets()))
    fs.rm(url[len("memory://"):], recursive=True)
    fs.rm(fresh[len("memory://"):], recursive=True)


def test_a_url_store_without_fsspec_names_the_extra(monkeypatch):
    """Without fsspec a URL store names what to install: fsspec from PyPI, or the checkout's urls extra (trak-core
    itself is not on PyPI: 'trak-core[urls]' was the hint, which pip cannot find)."""
    import sys

    from trak_core.disk_tree import store_tree
    from trak_core.errors import MissingFrameworkError

    monkeypatch.setitem(sys.modules, "fsspec", None)  # import fsspec raises ImportError
    with pytest.raises(MissingFrameworkError, match=r'is a URL, which zarr opens through fsspec: .*pip install fsspec '
                                                    r'\(or, in a trak-core checkout, pip install -e "\.\[urls\]"\), '
                                                    r"and the filesystem's package"):
        store_tree("s3://bucket/run")
