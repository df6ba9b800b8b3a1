"""Damage an audit found unchecked in on-disk stores: out-to-loss chunks (a missing one read as zeros: scores 33%
off; a flipped bit: 1.7e37 times off), the stored kernel (a truncated chunk: a raw decode error that featurizing
again did not repair), saved scores (a raw decode error), and directories that are not trak-core stores (a user's
own zarr.json was replaced; a foreign zarr group was written into)."""
import json
import logging

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import MLP, TRAK, TrakOSError, TrakValueError  # noqa: E402
from trak_core.disk_store import StoreMismatchError  # noqa: E402
from tests_helpers import save_interrupted  # noqa: E402

N, BATCH = 5000, 700  # two chunks of 4,096 rows, the second partial


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)), rng.integers(0, 3, N)


def _featurize(store):
    x, y = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=store, progress=False)
    for c in range(2):
        trak.featurize(model.init(seed=c), [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)])
    return trak, trak.score([(x[:6], y[:6])])


def _open(store):
    return TRAK.open(store, MLP(5, 4, 3), [MLP(5, 4, 3).init(seed=c) for c in range(2)])


@pytest.mark.parametrize("damage", ["missing", "flipped"])
def test_a_damaged_out_to_loss_chunk_is_refused_then_recomputed(tmp_path, damage):
    store = tmp_path / "store"
    _, reference = _featurize(store)
    chunk = store / "c1" / "out_to_loss" / "c" / "1"
    if damage == "missing":
        chunk.unlink()  # read back as zarr's fill value, 0
    else:
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        chunk.write_bytes(bytes(raw))
    with pytest.raises((StoreMismatchError, TrakValueError), match="damaged"):
        _open(store).score([(_data()[0][:6], _data()[1][:6])])
    trak, again = _featurize(store)  # the same calls: the damaged rows are recomputed
    assert np.array_equal(again, reference)
    x, y = _data()
    assert np.array_equal(_open(store).score([(x[:6], y[:6])]), reference)


def test_a_truncated_kernel_is_made_again_from_the_features(tmp_path, caplog):
    store = tmp_path / "store"
    _, reference = _featurize(store)
    chunk = next((store / "c0" / "kernel" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[:40])
    x, y = _data()
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        assert np.array_equal(_open(store).score([(x[:6], y[:6])]), reference)  # bit for bit: the same chunks
    assert "the stored kernel is damaged; it is made again from the features" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        assert np.array_equal(_open(store).score([(x[:6], y[:6])]), reference)
    assert "damaged" not in caplog.text  # stored again the first time


def test_truncated_saved_scores_are_named(tmp_path):
    store = tmp_path / "store"
    trak, _ = _featurize(store)
    x, y = _data()
    trak.score([(x[:6], y[:6])], save_as="s1")
    chunk = next(p for p in (store / "scores" / "s1" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:20])
    with pytest.raises(TrakValueError, match=r"scores 's1' in .* are damaged \(a chunk cannot be read"):
        _open(store).load_scores("s1")


def test_directories_that_are_not_trak_core_stores_are_left_alone(tmp_path):
    import zarr

    mine = tmp_path / "mine"
    mine.mkdir()
    settings = json.dumps({"experiment": "my settings", "lr": 0.1})
    (mine / "zarr.json").write_text(settings)
    foreign = tmp_path / "foreign.zarr"
    group = zarr.open_group(str(foreign), mode="w")
    group.attrs["owner"] = "someone"
    group.create_array("data", shape=(3,), dtype="float64")
    before = (foreign / "zarr.json").read_bytes()
    array = tmp_path / "array.zarr"
    zarr.open_array(str(array), mode="w", shape=(4,), dtype="float64")
    v2 = tmp_path / "v2.zarr"
    zarr.open_group(str(v2), mode="w", zarr_format=2).create_array("mine", shape=(3,), dtype="float64")
    plain = tmp_path / "plain"
    (plain / "c0").mkdir(parents=True)
    (plain / "c0" / "zarr.json").write_text('{"mine": true}')
    (plain / "notes.txt").write_text("my notes")
    for path, said in ((mine, "a zarr.json file that is not zarr metadata"),
                       (foreign, r"a zarr group that is not a trak-core store \(it holds \['data'\]\)"),
                       (array, "a zarr array"), (v2, "zarr v2 data"),
                       (plain, r"files that are not a trak-core store's \(\['c0', 'notes.txt'\]\)")):
        with pytest.raises(TrakOSError, match=f"holds {said}.*changed nothing"):
            _featurize(path)
    assert (mine / "zarr.json").read_text() == settings and sorted(p.name for p in mine.iterdir()) == ["zarr.json"]
    assert (foreign / "zarr.json").read_bytes() == before and not (foreign / "c0").exists()
    assert not (v2 / "zarr.json").exists() and not (v2 / "c0").exists()
    assert sorted(p.name for p in plain.iterdir()) == ["c0", "notes.txt"]
    hidden = tmp_path / "hidden"  # hidden files only (a desktop's .DS_Store): taken as an empty directory
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"\0")
    _featurize(hidden)
    killed = tmp_path / "killed"  # a first run's empty group (killed before its configuration), and a hidden file
    zarr.open_group(str(killed), mode="w")
    (killed / ".DS_Store").write_bytes(b"\0")
    _featurize(killed)


