"""``TRAK(progress=True)`` shows a bar over featurization with ``executor="ray"`` too, and clears it.

Before, the Ray path (``RayExecutor.featurize``) drew nothing: the option was silently ignored on the longest step
there is (a cluster's featurization), while one process drew a bar over its batches. The expectation is tqdm's own
text on stderr: the description and ``n/total`` over the shards (``trak_core.executors.shards``, counted here).
"""
import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed: the Ray executor is not exercised")
pytest.importorskip("zarr", reason="zarr is not installed: the Ray executor needs an on-disk store")
pytest.importorskip("tqdm", reason="tqdm is not installed: trak-core draws no bars")

from trak_core import MLP, TRAK  # noqa: E402
from trak_core.executors import RayExecutor, shards  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _featurize(store, show):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(9000, 5)), rng.integers(0, 3, 9000)
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=store, executor=RayExecutor(num_workers=2), progress=show)
    trak.featurize(model.init(seed=0), [(x[i:i + 1500], y[i:i + 1500]) for i in range(0, 9000, 1500)])
    trak.executor.close()
    return trak


def test_ray_featurization_draws_a_bar_over_its_shards(ray_cluster, tmp_path, capsys):
    n_shards = len(shards(0, 9000, RayExecutor().shard_rows))
    assert n_shards == 3  # 9,000 rows in chunks of 4,096
    _featurize(tmp_path / "store", True)
    err = capsys.readouterr().err
    assert "featurize checkpoint 0 (Ray shards)" in err
    assert f"0/{n_shards}" in err
    assert err.rstrip(" ").endswith("\r")  # leave=False: the last thing written clears the line


def test_no_bar_when_progress_is_off(ray_cluster, tmp_path, capsys):
    _featurize(tmp_path / "store", False)
    assert "featurize checkpoint" not in capsys.readouterr().err
