"""Each framework fast path of ``trak_core._delegation`` against the generic Array API path.

On NumPy, torch and JAX CPU arrays (a missing framework skips with the reason). Where a fast path
reorders floating sums the comparison is to float rounding; everything on hash words and signs is
compared bit for bit. Independent references: the pure-Python hash of :mod:`trak_core.hashing`, and
the generic code run in the same namespace.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from trak_core import _delegation, hashing, projection

NAMESPACES = ["numpy", "torch", "jax"]


@pytest.fixture(params=NAMESPACES)
def xp(request):
    """The compat-wrapped namespace of ``request.param`` (CPU)."""
    import array_api_compat

    if request.param == "numpy":
        import array_api_compat.numpy as xp

        return xp
    module = pytest.importorskip(request.param, reason=f"{request.param} is not installed: its fast paths "
                                                       "are not exercised")
    if request.param == "torch":
        return array_api_compat.array_namespace(module.zeros(1))
    return array_api_compat.array_namespace(module.numpy.zeros(1))


def _numpy(value) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else np.asarray(value)


def _name(xp) -> str:
    import array_api_compat

    if array_api_compat.is_torch_namespace(xp):
        return "torch"
    return "jax" if array_api_compat.is_jax_namespace(xp) else "numpy"


def _words_reference(stream: int, start: int, stop: int, n_cols: int) -> np.ndarray:
    """``w(a, b) = mix(rowkey(a) ^ colkey(b))`` in pure Python, as the spec in trak_core.hashing says."""
    mix, col_base = hashing.mix_scalar, hashing.key(stream, hashing.DOMAIN_COLUMNS)
    rows = [mix(mix(stream ^ (a & hashing.MASK32)) ^ (a >> 32)) for a in range(start, stop)]
    cols = [mix(b ^ col_base) for b in range(n_cols)]
    return np.array([[mix(r ^ c) for c in cols] for r in rows], dtype=np.uint32)


def _make_words(stream, start, stop, n_cols):
    return lambda xp, device: projection._words(stream, start, stop, n_cols, xp=xp, device=device)


def test_packed_words_are_the_spec_bits(xp):
    stream, start, stop, n_cols = 0x1234ABCD, 2**32 - 4, 2**32 + 5, 3
    words = _delegation.packed_words(_make_words(stream, start, stop, n_cols), xp=xp, device=None)
    expected = np.uint32 if _name(xp) != "torch" else np.int32  # torch keeps the 32 bits in int32
    assert _numpy(words).dtype == expected
    assert np.array_equal(_numpy(words).view(np.uint32), _words_reference(stream, start, stop, n_cols))


def test_torch_cpu_words_equal_torch_int64_hash():
    torch = pytest.importorskip("torch", reason="torch is not installed: its fast paths are not exercised")
    import array_api_compat

    txp = array_api_compat.array_namespace(torch.zeros(1))
    make = _make_words(777, 2**32 - 40, 2**32 + 40, 5)
    fast = _delegation.packed_words(make, xp=txp, device="cpu")  # hashed in NumPy's uint32
    generic = _delegation._int32_words(make(txp, "cpu"), xp=txp)  # the accelerator path: int64, masked
    assert fast.dtype == generic.dtype == torch.int32
    assert torch.equal(fast, generic)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_unpack_signs_equal_the_generic_bits(xp, dtype, scale):
    if _name(xp) == "jax" and dtype == "float64":
        pytest.skip("JAX without x64 has no float64")
    k = 45  # not a multiple of 32: the last word is cut
    scale = 1.0 / math.sqrt(k) if scale is None else scale
    words = projection._rademacher_words(2**32 - 10, 2**32 + 30, k, 3, xp=xp, device=None)
    fast = _delegation.unpack_signs(words, k, scale, xp=xp, dtype=getattr(xp, dtype))
    generic = projection._unpack_bits(words, k, scale, xp=xp, dtype=getattr(xp, dtype))
    if _name(xp) == "jax":
        assert fast is None  # no native path: the generic code runs
        return
    assert fast.dtype == generic.dtype and tuple(fast.shape) == (40, k)
    assert np.array_equal(_numpy(fast), _numpy(generic))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian", "signs"])
def test_make_array_equals_making_in_the_namespace(xp, kind):
    dtype = xp.float32

    def make(xp_, device, dtype_):
        if kind == "signs":
            return projection.row_signs(2**32 - 3, 2**32 + 20, seed=4, checkpoint=2, xp=xp_, device=device,
                                        dtype=dtype_)
        maker = projection._rademacher if kind == "rademacher" else projection._gaussian
        return maker(2**32 - 3, 2**32 + 20, 37, 4, xp=xp_, device=device, dtype=dtype_)

    made = _delegation.make_array(make, xp=xp, device=None, dtype=dtype, transcendental=kind == "gaussian")
    generic = make(xp, None, dtype)  # made in the namespace itself
    assert type(made) is type(generic) and made.dtype == generic.dtype == dtype
    if kind == "gaussian":
        np.testing.assert_allclose(_numpy(made), _numpy(generic), rtol=4 * 2.0**-24, atol=1e-7)
    else:
        assert np.array_equal(_numpy(made), _numpy(generic))


def test_in_float64_without_float64_equals_float64_in_the_namespace():
    jax = pytest.importorskip("jax", reason="jax is not installed: the no-float64 path is not exercised")
    import array_api_compat

    jxp = array_api_compat.array_namespace(jax.numpy.zeros(1))
    make = lambda xp_, device: projection._box_muller(5, 60, 33, 9, xp=xp_, device=device)  # noqa: E731
    with jax.enable_x64(False):
        fallback = _delegation.in_float64(make, xp=jxp, device=None, dtype=jxp.float32)  # made in NumPy
    with jax.enable_x64(True):
        generic = jxp.astype(make(jxp, None), jxp.float32)  # JAX's own float64
    assert fallback.dtype == generic.dtype == jxp.float32
    np.testing.assert_allclose(np.asarray(fallback), np.asarray(generic), rtol=2.0**-23, atol=1e-7)


def test_in_float64_with_float64_is_the_namespace_path(xp):
    if _name(xp) == "jax":
        pytest.skip("JAX without x64 takes the fallback (tested above)")
    make = lambda xp_, device: projection._box_muller(5, 60, 33, 9, xp=xp_, device=device)  # noqa: E731
    made = _delegation.in_float64(make, xp=xp, device=None, dtype=xp.float32)
    assert np.array_equal(_numpy(made), _numpy(xp.astype(make(xp, None), xp.float32)))


@pytest.mark.parametrize("block_bytes", [None, 8 * 96 * 4])  # the default, or blocks of 8 rows (k = 70: 96 columns)
def test_packed_product_equals_the_generic_block_loop(xp, block_bytes, monkeypatch):
    if block_bytes is not None:
        monkeypatch.setattr(_delegation, "PACKED_BLOCK_BYTES", block_bytes)
    k, p, block = 70, 100, 32
    rng = np.random.default_rng(0)
    grads = xp.asarray(rng.normal(size=(4, p)).astype(np.float32))
    signs = xp.asarray(np.sign(rng.normal(size=p)).astype(np.float32))
    packed = projection._rademacher_words(0, p, k, 11, xp=xp, device=None)
    fast = _delegation.packed_product(grads, signs, packed, k, block, xp=xp)
    if _name(xp) not in ("jax", "torch"):
        assert fast is None  # no native path: the generic loop runs
        return
    words = np.asarray(_numpy(packed)).view(np.uint32)
    bits = (words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1  # column 32 b + t is bit t of word b
    dense = np.where(bits.reshape(p, -1)[:, :k] == 0, 1.0, -1.0) / math.sqrt(k)
    reference = (_numpy(grads).astype(np.float64) * _numpy(signs)) @ dense  # float64, from the bits alone
    assert fast.dtype == grads.dtype and tuple(fast.shape) == (4, k)
    np.testing.assert_allclose(_numpy(fast), reference, rtol=1e-5, atol=2e-6)


def _half_operands(xp):
    rng = np.random.default_rng(1)
    a = xp.asarray(rng.normal(size=(6, 50)).astype(np.float16))
    b = xp.asarray(np.sign(rng.normal(size=(50, 9))).astype(np.float16))
    return a, b, xp.astype(a, xp.float32) @ xp.astype(b, xp.float32)


def test_half_matmul_equals_the_float32_product(xp):
    a, b, generic = _half_operands(xp)
    fast = _delegation.half_matmul(a, b, xp=xp)
    assert fast.dtype == xp.float32
    np.testing.assert_allclose(_numpy(fast), _numpy(generic), rtol=1e-6, atol=1e-6)


def test_torch_half_matmul_equals_the_float32_product():
    torch = pytest.importorskip("torch", reason="torch is not installed: its fast paths are not exercised")
    import array_api_compat

    a, b, generic = _half_operands(array_api_compat.array_namespace(torch.zeros(1)))
    fast = _delegation._torch_half_matmul(a, b)  # out_dtype=float32 where torch has it on this device
    assert fast.dtype == torch.float32
    np.testing.assert_allclose(fast.numpy(), generic.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
def test_solve_triangular_equals_the_general_solve(xp, transpose):
    rng = np.random.default_rng(2)
    lower = np.tril(rng.normal(size=(12, 12))) + 6 * np.eye(12)
    rhs = rng.normal(size=(12, 4))
    dtype = "float32" if _name(xp) == "jax" else "float64"  # JAX without x64
    lower, rhs = xp.asarray(lower.astype(dtype)), xp.asarray(rhs.astype(dtype))
    fast = _delegation.solve_triangular(lower, rhs, transpose=transpose, xp=xp)
    generic = xp.linalg.solve(xp.matrix_transpose(lower) if transpose else lower, rhs)
    assert type(fast) is type(generic) and fast.dtype == generic.dtype
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(_numpy(fast), _numpy(generic), rtol=rtol, atol=rtol)


def test_solve_triangular_generic_path_on_a_namespace_without_one():
    strict = pytest.importorskip("array_api_strict", reason="array-api-strict is not installed")
    lower = np.tril(np.random.default_rng(3).normal(size=(8, 8))) + 5 * np.eye(8)
    rhs = np.random.default_rng(4).normal(size=(8, 2))
    out = _delegation.solve_triangular(strict.asarray(lower), strict.asarray(rhs), transpose=True, xp=strict)
    np.testing.assert_allclose(np.asarray(out), np.linalg.solve(lower.T, rhs), rtol=1e-12)


def test_cpu_arrays_are_not_accelerators(xp):
    x = xp.zeros((2, 3))
    assert _delegation.is_accelerator(x) is False


def _dot_precisions(fn, *args) -> list:
    """The ``precision`` of every ``dot_general`` in the jaxpr of ``fn(*args)`` (JAX records the default
    matmul precision in force while tracing; ``None`` means JAX's default: TF32 on recent NVIDIA GPUs)."""
    import jax

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params.get("precision"))
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_the_estimators_products_run_at_full_precision_in_jax():
    """Kernel, solves, scores, the generic projection product and LDS ask JAX for float32 products
    (``Precision.HIGHEST``) whatever the user's default, and leave that default as it was. On a GPU,
    JAX's default would be TF32 (about 1e-3 relative): the conformance suite's float32 score bound is 1e-4."""
    jax = pytest.importorskip("jax", reason="jax is not installed: JAX precision is not exercised")
    import jax.numpy as jnp

    from trak_core import kernel, kronecker, scores

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    rng = np.random.default_rng(0)
    phi, targets = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32), jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    k_matrix = kernel.accumulate(None, phi, xp=jnp, dtype=jnp.float32)
    cholesky = kernel.factorize(k_matrix, 0.5, xp=jnp)
    eigh = kernel.factorize(k_matrix, 0.0, xp=jnp)
    with jax.default_matmul_precision("bfloat16"):  # a user's faster default must not reach the estimator
        cases = {
            "gram": lambda f: kernel.gram(f, xp=jnp, dtype=jnp.float32),
            "accumulate": lambda f: kernel.accumulate(None, f, xp=jnp, dtype=jnp.float32),
            "solve (eigh)": lambda t: kernel.solve(eigh, t.T, xp=jnp),
            "train_products": lambda f: scores.train_products(f, targets.T, 0, 24, xp=jnp, chunk_rows=10),
            "checkpoint_scores": lambda f: scores.checkpoint_scores(f, cholesky, targets, xp=jnp),
            "project (gaussian)": lambda f: projection.project(f, 4, kind="gaussian"),
            "layer_features": lambda f: kronecker.layer_features(
                f.reshape(24, 2, 4), f.reshape(24, 2, 4), SimpleNamespace(k_rows=4, k_cols=4, k=16), xp=jnp),
        }
        for name, fn in cases.items():
            found = _dot_precisions(fn, targets if name == "solve (eigh)" else phi)
            assert found and all(p == highest for p in found), (name, found)
        assert _dot_precisions(lambda f: f @ f.T, phi) == [(jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)]
    assert jax.config.jax_default_matmul_precision is None


