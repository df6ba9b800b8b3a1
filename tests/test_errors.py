"""Bad input gets a clear error naming the problem, and a failed call leaves the store as it was."""
import numpy as np
import pytest

from trak_core import (MLP, TRAK, MissingFrameworkError, SoftmaxRegression, StoreMismatchError, TrakCoreError,
                       UnknownBackendError)
from trak_core.backends import numpy_backend, registry

from tests_helpers import ZeroGradients


@pytest.fixture
def setup(rng):
    model = SoftmaxRegression(4, 3)
    x, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    return model, model.init(seed=0), x, y


@pytest.mark.parametrize("proj_dim", [0, -5, 2.5, True, "64"])
def test_bad_proj_dim(proj_dim, setup):
    with pytest.raises(ValueError, match="proj_dim must be a positive integer"):
        TRAK(setup[0], proj_dim=proj_dim)


@pytest.mark.parametrize("kwargs,match", [(dict(lambda_reg=-1.0), "lambda_reg"), (dict(lambda_reg=float("nan")), "lambda_reg"),
                                          (dict(task="ranking"), "unknown task"), (dict(proj_type="sparse"), "proj_type"),
                                          (dict(seed=-1), "seed")])
def test_bad_options(kwargs, match, setup):
    with pytest.raises(ValueError, match=match):
        TRAK(setup[0], **kwargs)


def test_labels_out_of_range(setup):
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match=r"labels out of range.*\[0, 2\]"):
        trak.featurize(theta, [(x, np.where(y == 0, 3, y))])
    with pytest.raises(TypeError, match="integers"):
        trak.featurize(theta, [(x, y.astype(float))])
    assert trak.n_checkpoints == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradients(bad, setup):
    model, theta, x, y = setup
    x = x.copy()
    x[3, 1] = bad
    x[15, 0] = bad
    trak = TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match=r"batch 0: the out-to-loss weights of rows \[3\] are NaN or inf.*inputs"):
        trak.featurize(theta, [(x[:10], y[:10]), (x[10:], y[10:])])
    with pytest.raises(ValueError, match=r"batch 1: the out-to-loss weights of rows \[5\] are NaN or inf"):
        trak.featurize(theta, [(x[:3], y[:3]), (x[10:], y[10:])])
    assert trak.n_checkpoints == 0


def test_numpy_integers_are_integers(setup):
    trak = TRAK(setup[0], proj_dim=np.int64(8), seed=np.uint32(3), progress=False)
    assert (trak.proj_dim, trak.seed) == (8, 3) and type(trak.proj_dim) is int


def test_mismatched_batch_lengths(setup):
    model, theta, x, y = setup
    with pytest.raises(ValueError, match="inputs have 20 rows but labels have 19"):
        TRAK(model, proj_dim=8, progress=False).featurize(theta, [(x, y[:-1])])


def test_score_before_featurize_and_empty_data(setup):
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match="before any featurize"):
        trak.score([(x, y)])
    for method, call in [("self_influence", trak.self_influence), ("features", lambda: trak.features([(x, y)]))]:
        with pytest.raises(ValueError, match=rf"^{method}\(\) called before any featurize\(\)"):
            call()
    with pytest.raises(ValueError, match="no batches"):
        trak.featurize(theta, [])
    with pytest.raises(ValueError, match="no examples .*only empty ones"):
        trak.featurize(theta, [(x[:0], y[:0])])
    with pytest.raises(TypeError, match="single"):
        trak.featurize(theta, (x, y))
    trak.featurize(theta, [(x, y)])
    with pytest.raises(ValueError, match="no targets"):
        trak.score(iter([]))
    with pytest.raises(ValueError, match="no targets"):
        trak.score([(x[:0], y[:0])])
    np.testing.assert_allclose(trak.score([(x[:0], y[:0]), (x[:3], y[:3]), (x[:0], y[:0]), (x[3:5], y[3:5])]),
                               trak.score([(x[:5], y[:5])]), rtol=1e-12, atol=0)  # empty target batches are skipped


def test_checkpoint_parameter_count(setup):
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=8, progress=False)
    trak.featurize(theta, [(x, y)])
    with pytest.raises(ValueError, match=r"shape \(15,\).*parameter count"):
        trak.featurize(np.zeros(16), [(x, y)])

    class GrowingBackend(numpy_backend.ArrayAPIBackend):  # a backend whose models change size
        def n_params(self, prepared):
            return 15 + len(self.seen)

        def prepare(self, model, checkpoint):
            self.seen.append(1)
            return super().prepare(model, checkpoint)

        def gradients(self, model, prepared, inputs, labels, task):  # as wide as n_params says
            grads, q = super().gradients(model, prepared, inputs, labels, task)
            return np.concatenate([grads, np.zeros((grads.shape[0], len(self.seen)))], axis=1), q

    growing = GrowingBackend()
    growing.seen = []
    trak = TRAK(model, proj_dim=8, backend=growing, progress=False)
    trak.featurize(theta, [(x, y)])
    with pytest.raises(ValueError, match="checkpoint 1 has 17 parameters but checkpoint 0 had 16"):
        trak.featurize(theta, [(x, y)])
    assert trak.n_checkpoints == 1


