"""Featurization on a local Ray cluster: the single-process numbers bit for bit, even when a worker dies."""
import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed: the Ray executor is not exercised")
pytest.importorskip("zarr", reason="zarr is not installed: the Ray executor needs an on-disk store")

from trak_core import MLP, TRAK  # noqa: E402
from trak_core.executors import RayExecutor, shards  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9000, 5)), rng.integers(0, 3, 9000)
    return x, y, [(x[i:i + 700], y[i:i + 700]) for i in range(0, 9000, 700)]


def _scores(store=None, executor=None):
    x, y, batches = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=store, executor=executor, progress=False)
    for c in range(2):
        trak.featurize(model.init(seed=c), batches)
    return trak.score([(x[:6], y[:6])])


def test_shards_are_chunk_aligned():
    assert shards(0, 9000, 4096) == [(0, 4096), (4096, 8192), (8192, 9000)]
    assert shards(4096, 9000, 5000) == [(4096, 9000)]
    assert shards(0, 0, 4096) == []


def test_two_workers_give_single_process_scores(ray_cluster, tmp_path):
    reference = _scores()
    assert np.array_equal(_scores(tmp_path / "store", RayExecutor(num_workers=2)), reference)


def test_a_dead_worker_is_replaced_and_its_shard_retried(ray_cluster, tmp_path):
    reference = _scores()
    executor = RayExecutor(num_workers=2)
    executor.fail_marker = str(tmp_path / "died-once")  # the first shard's worker exits mid-task, once
    assert np.array_equal(_scores(tmp_path / "store", executor), reference)
    assert (tmp_path / "died-once").exists()


def test_scoring_on_workers_over_row_shards(ray_cluster, tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(20000, 5)), rng.integers(0, 3, 20000)  # two 16,384-row scoring shards
    batches = [(x[i:i + 1000], y[i:i + 1000]) for i in range(0, 20000, 1000)]
    model = MLP(5, 4, 3)
    local = TRAK(model, proj_dim=32, progress=False)
    distributed = TRAK(model, proj_dim=32, store=tmp_path / "store", executor=RayExecutor(num_workers=2, shard_rows=1),
                       progress=False)
    for trak in (local, distributed):
        trak.featurize(model.init(seed=0), batches)
    assert np.array_equal(distributed.score([(x[:6], y[:6])]), local.score([(x[:6], y[:6])]))


def test_ray_needs_a_shared_store():
    with pytest.raises(ValueError, match="store=PATH"):
        TRAK(MLP(5, 4, 3), executor="ray")


def test_dict_batches_on_workers(ray_cluster, tmp_path):
    """Dict batches (a collator's) through the workers equal one process (before: AttributeError in the shards)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: dict batches on workers not exercised")
    x, y, _ = _data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    batches = [{"input": torch.as_tensor(x[i:i + 700]), "labels": torch.as_tensor(y[i:i + 700])}
               for i in range(0, 9000, 700)]  # nn.Sequential's forward takes its input as "input"
    scores = []
    for store, executor in ((None, None), (tmp_path / "store", RayExecutor(num_workers=2))):
        trak = TRAK(model, proj_dim=32, store=store, executor=executor, progress=False)
        trak.featurize(model.state_dict(), batches)
        scores.append(trak.score(batches[:1]))
        if executor is not None:
            executor.close()
    assert torch.equal(scores[0], scores[1])


def test_a_cluster_without_free_cpus_is_an_error_not_a_hang(ray_cluster, tmp_path):
    """A second estimator while the first holds every CPU: a clear error (before: ray.get waited forever); after
    the first's executor is closed, the second runs. Actors never outnumber the free CPUs."""
    from trak_core import TrakCoreError

    x, y, batches = _data()
    model = MLP(5, 4, 3)
    first = TRAK(model, proj_dim=32, store=tmp_path / "a", executor=RayExecutor(num_workers=2, cpu_wait_s=2),
                 progress=False)
    first.featurize(model.init(seed=0), batches)
    assert len(first.executor._actors) == 2
    second = TRAK(model, proj_dim=32, store=tmp_path / "b", executor=RayExecutor(num_workers=2, cpu_wait_s=2),
                  progress=False)
    with pytest.raises(TrakCoreError, match="no free CPU for trak-core's actors.*executor.close"):
        second.featurize(model.init(seed=0), batches)
    first.executor.close()
    second.featurize(model.init(seed=0), batches)
    local = TRAK(model, proj_dim=32, progress=False)
    local.featurize(model.init(seed=0), batches)
    assert np.array_equal(second.score([(x[:4], y[:4])]), local.score([(x[:4], y[:4])]))
    with pytest.raises(TrakCoreError, match="no free CPU"):  # the first's actors would be started again: none free
        first.score([(x[:4], y[:4])])
    second.executor.close()


def _float32_data(batch_rows):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9000, 10)).astype(np.float32), rng.integers(0, 4, 9000)
    return x, y, [(x[i:i + batch_rows], y[i:i + batch_rows]) for i in range(0, 9000, batch_rows)]


