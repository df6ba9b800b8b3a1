"""``trak-core store PATH``: a store's checkpoints (complete, in progress, started, missing), lambdas, parameters'
hashes and saved scores, read against what the estimator and zarr hold; ``--verify`` names a damaged chunk."""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
zarr = pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

import trak_core  # noqa: E402
from trak_core import cli, store_report  # noqa: E402
from trak_core.store import KERNEL_CHUNK_ROWS  # noqa: E402

N = KERNEL_CHUNK_ROWS + 300  # a checkpoint interrupted after its first chunk is "in progress" with 4,096 rows


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Checkpoints 0 and 3 complete (3 apart), 1 interrupted after its first chunk, 2 never begun; saved scores
    "first" and an interrupted set "cut"; the estimator that featurized checkpoint 0."""
    path = tmp_path_factory.mktemp("report") / "store"
    torch.manual_seed(0)
    x, y = torch.randn(N, 6), torch.randint(0, 3, (N,))
    data = [(x[i:i + 512], y[i:i + 512]) for i in range(0, N, 512)]
    models = [_model(seed) for seed in range(4)]
    trak = trak_core.TRAK(models[0], proj_dim=16, progress=False, store=path)
    trak.featurize(models[0].state_dict(), data, index=0)
    trak_core.TRAK(models[0], proj_dim=16, progress=False, store=path).featurize(models[3].state_dict(), data,
                                                                                 index=3)

    def interrupted():
        yield from data[:9]  # 4,608 rows: the first chunk of 4,096 is written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trak_core.TRAK(models[0], proj_dim=16, progress=False, store=path).featurize(models[1].state_dict(),
                                                                                     interrupted(), index=1)
    trak.score([(x[:5], y[:5])], save_as="first")
    zarr.open_group(str(path), mode="r+").require_group("scores").create_array("cut", shape=(N, 2), dtype="float32")
    return path, trak


def test_the_report_reads_what_the_store_holds(store):
    path, trak = store
    report = store_report.describe(str(path))
    root = zarr.open_group(str(path), mode="r")
    assert [c["index"] for c in report["checkpoints"]] == [0, 1, 3] and report["missing"] == [2]
    assert store_report.describe(str(path), expect=6)["missing"] == [2, 4, 5]  # an array of 6 jobs
    assert report["complete"] == [0, 3]
    states = {c["index"]: (c["state"], c["rows"]) for c in report["checkpoints"]}
    assert states == {0: ("complete", N), 1: ("in progress", KERNEL_CHUNK_ROWS), 3: ("complete", N)}
    first = report["checkpoints"][0]
    assert first["lambda_reg"] == pytest.approx(trak.lambdas[0], rel=1e-12) and first["lambda_setting"] == "auto"
    assert first["parameters_sha256"] == trak.store[0].parameters_digest
    assert report["checkpoints"][2]["configuration"] == "same"  # checkpoint 3, written apart, recorded its hash
    assert report["configuration"]["proj_dim"] == 16 and report["first_batch_rows"] == 512
    assert report["scores"] == [{"name": "cut", "shape": [N, 2], "dtype": "float32", "state": "interrupted"},
                                {"name": "first", "shape": [N, 5], "dtype": "float32", "state": "finished"}]
    assert root["scores"]["first"].shape == (N, 5) and report["damaged"] is False
    text = store_report.render(report)
    assert "1          in progress      4,096" in text and "missing (no group yet): [2]" in text
    assert "a mapping {index: checkpoint} of the complete ones, [0, 3]" in text


def test_the_command_prints_json_and_reads_only(store, capsys):
    path, _ = store
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    report = store_report.main([str(path), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["complete"] == report["complete"] == [0, 3]
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before
    done = subprocess.run([sys.executable, "-m", "trak_core.cli", "store", str(path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"trak-core store at {path}")


def _damaged_copy(store, tmp_path):
    """A copy of the store whose checkpoint 3 has a features chunk with its last 8 bytes zeroed."""
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(store[0], path)
    chunk = next(p for p in (path / "c3" / "features").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-8] + b"\0" * 8)
    return path


def test_verify_piped_to_head_still_exits_1(store, tmp_path):
    """``trak-core store PATH --verify | head -1`` on a damaged store exited 141 (the flush of the report, after the
    reader left, replaced the status 1 of the damage), so ``set -o pipefail`` scripts took it for an early reader."""
    from test_cli import closed_pipe_run

    path = _damaged_copy(store, tmp_path)
    done = closed_pipe_run([sys.executable, "-m", "trak_core", "store", str(path), "--verify"], buffered=True)
    assert done.returncode == 1 and "damaged parts found" in done.stderr
    assert "[Errno 32] Broken pipe" not in done.stderr


def test_verify_names_a_damaged_chunk_and_exits_1(store, tmp_path, capsys):
    path = _damaged_copy(store, tmp_path)
    assert store_report.describe(str(path))["damaged"] is False  # without --verify nothing is read
    with pytest.raises(SystemExit) as stop:
        cli.main(["store", str(path), "--verify"])
    assert stop.value.code == 1
    out = capsys.readouterr()
    assert "DAMAGED: rows 0 on fail their checksums" in out.out and "damaged parts found" in out.err
    report = store_report.describe(str(path), verify=True)
    assert [c["damaged"] is not None for c in report["checkpoints"]] == [False, False, True]
    assert report["opens"] == [0]  # TRAK.open refuses checkpoint 3 ("is damaged"): the report no longer offers it
    assert "the complete one that it can score, [0]" in store_report.render(report)
    assert np.all([s.get("damaged") is None for s in report["scores"]])


def test_a_path_without_a_store_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["store", str(tmp_path / "nothing")])
    assert stop.value.code == 2 and "no trak-core store at" in capsys.readouterr().err


def _small(seed=0, n=40):
    torch.manual_seed(seed)
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    return [(x[i:i + 20], y[i:i + 20]) for i in range(0, n, 20)]


def test_a_checkpoint_on_other_data_is_named_and_not_offered(tmp_path, monkeypatch):
    """Two jobs that began at once, one on reversed data: both complete, and the report said TRAK.open took
    ``[0, 1]``, which it refuses. Now the checkpoint is named with what to do, and the mapping offered is [0]."""
    from trak_core.disk_store import DiskStore

    path, data = tmp_path / "store", _small()
    models = [_model(seed) for seed in range(2)]
    reversed_data = [(x.flip(0), y.flip(0)) for x, y in reversed(data)]
    trak_core.TRAK(models[0], proj_dim=8, progress=False, store=path).featurize(models[1].state_dict(),
                                                                                reversed_data, index=1)
    monkeypatch.setattr(DiskStore, "data_reference", lambda self, index: None)  # job 0 began before c1 was complete
    trak_core.TRAK(models[0], proj_dim=8, progress=False, store=path).featurize(models[0].state_dict(), data, index=0)
    monkeypatch.undo()
    report = store_report.describe(str(path))
    assert report["complete"] == [0, 1] and report["opens"] == [0]
    assert [(c["index"], c["data"]) for c in report["checkpoints"]] == [(0, None), (1, "other")]
    text = store_report.render(report)
    assert "other training data than checkpoint 0's (delete its group c1" in text
    assert "takes a list of the 2" not in text and "complete one that it can score, [0]" in text
    checkpoints = [m.state_dict() for m in models]
    with pytest.raises(trak_core.errors.StoreMismatchError, match=r"different training data.*delete its group c1"):
        trak_core.TRAK.open(path, models[0], checkpoints, progress=False)
    import shutil

    shutil.rmtree(path / "c1")  # what the report and the error say: the job is run again on the same data
    trak_core.TRAK(models[0], proj_dim=8, progress=False, store=path).featurize(models[1].state_dict(), data, index=1)
    report = store_report.describe(str(path))
    assert report["opens"] == [0, 1] and report["checkpoints"][1]["data"] == "same"
    assert "takes a list of the 2 checkpoints 0 to 1" in store_report.render(report)
    in_order = trak_core.TRAK(models[0], proj_dim=8, progress=False)
    for checkpoint in checkpoints:
        in_order.featurize(checkpoint, data)
    opened = trak_core.TRAK.open(path, models[0], checkpoints, progress=False)
    assert np.array_equal(opened.score(data).numpy(), in_order.score(data).numpy())


def test_damaged_scores_say_how_to_score_them_again(tmp_path):
    """A damaged score set said "score again", and ``save_as`` with its name was then refused ("already exist"):
    the message names the two ways that work, and deleting the set's directory lets its name be saved again."""
    path, data = tmp_path / "store", _small()
    trak = trak_core.TRAK(_model(0), proj_dim=8, progress=False, store=path)
    trak.featurize(_model(0).state_dict(), data)
    expected = trak.score(data, save_as="t").numpy()
    chunk = next(p for p in (path / "scores" / "t").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(trak_core.errors.TrakValueError, match=r"damaged .*delete the directory scores/t in .* and "
                       r"score again with save_as='t'"):
        trak.load_scores("t")
    with pytest.raises(trak_core.errors.TrakValueError, match="already exist"):
        trak.score(data, save_as="t")
    import shutil

    shutil.rmtree(path / "scores" / "t")
    trak.score(data, save_as="t")
    assert np.array_equal(trak.load_scores("t"), expected)


def test_a_running_job_is_told_from_a_dead_one(store, tmp_path):
    """Checkpoint 1's run record names this process (it wrote its first chunk, then was interrupted), which is
    running; with the pid of a process that has exited, the report says it is not running and to rerun the call.
    (A refused run writes nothing, its record neither: ``test_store_rows.py`` compares the group's bytes.)"""
    import os
    import shutil
    import socket

    path, _ = store
    row = store_report.describe(str(path))["checkpoints"][1]
    assert (row["run"]["pid"], row["run"]["host"], row["running"]) == (os.getpid(), socket.gethostname(), True)
    assert row["written_at"] >= row["run"]["started"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    zarr.open_group(str(copy), mode="r+")["c1"].attrs["run"] = {**row["run"], "pid": int(exited.stdout)}
    report = store_report.describe(str(copy))
    assert report["checkpoints"][1]["running"] is False and report["checkpoints"][0]["running"] is None
    assert f"written by pid {int(exited.stdout)} on {socket.gethostname()}" in store_report.render(report)
    assert "not running (rerun its featurize call, which resumes, unless a rerun" in store_report.render(report)


def test_a_store_of_another_format_is_refused_as_trak_open_refuses_it(store, tmp_path, capsys):
    """A store written by another version (``store_format`` 2, its configuration hash written with it) was listed as
    two complete checkpoints that ``TRAK.open`` "takes", with exit status 0, and ``TRAK.open`` refused it."""
    import shutil

    from trak_core.disk_shared import configuration_digest

    path = tmp_path / "other"
    shutil.copytree(store[0], path)
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["trak_core"]["store_format"] = 2
    root["attributes"]["configuration_sha256"] = configuration_digest(root["attributes"]["trak_core"])
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(trak_core.errors.StoreMismatchError, match="has format 2"):
        trak_core.TRAK.open(path, _model(0), {0: _model(0).state_dict()}, progress=False)
    with pytest.raises(trak_core.errors.StoreMismatchError, match=r"has format 2, written by another version of "
                       r"trak-core; this one \(.*\) reads format 1 only"):
        store_report.describe(str(path))
    with pytest.raises(SystemExit) as stop:
        cli.main(["store", str(path), "--json"])
    out = capsys.readouterr()
    assert stop.value.code == 2 and "has format 2" in out.err and out.out == ""


def test_a_damaged_checkpoint_is_not_offered_in_a_list(tmp_path):
    """With checkpoint 1's ``zarr.json`` truncated the report said "TRAK.open takes a list of the 1 checkpoints 0 to
    0", which ``TRAK.open`` refuses (checkpoint 1 is damaged); the mapping it offers now opens, and scores as the
    writing estimator's checkpoint 0 does."""
    path, data = tmp_path / "store", _small()
    models = [_model(seed) for seed in range(2)]
    trak = trak_core.TRAK(models[0], proj_dim=8, progress=False, store=path)
    for model in models:
        trak.featurize(model.state_dict(), data)
    expected = trak.score(data, checkpoints=[0]).numpy()
    (path / "c1" / "zarr.json").write_text("{")
    text = store_report.render(store_report.describe(str(path)))
    assert "takes a list" not in text and "takes a mapping {index: checkpoint} of the complete one, [0]" in text
    with pytest.raises(trak_core.errors.StoreDamagedError, match="checkpoint 1 .* is damaged"):
        trak_core.TRAK.open(path, models[0], [models[0].state_dict()], progress=False)
    opened = trak_core.TRAK.open(path, models[0], {0: models[0].state_dict()}, progress=False)
    np.testing.assert_array_equal(opened.score(data).numpy(), expected)