def test_training_set_must_not_change(setup):
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=8, progress=False)
    trak.featurize(theta, [(x, y)])
    other = theta + 0.01
    with pytest.raises(StoreMismatchError, match=r"has 19 examples, but checkpoint 0 of this estimator was featurized "
                                                 r"on n_train=20 examples.*extended\) \(nothing of this checkpoint"):
        trak.featurize(other, [(x[1:], y[1:])])
    with pytest.raises(StoreMismatchError, match=r"data checkpoint 0 of this estimator was featurized on, in rows "
                                                 r"0\.\.19 \(data_checksums chunk 0\): other examples") as info:
        trak.featurize(other, [(x[::-1], y[::-1])])  # same size, another order
    assert "store path" not in str(info.value)  # an in-memory estimator has none
    assert trak.n_checkpoints == 1
    trak.featurize(other, [(x[:7], y[:7]), (x[7:], y[7:])])  # other batch sizes, same rows: the same data
    assert trak.n_checkpoints == 2


def test_same_checkpoint_twice_is_refused(setup):
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=8, progress=False)
    trak.featurize(theta, [(x, y)])
    with pytest.raises(TrakCoreError, match="same parameters as checkpoint 0"):
        trak.featurize(theta.copy(), [(x, y)])
    assert trak.n_checkpoints == 1


def test_all_zero_gradients(setup):
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=None, lambda_reg=0.0, backend=ZeroGradients(), progress=False)
    with pytest.raises(ValueError, match="all-zero gradients"):
        trak.featurize(theta, [(x, y)])
    ridge = TRAK(model, proj_dim=8, lambda_reg=0.5, backend=ZeroGradients(), progress=False)
    ridge.featurize(theta, [(x, y)])
    np.testing.assert_array_equal(ridge.score([(x[:2], y[:2])]), np.zeros((20, 2)))


