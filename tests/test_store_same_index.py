"""Two runs at one index of a shared store (``featurize(..., index=i)``): a requeued array task whose first copy still
runs, or the same job launched twice. Both wrote rows of ``c{i}`` at once: the rows and scores were right, but each
wrote its own view of the group's metadata over the other's, and the first to finish deleted the other's zarr
temporary files, so one of them failed with a raw ``FileNotFoundError`` or "changed under this process" (an array
created under it) in 5 trials of 59. Now the second run is refused, naming the first. And a run SIGKILLed between
its parameters hash and its first rows no longer bars another checkpoint from its index ("featurized from other
parameters"): nothing of it is stored, so it is taken over. Scores are checked against one process featurizing in
one go."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import TRAK, StoreMismatchError  # noqa: E402
from trak_core.errors import TrakOSError  # noqa: E402

N, BATCH = 9000, 700
SETUP = '''
import numpy as np
from trak_core import MLP, TRAK
rng = np.random.default_rng(0)
x, y = rng.normal(size=(N, 5)), rng.integers(0, 3, N)
DATA = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, N, BATCH)]
TARGETS = [(x[:7], y[:7])]
model = MLP(5, 4, 3)
'''
namespace: dict = {"N": N, "BATCH": BATCH}
exec(SETUP, namespace)
DATA, TARGETS, model = namespace["DATA"], namespace["TARGETS"], namespace["model"]

# a job: featurize checkpoint `seed` at `index`, once `go` exists; `mode` "hold" waits for `go` again after batch 10
# (its first chunk is stored), "kill-after-hash" and "kill-after-rows" SIGKILL it after its hash, its first chunk
JOB = "import sys\nN, BATCH = int(sys.argv[6]), 700\n" + SETUP + textwrap.dedent('''
    import os, pathlib, time
    from trak_core import disk_writer
    store, index, seed, mode, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]

    def wait(name):
        while not pathlib.Path(go + name).exists():
            time.sleep(0.005)

    def batches():
        for b, batch in enumerate(DATA):
            if b == 10 and mode == "hold":
                pathlib.Path(go + "-held").touch()
                wait("-release")
            yield batch

    def killed(method):
        def run(self, *args):
            method(self, *args)
            os.kill(os.getpid(), 9)
        return run

    if mode == "kill-after-hash":
        disk_writer.DiskWriter.record_parameters = killed(disk_writer.DiskWriter.record_parameters)
    if mode == "kill-after-rows":
        disk_writer.DiskWriter._write = killed(disk_writer.DiskWriter._write)
    wait("")
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=seed), batches(), index=index)
''')


@pytest.fixture(scope="module")
def reference():
    """Checkpoints 0 and 1 featurized in order by one process, in memory, and their scores."""
    trak = TRAK(model, proj_dim=32, progress=False)
    for seed in range(2):
        trak.featurize(model.init(seed=seed), DATA)
    return np.asarray(trak.score(TARGETS))


def _job(tmp_path, store, seed, mode="plain", index=1, rows=N):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    return subprocess.Popen([sys.executable, str(script), str(store), str(index), str(seed), mode,
                             str(tmp_path / "go"), str(rows)], stderr=subprocess.PIPE, text=True)


def _attributes(store, index=1):
    return json.loads((store / f"c{index}" / "zarr.json").read_text())["attributes"]


def _scores(store):
    return np.asarray(TRAK.open(store, model, [model.init(seed=s) for s in range(2)], progress=False).score(TARGETS))


def _wait_for(path, job):
    while not path.exists():
        assert job.poll() is None, job.stderr.read()
        time.sleep(0.01)


def test_a_second_run_at_an_index_another_process_writes_is_refused(tmp_path, reference):
    """Job A holds checkpoint 1 after its first chunk; job B, the same call, is refused naming A's pid and writes
    nothing (B ran beside A before); A then finishes, B again finds it complete, and the store scores as one
    process."""
    store = tmp_path / "store"
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=0), DATA, index=0)
    job = _job(tmp_path, store, 1, "hold")
    (tmp_path / "go").touch()
    _wait_for(tmp_path / "go-held", job)
    before = (store / "c1" / "zarr.json").read_bytes()
    assert json.loads(before)["attributes"]["rows_done"] >= 4096
    with pytest.raises(TrakOSError, match=rf"checkpoint 1 in .* is being featurized by another process now \(pid "
                                          rf"{job.pid} on .*Wait for it to finish.*rerun this call, which resumes"):
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    assert (store / "c1" / "zarr.json").read_bytes() == before  # nothing was written
    (tmp_path / "go-release").touch()
    assert job.wait(timeout=120) == 0, job.stderr.read()
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)  # reads it
    np.testing.assert_allclose(_scores(store), reference, rtol=1e-12, atol=0)


def test_two_runs_started_at_once_at_one_index(tmp_path):
    """Two processes start the same call at the same moment: one writes checkpoint 1, the other is refused (or, if
    it comes after, finds it complete); neither fails otherwise, and the store scores as one process."""
    store, rows = tmp_path / "store", 20000  # five chunks: the two runs overlap
    data = {"N": rows, "BATCH": BATCH}
    exec(SETUP, data)
    one = TRAK(model, proj_dim=32, progress=False)
    for seed in range(2):
        one.featurize(model.init(seed=seed), data["DATA"])
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=0), data["DATA"], index=0)
    jobs = [_job(tmp_path, store, 1, rows=rows) for _ in range(2)]
    time.sleep(3)  # the imports
    (tmp_path / "go").touch()
    results = [(job.wait(timeout=300), job.stderr.read()) for job in jobs]
    assert 0 in [rc for rc, _ in results], results
    for rc, err in results:
        assert rc == 0 or "TrakOSError: checkpoint 1 in" in err and "is being featurized by another process" in err, err
    opened = TRAK.open(store, model, [model.init(seed=s) for s in range(2)], progress=False)
    np.testing.assert_allclose(np.asarray(opened.score(data["TARGETS"])), np.asarray(one.score(data["TARGETS"])),
                               rtol=1e-12, atol=0)


def test_a_killed_run_is_resumed_by_its_rerun(tmp_path, reference):
    """SIGKILL after the first chunk: the system drops the dead job's claim, and the rerun resumes from its rows."""
    store = tmp_path / "store"
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=0), DATA, index=0)
    job = _job(tmp_path, store, 1, "kill-after-rows")
    (tmp_path / "go").touch()
    assert job.wait(timeout=120) == -signal.SIGKILL
    assert _attributes(store)["rows_done"] == 4096
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    np.testing.assert_allclose(_scores(store), reference, rtol=1e-12, atol=0)


