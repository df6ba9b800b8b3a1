"""The fused projection on an NVIDIA GPU: ``grads @ P`` with ``P`` generated inside the kernel.

One job: compile ``kernel.cu`` with CuPy (NVRTC, at first use, cached per input dtype) and launch
it. The matrix is never materialized: each block hashes the signs of its 32 x 128 tile of ``P``
into shared memory, so memory stays ``O(n (p + k))`` and any p, k and batch size work. The signs
are the reference Rademacher matrix bit for bit (same hash as ``trak_core.hashing``); the sums are
float32, so results equal ``trak_core.project`` up to float rounding.

Why CuPy for torch and JAX too: a RawModule compiles with NVRTC at run time, so no CUDA toolchain,
C++ extension build or Triton version has to match the installed torch (traker's ``fast_jl`` breaks
on exactly that), and DLPack hands torch and JAX GPU arrays to it without a copy.
"""
from __future__ import annotations

import math
import pathlib
from typing import Any

from trak_core import hashing
from trak_core.errors import TrakTypeError

KERNEL = pathlib.Path(__file__).with_name("kernel.cu")
TILE_N, TILE_K, THREADS = 64, 128, 256
MAX_GRID_Y = 65_535  # blocks of TILE_N rows per launch (CUDA's grid limit in y)
INPUT_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_modules: dict[str, Any] = {}


def _kernel(dtype_name: str) -> Any:
    import cupy

    if dtype_name not in _modules:
        source = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n" + KERNEL.read_text()
        options = (f"-DINPUT_T={INPUT_TYPES[dtype_name]}", "-DTRAK_DEVICE=__device__ __forceinline__", "-std=c++14")
        _modules[dtype_name] = cupy.RawModule(code=source, options=options).get_function("trak_project")
    return _modules[dtype_name]


def stream_keys(seed: int, checkpoint: int) -> tuple[int, int, int]:
    """``(rademacher stream, column base, sign stream)`` exactly as ``trak_core.projection`` derives them."""
    seed_words = hashing.split64(seed, "seed")
    rad = hashing.key(*seed_words, hashing.DOMAIN_RADEMACHER)
    sign = hashing.key(*seed_words, hashing.DOMAIN_SIGN, *hashing.split64(checkpoint, "checkpoint"))
    return rad, hashing.key(rad, hashing.DOMAIN_COLUMNS), sign


def supports(grads: Any, kind: str) -> bool:
    """Whether the fused kernel takes these CuPy gradients (Rademacher; float32/16, bfloat16)."""
    dtype = str(grads.dtype)
    return kind == "rademacher" and grads.ndim == 2 and dtype in INPUT_TYPES


def fused_project(grads: Any, k: int, *, seed: int = 0, checkpoint: int = 0, offset: int = 0) -> Any:
    """``grads @ P_checkpoint[offset:offset + p]`` for CuPy ``grads`` (n, p): float32 (n, k) on the same GPU."""
    import cupy

    if not supports(grads, "rademacher"):
        raise TrakTypeError(f"the fused kernel takes 2-D float32/float16/bfloat16 CuPy arrays, got {grads.dtype} "
                            f"with shape {grads.shape}; use trak_core.project for other inputs")
    grads = cupy.ascontiguousarray(grads)
    n, p = grads.shape
    out = cupy.empty((n, k), dtype=cupy.float32)
    if n == 0 or k == 0:
        return out
    rad, col_base, sign = stream_keys(seed, checkpoint)
    kernel = _kernel(str(grads.dtype))
    for start in range(0, n, MAX_GRID_Y * TILE_N):  # a grid has at most 65,535 blocks in y: larger n in parts
        rows = min(n - start, MAX_GRID_Y * TILE_N)
        grid = (math.ceil(k / TILE_K), math.ceil(rows / TILE_N))
        kernel(grid, (THREADS,), (grads[start:start + rows], out[start:start + rows], cupy.int64(rows),
                                  cupy.int64(p), cupy.int32(k), cupy.int64(offset), cupy.uint32(rad),
                                  cupy.uint32(col_base), cupy.uint32(sign), cupy.float32(1.0 / math.sqrt(k))))
    return out