def test_unknown_backend_lists_installed(setup):
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'tensorflow'.*installed backends: \[.*'numpy'"):
        TRAK(setup[0], backend="tensorflow")


def test_missing_framework_names_pip_extra(setup, monkeypatch):
    class Absent(numpy_backend.ArrayAPIBackend):
        name, framework, extra = "absent", "no_such_framework_xyz", "absent"

    monkeypatch.setattr(registry, "_registered", {"absent": Absent()})
    monkeypatch.setattr(registry, "_loaded", {})
    with pytest.raises(MissingFrameworkError, match=r"pip install no_such_framework_xyz$"):  # not trak-core's extra
        TRAK(setup[0], backend="absent")
    assert "absent" not in registry.available_backends()
    err = MissingFrameworkError("x")
    assert isinstance(err, ValueError) and isinstance(err, ImportError)


def test_missing_first_party_backend_package(setup, monkeypatch):
    monkeypatch.setitem(registry.KNOWN, "fancy", ("trak_fancy_not_installed:backend", "fancy_fw", "fancy"))
    monkeypatch.setattr(registry, "_loaded", {})
    with pytest.raises(MissingFrameworkError,
                       match=r'pip install fancy_fw \(or, in a trak-core checkout, pip install -e "\.\[fancy\]"\)'):
        TRAK(setup[0], backend="fancy")


def test_backend_inferred_from_model_type(setup):
    assert TRAK(MLP(3, 2, 2)).backend.name == "numpy"
    with pytest.raises(TypeError, match="no installed backend recognises a model of type builtins.object"):
        TRAK(object())
    with pytest.raises(TypeError, match="backend must be"):
        TRAK(setup[0], backend=3)


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes need Python 3.11+")
def test_a_models_own_error_keeps_its_type_and_names_the_batch():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")

    class Picky(torch.nn.Module):  # fails on any batch of 3 rows
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            if x.shape[0] == 3:
                raise KeyError("the model's own failure")
            return self.linear(x)

    model = Picky()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    trak = TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(KeyError, match="the model's own failure") as info:
        trak.featurize(model.state_dict(), [(x[:5], y[:5]), (x[5:8], y[5:8])])
    assert info.value.__notes__ == ["trak-core: raised in checkpoint 0, batch 1 (inputs (3, 4)), in backend 'torch' "
                                    "(the model's forward and its per-example gradients; it may run the model on the "
                                    "batch's first examples alone first, to check its fast path)"]
    assert trak.n_checkpoints == 0
    trak.featurize(model.state_dict(), [(x[:5], y[:5]), (x[5:], y[5:])])
    with pytest.raises(KeyError) as info:
        trak.score([(x[:2], y[:2]), (x[:3], y[:3])])
    assert len(info.value.__notes__) == 1 and "targets batch 1, checkpoint 0" in info.value.__notes__[0]
    assert tuple(trak.score([(x[:2], y[:2])]).shape) == (10, 2)


def test_progress_bars_know_their_totals(setup, monkeypatch):
    """featurize's and score's bars get the number of batches when the data has a length (a list, a DataLoader),
    and none for a generator (before, every bar counted batches with no total); score's passes over the
    checkpoints' features, the number of checkpoints."""
    import trak_core._featurizer
    import trak_core.trak
    from trak_core._progress import progress

    model, theta, x, y = setup
    totals = []

    def recording(iterable, *, desc, enabled, total=None):
        totals.append((desc.split()[0], total))
        return progress(iterable, desc=desc, enabled=False, total=total)

    monkeypatch.setattr(trak_core._featurizer, "progress", recording)
    monkeypatch.setattr(trak_core.trak, "progress", recording)
    trak = TRAK(model, proj_dim=8, progress=True)
    batches = [(x[:7], y[:7]), (x[7:14], y[7:14]), (x[14:], y[14:])]
    trak.featurize(theta, batches)
    trak.featurize(model.init(seed=1), (batch for batch in batches))
    trak.score([(x[:2], y[:2]), (x[2:4], y[2:4])])
    assert totals == [("featurize", 3), ("featurize", None), ("score", 2), ("score:", 2)]
    bar = progress(iter(range(4)), desc="bar", enabled=True, total=None)
    assert getattr(bar, "total", None) is None  # a generator: no total, and progress() does not guess one
    assert getattr(progress(range(4), desc="bar", enabled=True), "total", 4) == 4


@pytest.mark.parametrize("wrong", ["dict", "vector"])
def test_open_with_a_single_checkpoint_not_in_a_list_says_so(setup, tmp_path, wrong):
    pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")
    model, theta, x, y = setup
    TRAK(model, proj_dim=8, store=tmp_path / "s", progress=False).featurize(theta, [(x, y)])
    single = {"theta": theta} if wrong == "dict" else theta
    with pytest.raises(TypeError, match=r"checkpoints must be a list of every checkpoint .*pass \[checkpoint\]"):
        TRAK.open(tmp_path / "s", model, single)
    reopened = TRAK.open(tmp_path / "s", model, (c for c in [theta]))  # any iterable of checkpoints
    fresh = TRAK(model, proj_dim=8, progress=False)
    fresh.featurize(theta, [(x, y)])
    np.testing.assert_allclose(reopened.self_influence(), fresh.self_influence(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("checkpoint", [None, [0.1, 0.2], "theta.npy"])
def test_an_analytic_model_checkpoint_that_is_not_an_array_says_what_it_must_be(setup, checkpoint):
    model, theta, x, y = setup
    expected = rf"flat parameter vector of shape \({theta.shape[0]},\) or a mapping"
    if checkpoint is None:
        expected += r".*holds no weights of its own: pass them, e\.g\. model\.init\(seed=0\)"
    with pytest.raises(TypeError, match=expected):
        TRAK(model, proj_dim=8, progress=False).featurize(checkpoint, [(x, y)])


def test_a_custom_store_that_saves_scores_gets_save_as(setup):
    # the base Store refuses save_as before scoring only where save_scores is not overridden (docs/store.md's table)
    from trak_core.store import MemoryStore

    class Saving(MemoryStore):
        def __init__(self):
            super().__init__()
            self.saved = {}

        def save_scores(self, name, scores):
            self.saved[name] = np.array(scores)

    model, theta, x, y = setup
    store = Saving()
    trak = TRAK(model, proj_dim=8, store=store, progress=False)
    trak.featurize(theta, [(x, y)])
    scores = trak.score([(x[:3], y[:3])], save_as="run")
    np.testing.assert_array_equal(store.saved["run"], scores)
    plain = TRAK(model, proj_dim=8, progress=False)
    plain.featurize(theta, [(x, y)])
    with pytest.raises(ValueError, match="save_as needs an on-disk store"):
        plain.score([(x[:3], y[:3])], save_as="run")


def test_the_finiteness_check_tells_overflow_from_nan_and_inf():
    """One sum decides the common case; a total that overflows from finite entries is not taken for a NaN."""
    from trak_core._checks import _all_finite, _check_features, _check_weights

    big = np.full((6, 4), 3e38, np.float32)  # finite entries whose float32 sum is inf
    assert not np.isfinite(big.sum()) and _all_finite(big) and _all_finite(big, big[:, 0])
    _check_features(big, "here")
    _check_weights(big[:, 0], "here", 6)
    for bad in (np.nan, np.inf, -np.inf):
        values = np.ones((6, 4), np.float32)
        values[2, 1] = bad
        assert not _all_finite(values) and not _all_finite(np.ones(3), values)
        with pytest.raises(TrakCoreError, match=r"out-to-loss weights of rows \[2\]"):
            _check_weights(values[:, 1], "here", 6)


def test_install_advice_names_packages_not_an_unpublished_distribution(monkeypatch, tmp_path):
    """trak-core is not on PyPI: a missing framework's error names its package (and the extra of a checkout),
    never pip install "trak-core[...]", which finds nothing."""
    import sys

    from trak_core.disk_store import DiskStore

    monkeypatch.setitem(sys.modules, "zarr", None)  # import zarr raises ImportError
    with pytest.raises(MissingFrameworkError) as info:
        DiskStore(tmp_path / "store")
    assert 'pip install zarr (or, in a trak-core checkout, pip install -e ".[store]")' in str(info.value)
    monkeypatch.setattr(registry, "_importable", lambda module: module != "cupy")
    monkeypatch.delitem(registry._loaded, "cupy", raising=False)  # loaded by available_backends() where CuPy is
    with pytest.raises(MissingFrameworkError) as info:
        registry.get_backend("cupy")
    assert "pip install cupy-cuda12x" in str(info.value) and "trak-core[" not in str(info.value)


@pytest.mark.parametrize("options", [dict(seed=1.5), dict(checkpoint=2.0), dict(seed=True), dict(dtype=np.int32)])
def test_projection_arguments_are_checked(options):
    """A fractional seed was truncated (seed=1.5 gave seed 1's matrix) and an integer dtype gave zeros."""
    from trak_core import projection_matrix

    with pytest.raises(TrakCoreError, match="seed|checkpoint|floating"):
        projection_matrix(4, 8, **options)


def test_a_used_up_generator_and_another_label_dtype_are_named(setup):
    """A generator reused for a second checkpoint said only "0 examples ... not truncated or extended"; int64 labels
    then int32 ones said only "other examples, other labels or another order"."""
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=8, progress=False)
    data = ((x[i:i + 5], y[i:i + 5]) for i in range(0, 20, 5))
    trak.featurize(theta, data)
    with pytest.raises(StoreMismatchError, match=r"has 0 examples \(it yielded nothing: a generator, map or zip is "
                                                 r"used up by one pass; pass a list"):
        trak.featurize(theta + 0.01, data)
    with pytest.raises(StoreMismatchError, match=r"in another dtype or shape \(int64 labels one time and int32"):
        trak.featurize(theta + 0.01, [(x, y.astype(np.int32) if y.dtype != np.int32 else y.astype(np.int64))])


@pytest.mark.parametrize("options, named", [
    ({"num_workers": 2.5}, "num_workers"), ({"num_workers": "2"}, "num_workers"),
    ({"num_workers": True}, "num_workers"),
    ({"shard_rows": 0}, "shard_rows"), ({"max_retries": -2}, "max_retries"), ({"max_retries": None}, "max_retries"),
    ({"cpu_wait_s": -1}, "cpu_wait_s"), ({"cpu_wait_s": float("inf")}, "cpu_wait_s"), ({"address": 3}, "address")])
def test_ray_executor_arguments_are_checked_when_made(options, named):
    """No Ray needed: 2.5 and '2' workers failed inside Ray at the first featurize, True workers and
    max_retries=None were taken."""
    from trak_core.executors import RayExecutor

    with pytest.raises(TrakCoreError, match=f"^{named} must be"):
        RayExecutor(**options)
    assert RayExecutor(num_workers=np.int64(3), shard_rows=np.int32(8192)).num_workers == 3
    assert RayExecutor(shard_rows=1e5, max_retries=-1).shard_rows == 100000  # as before: rounded up to chunks later


@pytest.mark.parametrize("error", [KeyboardInterrupt, AssertionError])
def test_a_first_featurize_stopped_by_an_error_without_a_message_is_named(setup, error):
    """Ctrl-C (or a bare assert) in the first featurize: score() raised IndexError on the error's empty message
    instead of saying that featurize failed."""
    model, theta, x, y = setup
    trak = TRAK(model, proj_dim=8, progress=False)

    def batches():
        raise error
        yield x, y

    with pytest.raises(error):
        trak.featurize(theta, batches())
    with pytest.raises(ValueError, match=rf"the last featurize failed \({error.__name__}: no message\)"):
        trak.score([(x, y)])
