"""Per-example gradients of the margin (``vmap(grad)`` in torch/JAX, closed form in NumPy) vs p."""
from __future__ import annotations

import numpy as np

from _harness import CLASSES, GRADIENT_ROWS, IN_FEATURES, mlp_params, mlp_weights

CASE = "gradients"


def test_gradients(benchmark, bench_target, size):
    hidden = size
    from trak_core.tasks import TASKS
    from trak_core.testing import canonical

    rng = np.random.default_rng(1)
    x_np = rng.normal(size=(GRADIENT_ROWS, IN_FEATURES)).astype(np.float32)
    y_np = rng.integers(0, CLASSES, size=GRADIENT_ROWS)
    model, checkpoint = bench_target.mlp(hidden)
    backend = bench_target.backend
    prepared = backend.prepare(model, checkpoint)
    x, y = bench_target.array(x_np), bench_target.array(y_np)
    task = TASKS["classification"]
    run = bench_target.timed(lambda: backend.gradients(model, prepared, x, y, task))
    benchmark.group = f"gradients p={mlp_params(hidden)}"
    benchmark.extra_info.update(case=CASE, id=bench_target.id, p=mlp_params(hidden), n=GRADIENT_ROWS)
    grads, _ = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    assert tuple(grads.shape) == (GRADIENT_ROWS, mlp_params(hidden))
    if bench_target.id != "numpy":  # against the NumPy closed form in float64, an independent implementation
        import trak_core

        weights = [w.astype(np.float64) for w in mlp_weights(hidden)]
        numpy_backend = trak_core.get_backend("numpy")
        reference = canonical.analytic_model("mlp", weights)
        expected, _ = numpy_backend.gradients(reference, numpy_backend.prepare(reference, canonical.flat(weights)),
                                              x_np.astype(np.float64), y_np, task)
        np.testing.assert_allclose(bench_target.case.to_numpy(grads), expected, rtol=1e-3, atol=1e-4)
