"""Framework fast paths in one place: the few operations the Array API does not cover.

One job: take a native path where a framework has one, behind one function each, so the generic
code in :mod:`trak_core.projection` and :mod:`trak_core._split` never branches on a framework.
Frameworks are imported only when the arrays already come from them (never by ``import trak_core``).

- :func:`is_accelerator`: whether an array lives on a GPU (or another non-CPU device).
- :func:`half_matmul`: ``a @ b`` for float16 operands with float32 products and sums and a float32
  result (tensor cores on GPUs; an exact emulation elsewhere).
- :func:`free_memory`: free bytes on an array's device (``None`` when it cannot be told).
"""
from __future__ import annotations

import logging
from typing import Any

import array_api_compat

__all__ = ["is_accelerator", "half_matmul", "free_memory"]

log = logging.getLogger("trak_core")
_warned: set[str] = set()


def is_accelerator(x: Any) -> bool:
    """Whether array ``x`` lives on a GPU: a torch CUDA tensor, a JAX array on a GPU, or any CuPy array."""
    if array_api_compat.is_torch_array(x):
        return x.device.type not in ("cpu", "meta")
    if array_api_compat.is_jax_array(x):
        return any(d.platform != "cpu" for d in x.devices())
    return array_api_compat.is_cupy_array(x)


def half_matmul(a: Any, b: Any, *, xp: Any) -> Any:
    """``a @ b`` of float16 matrices, with float32 accumulation and a float32 result.

    Every product of two float16 numbers is exact in float32, so the result is the float32 sum
    of exact products, as tensor cores compute it; only the order of the sums differs between
    frameworks. Off GPUs (NumPy, torch on CPU) the operands are converted to float32 first, which
    gives the same numbers without the speed.
    """
    if is_accelerator(a):
        if array_api_compat.is_torch_namespace(xp):
            return _torch_half_matmul(a, b)
        if array_api_compat.is_jax_namespace(xp):
            return _jax_half_matmul(a, b)
        if array_api_compat.is_cupy_namespace(xp):
            return _cupy_half_matmul(a, b)
    if array_api_compat.is_jax_namespace(xp):
        return _jax_half_matmul(a, b)
    return xp.astype(a, xp.float32) @ xp.astype(b, xp.float32)


def _fallback(name: str, reason: str, a: Any, b: Any, xp: Any) -> Any:
    if name not in _warned:
        _warned.add(name)
        log.warning("half-precision matmul with float32 output is not available in %s (%s); the split "
                    "projection converts to float32 instead: same numbers, without tensor cores", name, reason)
    return xp.astype(a, xp.float32) @ xp.astype(b, xp.float32)


def _torch_half_matmul(a: Any, b: Any) -> Any:
    import torch

    try:
        return torch.mm(a, b, out_dtype=torch.float32)  # torch >= 2.8 on CUDA: fp16 in, fp32 out
    except (TypeError, RuntimeError, NotImplementedError) as exc:
        import array_api_compat.torch as xp

        return _fallback(f"torch {torch.__version__}", str(exc).splitlines()[0][:120], a, b, xp)


def _jax_half_matmul(a: Any, b: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _cupy_half_matmul(a: Any, b: Any) -> Any:
    """cuBLAS ``gemmEx``: float16 A and B, float32 C, float32 compute (row-major through the transpose)."""
    import cupy
    import numpy as np
    from cupy.cuda import cublas, runtime

    a, b = cupy.ascontiguousarray(a), cupy.ascontiguousarray(b)
    m, inner = a.shape
    n = b.shape[1]
    out = cupy.empty((m, n), dtype=cupy.float32)
    if m == 0 or n == 0:
        return out
    if inner == 0:
        out.fill(0)
        return out
    one, zero = np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.float32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    # row-major out (m, n) = a (m, inner) @ b (inner, n)  <=>  column-major out^T = b^T a^T
    cublas.gemmEx(handle, cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_N, n, m, inner,
                  one.ctypes.data, b.data.ptr, runtime.CUDA_R_16F, n,
                  a.data.ptr, runtime.CUDA_R_16F, inner,
                  zero.ctypes.data, out.data.ptr, runtime.CUDA_R_32F, n,
                  cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
    return out


def free_memory(x: Any) -> int | None:
    """Free bytes on the device of array ``x`` (GPUs), or ``None`` where it cannot be told (CPUs)."""
    if not is_accelerator(x):
        return None
    try:
        if array_api_compat.is_torch_array(x):
            import torch

            return int(torch.cuda.mem_get_info(x.device)[0])
        if array_api_compat.is_cupy_array(x):
            import cupy

            with cupy.cuda.Device(x.device.id):
                return int(cupy.cuda.runtime.memGetInfo()[0])
        if array_api_compat.is_jax_array(x):
            stats = next(iter(x.devices())).memory_stats() or {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    except Exception:  # a device that cannot report its memory
        return None
    return None
