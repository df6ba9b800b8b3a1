"""The Triton split-projection kernel (trak_core._triton), run by Triton's interpreter on CPU tensors.

Run by ``tests/test_triton_projection.py`` in a fresh process with ``TRITON_INTERPRET=1`` (Triton reads it
when imported, and other tests' imports, such as transformers', import Triton first); not collected by
itself. On a GPU the same kernel is compiled (``bench/gpu_check.sh`` runs ``tests/test_gpu_projection.py``
there); here the interpreter executes it with NumPy, so its indexing, bit unpacking, masking, slicing of
``p`` and the sum of the slices are checked on every CI run. References: the same hi/lo split computed in
float64 from the bits of ``trak_core.projection_matrix``, and the float64 product with that matrix.
"""
import logging
import math
import os

import numpy as np
import pytest

from trak_core import ProjectionCache
from trak_core.errors import TrakValueError
from trak_core.projection import _rademacher_words, projection_matrix, row_signs

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_projection.py (TRITON_INTERPRET=1)"
torch = pytest.importorskip("torch", reason="PyTorch is not installed: the Triton kernel (torch tensors) is not exercised")
pytest.importorskip("triton", reason="Triton is not installed: the GPU projection kernel is not exercised")

import array_api_compat.numpy as npx  # noqa: E402
import array_api_compat.torch as txp  # noqa: E402

from trak_core import _triton  # noqa: E402
from trak_core._split import row_scales, split_parts, split_project  # noqa: E402


@pytest.fixture
def interpret(monkeypatch):
    """The kernel switched back on (no earlier failure, no ``TRAK_CORE_TRITON=0``)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("TRAK_CORE_TRITON", raising=False)
    monkeypatch.setattr(_triton, "_failed", [])


def _inputs(n, p, k, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, p)).astype(np.float32)
    g[0] *= 1e-20  # rows of very different sizes: the per-row power-of-two scale handles each
    if n > 2:
        g[2] *= 1e20
        g[1, ::5] *= 1e-4
    return torch.from_numpy(g)


def _split_in_float64(grads, k, n_passes, *, seed, checkpoint):
    """The kernel's result computed in float64: the float16 parts of ``grads * signs * scales`` times the +-1 bits."""
    xp = txp
    n, p = grads.shape
    signs = row_signs(0, p, seed=seed, checkpoint=checkpoint, xp=xp, dtype=xp.float32)
    scales = row_scales(grads, p, xp=xp)
    parts = split_parts(grads.float() * signs[None, :] * scales[:, None], n_passes, xp=xp).double().numpy()
    plus_minus = projection_matrix(p, k, seed=seed, checkpoint=0, dtype=np.float64) * math.sqrt(k)
    plus_minus /= row_signs(0, p, seed=seed, checkpoint=0, xp=npx, dtype=np.float64)[:, None]  # the shared +-1 bits alone
    product = parts @ plus_minus
    l1 = np.abs(parts).sum(axis=1, keepdims=True)
    l1 = l1 if n_passes == 1 else l1[:n] + l1[n:]  # sum over the row's terms of their size: the rounding bound
    return (product if n_passes == 1 else product[:n] + product[n:]), signs, scales, l1


@pytest.mark.parametrize("n,p,k", [(5, 300, 96), (40, 1000, 200), (70, 129, 130), (130, 200, 40)])
@pytest.mark.parametrize("n_passes", [1, 2])
def test_kernel_equals_the_split_in_float64(interpret, n, p, k, n_passes):
    grads = _inputs(n, p, k)
    expected, signs, scales, l1 = _split_in_float64(grads, k, n_passes, seed=4, checkpoint=2)
    words = _rademacher_words(0, p, k, 4, xp=txp, device=None)
    assert _triton.launch_plan(n, p, k, 4)["splits"] > 1  # the sum over slices of p is exercised
    out = _triton.split_product(grads, words, signs, scales, k, n_passes)
    assert out is not None and out.dtype == torch.float32 and tuple(out.shape) == (n, k)
    assert np.all(np.abs(out.double().numpy() - expected) <= p * 2.0**-24 * l1)  # float32 sums of p terms


@pytest.mark.parametrize("options", [dict(block_m=16, block_n=64, block_k=32), dict(block_n=128, block_k=128, warps=4,
                                                                                     stages=2),
                                     dict(block_m=64, block_n=32), dict(block_m=16, block_n=512), dict(pairs=True),
                                     dict(pairs=True, block_m=16, block_n=32)])
def test_other_launch_plans_give_the_same_numbers(interpret, options):
    """The tile sizes ``bench/triton_sweep.py`` tries: the same split, summed in another order."""
    n, p, k = 40, 700, 300
    grads = _inputs(n, p, k, seed=6)
    expected, signs, scales, l1 = _split_in_float64(grads, k, 2, seed=4, checkpoint=2)
    words = _rademacher_words(0, p, k, 4, xp=txp, device=None)
    plan = _triton.launch_plan(n, p, k, 16, **options)
    assert plan["splits"] > 1 and all(plan[key] == value for key, value in options.items())
    out = _triton.split_product(grads, words, signs, scales, k, 2, plan=plan)
    assert np.all(np.abs(out.double().numpy() - expected) <= p * 2.0**-24 * l1)


