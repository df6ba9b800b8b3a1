"""One job per checkpoint into one on-disk store: ``featurize(checkpoint, data, index=i)`` in any order, in separate
processes at once, scores through ``TRAK.open`` bit for bit as one process featurizing in order; gaps, duplicates,
other data and other configurations are named."""
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

import trak_core  # noqa: E402
from trak_core.errors import StoreMismatchError, TrakTypeError, TrakValueError  # noqa: E402

SETUP = '''
import torch
torch.manual_seed(0)
x, y = torch.randn(300, 10), torch.randint(0, 3, (300,))
DATA = [(x[i:i + 50], y[i:i + 50]) for i in range(0, 250, 50)]
TARGETS = [(x[250:], y[250:])]


def model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
'''
namespace: dict = {}
exec(SETUP, namespace)
DATA, TARGETS, model = namespace["DATA"], namespace["TARGETS"], namespace["model"]
MODELS = [model(seed) for seed in range(3)]
CHECKPOINTS = [m.state_dict() for m in MODELS]


def _trak(store=None, **options):
    return trak_core.TRAK(MODELS[0], proj_dim=64, progress=False, store=store, **options)


@pytest.fixture(scope="module")
def in_order():
    """Every checkpoint featurized in order, in memory: the reference."""
    trak = _trak()
    for checkpoint in CHECKPOINTS:
        trak.featurize(checkpoint, DATA)
    return trak


def _opened(path, checkpoints=CHECKPOINTS):
    return trak_core.TRAK.open(path, MODELS[0], checkpoints, progress=False)


def test_checkpoints_featurized_apart_in_any_order_score_as_one_process(tmp_path, in_order):
    """Checkpoints 2, 0 and 1, each by its own estimator: the opened store's scores are the in-order ones, bit for
    bit; the estimator that wrote checkpoint 2 alone holds nothing and says where its checkpoint went."""
    for i in (2, 0, 1):
        trak = _trak(tmp_path)
        trak.featurize(CHECKPOINTS[i], DATA, index=i)
        if i == 2:
            assert len(trak.store) == 0
            with pytest.raises(TrakValueError, match=r"holds complete checkpoints \[2\]: TRAK.open"):
                trak.score(TARGETS)
    expected = in_order.score(TARGETS).numpy()
    assert np.array_equal(_opened(tmp_path).score(TARGETS).numpy(), expected)
    assert np.abs(expected).max() > 0


def test_the_next_index_is_held_as_without_it(tmp_path, in_order):
    """``index=len(checkpoints)`` is an in-order featurize: the estimator holds the checkpoint and scores."""
    trak = _trak(tmp_path)
    for i, checkpoint in enumerate(CHECKPOINTS):
        trak.featurize(checkpoint, DATA, index=i)
    assert np.array_equal(trak.score(TARGETS).numpy(), in_order.score(TARGETS).numpy())


def test_a_gap_is_named_and_a_mapping_opens_the_complete_ones(tmp_path, in_order):
    """Checkpoints 1 and 2 stored, 0 not yet: a list is refused naming the gap; ``{1: ..., 2: ...}`` scores as the
    in-order estimator's ``checkpoints=[1, 2]``, and a featurize on it is refused (a new one goes after all)."""
    for i in (1, 2):
        _trak(tmp_path).featurize(CHECKPOINTS[i], DATA, index=i)
    with pytest.raises(TrakValueError, match=r"checkpoint 0 is not complete, and \[1, 2\] are: jobs featurizing"):
        _opened(tmp_path)
    with pytest.raises(TrakValueError, match=r"holds checkpoints \[1, 2\], got the key 0"):
        _opened(tmp_path, {0: CHECKPOINTS[0]})
    opened = _opened(tmp_path, {1: CHECKPOINTS[1], 2: CHECKPOINTS[2]})
    assert np.array_equal(opened.score(TARGETS).numpy(), in_order.score(TARGETS, checkpoints=[1, 2]).numpy())
    with pytest.raises(TrakValueError, match="a new checkpoint goes after all of them"):
        opened.featurize(CHECKPOINTS[0], DATA)


