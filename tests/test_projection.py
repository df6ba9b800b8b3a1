"""The projection contract of DESIGN.md: a pure function of (seed, checkpoint, row, column)."""
import math

import numpy as np
import pytest

import trak_core
from trak_core import ProjectionCache, project, projection_matrix

MASK = 0xFFFFFFFF


def _mix(x):  # the hash as documented in trak_core/hashing.py, written again from the docstring
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & MASK
    x ^= x >> 12
    x = (x * 0x297A2D39) & MASK
    return x ^ (x >> 15)


def _key(*words):
    h = 0x9E3779B9
    for w in words:
        h = _mix(h ^ w)
    return h


def _reference_entry(seed, checkpoint, a, j, k):
    """P[a, j] of the Rademacher matrix, one entry at a time, in plain Python."""
    stream = _key(seed & MASK, seed >> 32, 0x52414430)
    row = _mix(_mix(stream ^ (a & MASK)) ^ (a >> 32))
    col = _mix((j // 32) ^ _key(stream, 0x434F4C53))
    bit = (_mix(row ^ col) >> (j % 32)) & 1
    sign_stream = _key(seed & MASK, seed >> 32, 0x5349474E, checkpoint & MASK, checkpoint >> 32)
    flip = _mix(_mix(sign_stream ^ (a & MASK)) ^ (a >> 32)) >> 31
    return (-1.0 if bit ^ flip else 1.0) / math.sqrt(k)


@pytest.mark.parametrize("seed,checkpoint,offset", [(0, 0, 0), (7, 3, 1000), (2**40 + 5, 2**33, 2**32 - 3)])
def test_rademacher_matches_plain_python_reference(seed, checkpoint, offset):
    p, k = 6, 70
    m = projection_matrix(p, k, seed=seed, checkpoint=checkpoint, offset=offset, dtype=np.float64)
    ref = np.array([[_reference_entry(seed, checkpoint, offset + a, j, k) for j in range(k)] for a in range(p)])
    assert np.array_equal(np.asarray(m), ref)


@pytest.mark.parametrize("k", [1, 31, 64, 70, 1024])
def test_rademacher_bit_identical_numpy_and_strict(k):
    xs = pytest.importorskip("array_api_strict")
    a = projection_matrix(50, k, seed=3, checkpoint=2, offset=17)
    b = projection_matrix(50, k, seed=3, checkpoint=2, offset=17, xp=xs)
    assert type(b).__module__.startswith("array_api_strict")
    assert np.array_equal(a, np.asarray(b))
    assert set(np.unique(a).tolist()) <= {np.float32(1 / np.sqrt(k)), np.float32(-1 / np.sqrt(k))}


def test_gaussian_within_4_ulp_of_plain_python_and_across_namespaces():
    xs = pytest.importorskip("array_api_strict")
    p, k = 40, 33
    a = projection_matrix(p, k, seed=11, checkpoint=1, kind="gaussian", dtype=np.float64)
    b = np.asarray(projection_matrix(p, k, seed=11, checkpoint=1, kind="gaussian", xp=xs, dtype=xs.float64))
    ulp = np.spacing(np.abs(a))
    assert np.all(np.abs(a - b) <= 4 * ulp)
    stream = _key(11, 0, 0x47415530)
    col_base = _key(stream, 0x434F4C53)
    sign_stream = _key(11, 0, 0x5349474E, 1, 0)
    for row in range(p):
        rkey = _mix(_mix(stream ^ row) ^ 0)
        flip = -1.0 if _mix(_mix(sign_stream ^ row)) >> 31 else 1.0
        for j in range(k):
            m = j // 2
            w1, w2 = _mix(rkey ^ _mix(2 * m ^ col_base)), _mix(rkey ^ _mix((2 * m + 1) ^ col_base))
            r = math.sqrt(-2 * math.log((w1 + 0.5) * 2.0**-32))
            z = r * (math.cos if j % 2 == 0 else math.sin)(2 * math.pi * w2 * 2.0**-32) / math.sqrt(k)
            assert abs(flip * z - a[row, j]) <= 4 * np.spacing(abs(z))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blocks_of_rows_concatenate(kind):
    whole = projection_matrix(300, 96, seed=5, checkpoint=4, kind=kind, dtype=np.float64)
    parts = [projection_matrix(stop - start, 96, seed=5, checkpoint=4, kind=kind, offset=start, dtype=np.float64)
             for start, stop in [(0, 1), (1, 128), (128, 299), (299, 300)]]
    assert np.array_equal(whole, np.concatenate(parts))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_project_equals_matmul_any_block_size_and_split(kind, rng):
    g = rng.normal(size=(7, 500))
    dense = g @ projection_matrix(500, 130, seed=9, checkpoint=1, kind=kind, dtype=np.float64)
    for block in (None, 1, 33, 499, 10_000):
        out = project(g, 130, seed=9, checkpoint=1, kind=kind, block_size=block)
        np.testing.assert_allclose(out, dense, rtol=1e-12, atol=1e-12)
    halves = (project(g[:, :200], 130, seed=9, checkpoint=1, kind=kind)
              + project(g[:, 200:], 130, seed=9, checkpoint=1, kind=kind, offset=200))
    np.testing.assert_allclose(halves, dense, rtol=1e-12, atol=1e-12)
    uncached = project(g, 130, seed=9, checkpoint=1, kind=kind, cache=ProjectionCache(0))
    np.testing.assert_allclose(uncached, dense, rtol=1e-12, atol=1e-12)


def test_project_keeps_namespace_and_dtype(xp, rng):
    g = xp.asarray(rng.normal(size=(4, 90)), dtype=xp.float32)
    out = project(g, 40, seed=1)
    assert out.dtype == xp.float32 and out.shape == (4, 40)
    assert type(out) is type(g)
    ref = np.asarray(g, dtype=np.float64) @ projection_matrix(90, 40, seed=1, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_cache_is_bounded_and_reused(rng):
    cache = ProjectionCache(max_bytes=200 * 64 * 8 * 2 + 10_000)
    g = rng.normal(size=(3, 200))
    first = project(g, 64, seed=2, cache=cache)
    assert len(cache) == 2  # signs and the shared matrix
    assert np.array_equal(project(g, 64, seed=2, cache=cache), first)
    project(g, 64, seed=3, cache=cache)  # evicts the oldest entries to stay in budget
    assert cache._bytes <= cache.max_bytes


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_different_seed_or_checkpoint_gives_different_matrix(kind):
    base = projection_matrix(400, 128, seed=0, checkpoint=0, kind=kind)
    # another seed: every entry independent; another checkpoint: every row independently flipped,
    # so the correlation is a mean of 400 independent +-1 (std 0.05).
    for other, bound in ((projection_matrix(400, 128, seed=1, checkpoint=0, kind=kind), 4 / math.sqrt(400 * 128)),
                         (projection_matrix(400, 128, seed=0, checkpoint=1, kind=kind), 4 / math.sqrt(400))):
        same_sign = np.mean(np.sign(base) == np.sign(other))
        assert 0.4 < same_sign < 0.6
        assert abs(np.corrcoef(base.ravel(), other.ravel())[0, 1]) < bound


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_johnson_lindenstrauss(kind, rng):
    n, p, k = 200, 10_000, 1024
    g = rng.normal(size=(n, p))
    pg = project(g, k, seed=4, kind=kind)
    ratio = np.sum(pg**2, axis=1) / np.sum(g**2, axis=1)
    assert abs(ratio.mean() - 1) < 0.01
    eps = math.sqrt(8 * math.log(n) / k)  # JL distortion for n points at k dimensions
    norms = np.linalg.norm(g, axis=1)
    error = np.abs(pg @ pg.T - g @ g.T) / np.outer(norms, norms)
    assert error.max() < eps
    assert np.all(np.abs(ratio - 1) < eps)


def test_entries_are_balanced_and_columns_uncorrelated():
    m = projection_matrix(20_000, 64, seed=8, dtype=np.float64) * 8.0  # +-1 entries
    assert abs(m.mean()) < 0.01
    cov = m.T @ m / m.shape[0]
    assert np.abs(cov - np.eye(64)).max() < 5 / math.sqrt(m.shape[0])


@pytest.mark.parametrize("bad,err", [(dict(k=0), ValueError), (dict(k=-3), ValueError), (dict(kind="sparse"), ValueError),
                                     (dict(offset=-1), ValueError), (dict(seed=-1), ValueError),
                                     (dict(seed=2**64), ValueError), (dict(checkpoint=-2), ValueError)])
def test_bad_arguments(bad, err):
    args = dict(k=8)
    args.update(bad)
    with pytest.raises(err):
        project(np.ones((2, 5)), **args)


def test_bad_gradients():
    with pytest.raises(ValueError, match="2-D"):
        project(np.ones(5), 4)
    with pytest.raises(TypeError, match="floating"):
        project(np.ones((2, 5), dtype=np.int64), 4)
    assert trak_core.projection_matrix(0, 4).shape == (0, 4)


def test_a_matrix_that_fits_the_cache_only_alone_is_not_thrashed(rng, monkeypatch):
    """At the boundary (the matrix alone fills the cache) the packed bits are kept: no regeneration per call."""
    import trak_core.projection as projection

    p, k = 96, 64
    made = []
    real = projection._rademacher_words
    monkeypatch.setattr(projection, "_rademacher_words", lambda *a, **kw: made.append(1) or real(*a, **kw))
    cache = ProjectionCache(p * k * 4)  # the dense float32 matrix alone, without its row signs
    grads = rng.normal(size=(5, p)).astype(np.float32)
    first = project(grads, k, seed=3, checkpoint=1, cache=cache)
    second = project(grads, k, seed=3, checkpoint=1, cache=cache)
    assert len(made) == 1  # made once, then served from the cache
    expected = grads.astype(np.float64) @ projection_matrix(p, k, seed=3, checkpoint=1, dtype=np.float64)
    np.testing.assert_allclose(first, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(first, second)


def test_jax_packed_block_loop_equals_the_reference(rng):
    """JAX's jitted block loop (matrix too large to cache densely) gives the reference product."""
    jnp = pytest.importorskip("jax.numpy", reason="jax not installed: its packed projection path not exercised")
    p, k = 1000, 96
    grads = rng.normal(size=(7, p)).astype(np.float32)
    cache = ProjectionCache(p * 4 * 3 + p * 4 * 2)  # room for the packed words and the signs, not the matrix
    out = project(jnp.asarray(grads), k, seed=5, checkpoint=2, block_size=300, cache=cache)
    expected = grads.astype(np.float64) @ projection_matrix(p, k, seed=5, checkpoint=2, dtype=np.float64)
    assert isinstance(out, type(jnp.zeros(1))) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_numpy_integers_are_taken_as_sizes_and_bools_are_not(rng):
    """k, p and offset from NumPy arithmetic (np.int64) were refused as "not a positive integer", unlike proj_dim."""
    grads = rng.normal(size=(3, 10))
    assert np.array_equal(project(grads, np.int64(8), offset=np.int32(4)), project(grads, 8, offset=4))
    matrix = projection_matrix(np.int64(10), np.int16(8), offset=np.uint8(4))
    assert matrix.shape == (10, 8)
    np.testing.assert_array_equal(grads @ matrix, grads @ projection_matrix(10, 8, offset=4))
    for bad in (dict(k=True), dict(k=8.0), dict(k=8, offset=True)):
        with pytest.raises(ValueError, match="integer"):
            project(grads, **bad)
