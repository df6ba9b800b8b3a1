"""Projection ``grads @ P``: trak-core's (matrix made from the hash, cached or streamed) vs a raw matmul.

The baseline is what a library that keeps a materialized ``P`` in memory pays per batch: one
matmul with the matrix already made. The ratio ``ours / matmul`` is the cost of never storing
``P`` (above the cache size, trak-core regenerates or unpacks it block by block).
"""
from __future__ import annotations

import numpy as np
import pytest

from _harness import BASELINE_MAX_BYTES, PROJECTION_ROWS

CASE = "projection"


def _grads(bench_target, p):
    return bench_target.array(np.random.default_rng(0).normal(size=(PROJECTION_ROWS, p)).astype(np.float32))


def _info(benchmark, bench_target, p, k, role, what):
    benchmark.group = f"projection {bench_target.id} p={p} k={k}"
    benchmark.extra_info.update(case=CASE, id=bench_target.id, p=p, k=k, n=PROJECTION_ROWS, role=role, what=what,
                                pair=f"projection {bench_target.id} p={p} k={k}")


def test_projection_ours(benchmark, bench_target, size):
    p, k = size
    grads = _grads(bench_target, p)
    backend = bench_target.backend
    run = bench_target.timed(lambda: backend.project(grads, k, seed=0, checkpoint=1, kind="rademacher"))
    _info(benchmark, bench_target, p, k, "ours", "trak-core projection")
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    if p * k <= 2**24:  # cheap enough to check against the materialized matrix in float64
        import trak_core

        matrix = trak_core.projection_matrix(p, k, seed=0, checkpoint=1, dtype=np.float64)
        expected = bench_target.case.to_numpy(grads).astype(np.float64) @ matrix
        np.testing.assert_allclose(bench_target.case.to_numpy(out), expected, rtol=1e-3, atol=1e-3)


def test_projection_matmul(benchmark, bench_target, size):
    p, k = size
    if p * k * 4 > BASELINE_MAX_BYTES:
        pytest.skip(f"a materialized {p} x {k} float32 matrix is over {BASELINE_MAX_BYTES >> 30} GiB")
    import trak_core
    from trak_core._namespace import device_of, namespace

    grads = _grads(bench_target, p)
    xp = namespace(grads)
    matrix = trak_core.projection_matrix(p, k, seed=0, checkpoint=1, xp=xp, device=device_of(grads),
                                         dtype=grads.dtype)
    from trak_core._delegation import full_precision

    def product():  # float32 as the baseline: JAX on GPUs would multiply in TF32 by default
        with full_precision(xp):
            return grads @ matrix

    run = bench_target.timed(product)
    _info(benchmark, bench_target, p, k, "baseline", "matmul with a materialized matrix")
    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert tuple(out.shape) == (PROJECTION_ROWS, k)
    if p * k <= 2**24:  # the same product in float64
        expected = bench_target.case.to_numpy(grads).astype(np.float64) @ bench_target.case.to_numpy(matrix)
        np.testing.assert_allclose(bench_target.case.to_numpy(out), expected, rtol=1e-3, atol=1e-3)