def test_a_gap_names_the_complete_checkpoints_and_the_call_to_rerun(tmp_path):
    """Checkpoints 0 and 2 complete, 1 not (its job died): a list was refused with "holds 1 complete checkpoints;
    pass all 1", though two were complete, and a mapping with key 1 did not say why. Both name the job to rerun."""
    for i in (0, 2):
        _trak(tmp_path).featurize(CHECKPOINTS[i], DATA, index=i)
    with pytest.raises(TrakValueError, match=r"holds complete checkpoints \[0, 2\], not every one from 0 \(got a "
                       r"list of 3\): checkpoint 1 is not complete, and \[2\] are: .*featurize\(..., index=1\) call"):
        _opened(tmp_path)
    with pytest.raises(TrakValueError, match=r"got the key 1 \(checkpoint 1 is not complete: .*index=1\) call again"):
        _opened(tmp_path, {0: CHECKPOINTS[0], 1: CHECKPOINTS[1]})


def test_jobs_in_separate_processes_at_once_fill_one_store(tmp_path, in_order):
    """Three processes start together on a new store (each creating its root, writing the configuration and its
    own checkpoint): the opened store scores as one process, bit for bit."""
    store, go = tmp_path / "store", tmp_path / "go"
    script = tmp_path / "job.py"
    script.write_text(SETUP + textwrap.dedent(f'''
        import pathlib, sys, time
        import trak_core
        i = int(sys.argv[1])
        while not pathlib.Path({str(go)!r}).exists():
            time.sleep(0.005)
        trak = trak_core.TRAK(model(0), proj_dim=64, progress=False, store={str(store)!r})
        trak.featurize(model(i).state_dict(), DATA, index=i)
    '''))
    jobs = [subprocess.Popen([sys.executable, str(script), str(i)], stderr=subprocess.PIPE, text=True)
            for i in range(3)]
    time.sleep(3)  # the imports
    go.touch()
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.stderr.read()
    assert np.array_equal(_opened(store).score(TARGETS).numpy(), in_order.score(TARGETS).numpy())


def test_the_same_checkpoint_under_two_indices_is_refused(tmp_path):
    _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=0)
    with pytest.raises(TrakValueError, match="same parameters as checkpoint 0 in .* as checkpoint 2 it would count"):
        _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=2)
    assert not (tmp_path / "c2" / "features").exists()


def test_other_data_is_refused_at_featurize_or_at_open(tmp_path, monkeypatch):
    """A job whose data differs from a complete checkpoint's is refused before it writes rows; two jobs that both
    began before either finished are told apart by ``TRAK.open``."""
    from trak_core.disk_store import DiskStore

    shuffled = [(x.flip(0), y.flip(0)) for x, y in DATA]
    _trak(tmp_path / "a").featurize(CHECKPOINTS[0], DATA, index=0)
    with pytest.raises(StoreMismatchError, match="training data differs"):
        _trak(tmp_path / "a").featurize(CHECKPOINTS[1], shuffled, index=1)
    _trak(tmp_path / "b").featurize(CHECKPOINTS[1], shuffled, index=1)  # nothing complete to compare with
    monkeypatch.setattr(DiskStore, "data_reference", lambda self, index: None)  # job 0 began before c1 was complete
    _trak(tmp_path / "b").featurize(CHECKPOINTS[0], DATA, index=0)
    monkeypatch.undo()
    with pytest.raises(StoreMismatchError, match="checkpoints 0 and 1 .* different training data, in rows 0 on"):
        _opened(tmp_path / "b", CHECKPOINTS[:2])


def test_a_checkpoint_of_another_configuration_is_named(tmp_path, monkeypatch):
    """Jobs that began the store together with other settings each took theirs for the store's: the checkpoint
    whose recorded configuration is not the store's is refused before it is marked complete, and by open."""
    from trak_core import disk_writer

    _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=0)
    finish = disk_writer.DiskWriter.finish

    import zarr

    config = dict(zarr.open_group(str(tmp_path), mode="r").attrs["trak_core"])

    def another_job_wins(self, *args, **kwargs):  # the root's configuration written over by another job's
        zarr.open_group(str(tmp_path), mode="r+").attrs["trak_core"] = {**config, "seed": 1}
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(disk_writer.DiskWriter, "finish", another_job_wins)
    with pytest.raises(StoreMismatchError, match="checkpoint 1 in .* another configuration than the store's"):
        _trak(tmp_path).featurize(CHECKPOINTS[1], DATA, index=1)
    monkeypatch.undo()
    assert not zarr.open_group(str(tmp_path), mode="r")["c1"].attrs.get("complete", False)
    zarr.open_group(str(tmp_path), mode="r+").attrs["trak_core"] = config
    group = zarr.open_group(str(tmp_path), mode="r+")["c0"]
    group.attrs["configuration_sha256"] = "0" * 64
    with pytest.raises(StoreMismatchError, match="checkpoint 0 in .* another configuration"):
        _opened(tmp_path, {0: CHECKPOINTS[0]})