def test_another_checkpoint_takes_over_an_index_a_killed_run_left_without_rows(tmp_path, reference, caplog):
    """Job 1 given checkpoint 5 by mistake is SIGKILLed after its hash, before its first rows; its rerun with
    checkpoint 1 was refused as "featurized from other parameters" (nothing there to keep). Now it takes the index
    over, saying so; killed after its first rows, the other checkpoint's rows are kept and the rerun still refused."""
    store = tmp_path / "store"
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=0), DATA, index=0)
    job = _job(tmp_path, store, 5, "kill-after-hash")
    (tmp_path / "go").touch()
    assert job.wait(timeout=120) == -signal.SIGKILL
    left = _attributes(store)
    assert left["run"]["pid"] == job.pid and "parameters_sha256" in left and "rows_done" not in left
    with caplog.at_level(logging.INFO, logger="trak_core"):
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    assert f"checkpoint 1 in {store}: taken over from a run of other parameters (parameters_sha256 " \
           f"{left['parameters_sha256'][:12]}...) that stored no rows and ended (pid {job.pid} on " in caplog.text
    assert _attributes(store)["parameters_sha256"] != left["parameters_sha256"]
    np.testing.assert_allclose(_scores(store), reference, rtol=1e-12, atol=0)


def test_an_index_is_not_taken_over_with_rows_or_from_another_host(tmp_path):
    """The same kill after the first chunk of checkpoint 5: its rows are kept, and checkpoint 1 is refused as
    before; so is it where no rows were stored and the run record names another host (whether it runs cannot be
    told here). Nothing is written either time."""
    store = tmp_path / "store"
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=0), DATA, index=0)
    job = _job(tmp_path, store, 5, "kill-after-rows")
    (tmp_path / "go").touch()
    assert job.wait(timeout=120) == -signal.SIGKILL
    before = (store / "c1" / "zarr.json").read_bytes()
    with pytest.raises(StoreMismatchError, match="checkpoint 1 in .* was featurized from other parameters"):
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    assert (store / "c1" / "zarr.json").read_bytes() == before
    import zarr

    group = zarr.open_group(str(store), mode="r+")["c1"]
    attributes = {k: v for k, v in group.attrs.asdict().items() if k not in ("rows_done", "checksums")}
    group.attrs.clear()
    group.attrs.update({**attributes, "run": {"host": "another-host", "pid": os.getpid(), "started": 0.0}})
    before = (store / "c1" / "zarr.json").read_bytes()
    with pytest.raises(StoreMismatchError, match="checkpoint 1 in .* was featurized from other parameters"):
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    assert (store / "c1" / "zarr.json").read_bytes() == before


