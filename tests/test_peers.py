"""``bench/peers.py`` against independent references (small settings; the full run is the command).

* trak-core through the benchmark's own path (checkpoint file, fresh child process, LDS in the
  parent) gives the LDS of scores computed here directly with ``trak_core.TRAK``, to 1e-12.
* dattri and traker, driven by the benchmark's adapters (target, out-to-loss, loaders, units of the
  ridge) with no projection and the same ridge, reproduce trak-core's exact scores; this is the
  setting in which the three estimators are the same formula, so only the adapters can differ.
"""
import importlib
import importlib.util
import pathlib
import sys
import warnings

import numpy as np
import pytest

import trak_core

pytest.importorskip("torch", reason="PyTorch is not installed: bench/peers.py needs it")
pytest.importorskip("sklearn", reason="scikit-learn is not installed: the digits task needs it")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
peers = importlib.import_module("peers")
TASKS = importlib.import_module("tasks").TASKS  # bench/quality, put on the path by peers


@pytest.fixture(scope="module")
def digits():
    task = TASKS["digits-mlp"]()
    checkpoint = task.train(*task.arrays(task.x, task.y), 0)
    return task, checkpoint, (task.x, task.y, task.xt, task.yt)


@pytest.fixture(scope="module")
def exact(digits):
    """trak-core's exact scores (no projection) and the automatic lambda they used."""
    task, checkpoint, data = digits
    trak = trak_core.TRAK(task.model, proj_dim=None, backend="torch", progress=False)
    trak.featurize(checkpoint, peers._loader(data[0], data[1], 100))
    return trak.score(peers._loader(data[2], data[3], 100)).double().numpy(), trak.lambdas[0]


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_trak_core_row_matches_direct_scores(digits):
    task, checkpoint, _ = digits
    masks = trak_core.subset_masks(len(task.y), 4, seed=0)  # a small ground truth of real retrains
    outputs = np.stack([task.outputs(task.train(*task.arrays(task.x[m], task.y[m]), 100 + s), task.xt, task.yt)
                        for s, m in enumerate(masks)])
    (row,) = peers.measure(["trak-core"], [1], 256, 100, masks, outputs)
    trak = trak_core.TRAK(task.model, task="classification", proj_dim=256, backend="torch", seed=0, progress=False)
    trak.featurize(checkpoint, [task.arrays(task.x[i:i + 100], task.y[i:i + 100]) for i in range(0, 1000, 100)])
    direct = trak_core.lds(trak.score([task.arrays(task.xt, task.yt)]).double().numpy(), masks, outputs)
    assert abs(row["lds"] - direct.mean) <= 1e-12 and abs(row["sem"] - direct.sem) <= 1e-12
    assert direct.mean > 0.2  # and it attributes something
    assert (row["id"], row["library"], row["M"], row["k"]) == ("trak-core", "trak-core", 1, 256)
    assert row["seconds"] > 0 and row["peak_rss_mb"] >= row["import_rss_mb"] > 50


def test_missing_library_is_skipped_with_a_message(digits, monkeypatch, capsys):
    variants = peers._variants

    def with_missing(k, ridge, n_params):
        return dict(variants(k, ridge, n_params), missing=(("no_such_peer_lib",), "no-such-peer", None, {}, ""))

    monkeypatch.setattr(peers, "_variants", with_missing)
    assert peers.measure(["missing"], [1], 256, 100, np.ones((3, 1000)), np.ones((3, 100))) == []
    assert "no-such-peer not installed: pip install no-such-peer" in capsys.readouterr().out


def test_dattri_without_projection_reproduces_trak_core_exact_scores(digits, exact):
    pytest.importorskip("dattri", reason="dattri not installed: pip install dattri")
    task, checkpoint, data = digits
    reference, lam = exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = peers.run_dattri(task.model, [checkpoint], data, k=None, batch=100,
                                  regularization=lam / _n_params(task.model))  # dattri divides grads by sqrt(p)
    np.testing.assert_allclose(scores, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_traker_without_projection_reproduces_trak_core_exact_scores(digits, exact):
    pytest.importorskip("trak", reason="traker not installed: pip install traker")
    task, checkpoint, data = digits
    reference, lam = exact
    scores = peers.run_traker(task.model, [checkpoint], data, k=None, batch=100, half=False,
                              lambda_reg=lam / _n_params(task.model))  # traker divides grads by sqrt(p)
    # traker divides (X^T X + lambda I)^-1 by its mean absolute entry: one positive factor per checkpoint
    scale = np.sum(scores * reference) / np.sum(scores * scores)
    assert scale > 0
    np.testing.assert_allclose(scale * scores, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


@pytest.mark.skipif(not (importlib.util.find_spec("trak") and importlib.util.find_spec("dattri")),
                    reason="needs traker and dattri: pip install traker dattri")
def test_projected_ridges_are_in_each_library_units(digits):
    """dattri 0.3's CPU projector draws traker's Gaussian matrix (same seeds and blocks) scaled by
    1/sqrt(k); so with the ridge translated as the benchmark does, their scores agree up to a factor."""
    task, checkpoint, data = digits
    variants = peers._variants(256, 30.0, _n_params(task.model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dattri = peers.run_dattri(task.model, [checkpoint], data, k=256, batch=100, **variants["dattri-ridge"][3])
    traker = peers.run_traker(task.model, [checkpoint], data, k=256, batch=100, half=False,
                              **variants["traker-ridge"][3])
    scale = np.sum(traker * dattri) / np.sum(traker * traker)
    np.testing.assert_allclose(scale * traker, dattri, rtol=0, atol=1e-4 * np.abs(dattri).max())