def test_a_job_with_another_lambda_setting_is_refused(tmp_path):
    """Checkpoint 1 stored with ``lambda_reg="auto"``: a job for checkpoint 0 with ``lambda_reg=1.0`` would store
    another ridge, which ``TRAK.open`` would score mixed."""
    _trak(tmp_path).featurize(CHECKPOINTS[1], DATA, index=1)
    with pytest.raises(StoreMismatchError, match="featurized with lambda_reg='auto'.*checkpoint 0 would be stored"):
        _trak(tmp_path, lambda_reg=1.0).featurize(CHECKPOINTS[0], DATA, index=0)


def test_an_interrupted_job_resumes_with_the_same_call(tmp_path, in_order):
    def failing():
        yield from DATA[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _trak(tmp_path).featurize(CHECKPOINTS[2], failing(), index=2)
    for i in (2, 1, 0):
        _trak(tmp_path).featurize(CHECKPOINTS[i], DATA, index=i)
    assert np.array_equal(_opened(tmp_path).score(TARGETS).numpy(), in_order.score(TARGETS).numpy())


@pytest.mark.parametrize("index, error, match", [
    (-1, TrakValueError, "index must be 0 or more"), (True, TrakTypeError, "index must be an int"),
    ("1", TrakTypeError, "index must be an int .* got a str")])
def test_a_bad_index_is_refused(tmp_path, index, error, match):
    with pytest.raises(error, match=match):
        _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=index)
    assert not (tmp_path / "c0").exists()


def test_an_index_beyond_the_estimator_needs_an_on_disk_store_and_no_executor(tmp_path):
    trak = _trak()
    with pytest.raises(TrakValueError, match=r"index=1.*only an on-disk store \(TRAK\(..., store=path\)\)"):
        trak.featurize(CHECKPOINTS[0], DATA, index=1)
    trak.featurize(CHECKPOINTS[0], DATA, index=0)
    with pytest.raises(TrakValueError, match="holds checkpoint 0 already"):
        trak.featurize(CHECKPOINTS[1], DATA, index=0)
    trak = _trak(tmp_path)
    trak.executor = object()  # any executor: refused before it is used
    with pytest.raises(TrakValueError, match="runs in this process only: drop executor="):
        trak.featurize(CHECKPOINTS[0], DATA, index=1)


def test_jax_jobs_apart_score_as_one_process(tmp_path):
    """The same with the JAX backend, whose steps are sized by the first batch: checkpoints 1 then 0, each by its
    own estimator, open to the in-order scores bit for bit."""
    pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    import jax.numpy as jnp
    from trak_core.testing import canonical
    from trak_jax import JaxModel

    def mlp(params, x):
        w1, b1, w2, b2 = params
        return jnp.tanh(x @ w1.T + b1) @ w2.T + b2

    x, y = canonical.inputs("mlp", 70, seed=0, dtype="float32")
    data, targets = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 60, 16)], [(x[60:], y[60:])]
    weights = [[jnp.asarray(w) for w in canonical.weights("mlp", seed=c, dtype="float32")] for c in range(2)]

    def trak(store=None):
        return trak_core.TRAK(JaxModel(mlp), proj_dim=32, progress=False, store=store)

    in_order = trak()
    for w in weights:
        in_order.featurize(w, data)
    for i in (1, 0):
        trak(tmp_path).featurize(weights[i], data, index=i)
    opened = trak_core.TRAK.open(tmp_path, JaxModel(mlp), weights, progress=False)
    assert np.array_equal(np.asarray(opened.score(targets)), np.asarray(in_order.score(targets)))


