"""Damaged zarr metadata in on-disk stores, which an audit found unnamed: a truncated or zeroed ``zarr.json`` of a
checkpoint (its group's or an array's), of a kernel, of the saved scores' group or of a score set raised zarr's raw
JSON or Unicode error, naming no file; a damaged or deleted root ``zarr.json`` made the store pass for a foreign
directory ("holds a zarr.json file that is not zarr metadata") or for no store at all; and ``trak-core store
--verify`` listed a checkpoint whose group ``zarr.json`` was deleted as missing, though its arrays were there. Each test
checks the error's class, that it names the file, and that the store's data is intact afterwards: scores equal to
those of an undamaged copy."""
import json
import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import MLP, TRAK, StoreDamagedError, StoreMismatchError  # noqa: E402
from trak_core import cli, store_report  # noqa: E402
from tests_helpers import STORE_ROWS, store_data, store_targets  # noqa: E402

N, BATCH = STORE_ROWS, 100
ZEROED = "zeroed"


_data, _targets = store_data, store_targets


def _featurize(store):
    """The same calls every time: two checkpoints (a damaged one is redone, a complete one verified)."""
    x, y = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=16, store=store, progress=False)
    for c in range(2):
        trak.featurize(model.init(seed=c), [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)])
    return trak


def _open(store, checkpoints=(0, 1)):
    return TRAK.open(store, MLP(5, 4, 3), {c: MLP(5, 4, 3).init(seed=c) for c in checkpoints})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An undamaged store with two score sets, and the reference scores read from it."""
    path = tmp_path_factory.mktemp("base") / "store"
    trak = _featurize(path)
    trak.score(_targets(), save_as="s1")
    trak.score(_targets(slice(6, 9)), save_as="s2")
    return path, {"both": _open(path).score(_targets()), "first": _open(path, (0,)).score(_targets()),
                  "s2": _open(path).load_scores("s2")}


def _damaged_copy(base, tmp_path, member, how):
    """A copy of the base store with ``member/zarr.json`` truncated, zeroed or deleted; the file's path."""
    path = tmp_path / "store"
    shutil.copytree(base[0], path)
    file = path / member / "zarr.json"
    raw = file.read_bytes()
    if how == "truncated":
        file.write_bytes(raw[:30])
    elif how == ZEROED:
        file.write_bytes(b"\0" * len(raw))
    else:
        file.unlink()
    return path, file


def _snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["truncated", ZEROED])
@pytest.mark.parametrize("member", ["c1", "c1/features", "c1/out_to_loss"])
def test_a_checkpoint_whose_metadata_is_unreadable_is_named_then_redone(base, tmp_path, member, how):
    """TRAK.open raised json's JSONDecodeError (or a 'utf-32-be' UnicodeDecodeError for a zeroed file) naming no
    file, and featurizing again, the fix, raised the same: now the damaged checkpoint is named with its file, the
    other checkpoint still opens, and the same featurize calls redo it (as a deleted array zarr.json was redone)."""
    path, file = _damaged_copy(base, tmp_path, member, how)
    before = _snapshot(path)
    with pytest.raises(StoreDamagedError, match="checkpoint 1 .* is damaged") as raised:
        _open(path).score(_targets())
    assert isinstance(raised.value, StoreMismatchError)  # what a damaged checkpoint raised before
    assert str(file) in str(raised.value) and "featurize it again" in str(raised.value)
    assert _snapshot(path) == before  # nothing was written
    np.testing.assert_allclose(_open(path, (0,)).score(_targets()), base[1]["first"])  # the intact checkpoint
    np.testing.assert_allclose(_featurize(path).score(_targets()), base[1]["both"])  # redone
    np.testing.assert_allclose(_open(path).score(_targets()), base[1]["both"])
    np.testing.assert_allclose(_open(path).load_scores("s2"), base[1]["s2"])


@pytest.mark.parametrize("how", ["truncated", ZEROED])
def test_an_unreadable_kernel_metadata_is_made_again(base, tmp_path, caplog, how):
    """Scoring a reopened store raised JSONDecodeError at ``"kernel" in group``; now the kernel is damaged as a
    truncated kernel chunk is: made again from the checked features (and stored again)."""
    path, file = _damaged_copy(base, tmp_path, "c1/kernel", how)
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        np.testing.assert_allclose(_open(path).score(_targets()), base[1]["both"])
    assert "the stored kernel is damaged; it is made again from the features" in caplog.text
    assert json.loads(file.read_bytes())["node_type"] == "array"  # stored again
    np.testing.assert_allclose(_open(path).score(_targets()), base[1]["both"])


