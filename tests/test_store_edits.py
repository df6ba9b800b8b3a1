"""A store's configuration and each checkpoint's ridge are written with their SHA-256, and a value that no longer
matches it (a hand edit of zarr.json, a damaged file) is refused wherever it is read. Before, an edited ``seed`` or
``lambda_reg`` opened silently and scored otherwise. Stores written before the hashes open as before."""
import json
import os
import shutil

import numpy as np
import pytest

zarr = pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import MLP, TRAK, StoreMismatchError  # noqa: E402
from trak_core import cli  # noqa: E402

N = 300
EDITED = r"does not match the checksum written with it; it was edited or damaged: "


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)), rng.integers(0, 3, N)


def _batches():
    x, y = _data()
    return [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)]


MODEL = MLP(5, 4, 3)
CHECKPOINTS = [MODEL.init(seed=c) for c in range(2)]
TARGETS = [(_data()[0][:7], _data()[1][:7])]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A finished store of two checkpoints (``lambda_reg=0.05``) and its scores."""
    path = tmp_path_factory.mktemp("edits") / "store"
    trak = TRAK(MODEL, proj_dim=32, store=path, lambda_reg=0.05, progress=False)
    for checkpoint in CHECKPOINTS:
        trak.featurize(checkpoint, _batches())
    return path, TRAK.open(path, MODEL, CHECKPOINTS, progress=False).score(TARGETS)


def _copy(written, tmp_path):
    shutil.copytree(written[0], tmp_path / "store")
    return tmp_path / "store"


def _edit(file, change):
    document = json.loads(file.read_text())
    change(document["attributes"])
    file.write_text(json.dumps(document))


def _files(path):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs}


def test_a_hand_edited_configuration_is_refused_wherever_it_is_read(written, tmp_path, capsys):
    """``seed`` 0 -> 1 in the root's zarr.json: ``TRAK.open`` scored with another projection of the targets (max
    relative difference 4.0), featurizing into the store went on; now each refuses, naming the file, and writes
    nothing; the value put back, the store scores as before."""
    path = _copy(written, tmp_path)
    _edit(path / "zarr.json", lambda attrs: attrs["trak_core"].update(seed=1))
    before = _files(path)
    message = "the stored configuration " + EDITED + str(path / "zarr.json")
    with pytest.raises(StoreMismatchError, match=message.replace(".", r"\.") + r" .*restore that file from a copy"):
        TRAK.open(path, MODEL, CHECKPOINTS, progress=False)
    with pytest.raises(StoreMismatchError, match="the stored configuration " + EDITED):  # reopened to write
        TRAK(MODEL, proj_dim=32, store=path, lambda_reg=0.05, progress=False).featurize(MODEL.init(seed=9),
                                                                                        _batches())
    with pytest.raises(StoreMismatchError, match="the stored configuration " + EDITED):  # a job of a shared store
        TRAK(MODEL, proj_dim=32, store=path, lambda_reg=0.05, progress=False).featurize(MODEL.init(seed=9),
                                                                                        _batches(), index=2)
    with pytest.raises(SystemExit) as exit_status:
        cli.main(["store", str(path)])
    assert exit_status.value.code == 2 and "the stored configuration does not match" in capsys.readouterr().err
    assert _files(path) == before
    _edit(path / "zarr.json", lambda attrs: attrs["trak_core"].update(seed=0))
    np.testing.assert_array_equal(TRAK.open(path, MODEL, CHECKPOINTS, progress=False).score(TARGETS), written[1])


def test_a_hand_edited_ridge_is_refused(written, tmp_path):
    """``lambda_reg`` 0.05 -> 0.05005 in ``c1/zarr.json``: opened with the stored ridges it scored otherwise (relative
    difference 5e-5). Now refused, naming the file; ``lambda_reg=`` given, the stored ridges are not read and the
    scores are the original ones."""
    path = _copy(written, tmp_path)
    _edit(path / "c1" / "zarr.json", lambda attrs: attrs.update(lambda_reg=0.05005))
    file = str(path / "c1" / "zarr.json").replace(".", r"\.")
    with pytest.raises(StoreMismatchError, match=r"the stored ridge of checkpoint 1 \(lambda_reg, lambda_setting\) "
                                                 + EDITED + file + r" .*pass lambda_reg= to TRAK\.open"):
        TRAK.open(path, MODEL, CHECKPOINTS, progress=False)
    with pytest.raises(StoreMismatchError, match="the stored ridge of checkpoint 1"):  # a job joining it reads it
        TRAK(MODEL, proj_dim=32, store=path, lambda_reg=0.05, progress=False).featurize(MODEL.init(seed=9),
                                                                                        _batches(), index=2)
    np.testing.assert_allclose(TRAK.open(path, MODEL, CHECKPOINTS, lambda_reg=0.05, progress=False).score(TARGETS),
                               written[1], rtol=1e-6, atol=1e-9)


def test_a_store_written_before_the_checksums_opens_as_before(written, tmp_path):
    """Without ``configuration_sha256`` (beside the configuration, which earlier versions compare key by key) and
    ``lambda_sha256``, nothing is checked and the scores are the same."""
    path = _copy(written, tmp_path)
    root = zarr.open_group(str(path), mode="r+")
    assert "configuration_sha256" in root.attrs and "configuration_sha256" not in root.attrs["trak_core"]
    del root.attrs["configuration_sha256"]
    for c in range(2):
        del root[f"c{c}"].attrs["lambda_sha256"]
    np.testing.assert_array_equal(TRAK.open(path, MODEL, CHECKPOINTS, progress=False).score(TARGETS), written[1])


def test_verify_names_a_hand_edited_ridge(written, tmp_path, capsys):
    """``trak-core store --verify`` checked chunks, kernels and score sets but not the ridge's hash: a store whose
    ``lambda_reg`` was edited passed (exit 0) while ``TRAK.open`` refused it. Now it is named, with the file and the
    fix (exit 1), and left out of ``opens``; the untouched copy still verifies clean."""
    from trak_core.store_report import describe

    clean = describe(str(written[0]), verify=True)
    assert not clean["damaged"] and clean["opens"] == [0, 1]
    path = _copy(written, tmp_path)
    _edit(path / "c1" / "zarr.json", lambda attrs: attrs.update(lambda_reg=0.05005))
    before = _files(path)
    report = describe(str(path), verify=True)
    assert report["damaged"] and report["opens"] == [0]
    assert [c["index"] for c in report["checkpoints"] if c["damaged"]] == [1]
    assert report["checkpoints"][1]["ridge_edited"] and str(path / "c1" / "zarr.json") in \
        report["checkpoints"][1]["damaged"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["store", str(path), "--verify"])
    assert exit_.value.code == 1
    assert "the stored ridge of checkpoint 1" in capsys.readouterr().out
    plain = describe(str(path))  # without --verify too (no chunk is read for it): TRAK.open refuses it
    assert plain["opens"] == [0] and plain["checkpoints"][1]["ridge_edited"] and not plain["checkpoints"][0][
        "ridge_edited"]
    cli.main(["store", str(path)])
    assert "its lambda_reg does not match the checksum written with it" in capsys.readouterr().out
    assert _files(path) == before  # it only reads
