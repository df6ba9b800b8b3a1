"""A reduced LDS check of the defaults on the suite's synthetic regression task (fast, NumPy only).

The full measurement (four tasks, 128 retrained models each) is ``python bench/quality/run.py``.
"""
import pathlib
import sys
import warnings

import numpy as np

import trak_core

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench" / "quality"))
from tasks import synthetic_regression  # noqa: E402


def test_auto_lambda_beats_zero_and_is_near_the_best_of_a_grid():
    task = synthetic_regression()
    masks = trak_core.subset_masks(len(task.y), 48, seed=0)
    outputs = np.array([task.outputs(task.train(task.x[m], task.y[m], 1000 + s), task.xt, task.yt)
                        for s, m in enumerate(masks)])
    trak = trak_core.TRAK(task.model, task="regression", proj_dim=512, progress=False)  # k > n = 100
    for c in range(5):
        trak.featurize(task.train(task.x, task.y, c), [(task.x, task.y)])

    def lds(lambda_reg):
        trak.refit(lambda_reg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return trak_core.lds(trak.score([(task.xt, task.yt)]), masks, outputs).mean

    auto = lds("auto")
    zero = lds(0.0)
    trak.refit("auto")
    scale = np.mean(trak.lambdas)  # the grid spans 1e-4 .. 1e4 times the automatic lambda
    grid = max(lds(scale * 10.0**e) for e in range(-4, 5))
    assert auto >= 5 * max(zero, 0.02)
    assert auto >= grid - 0.03