@pytest.mark.parametrize("precision,bound", [("float32", 1e-6), ("fast", 5e-4)])
def test_split_project_through_the_kernel_is_float32_grade(interpret, precision, bound, caplog):
    n, p, k = 6, 700, 160
    grads = _inputs(n, p, k, seed=1)
    grads[0] = torch.from_numpy(np.random.default_rng(2).standard_normal(p).astype(np.float32))
    reference = grads.double().numpy() @ projection_matrix(p, k, seed=7, checkpoint=3, dtype=np.float64)
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        fused = split_project(grads, k, seed=7, checkpoint=3, precision=precision, cache=ProjectionCache(0))
        via_cache = split_project(grads, k, seed=7, checkpoint=3, precision=precision, cache=ProjectionCache())
    assert not caplog.records and not _triton._failed
    for out in (fused, via_cache):  # words hashed in blocks, and words from the cache
        errors = [np.linalg.norm(out[i].double().numpy() - reference[i]) / np.linalg.norm(reference[i])
                  for i in range(n)]
        assert max(errors) <= bound
    assert torch.equal(fused, via_cache)


def test_a_column_slice_is_read_in_place(interpret):
    """A slice of the columns of a wider matrix (the hashed-blocks path) is read through its row stride, no copy."""
    n, p, k = 6, 300, 96
    full = _inputs(n, p + 9, k, seed=2)
    view = full[:, 4:4 + p]
    expected, signs, scales, l1 = _split_in_float64(view.contiguous(), k, 2, seed=4, checkpoint=2)
    words = _rademacher_words(0, p, k, 4, xp=txp, device=None)
    assert not view.is_contiguous()
    out = _triton.split_product(view, words, signs, scales, k, 2)
    assert np.all(np.abs(out.double().numpy() - expected) <= p * 2.0**-24 * l1)


def test_kernel_matches_the_generic_split_path(interpret, monkeypatch):
    grads = _inputs(9, 500, 64, seed=3)
    fused = split_project(grads, 64, seed=1, checkpoint=0, cache=ProjectionCache())
    monkeypatch.setenv("TRAK_CORE_TRITON", "0")
    generic = split_project(grads, 64, seed=1, checkpoint=0, cache=ProjectionCache())
    rows = [i for i in range(9) if float(generic[i].abs().max()) > 0]
    for i in rows:  # the same parts and bits; only the order of float32 sums differs
        assert float((fused[i] - generic[i]).norm() / generic[i].norm()) < 1e-6


def test_a_failing_kernel_falls_back_to_the_generic_path_once(interpret, monkeypatch, caplog):
    grads = _inputs(4, 200, 32, seed=5)
    monkeypatch.setenv("TRAK_CORE_TRITON", "0")
    expected = split_project(grads, 32, seed=0, checkpoint=0, cache=ProjectionCache(0))
    monkeypatch.delenv("TRAK_CORE_TRITON")

    def broken():
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(_triton, "_kernel", broken)
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        out = split_project(grads, 32, seed=0, checkpoint=0, cache=ProjectionCache(0))
        again = split_project(grads, 32, seed=0, checkpoint=0, cache=ProjectionCache(0))
    assert torch.equal(out, expected) and torch.equal(again, expected)
    assert [r.message for r in caplog.records if "Triton" in r.message] == [caplog.records[0].message]
    assert "no compiler here" in caplog.records[0].message and not _triton.available(grads)


def test_a_failure_of_one_launch_leaves_the_other_on(monkeypatch):
    # CuPy's launch (CuPy and JAX arrays) failing must not turn off Triton's own launch for torch tensors, nor back
    grads = torch.zeros(2, 2)
    monkeypatch.setattr(_triton, "_failed", ["cupy: RuntimeError: no NVRTC"])
    assert _triton.available(grads)
    monkeypatch.setattr(_triton, "_failed", ["torch: RuntimeError: no compiler here"])
    assert not _triton.available(grads)


def test_launch_plan_covers_p_once_and_fills_the_gpu():
    for n, p, k, sms in [(32, 11_181_642, 2048, 132), (256, 2_000_000, 4096, 132), (1, 10, 8, 132), (300, 64, 16, 8)]:
        plan = _triton.launch_plan(n, p, k, sms)
        steps = -(-p // plan["block_k"])
        assert (plan["splits"] - 1) * plan["iters"] < steps <= plan["splits"] * plan["iters"]  # no empty slice
        assert plan["block_m"] == (32 if n <= 32 else 64 if n <= 64 else 128)
        if steps >= 4 * sms:  # enough work: at least about WAVES programs per SM, at most twice that
            programs = plan["tiles"] * plan["splits"]
            assert _triton.WAVES * sms * 0.6 <= programs <= 2 * _triton.WAVES * sms, (n, p, k, plan)
    for bad in (dict(block_n=48), dict(block_n=16), dict(block_m=8), dict(block_k=100)):
        with pytest.raises(TrakValueError, match="power of two"):
            _triton.launch_plan(8, 100, 64, 4, **bad)
    assert [_triton._rounded(v) for v in (1, 2, 3, 5, 6, 7, 9, 12, 13)] == [1, 2, 3, 6, 6, 8, 12, 12, 16]


def test_off_gpu_without_the_interpreter_the_kernel_is_not_used(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _triton.available(torch.zeros(2, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TRAK_CORE_TRITON", "0")
    assert not _triton.available(torch.zeros(2, 2))
