"""Featurize end to end (gradients, projection, kernel update) in examples per second, vs p and k."""
from __future__ import annotations

import numpy as np

from _harness import CLASSES, FEATURIZE_BATCH, FEATURIZE_ROWS, IN_FEATURES, mlp_params

CASE = "featurize"


def test_featurize(benchmark, bench_target, size):
    hidden, k = size
    import trak_core

    rng = np.random.default_rng(2)
    x_np = rng.normal(size=(FEATURIZE_ROWS, IN_FEATURES)).astype(np.float32)
    y_np = rng.integers(0, CLASSES, size=FEATURIZE_ROWS)
    batches = [(bench_target.array(x_np[i:i + FEATURIZE_BATCH]), bench_target.array(y_np[i:i + FEATURIZE_BATCH]))
               for i in range(0, FEATURIZE_ROWS, FEATURIZE_BATCH)]
    model, checkpoint = bench_target.mlp(hidden)
    backend = bench_target.backend

    def run():
        trak = trak_core.TRAK(model, proj_dim=k, lambda_reg=1.0, backend=backend, progress=False)
        trak.featurize(checkpoint, batches)
        return trak

    p = mlp_params(hidden)
    benchmark.group = f"featurize p={p} k={k}"
    benchmark.extra_info.update(case=CASE, id=bench_target.id, p=p, k=k, n=FEATURIZE_ROWS, batch=FEATURIZE_BATCH)
    trak = benchmark.pedantic(lambda: bench_target.sync(run().store[0].kernel), rounds=3, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (one untimed run, still checked below)
        benchmark.extra_info["examples_per_s"] = FEATURIZE_ROWS / benchmark.stats.stats.mean
    kernel = bench_target.case.to_numpy(trak)
    # the kernel Phi^T Phi is positive semi-definite with trace = sum of squared feature norms > 0
    assert kernel.shape == (k, k) and np.trace(kernel) > 0
    np.testing.assert_allclose(kernel, kernel.T, rtol=1e-5, atol=1e-6 * np.trace(kernel))