def test_job_zero_is_checked_beside_the_complete_checkpoints(tmp_path):
    """``index=0`` on a new estimator is an in-order featurize, and is checked as any job against the checkpoints
    other jobs completed: their parameters (the same checkpoint under two indices) and their data, before its rows."""
    import zarr

    _trak(tmp_path / "a").featurize(CHECKPOINTS[0], DATA, index=2)
    with pytest.raises(TrakValueError, match="same parameters as checkpoint 2 in .* as checkpoint 0 it would count"):
        _trak(tmp_path / "a").featurize(CHECKPOINTS[0], DATA, index=0)
    assert "features" not in zarr.open_group(str(tmp_path / "a"), mode="r")["c0"]
    shuffled = [(x.flip(0), y.flip(0)) for x, y in DATA]
    _trak(tmp_path / "b").featurize(CHECKPOINTS[1], DATA, index=1)
    with pytest.raises(StoreMismatchError, match="training data differs"):
        _trak(tmp_path / "b").featurize(CHECKPOINTS[0], shuffled, index=0)
    assert not zarr.open_group(str(tmp_path / "b"), mode="r")["c0"].attrs.get("rows_done", 0)


def test_a_resumed_job_with_rows_of_other_data_is_refused(tmp_path):
    """Job 2 interrupted after its first chunk of rows, on data in another order, before any checkpoint was
    complete; job 1 completes on the right data; job 2 rerun on the right data would resume the other data's rows
    (and record the right data's digests over theirs): refused, naming the group to delete."""
    from trak_core.store import KERNEL_CHUNK_ROWS

    torch.manual_seed(1)
    n = KERNEL_CHUNK_ROWS + 904
    x, y = torch.randn(n, 10), torch.randint(0, 3, (n,))
    data = [(x[i:i + 500], y[i:i + 500]) for i in range(0, n, 500)]
    other = [(a.flip(0), b.flip(0)) for a, b in data]

    def interrupted():
        yield from other[:9]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _trak(tmp_path).featurize(CHECKPOINTS[2], interrupted(), index=2)
    _trak(tmp_path).featurize(CHECKPOINTS[1], data, index=1)
    with pytest.raises(StoreMismatchError, match=r"checkpoint 2 in .* holds rows from 0 on of other training data "
                                                 r"than checkpoint 1.*Delete its group c2"):
        _trak(tmp_path).featurize(CHECKPOINTS[2], data, index=2)


def test_jobs_at_once_with_other_lambda_settings_are_refused_by_open(tmp_path, monkeypatch, in_order):
    """Two jobs that began before either was complete, one with ``lambda_reg=1.0``: neither had a setting to check
    against; ``TRAK.open`` refuses to score the mix of ridges and scores with ``lambda_reg=`` given."""
    from trak_core import _featurizer

    _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=0)
    monkeypatch.setattr(_featurizer, "check_lambda_setting", lambda *args: None)  # it began before c0 was complete
    _trak(tmp_path, lambda_reg=1.0).featurize(CHECKPOINTS[1], DATA, index=1)
    monkeypatch.undo()
    with pytest.raises(StoreMismatchError, match=r"checkpoints 0 and 1 .* lambda_reg='auto' and lambda_reg=1.0"):
        _opened(tmp_path, CHECKPOINTS[:2])
    opened = trak_core.TRAK.open(tmp_path, MODELS[0], CHECKPOINTS[:2], progress=False, lambda_reg="auto")
    assert np.array_equal(opened.score(TARGETS).numpy(), in_order.score(TARGETS, checkpoints=[0, 1]).numpy())


def test_an_estimator_opened_with_some_checkpoints_writes_another_apart(tmp_path, in_order):
    """Opened with ``{2: ...}`` (job 0 failed): ``featurize(checkpoint_0, data, index=0)`` writes checkpoint 0 (it
    was refused as "held already"); an index it holds is named with the indices it holds."""
    _trak(tmp_path).featurize(CHECKPOINTS[2], DATA, index=2)
    _trak(tmp_path).featurize(CHECKPOINTS[1], DATA, index=1)
    opened = _opened(tmp_path, {2: CHECKPOINTS[2]})
    with pytest.raises(TrakValueError, match=r"holds checkpoint 2 already \(it holds checkpoints \[2\]\)"):
        opened.featurize(CHECKPOINTS[2], DATA, index=2)
    opened.featurize(CHECKPOINTS[0], DATA, index=0)
    assert np.array_equal(_opened(tmp_path).score(TARGETS).numpy(), in_order.score(TARGETS).numpy())