def test_a_child_forked_during_a_run_does_not_keep_its_released_claim(tmp_path, reference):
    """A data loader that forks workers (torch's DataLoader under 'fork') while the run holds its claim: the child
    shares the lock, and closing the parent's descriptor alone left it held, so the rerun in the same process, after
    the run failed on a bad batch, was refused as "being featurized by another process" naming its own pid. The
    claim is unlocked on release; the rerun finishes and the store scores as one process."""
    import multiprocessing

    store = tmp_path / "store"
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=0), DATA, index=0)
    workers = []

    def loader():
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
        worker.start()
        workers.append(worker)
        for b, batch in enumerate(DATA):
            if b == 8:
                raise RuntimeError("a bad batch")
            yield batch

    try:
        with pytest.raises(RuntimeError, match="a bad batch"):
            TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), loader(), index=1)
        assert workers[0].is_alive()  # the child that shares the lock still runs
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    finally:
        for worker in workers:
            worker.terminate()
    np.testing.assert_allclose(_scores(store), reference, rtol=1e-12, atol=0)


def test_redoing_a_damaged_complete_checkpoint_is_claimed(tmp_path, reference):
    """A complete checkpoint whose second chunk is damaged is redone by featurizing it again, as the errors advise;
    its claim was skipped (the group said complete), so two runs redoing it at once were not told apart. Job A
    redoes it and holds inside that chunk; the same call beside it is refused, naming A, and writes nothing."""
    store = tmp_path / "store"
    for index in range(2):
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=index), DATA, index=index)
    chunks = sorted(p for p in (store / "c1" / "features" / "c").rglob("*") if p.is_file())
    assert len(chunks) == 3  # rows 0-4095, 4096-8191, 8192-8999; the job holds at row 7,000
    chunks[1].write_bytes(b"\0" * 8)
    job = _job(tmp_path, store, 1, "hold")
    (tmp_path / "go").touch()
    _wait_for(tmp_path / "go-held", job)
    before = (store / "c1" / "zarr.json").read_bytes()
    # A records itself with its first chunk; until then the group's record is this process's, which wrote it first
    # and must not be named as the one writing now
    with pytest.raises(TrakOSError, match=r"checkpoint 1 in .* is being featurized by another process now \(one that "
                                          r"has not recorded its pid in the group yet\)"):
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    assert (store / "c1" / "zarr.json").read_bytes() == before
    (tmp_path / "go-release").touch()
    assert job.wait(timeout=120) == 0, job.stderr.read()
    np.testing.assert_allclose(_scores(store), reference, rtol=1e-12, atol=0)


def test_a_refused_open_that_is_still_referenced_does_not_bar_the_next_call(tmp_path, reference):
    """``TRAK.open`` refuses a complete checkpoint with a damaged chunk after its writer took the claim to redo it;
    while the refusal's traceback is referenced (``pytest.raises``' ``excinfo``, a notebook's ``sys.last_value``),
    the estimator and its lock stayed alive, and featurizing the checkpoint again, as the error says, was refused as
    "being featurized by another process" (CI saw it when the garbage collector ran late). The newest claim in a
    process takes the place of an older one on the same directory."""
    store = tmp_path / "store"
    for index in range(2):
        TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=index), DATA, index=index)
    chunks = sorted(p for p in (store / "c1" / "features" / "c").rglob("*") if p.is_file())
    chunks[1].write_bytes(b"\0" * 8)
    with pytest.raises(StoreMismatchError, match="checkpoint 1 in .* is damaged") as refused:
        TRAK.open(store, model, [model.init(seed=s) for s in range(2)], progress=False)
    TRAK(model, proj_dim=32, progress=False, store=store).featurize(model.init(seed=1), DATA, index=1)
    assert refused.value.__traceback__ is not None  # still referenced up to here
    np.testing.assert_allclose(_scores(store), reference, rtol=1e-12, atol=0)