@pytest.mark.parametrize("how", ["truncated", ZEROED])
def test_a_score_set_whose_metadata_is_unreadable_is_named(base, tmp_path, how):
    """load_scores of any set (and save_as, saved_scores) raised JSONDecodeError: zarr lists the group's members by
    reading every one's metadata. Now the damaged set is named with its file and the fix; the others read."""
    path, file = _damaged_copy(base, tmp_path, "scores/s1", how)
    trak = _open(path)
    with pytest.raises(StoreDamagedError, match=r"scores 's1' .* are damaged: .*delete the directory scores/s1") as e:
        trak.load_scores("s1")
    assert str(file) in str(e.value)
    with pytest.raises(StoreDamagedError, match="scores 's1'"):
        trak.score(_targets(), save_as="s1")  # never written over
    assert trak.saved_scores() == ["s2"]
    np.testing.assert_allclose(trak.load_scores("s2"), base[1]["s2"])
    report = store_report.describe(str(path), verify=True)
    assert [(s["name"], s["state"]) for s in report["scores"]] == [("s1", "damaged"), ("s2", "finished")]
    assert report["damaged"] and str(file) in report["scores"][0]["damaged"]


@pytest.mark.parametrize("how", ["truncated", ZEROED, "deleted"])
def test_the_saved_scores_group_whose_metadata_is_damaged_is_named(base, tmp_path, how):
    """A truncated or zeroed scores/zarr.json made TRAK.open itself raise JSONDecodeError (zarr read it while
    listing the checkpoints); deleted, the sets were reported as absent ("no scores named 's1'"). Now TRAK.open and
    scoring work, and reading a set names the file and what it holds: written back, every set reads again."""
    path, file = _damaged_copy(base, tmp_path, "scores", how)
    trak = _open(path)
    np.testing.assert_allclose(trak.score(_targets()), base[1]["both"])
    with pytest.raises(StoreDamagedError, match="the saved scores in .* cannot be read") as raised:
        trak.load_scores("s2")
    assert str(file) in str(raised.value)
    assert store_report.describe(str(path), verify=True)["scores_damaged"] == str(raised.value)
    file.write_text('{"attributes": {}, "zarr_format": 3, "node_type": "group"}')  # as the message says
    np.testing.assert_allclose(_open(path).load_scores("s2"), base[1]["s2"])


@pytest.mark.parametrize("how", ["truncated", ZEROED, "deleted"])
def test_a_store_whose_root_metadata_is_damaged_is_not_taken_for_a_foreign_directory(base, tmp_path, how):
    """A damaged root zarr.json gave "holds a zarr.json file that is not zarr metadata; trak-core writes only into
    its own stores" and a deleted one "no trak-core store at ..." (featurize: "holds files that are not a trak-core
    store's"). Now each says the store's root metadata is damaged, naming the file, and changes nothing."""
    path, file = _damaged_copy(base, tmp_path, ".", how)
    original = (base[0] / "zarr.json").read_bytes()
    before = _snapshot(path)
    for call in (lambda: _open(path), lambda: _featurize(path), lambda: store_report.describe(str(path))):
        with pytest.raises(StoreDamagedError, match="store at .* is damaged: its root metadata") as raised:
            call()
        assert str(file) in str(raised.value) and "changed nothing" in str(raised.value)
    assert _snapshot(path) == before
    file.write_bytes(original)  # the store was left whole: with its root metadata back, it opens as before
    np.testing.assert_allclose(_open(path).score(_targets()), base[1]["both"])


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_verify_reports_a_checkpoint_whose_group_metadata_is_gone_as_damaged(base, tmp_path, capsys, how):
    """``trak-core store --verify`` listed checkpoint 1 as missing ("no group yet") when its group's zarr.json was
    deleted, though its arrays were there, and exited 0; truncated, it printed a JSONDecodeError traceback."""
    path, file = _damaged_copy(base, tmp_path, "c1", how)
    with pytest.raises(SystemExit) as stop:
        cli.main(["store", str(path), "--verify"])
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert f"DAMAGED: its metadata {file}" in out.out and "missing (no group yet)" not in out.out
    report = store_report.describe(str(path), verify=True)
    assert [(c["index"], c["state"]) for c in report["checkpoints"]] == [(0, "complete"), (1, "damaged")]
    assert report["missing"] == [] and report["opens"] == [0] and str(file) in report["checkpoints"][1]["damaged"]
    np.testing.assert_allclose(_featurize(path).score(_targets()), base[1]["both"])  # redone
    assert store_report.describe(str(path), verify=True)["damaged"] is False


@pytest.mark.parametrize("where", ["c1", "c1/features"])
def test_a_file_in_place_of_a_checkpoint_folder_is_no_damaged_metadata(tmp_path, where):
    """A local ``c1`` (or ``c1/features``) that is a file: its ``zarr.json`` is not there (as before; a read of it
    raised ``NotADirectoryError``, which was taken for a damaged file that featurizing again deleted: the unlink then
    raised NotADirectoryError instead of zarr's own error)."""
    from trak_core.disk_layout import unreadable_metadata

    folder = tmp_path / "store" / where
    folder.parent.mkdir(parents=True)
    folder.write_bytes(b"not a folder")
    assert unreadable_metadata(tmp_path / "store" / "c1") == []