def test_shards_project_in_groups_aligned_to_absolute_rows(ray_cluster, tmp_path):
    """Batches of 700 do not divide the 4,096-row shards: a shard's batches start at row 3,500, not 0. Its projection
    groups still end where one process's do, so the stored features are the same bits (before: 404 rows of the
    second shard differed by up to 5e-7, the groups there ending at row 7,596 instead of 8,192)."""
    import zarr

    x, y, batches = _float32_data(700)
    model = MLP(10, 16, 4)
    features, scores = [], []
    for name, executor in (("local", None), ("ray", RayExecutor(num_workers=2))):
        trak = TRAK(model, proj_dim=128, store=tmp_path / name, executor=executor, progress=False)
        trak.featurize(model.init(seed=0, dtype="float32"), batches)
        features.append(zarr.open_group(str(tmp_path / name), mode="r")["c0/features"][:])
        scores.append(trak.score([(x[:8], y[:8])]))
        if executor is not None:
            executor.close()
    assert features[0].shape == (9000, 128)
    assert np.array_equal(features[1], features[0]), f"{np.any(features[1] != features[0], axis=1).sum()} rows differ"
    assert np.array_equal(scores[1], scores[0])


def test_a_dead_actor_without_retries_is_replaced_by_the_next_call(ray_cluster, tmp_path):
    """max_retries=0: the worker's death fails the call, and the same call again resumes on new actors with the
    single-process scores (before: every later call failed with ActorDiedError on the dead actor)."""
    import ray

    reference = _scores()
    x, y, batches = _data()
    model = MLP(5, 4, 3)
    executor = RayExecutor(num_workers=2, max_retries=0)
    executor.fail_marker = str(tmp_path / "died-once")  # the first shard's worker exits mid-task, once
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", executor=executor, progress=False)
    with pytest.raises(ray.exceptions.RayActorError):
        trak.featurize(model.init(seed=0), batches)
    for c in range(2):
        trak.featurize(model.init(seed=c), batches)
    assert np.array_equal(trak.score([(x[:6], y[:6])]), reference)
    executor.close()


def test_a_worker_error_names_the_global_batch_and_the_rerun_resumes(ray_cluster, tmp_path):
    """A bad batch 13 (rows 6,656..7,167, in the second shard): the worker's error names batch 13 as one process
    does (before: batch 5, its index in the shard's batches); the first shard is kept, and the same call with the
    data fixed resumes from it with the single-process scores."""
    import zarr

    from trak_core import TrakValueError

    x, y, batches = _float32_data(512)
    bad = list(batches)
    bad[13] = (bad[13][0][:, :9], bad[13][1])
    model = MLP(10, 16, 4)
    checkpoint = model.init(seed=0, dtype="float32")
    local = TRAK(model, proj_dim=32, progress=False)
    with pytest.raises(TrakValueError) as one_process:
        local.featurize(checkpoint, bad)
    assert str(one_process.value).startswith("checkpoint 0, batch 13: ")
    executor = RayExecutor(num_workers=2)
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", executor=executor, progress=False)
    with pytest.raises(TrakValueError) as on_workers:
        trak.featurize(checkpoint, bad)
    assert str(one_process.value) in str(on_workers.value)
    assert "batch 5" not in str(on_workers.value)
    assert zarr.open_group(str(tmp_path / "store"), mode="r")["c0"].attrs["rows_done"] == 4096
    local.featurize(checkpoint, batches)
    trak.featurize(checkpoint, batches)
    assert np.array_equal(trak.score([(x[:8], y[:8])]), local.score([(x[:8], y[:8])]))
    executor.close()


def test_jax_with_uneven_batches_gives_single_process_bits(ray_cluster, tmp_path):
    """A first batch of 1,000 rows then batches of 300: a worker whose shard starts later compiled its JAX step at
    300 rows where one process compiled at 1,000 (2,754 stored rows apart, up to 2.4e-6); workers now take the
    training data's first batch's size."""
    pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    from trak_jax import JaxModel

    def _jax_apply(params, inputs):  # defined here: cloudpickle sends it to the workers by value
        import jax.numpy as jnp

        (w1, b1), (w2, b2) = params
        return jnp.tanh(inputs @ w1.T + b1) @ w2.T + b2

    rng = np.random.default_rng(1)
    params = [(rng.normal(size=(48, 32)).astype(np.float32) / 4, rng.normal(size=48).astype(np.float32)),
              (rng.normal(size=(10, 48)).astype(np.float32) / 4, rng.normal(size=10).astype(np.float32))]
    x, y = rng.normal(size=(9000, 32)).astype(np.float32), rng.integers(0, 10, 9000)
    edges = [0, 1000] + list(range(1300, 9000, 300)) + [9000]
    batches = [(x[a:b], y[a:b]) for a, b in zip(edges[:-1], edges[1:])]
    one = TRAK(JaxModel(_jax_apply), proj_dim=64, progress=False)
    one.featurize(params, batches)
    ray = TRAK(JaxModel(_jax_apply), proj_dim=64, store=tmp_path / "store", executor=RayExecutor(num_workers=2),
               progress=False)
    ray.featurize(params, batches)
    assert np.array_equal(np.asarray(ray.store[0].features[0:9000]), np.asarray(one.store[0].features))
    assert np.array_equal(np.asarray(ray.score([(x[:6], y[:6])])), np.asarray(one.score([(x[:6], y[:6])])))
    ray.executor.close()


