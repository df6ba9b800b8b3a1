"""The CuPy backend. Its GPU tests run on a CUDA machine (bench/gpu_check.sh); here they skip.

What runs without a GPU: the CUDA kernel's hash, compiled for the CPU from the same source,
against the reference projection (bit for bit), and the errors a GPU-less machine gives.
"""
import ctypes
import importlib.util
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import trak_core
from trak_core import MissingFrameworkError

KERNEL = pathlib.Path(__file__).resolve().parents[1] / "backends" / "trak_cupy" / "kernel.cu"


def _gpu_reason():
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed: the cupy backend's GPU path is not exercised here"
    import cupy

    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception:
        pass
    return "no CUDA device: the cupy backend's GPU path is not exercised here"


gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to compile the kernel's hash for the CPU")
@pytest.mark.parametrize("seed,checkpoint,offset,k", [(0, 0, 0, 128), (5, 3, 2**32 - 7, 70), (2**40 + 1, 2**33, 11, 33)])
def test_kernel_hash_is_the_reference_bit_for_bit(tmp_path, seed, checkpoint, offset, k):
    from trak_cupy.projection import stream_keys

    source = tmp_path / "host.cpp"
    source.write_text(f'#define TRAK_HOST_ONLY\n#define TRAK_DEVICE static inline\n#include "{KERNEL}"\n')
    library = tmp_path / "host.so"
    subprocess.run(["g++", "-O1", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    host = ctypes.CDLL(str(library))
    p = 40
    out = np.zeros((p, k), dtype=np.int8)
    rad, col_base, sign = stream_keys(seed, checkpoint)
    host.trak_signs(ctypes.c_uint(rad), ctypes.c_uint(col_base), ctypes.c_uint(sign), ctypes.c_longlong(offset),
                    ctypes.c_longlong(p), ctypes.c_int(k), out.ctypes.data_as(ctypes.POINTER(ctypes.c_byte)))
    reference = trak_core.projection_matrix(p, k, seed=seed, checkpoint=checkpoint, offset=offset, dtype=np.float64)
    assert np.array_equal(out.astype(np.float64) / np.sqrt(k), reference)


@pytest.mark.skipif(_gpu_reason() is None, reason="a GPU is present")
def test_without_gpu_the_backend_says_what_it_needs():
    model = trak_core.MLP(3, 2, 2)
    with pytest.raises(MissingFrameworkError, match="CuPy and a CUDA device|needs a CUDA device, and CuPy found none"):
        trak_core.TRAK(model, backend="cupy").featurize(model.init(), [(np.zeros((2, 3)), np.zeros(2, int))])


@gpu
def test_fused_projection_is_the_reference_matrix():
    import cupy
    from trak_cupy.projection import fused_project

    for k, offset in ((128, 0), (70, 2**32 - 5), (4096, 12345)):
        p = 300
        eye = cupy.eye(p, dtype=cupy.float32)
        matrix = fused_project(eye, k, seed=3, checkpoint=2, offset=offset).get()  # one-hot rows: exact entries
        reference = trak_core.projection_matrix(p, k, seed=3, checkpoint=2, offset=offset)
        assert np.array_equal(matrix, reference)


@gpu
@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float16", 2e-3), ("bfloat16", 2e-2)])
def test_fused_projection_equals_core_project(dtype, rtol):
    import cupy
    from trak_cupy.projection import fused_project

    g = np.random.default_rng(0).normal(size=(37, 5001)).astype(np.float32)
    reference = trak_core.project(g.astype(np.float64), 300, seed=1, checkpoint=4)
    if dtype == "bfloat16":  # NumPy knows the name only through ml_dtypes (which JAX installs)
        dtype = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed: no bfloat16 dtype").bfloat16
    out = fused_project(cupy.asarray(g).astype(dtype), 300, seed=1, checkpoint=4).get()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


@gpu
def test_rows_past_one_launch_grid_are_projected_in_parts(monkeypatch):
    # CUDA grids have at most 65,535 blocks in y (4,194,240 rows of 64): larger batches launch in parts
    import cupy
    from trak_cupy import projection

    g = cupy.asarray(np.random.default_rng(1).normal(size=(300, 777)).astype(np.float32))
    whole = projection.fused_project(g, 130, seed=2, checkpoint=1, offset=5).get()
    monkeypatch.setattr(projection, "MAX_GRID_Y", 2)  # parts of 128 rows: 128 + 128 + 44
    parts = projection.fused_project(g, 130, seed=2, checkpoint=1, offset=5).get()
    assert np.array_equal(parts, whole)
    reference = trak_core.project(cupy.asnumpy(g).astype(np.float64), 130, seed=2, checkpoint=1, offset=5)
    np.testing.assert_allclose(whole, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@gpu
def test_precomputed_gradients_through_dlpack_and_torch_cuda():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    from trak_cupy import PrecomputedGradients

    g = torch.randn(50, 2000, device="cuda")
    q = torch.rand(50, device="cuda")
    trak = trak_core.TRAK(PrecomputedGradients(2000), proj_dim=256, lambda_reg=0.1, backend="cupy", progress=False)
    trak.featurize("checkpoint-0", [(g[:25], q[:25]), (g[25:], q[25:])])
    scores = trak.score([(g[:5], q[:5])]).get()
    phi = trak_core.project(g.double().cpu().numpy(), 256, seed=0, checkpoint=0)
    kernel = phi.T @ phi + 0.1 * np.eye(256)
    expected = phi @ np.linalg.solve(kernel, phi[:5].T) * q.double().cpu().numpy()[:, None]
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    out = trak_core.get_backend("torch").project(g, 256, seed=0, checkpoint=0, kind="rademacher")
    assert out.is_cuda
    np.testing.assert_allclose(out.cpu().numpy(), phi, rtol=1e-4, atol=1e-4 * np.abs(phi).max())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the kernel is compiled on the GPU machine only")
@pytest.mark.parametrize("input_type", ["float", "__half", "__nv_bfloat16"])
def test_kernel_compiles_for_hopper_without_spills(tmp_path, input_type):
    source = tmp_path / "kernel.cu"
    source.write_text(f'#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include "{KERNEL}"\n')
    result = subprocess.run(["nvcc", "-std=c++14", "-arch=sm_90", f"-DINPUT_T={input_type}",
                             "-DTRAK_DEVICE=__device__ __forceinline__", "-Xptxas", "-v", "-c", str(source),
                             "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "0 bytes spill stores" in result.stderr


def test_precomputed_gradients_take_numpy_integers_and_refuse_bools():
    """n_params from NumPy arithmetic (np.int64) was refused while True was taken as one parameter."""
    from trak_cupy import PrecomputedGradients

    counted = PrecomputedGradients(np.int64(2000))
    assert counted.n_params == 2000 and type(counted.n_params) is int
    for bad in (True, 0, 2000.0, "2000"):
        with pytest.raises(ValueError, match="n_params must be a positive integer"):
            PrecomputedGradients(bad)
