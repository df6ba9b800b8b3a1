"""The JAX step's sizes: a short chunk is padded to a bucket of the step's size ``S`` (``S``, ``ceil(S / 2)``, ...,
1), not to ``S`` itself, with one compilation per bucket used; ``JaxBackend(batch_size=...)`` keeps one size; the
cropped rows equal per-example gradients taken at the exact batch size, in float32 and float64."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
import jax.numpy as jnp  # noqa: E402

import trak_core  # noqa: E402
from trak_core.executors import fix_step_size  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402

SIZES = [16, 5, 7, 3, 40, 17, 16]  # the first batch fixes S = 16
TASK = trak_core.Classification()


def _mlp(params, x):
    w1, b1, w2, b2 = params
    return jnp.tanh(x @ w1.T + b1) @ w2.T + b2


def _margin(params, x, y):
    """Classification's output of one example, written out: ``logit_y - logsumexp`` of the other logits."""
    logits = _mlp(params, x[None])[0]
    others = jnp.where(jnp.arange(logits.shape[0]) == y, -jnp.inf, logits)
    return logits[y] - jax.scipy.special.logsumexp(others)


def _reference(weights, x, y):
    """Per-example gradients of the margin, ``jax.vmap(jax.grad)`` at the batch's exact size, raveled."""
    grads = jax.vmap(jax.grad(_margin), in_axes=(None, 0, 0))([jnp.asarray(w) for w in weights], jnp.asarray(x),
                                                                jnp.asarray(y))
    return np.concatenate([np.asarray(g).reshape(len(y), -1) for g in grads], axis=1)


@pytest.fixture
def computed(monkeypatch):
    """The rows of every call of the backends' jitted steps made in the test: the padded sizes computed."""
    rows, jit = [], jax.jit

    def recording_jit(fun, *args, **kwargs):
        compiled = jit(fun, *args, **kwargs)
        if getattr(fun, "__name__", "") != "step":  # the backend's steps (dense and Kronecker) only
            return compiled

        def call(params, inputs, labels, *rest):
            rows.append(labels.shape[0])
            return compiled(params, inputs, labels, *rest)
        return call

    monkeypatch.setattr(jax, "jit", recording_jit)
    return rows


def _run(backend, sizes, dtype="float32", factorized=False, start=0):
    """Gradients (or Kronecker features) of batches of ``sizes`` rows from row ``start`` on, and the data."""
    model = JaxModel(_mlp)
    x, y = canonical.inputs("mlp", sum(SIZES), seed=0, dtype=dtype)
    weights = canonical.weights("mlp", seed=0, dtype=dtype)
    prepared = backend.prepare(model, [jnp.asarray(w) for w in weights])
    outputs = []
    for n in sizes:
        x_n, y_n = x[start:start + n], y[start:start + n]
        if factorized:
            out = backend.factorized_features(model, prepared, x_n, y_n, TASK, k=8, seed=0, checkpoint=0,
                                              options=None)[0]
        else:
            out = backend.gradients(model, prepared, x_n, y_n, TASK)[0]
        outputs.append(np.asarray(out))
        start += n
    return outputs, (weights, x, y)


@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "kronecker"])
def test_short_chunks_are_padded_to_buckets_compiled_once_each(factorized, computed):
    """Batches of 16 (S), 5, 7, 3, 40, 17 and 16 rows: 5 and 7 pad to 8, 3 to 4, 40 is 16 + 16 + 8, 17 is 16 + 1.
    The step was padded to 16 rows in every call (1.9x the rows computed here), compiled once."""
    backend = JaxBackend()
    outputs, _ = _run(backend, SIZES, factorized=factorized)
    assert computed == [16, 8, 8, 4, 16, 16, 8, 16, 1, 16]
    assert backend.compilations == 4  # 16, 8, 4 and 1 rows: one trace each
    assert [len(out) for out in outputs] == SIZES
    computed.clear()
    again, _ = _run(backend, SIZES, factorized=factorized)  # every bucket is compiled now
    assert backend.compilations == 4 and computed == [16, 8, 8, 4, 16, 16, 8, 16, 1, 16]
    assert all(np.array_equal(a, b) for a, b in zip(outputs, again))