def test_a_pickled_copy_keeps_its_hands_off_the_originals_actors(ray_cluster, tmp_path):
    """A copy (pickled, or passed to a Ray task) held the original's actor handles and killed them when it
    started its own: the original's next score failed with ActorDiedError."""
    import pickle

    x, y, batches = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", executor=RayExecutor(num_workers=1), progress=False)
    trak.featurize(model.init(seed=0), batches)
    expected = trak.score([(x[:6], y[:6])])
    copy = pickle.loads(pickle.dumps(trak))
    assert copy.executor._actors == [] and len(trak.executor._actors) == 1
    copy.featurize(model.init(seed=1), batches)  # starts actors of its own
    assert np.array_equal(trak.score([(x[:6], y[:6])]), expected)  # the original's actors still serve it
    copy.executor.close()
    trak.executor.close()


def test_a_workers_model_error_carries_trak_cores_location_once(ray_cluster, tmp_path):
    """The model's own error on a worker (a torch shape mismatch) keeps its type, and trak-core's note naming the
    checkpoint and batch appears once: it was in Ray's remote traceback (the message) and again as a note."""
    import traceback

    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    batches[2] = (torch.randn(8, 5), batches[2][1])  # the model's forward fails on batch 2
    executor = RayExecutor(num_workers=1)
    trak = TRAK(model, proj_dim=8, store=tmp_path / "store", executor=executor, progress=False)
    with pytest.raises(RuntimeError) as failed:
        trak.featurize(None, batches)
    text = "".join(traceback.format_exception(failed.value))
    assert text.count("trak-core: raised in checkpoint 0, batch 2") == 1, text
    executor.close()


def test_two_workers_give_single_process_factorized_scores(ray_cluster, tmp_path):
    """``proj_type="kronecker"`` with a torch model: the workers check the layout on their shards' first batches
    (they do not record it), and give one process's bits."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the factorized path is not exercised")

    x, y, _ = _data()
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    batches = [(x[i:i + 700], y[i:i + 700]) for i in range(0, 9000, 700)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def scores(store=None, executor=None):
        trak = TRAK(model, proj_type="kronecker", proj_dim=16, store=store, executor=executor, progress=False)
        for c in range(2):
            trak.featurize({k: v + 0.1 * c for k, v in model.state_dict().items()}, batches)
        return np.asarray(trak.score([(x[:6], y[:6])]))

    reference = scores()
    assert np.array_equal(scores(tmp_path / "store", RayExecutor(num_workers=2)), reference)


def test_an_estimator_that_does_not_pickle_names_what_to_do(ray_cluster, tmp_path):
    """A backend holding a lock: the executor failed with a bare "cannot pickle '_thread.lock' object"."""
    import threading

    from trak_core import TrakTypeError
    from trak_core.backends.numpy_backend import ArrayAPIBackend

    class Locked(ArrayAPIBackend):
        name = "numpy-locked"

        def __init__(self):
            self.lock = threading.Lock()

    _, _, batches = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", executor=RayExecutor(num_workers=1),
                backend=Locked(), progress=False)
    with pytest.raises(TrakTypeError, match=r"executor='ray' sends the estimator to its workers, and it cannot be "
                                            r"pickled \(TypeError: cannot pickle '_thread.lock' object\): the model, "
                                            r"the task or the backend 'numpy-locked' holds"):
        trak.featurize(model.init(seed=0), batches)


def test_subnormal_rows_normalized_on_workers_are_warned_of(ray_cluster, tmp_path):
    """normalize_features: the rows Ray workers normalize were never noted, and the driver's one template row was:
    "1 of 1 training feature rows are subnormal" for 20 of 200 (or no warning where the first row is normal)."""
    import warnings

    torch = pytest.importorskip("torch", reason="torch is not installed: a float32 linear model is not exercised")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=False)
    x, y = torch.randn(200, 4), torch.randint(0, 3, (200,))
    x[180:] *= 1e-42  # the last 20 rows: subnormal features, none in the first batch
    for executor in (None, RayExecutor(num_workers=1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trak = TRAK(model, normalize_features=True, progress=False, executor=executor,
                        store=tmp_path / ("ray" if executor else "local"))
            trak.featurize(None, [(x[:100], y[:100]), (x[100:], y[100:])])
        warned = [str(w.message) for w in caught if "subnormal" in str(w.message)]
        assert len(warned) == 1 and "20 of 200 training feature rows" in warned[0], (executor, warned)
