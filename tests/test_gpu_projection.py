"""The half-precision projection on GPUs (torch:cuda, jax:gpu, cupy) against float64 references.

These run on a CUDA machine (bench/gpu_check.sh) and skip elsewhere, saying why; the same code path
runs on CPU arrays in tests/test_split_projection.py on every CI run.
"""
import importlib.util

import numpy as np
import pytest

import trak_core
from trak_core import ProjectionCache
from trak_core.projection import projection_matrix


def _torch_cuda():
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed: torch:cuda is not exercised")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch:cuda is not exercised")
    return lambda a: torch.as_tensor(a, device="cuda"), lambda t: t.cpu().numpy()


def _jax_gpu():
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed: jax:gpu is not exercised")
    import jax

    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX sees no GPU: jax:gpu is not exercised")
    return lambda a: jax.device_put(a, device), np.asarray


def _cupy():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed: cupy is not exercised")
    import cupy

    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError
    except Exception:
        pytest.skip("no CUDA device: cupy is not exercised")
    return cupy.asarray, lambda a: a.get()


DEVICES = {"torch:cuda": _torch_cuda, "jax:gpu": _jax_gpu, "cupy": _cupy}


@pytest.fixture(params=list(DEVICES))
def device(request):
    return DEVICES[request.param]()


def _float32_matmul_error(g, matrix, reference):
    """Relative error of torch's float32 matmul with the matrix in memory, TF32 off (the acceptance bar)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    out = torch.as_tensor(g, device="cuda") @ torch.as_tensor(matrix.astype(np.float32), device="cuda")
    return np.linalg.norm(out.cpu().numpy().astype(np.float64) - reference) / np.linalg.norm(reference)


def test_signs_are_the_reference_bits(device):
    to, back = device
    for k, offset in ((128, 0), (70, 2**32 - 5), (2048, 12345)):
        eye = np.eye(300, dtype=np.float32)
        matrix = back(trak_core.project(to(eye), k, seed=3, checkpoint=2, offset=offset))
        assert np.array_equal(matrix, projection_matrix(300, k, seed=3, checkpoint=2, offset=offset))


@pytest.mark.parametrize("n,p,k", [(37, 50_001, 512), (300, 20_000, 2048)])
def test_default_precision_is_float32_grade(device, n, p, k):
    _torch_cuda()
    to, back = device
    g = np.random.default_rng(0).standard_normal((n, p)).astype(np.float32)
    g[1] *= 1e-9
    matrix = projection_matrix(p, k, seed=1, checkpoint=4, dtype=np.float64)
    reference = g.astype(np.float64) @ matrix
    bound = min(1e-5, 2 * _float32_matmul_error(g, matrix, reference))
    for cache in (ProjectionCache(), ProjectionCache(2**20), ProjectionCache(0)):  # dense, packed, hashed signs
        out = back(trak_core.project(to(g), k, seed=1, checkpoint=4, cache=cache))
        assert out.dtype == np.float32
        assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= bound
    fast = back(trak_core.project(to(g), k, seed=1, checkpoint=4, precision="fast"))
    assert np.linalg.norm(fast - reference) / np.linalg.norm(reference) <= 5e-4


def test_half_matmul_uses_the_framework_gemm(device, caplog):
    """No fallback to a float32 product (it would warn): fp16 operands, float32 output."""
    from trak_core._delegation import _warned, half_matmul
    from trak_core._namespace import namespace

    to, back = device
    rng = np.random.default_rng(2)
    a = rng.standard_normal((70, 513)).astype(np.float16)
    b = np.where(rng.random((513, 129)) < 0.5, 1, -1).astype(np.float16)
    x = to(a)
    out = back(half_matmul(x, to(b), xp=namespace(x)))
    assert out.dtype == np.float32 and not _warned
    reference = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(out, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_torch_cuda_chunks_follow_free_memory():
    _torch_cuda()
    import torch
    from trak_torch.vmapped import _free_bytes, chunk_rows

    free = _free_bytes(torch.device("cuda"))
    assert free is not None and free > 0
    assert chunk_rows(11_181_642, 4, free) == min(256, min(6 * 2**30, free // 8) // (4 * 11_181_642))


def test_gpu_arrays_project_with_the_triton_kernel(device, monkeypatch):
    """torch:cuda (Triton's launch), cupy and jax:gpu (the kernel compiled ahead of time and launched by CuPy,
    trak_core._triton_aot) take the Triton kernel when Triton (and for JAX, CuPy) is installed, and give the
    generic split path's numbers to float32 rounding, at both precisions and with several slices of p."""
    to, back = device
    from trak_core import _triton, _triton_aot

    g = np.random.default_rng(5).standard_normal((70, 300_001)).astype(np.float32)
    x = to(g)
    import importlib.util

    needed = ("triton",) if _triton._launcher(x) == "torch" or type(x).__module__.startswith("cupy") else \
        ("triton", "cupy")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:  # not _triton.available: after an earlier failure in this process, that is False too
        pytest.skip(f"{' and '.join(missing)} not installed: the Triton projection kernel is not exercised")
    assert not _triton._has_failed(x), _triton._failed  # an earlier test's launch failed: a failure, not a skip
    assert _triton.available(x)
    launches = []
    launch_cupy = _triton_aot.launch_cupy
    monkeypatch.setattr(_triton_aot, "launch_cupy", lambda *args: launches.append(1) or launch_cupy(*args))
    for precision in ("float32", "fast"):
        fused = back(trak_core.project(x, 1000, seed=2, checkpoint=1, precision=precision))
        assert not _triton._failed, _triton._failed
        monkeypatch.setenv("TRAK_CORE_TRITON", "0")
        generic = back(trak_core.project(x, 1000, seed=2, checkpoint=1, precision=precision))
        monkeypatch.delenv("TRAK_CORE_TRITON")
        assert np.linalg.norm(fused - generic) / np.linalg.norm(generic) < 1e-6
    assert len(launches) == (0 if type(x).__module__.startswith("torch") else 2)  # CuPy's launch for CuPy and JAX
    assert _triton.launch_plan(70, 300_001, 1000, 132)["splits"] > 1


def test_a_jax_arrays_cuda_ordinal_is_its_local_id_even_when_zero():
    """On a second host (or process) of a multi-process JAX run, GPU 0 has a global id of 8: CuPy was given 8
    (``local_hardware_id or id`` took the local 0 for missing), a device that is not there or another GPU."""
    from types import SimpleNamespace

    from trak_core._triton import _jax_ordinal

    def array_on(**device):
        return SimpleNamespace(devices=lambda: [SimpleNamespace(**device)])  # JAX gives a set; next(iter()) either way

    assert _jax_ordinal(array_on(id=8, local_hardware_id=0)) == 0
    assert _jax_ordinal(array_on(id=9, local_hardware_id=1)) == 1
    assert _jax_ordinal(array_on(id=3, local_hardware_id=None)) == 3  # a device that does not say: its id
    assert _jax_ordinal(array_on(id=2)) == 2