def test_a_refused_duplicate_checkpoint_leaves_no_trace(tmp_path):
    """After TRAK.open, featurizing a stored checkpoint again was refused but left an empty c2/ behind."""
    store = tmp_path / "store"
    _featurize(store)
    trak = _open(store)
    x, y = _data()
    with pytest.raises(TrakValueError, match="same parameters as checkpoint 1"):
        trak.featurize(MLP(5, 4, 3).init(seed=1), [(x, y)])
    assert not (store / "c2").exists()


def test_a_resumed_checkpoint_shows_its_progress_total(tmp_path, monkeypatch):
    """A checkpoint resumed in a new process lost its progress bar's total (the data was chained after one
    example was taken to learn the features' dtype)."""
    import trak_core._featurizer as featurizer

    store, x, y = tmp_path / "store", *_data()
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)]

    class Stop(Exception):
        pass

    def interrupted():
        for i, batch in enumerate(batches):
            if i == 7:  # after 4,900 rows: the first chunk is stored
                raise Stop
            yield batch

    with pytest.raises(Stop):
        TRAK(MLP(5, 4, 3), proj_dim=32, store=store, progress=False).featurize(MLP(5, 4, 3).init(seed=0),
                                                                               interrupted())
    totals = []
    original = featurizer.progress

    def recording(iterable, *, desc, enabled, total=None):
        totals.append((desc, total))
        return original(iterable, desc=desc, enabled=False, total=total)

    monkeypatch.setattr(featurizer, "progress", recording)
    TRAK(MLP(5, 4, 3), proj_dim=32, store=store, progress=False).featurize(MLP(5, 4, 3).init(seed=0), batches)
    assert ("featurize checkpoint 0", len(batches)) in totals, totals


def test_reopening_shows_the_checksum_pass(tmp_path, monkeypatch):
    """TRAK.open reads every chunk of every checkpoint to check it (5-11 s for two 1.5 GB checkpoints) with no
    progress bar; now one per checkpoint, over its chunks, when the estimator's progress= asks for bars."""
    import trak_core.disk_writer as disk_writer

    store = tmp_path / "store"
    _featurize(store)
    shown, original = [], disk_writer.progress

    def recording(iterable, *, desc, enabled, total=None):
        items = list(iterable)
        shown.append((desc, len(items), enabled))
        return original(items, desc=desc, enabled=False, total=total)

    monkeypatch.setattr(disk_writer, "progress", recording)
    x, y = _data()
    for asked in (True, False):
        shown.clear()
        trak = TRAK.open(store, MLP(5, 4, 3), [MLP(5, 4, 3).init(seed=c) for c in range(2)], progress=asked)
        assert shown == [(f"verify checkpoint {c}", -(-N // 4096), asked) for c in range(2)], shown
        assert trak.score([(x[:2], y[:2])]).shape == (N, 2)


@pytest.mark.parametrize("array", ["features", "out_to_loss"])
def test_a_complete_checkpoint_whose_array_metadata_is_gone_is_damaged_and_redone(tmp_path, array):
    """A complete checkpoint whose ``features`` (or ``out_to_loss``) ``zarr.json`` was lost was still taken as
    complete: TRAK.open blamed "different training data ... 9000 and 0 examples", and featurizing again, the fix
    every message gives, failed with "data yielded no examples" (or named itself as the fix again)."""
    store = tmp_path / "store"
    _, reference = _featurize(store)
    (store / "c1" / array / "zarr.json").unlink()
    x, y = _data()
    with pytest.raises(StoreMismatchError, match="checkpoint 1 .* is damaged"):
        _open(store).score([(x[:6], y[:6])])
    _, again = _featurize(store)  # the same calls: checkpoint 1 is redone
    assert np.array_equal(again, reference)
    assert np.array_equal(_open(store).score([(x[:6], y[:6])]), reference)


def test_save_as_does_not_take_over_a_set_another_live_process_is_saving(tmp_path, monkeypatch):
    """Two processes saving the same name at once: the second took the first's unfinished set for an interrupted one
    and replaced it, then the first wrote its chunks and checksum over the second's finished set (both calls returned;
    the second's scores were silently gone, or the set was a mix of both)."""
    import os
    import socket
    import time

    store = tmp_path / "store"
    trak, reference = _featurize(store)
    x, y = _data()
    save_interrupted(monkeypatch, trak, [(x[:6], y[:6])], "run")
    meta = store / "scores" / "run" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {})["run"] = {"host": socket.gethostname(), "pid": os.getppid(),  # alive, not us
                                               "started": time.time()}
    meta.write_text(json.dumps(doc))
    before = meta.read_bytes()
    with pytest.raises(TrakValueError, match="'run' .* being saved now by process"):
        _open(store).score([(x[:2], y[:2])], save_as="run")
    assert meta.read_bytes() == before  # the other process's set is left to it
    doc["attributes"]["run"]["pid"] = os.getpid()  # an interrupted call of this process: replaced
    meta.write_text(json.dumps(doc))
    assert np.array_equal(trak.score([(x[:6], y[:6])], save_as="run"), reference)
    assert np.array_equal(_open(store).load_scores("run"), reference)
