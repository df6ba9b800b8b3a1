"""Scoring one checkpoint: ``Phi K^{-1} phi_t^T`` for 64 targets, vs n_train and k."""
from __future__ import annotations

import numpy as np

from _harness import SCORING_TARGETS

CASE = "scoring"


def test_scoring(benchmark, bench_target, size):
    n, k = size
    from trak_core._namespace import namespace
    from trak_core.kernel import accumulate, factorize
    from trak_core.scores import checkpoint_scores

    rng = np.random.default_rng(4)
    train_np = rng.normal(size=(n, k)).astype(np.float32)
    target_np = rng.normal(size=(SCORING_TARGETS, k)).astype(np.float32)
    train, targets = bench_target.array(train_np), bench_target.array(target_np)
    xp = namespace(train)
    factor = factorize(accumulate(None, train, xp=xp), 1.0, xp=xp)
    run = bench_target.timed(lambda: checkpoint_scores(train, factor, targets, xp=xp))
    benchmark.group = f"scoring n={n} k={k}"
    benchmark.extra_info.update(case=CASE, id=bench_target.id, n=n, k=k, targets=SCORING_TARGETS)
    scores = bench_target.case.to_numpy(benchmark.pedantic(run, rounds=3, warmup_rounds=1))
    # first 8 targets against a float64 solve in NumPy
    t = train_np.astype(np.float64)
    expected = t @ np.linalg.solve(t.T @ t + np.eye(k), target_np[:8].astype(np.float64).T)
    np.testing.assert_allclose(scores[:, :8], expected, rtol=2e-2, atol=2e-3 * np.abs(expected).max())