def test_lds_multiplies_under_full_precision(monkeypatch):
    """LDS goes through NumPy (Spearman) and cannot be traced: its product is checked to run inside
    ``full_precision`` for the scores' namespace, and to give the float64 product's LDS."""
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed: JAX precision is not exercised")
    import contextlib

    from trak_core import evaluation

    entered = []

    @contextlib.contextmanager
    def spy(xp):
        entered.append(xp.__name__)
        with _delegation.full_precision(xp):
            yield

    monkeypatch.setattr(evaluation, "full_precision", spy)
    rng = np.random.default_rng(1)
    scores, masks, outputs = rng.normal(size=(24, 3)), rng.integers(0, 2, size=(6, 24)), rng.normal(size=(6, 3))
    result = evaluation.lds(jnp.asarray(scores, jnp.float32), jnp.asarray(masks, jnp.float32),
                            jnp.asarray(outputs, jnp.float32))
    assert entered == ["jax.numpy"]
    expected = evaluation.lds(scores, masks.astype(float), outputs)
    np.testing.assert_allclose(result.per_target, expected.per_target, atol=1e-6)


def test_row_max_abs_equals_the_generic_block_loop():
    """torch's one-pass reduction gives the generic loop's row maxima bit for bit (float32, float16, bfloat16;
    zero rows, NaN), and the other namespaces have no native path."""
    torch = pytest.importorskip("torch", reason="torch is not installed: its fast paths are not exercised")
    from trak_core._split import row_scales

    g = np.random.default_rng(3).standard_normal((5, 1000)).astype(np.float32) * np.array([[1e-30], [1], [1e30], [0], [1]],
                                                                                          dtype=np.float32)
    g[4, 17] = np.nan
    expected = np.max(np.abs(g), axis=1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.from_numpy(g).to(dtype)
        reference = np.max(np.abs(x.float().numpy()), axis=1)
        out = _delegation.row_max_abs(x, xp=_namespace_of(x)).numpy()
        assert out.dtype == np.float32 and np.array_equal(out, reference, equal_nan=True)
    assert np.array_equal(_delegation.row_max_abs(torch.from_numpy(g), xp=_namespace_of(torch.from_numpy(g))).numpy(),
                          expected, equal_nan=True)
    import array_api_compat.numpy as npx

    assert _delegation.row_max_abs(g, xp=npx) is None
    scales_torch = row_scales(torch.from_numpy(g[:4]), 300, xp=_namespace_of(torch.from_numpy(g)))
    assert np.array_equal(scales_torch.numpy(), row_scales(g[:4], 300, xp=npx))


def _namespace_of(x):
    import array_api_compat

    return array_api_compat.array_namespace(x)


@pytest.mark.parametrize("rows", [60, 300])
def test_dense_product_equals_the_float64_product(rows):
    """torch on CPUs with the matrix in memory: sign flips by column blocks into one buffer, added in place (no
    flipped copy of the gradients), against NumPy's float64 ``(grads * signs) @ shared``; 20,000 columns make
    several blocks and a short last one."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: its dense product is not exercised")
    g = np.random.default_rng(3)
    grads, signs = g.standard_normal((rows, 20_000)), np.where(g.random(20_000) < 0.5, -1.0, 1.0)
    shared = np.where(g.random((20_000, 64)) < 0.5, -0.125, 0.125)
    got = _delegation.dense_product(torch.tensor(grads, dtype=torch.float32), torch.tensor(signs, dtype=torch.float32),
                                    torch.tensor(shared, dtype=torch.float32), xp=torch)
    assert got is not None and got.shape == (rows, 64)
    expected = (grads * signs) @ shared
    error = np.linalg.norm(got.numpy() - expected) / np.linalg.norm(expected)
    assert error < 1e-6, error
    assert _delegation.dense_product(torch.zeros(rows, 100), torch.ones(100), torch.zeros(100, 8), xp=torch) is None
