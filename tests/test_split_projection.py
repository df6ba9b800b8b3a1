"""The half-precision projection (trak_core._split) and the precision setting, against float64 references.

The GPU path runs here on CPU arrays: float16 operands multiplied with float32 sums are what tensor
cores compute, so the error bounds of issue 12 are checked on every CI run; the GPU speed is not.
"""
import math

import numpy as np
import pytest

import trak_core
from trak_core import ProjectionCache
from trak_core._checks import projection_group_rows
from trak_core._split import row_scales, split_project
from trak_core.projection import project, projection_matrix


def _gradients(n=9, p=3000, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, p)).astype(np.float32)
    g[1] *= 1e-12  # tiny and huge rows: the per-row scale keeps both in float16's range
    g[2] *= 1e12
    g[3] = 0.0
    g[4, ::7] *= 1e-3  # entries of very different sizes within a row
    return g


def _relative_error(out, reference):
    return float(np.linalg.norm(np.asarray(out, dtype=np.float64) - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def case():
    g = _gradients()
    matrix = projection_matrix(g.shape[1], 256, seed=3, checkpoint=1, dtype=np.float64)
    return g, g.astype(np.float64) @ matrix, matrix


def _namespaces():
    yield "numpy", lambda a: a, np.asarray
    try:
        import torch
    except ImportError:
        pass
    else:
        yield "torch", torch.from_numpy, lambda t: t.numpy()
    try:
        import jax.numpy as jnp
    except ImportError:
        pass
    else:
        yield "jax", jnp.asarray, np.asarray


@pytest.mark.parametrize("name,to,back", list(_namespaces()), ids=lambda v: v if isinstance(v, str) else "")
def test_float32_grade_within_twice_a_float32_matmul(case, name, to, back):
    torch = pytest.importorskip("torch")
    g, reference, matrix = case
    float32_matmul = (torch.from_numpy(g) @ torch.from_numpy(matrix.astype(np.float32))).numpy()
    bound = 2 * _relative_error(float32_matmul, reference)
    out = back(split_project(to(g), 256, seed=3, checkpoint=1, cache=ProjectionCache(), block_size=700))
    error = _relative_error(out, reference)
    assert error <= min(bound, 1e-5), (name, error, bound)
    rows = np.linalg.norm(out - reference, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-300)
    assert rows[[0, 1, 2, 4]].max() < 1e-6  # every nonzero row, whatever its magnitude
    assert not np.any(out[3])  # a zero row projects to zero


@pytest.mark.parametrize("name,to,back", list(_namespaces()), ids=lambda v: v if isinstance(v, str) else "")
def test_fast_is_float16_grade(case, name, to, back):
    g, reference, _ = case
    out = back(split_project(to(g), 256, seed=3, checkpoint=1, precision="fast", cache=ProjectionCache()))
    assert 1e-5 < _relative_error(out, reference) <= 5e-4  # it does round: one float16 pass


def test_every_sign_source_gives_the_same_numbers(case):
    g, _, _ = case
    dense = split_project(g, 256, seed=3, checkpoint=1, cache=ProjectionCache(), block_size=700)
    packed = split_project(g, 256, seed=3, checkpoint=1, cache=ProjectionCache(2**20), block_size=700)
    hashed = split_project(g, 256, seed=3, checkpoint=1, cache=ProjectionCache(0), block_size=700)
    assert np.array_equal(dense, packed) and np.array_equal(dense, hashed)


def test_blocks_and_offsets_are_one_matrix(case):
    g, _, _ = case
    whole = split_project(g, 256, seed=3, checkpoint=1, cache=ProjectionCache())
    halves = (split_project(g[:, :1000], 256, seed=3, checkpoint=1, cache=ProjectionCache())
              + split_project(g[:, 1000:], 256, seed=3, checkpoint=1, offset=1000, cache=ProjectionCache()))
    np.testing.assert_allclose(halves, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def test_row_scales_are_powers_of_two_in_range():
    g = _gradients()
    scales = row_scales(g, 512, xp=trak_core._namespace.namespace(g))
    exponents = np.log2(scales)
    assert np.array_equal(exponents, np.round(exponents))
    top = np.abs(g).max(axis=1) * scales
    nonzero = np.abs(g).max(axis=1) > 0
    assert np.all(top[nonzero] >= 2**12) and np.all(top[nonzero] < 2**15) and scales[3] == 2.0**13


def test_jax_half_matmul_equals_the_float32_emulation():
    jnp = pytest.importorskip("jax.numpy")
    import array_api_compat

    from trak_core._delegation import half_matmul

    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 300)).astype(np.float16)
    b = np.where(rng.random((300, 64)) < 0.5, 1, -1).astype(np.float16)
    out = half_matmul(jnp.asarray(a), jnp.asarray(b), xp=array_api_compat.array_namespace(jnp.asarray(a)))
    assert out.dtype == jnp.float32
    reference = a.astype(np.float64) @ b.astype(np.float64)  # the exact products and sums
    np.testing.assert_allclose(np.asarray(out), reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_project_precision_dispatch(case):
    g, reference, _ = case
    fast = project(g, 256, seed=3, checkpoint=1, precision="fast")
    assert np.array_equal(fast, split_project(g, 256, seed=3, checkpoint=1, precision="fast",
                                              cache=ProjectionCache()))
    default = project(g, 256, seed=3, checkpoint=1)  # on a CPU: the float32 product, as before
    assert np.array_equal(project(g, 256, seed=3, checkpoint=1, precision="float32"), default)
    assert _relative_error(default, reference) < 1e-6
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        project(g, 256, precision="half")
    with pytest.raises(ValueError, match="needs proj_type='rademacher'"):
        project(g, 256, kind="gaussian", precision="fast")


def test_trak_precision_setting():
    model = trak_core.MLP(6, 5, 3)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    scores = {}
    for precision in ("float32", "fast"):
        trak = trak_core.TRAK(model, proj_dim=64, lambda_reg=0.1, precision=precision)
        trak.featurize(model.init(seed=0), [(x, y)])
        scores[precision] = trak.score([(x[:7], y[:7])])
    assert trak._fingerprint(1, None)["precision"] == "fast"
    difference = np.linalg.norm(scores["fast"] - scores["float32"]) / np.linalg.norm(scores["float32"])
    assert 0 < difference < 5e-3
    with pytest.raises(ValueError, match="unknown precision"):
        trak_core.TRAK(model, precision="tf32")
    with pytest.raises(ValueError, match=r"needs proj_type='rademacher' \(Gaussian entries are not exact in float16"):
        trak_core.TRAK(model, proj_type="gaussian", precision="fast")
    with pytest.raises(ValueError, match=r"needs proj_type='rademacher' \(the factorized projection has no float16 "
                                         r"mode\); use precision='float32' with proj_type='kronecker'"):
        trak_core.TRAK(model, proj_dim=64, proj_type="kronecker", precision="fast")  # said "Gaussian entries"


def test_accelerator_groups_hold_a_resnet_batch():
    assert projection_group_rows(11_181_642, 4, 2048, accelerator=True) == 256  # 16 GiB / 44.7 MB -> 384 -> 256
    assert projection_group_rows(11_181_642, 4, 2048) == 64  # on CPUs: 128 MiB, at least 64 when uncached
    assert projection_group_rows(1_126_410, 4, 2048) == 128  # uncached: up to 256 rows within 1 GiB (238 -> 128)
    assert projection_group_rows(1_126_410, 4, 64) == 16  # cached (1.13M x 64 fits): 128 MiB of gradients
    assert projection_group_rows(1000, 4, 64, accelerator=True) == 4096
    assert math.log2(projection_group_rows(3_000_000, 2, 2048, accelerator=True)).is_integer()


@pytest.mark.parametrize("precision", ["float32", "fast"])
def test_jax_packed_split_is_the_numpy_split(case, precision):
    """JAX arrays whose dense float16 signs do not fit the cache take one jitted step per block (words cached,
    or hashed per block): the NumPy split's numbers to float32 rounding, and the float64 product's grade."""
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed: the jitted JAX split is not exercised")
    from trak_core import _jax_blocks

    g, reference, _ = case
    expected = split_project(g, 256, seed=3, checkpoint=1, precision=precision, cache=ProjectionCache(),
                             block_size=700)
    _jax_blocks._split_step.cache_clear()
    for cache in (ProjectionCache(2**20), ProjectionCache(0)):  # words cached (dense does not fit), words hashed
        out = np.asarray(split_project(jnp.asarray(g), 256, seed=3, checkpoint=1, precision=precision, cache=cache,
                                       block_size=700))
        rows = [0, 1, 2, 4]
        for i in rows:
            assert np.linalg.norm(out[i] - expected[i]) <= 1e-6 * np.linalg.norm(expected[i])
        assert not np.any(out[3])
        assert _relative_error(out, reference) <= (1e-6 if precision == "float32" else 5e-4)
    assert _jax_blocks._split_step.cache_info().currsize == 2  # the full blocks and the last one: two compiles