def test_a_job_refused_before_its_rows_does_not_hold_its_index(tmp_path, in_order):
    """Job 1 given checkpoint 2 and shuffled data is refused by the data check before any row is written; its rerun
    with the right checkpoint was refused as "featurized from other parameters" (the first run's hash), with no row
    to keep; now it writes checkpoint 1."""
    shuffled = [(x.flip(0), y.flip(0)) for x, y in DATA]
    _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=0)
    with pytest.raises(StoreMismatchError, match="training data differs"):
        _trak(tmp_path).featurize(CHECKPOINTS[2], shuffled, index=1)
    _trak(tmp_path).featurize(CHECKPOINTS[1], DATA, index=1)
    _trak(tmp_path).featurize(CHECKPOINTS[2], DATA, index=2)
    assert np.array_equal(_opened(tmp_path).score(TARGETS).numpy(), in_order.score(TARGETS).numpy())


def test_scoring_jobs_at_once_save_under_their_own_names(tmp_path, monkeypatch, in_order):
    """Two scoring jobs saving other names: the second to create the store's ``scores`` group lost its scores, after
    all its work, to "another process is writing it" (2 rounds in 10 with four processes); now both are saved."""
    import zarr

    _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=0)
    opened = _opened(tmp_path, CHECKPOINTS[:1])
    require = zarr.Group.require_group

    def another_job_first(self, name, **kwargs):  # another process creates scores/ between the check and the create
        if name == "scores" and "scores" not in self:
            zarr.open_group(str(tmp_path), mode="r+").create_group("scores")
            kwargs["overwrite"] = False
            return zarr.Group.create_group(self, name, **kwargs)
        return require(self, name, **kwargs)

    monkeypatch.setattr(zarr.Group, "require_group", another_job_first)
    scores = opened.score(TARGETS, save_as="job-1")
    monkeypatch.undo()
    assert np.array_equal(opened.load_scores("job-1"), scores.numpy())
    assert np.array_equal(scores.numpy(), in_order.score(TARGETS, checkpoints=[0]).numpy())


def test_a_second_job_at_the_same_index_is_refused_while_the_first_has_no_rows(tmp_path, in_order):
    """Job A (checkpoint 1 at index 1) has recorded its hash and not yet its first rows; job B, by mistake at the same
    index with checkpoint 2, was accepted (no rows to keep), reported success, and A overwrote its checkpoint.
    Now B is refused, and A's refused-before-rows runs still leave the index free (test above)."""
    _trak(tmp_path).featurize(CHECKPOINTS[0], DATA, index=0)

    def waiting():  # job A, held before its first rows while job B runs
        with pytest.raises(StoreMismatchError, match="featurized from other parameters"):
            _trak(tmp_path).featurize(CHECKPOINTS[2], DATA, index=1)
        yield from DATA

    _trak(tmp_path).featurize(CHECKPOINTS[1], waiting(), index=1)
    assert np.array_equal(_opened(tmp_path, CHECKPOINTS[:2]).score(TARGETS).numpy(),
                          in_order.score(TARGETS, checkpoints=[0, 1]).numpy())


def test_checkpoints_opened_in_another_order_are_named(tmp_path):
    """Checkpoints 1 and 2 passed swapped to ``TRAK.open``: the error names the stored checkpoint each one is (it
    said "parameters cast to another dtype count as other parameters", which did not apply)."""
    for i, checkpoint in enumerate(CHECKPOINTS):
        _trak(tmp_path).featurize(checkpoint, DATA, index=i)
    with pytest.raises(StoreMismatchError, match=r"checkpoint 1 in .* other parameters .*these parameters are "
                       r"checkpoint 2's in the store: pass the checkpoints in the order they were featurized"):
        _opened(tmp_path, [CHECKPOINTS[0], CHECKPOINTS[2], CHECKPOINTS[1]])