def test_a_fixed_batch_size_keeps_one_program(computed):
    """``JaxBackend(batch_size=16)``: every chunk is padded to 16 rows, one compilation, as before buckets."""
    backend = JaxBackend(batch_size=16)
    _run(backend, SIZES)
    assert computed == [16] * 10 and backend.compilations == 1


def test_step_rows_gives_the_sizes_of_the_process_that_featurized(computed):
    """``TRAK.open`` and Ray workers set ``step_rows`` (not ``batch_size``, one size), so their short batches pad
    to the buckets of the process whose first batch fixed S, and give its bits."""
    outputs, _ = _run(JaxBackend(), SIZES)
    trak = trak_core.TRAK(JaxModel(_mlp), proj_dim=8, backend=JaxBackend(), progress=False)
    fix_step_size(trak, 16)
    assert trak.backend.step_rows == 16 and trak.backend.batch_size is None
    computed.clear()
    worker, _ = _run(trak.backend, [5, 7, 3], start=16)  # no batch of 16 rows first: S comes from step_rows
    assert computed == [8, 8, 4]
    assert all(np.array_equal(a, b) for a, b in zip(outputs[1:4], worker))


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_padded_and_cropped_rows_equal_per_example_gradients_at_the_exact_size(x64):
    """Every batch's rows against ``jax.vmap(jax.grad)`` of the margin at that batch's exact size."""
    dtype = "float64" if x64 else "float32"
    with jax.enable_x64(x64):
        outputs, (weights, x, y) = _run(JaxBackend(), SIZES, dtype=dtype)
        start = 0
        for n, out in zip(SIZES, outputs):
            expected = _reference(weights, x[start:start + n], y[start:start + n])
            assert out.dtype == np.dtype(dtype)
            tol = 1e-12 if x64 else 2e-6
            np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * np.abs(expected).max())
            start += n


def test_scores_through_trak_use_the_buckets(computed):
    """Featurizing two checkpoints in batches of 16, 16, 16 and 2 rows and scoring 5 targets compiles 16, 2 and 8
    rows (it was one size, 16); the scores equal those of a backend fixed at 16 rows within float32 rounding."""
    x, y = canonical.inputs("mlp", 55, seed=0, dtype="float32")
    train = [(x[i:min(i + 16, 50)], y[i:min(i + 16, 50)]) for i in range(0, 50, 16)]
    scores = {}
    for name, backend in (("buckets", JaxBackend()), ("fixed", JaxBackend(batch_size=16))):
        trak = trak_core.TRAK(JaxModel(_mlp), proj_dim=32, lambda_reg=1.0, backend=backend, progress=False)
        for c in range(2):
            trak.featurize(canonical.weights("mlp", seed=c, dtype="float32"), train)
        scores[name] = np.asarray(trak.score([(x[50:], y[50:])]))
        assert backend.compilations == (3 if name == "buckets" else 1)
        assert computed == ([16, 16, 16, 2] * 2 + [8, 8] if name == "buckets" else [16] * 10)
        computed.clear()
    np.testing.assert_allclose(scores["buckets"], scores["fixed"], rtol=1e-5, atol=1e-6 * np.abs(scores["fixed"]).max())


@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "kronecker"])
def test_a_step_evicted_from_the_cache_is_made_again_at_its_own_size(factorized, computed):
    """With one step kept, the other path's step evicts this one between batches; made again, it keeps S = 16
    (5 rows pad to 8, 3 to 4), as the backend that kept it, and its rows keep their bits. It was made again at the
    calling batch's size (5 rows padded to 5)."""
    from trak_jax.recent import Recent

    kept, evicted = JaxBackend(), JaxBackend()
    evicted._steps = Recent(1)
    expected, _ = _run(kept, [16, 5, 3], factorized=factorized)
    computed.clear()
    outputs = []
    for start, n in ((0, 16), (16, 5), (21, 3)):
        outputs += _run(evicted, [n], factorized=factorized, start=start)[0]
        _run(evicted, [2], factorized=not factorized, start=40)  # the other path's step: this one is dropped
    assert computed == [16, 2, 8, 2, 4, 2]
    assert all(np.array_equal(a, b) for a, b in zip(expected, outputs))
