"""Kernel factorization: Cholesky of ``Phi^T Phi + lambda I`` in the accumulation dtype, vs k."""
from __future__ import annotations

import numpy as np

CASE = "kernel"


def test_kernel_factorization(benchmark, bench_target, size):
    k = size
    from trak_core._namespace import namespace
    from trak_core.kernel import accumulate, factorize

    features = bench_target.array(np.random.default_rng(3).normal(size=(2 * k, k)).astype(np.float32))
    xp = namespace(features)
    kernel = bench_target.sync(accumulate(None, features, xp=xp))
    run = bench_target.timed(lambda: factorize(kernel, 1.0, xp=xp).arrays[0])
    benchmark.group = f"kernel k={k}"
    benchmark.extra_info.update(case=CASE, id=bench_target.id, k=k, dtype=str(kernel.dtype))
    lower = bench_target.case.to_numpy(benchmark.pedantic(run, rounds=3, warmup_rounds=1)).astype(np.float64)
    # against NumPy's float64 Cholesky of the same matrix
    expected = np.linalg.cholesky(bench_target.case.to_numpy(kernel).astype(np.float64) + np.eye(k))
    np.testing.assert_allclose(lower, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
