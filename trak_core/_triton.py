"""The split half-precision projection as one Triton kernel: packed sign bits in, features out.

One job: ``grads @ P`` on GPUs without ever writing ``P`` to memory. The kernel reads the packed
Rademacher bits (``k / 8`` bytes a row of ``P``, the reference bits of
``trak_core.projection.projection_matrix``), turns them into float16 ``+-1`` in registers, and
multiplies them on the tensor cores with the float16 parts of the flipped, scaled input (the split
of ``trak_core._split``: ``hi`` and, for ``precision="float32"``, ``lo``), accumulating in float32.
Unpacking ``P`` into memory first (the generic split path) writes and reads 16 times as many bytes as
the bits, which bounds small batches by memory bandwidth; here the bits are read once per tile of rows.

The work is split over output tiles (rows of ``grads`` x columns of the features) and over ``p``
(``splits`` slices, each summing ``iters`` steps of ``block_k`` rows of ``P``), so that a batch of 32
examples still fills the GPU. The slices' partial sums are added in a fixed order afterwards: results
are deterministic. The kernel computes the transposed product (``trak_core._triton_kernel``) and makes
each float16 sign from its bit with two integer operations; ``bench/triton_compile.py`` compiles it for
sm_90 on any machine and counts the instructions of its main loop.

Used by ``trak_core._split.split_project`` when Triton is installed (it ships with PyTorch's CUDA
wheels): torch tensors on CUDA through Triton's launcher; CuPy arrays, and JAX GPU arrays when CuPy is
installed, through ``trak_core._triton_aot`` (compiled ahead of time, launched by CuPy).
``TRAK_CORE_TRITON=0`` turns it off. Triton is imported only when the kernel is first needed. ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors (NumPy
underneath; slow): the tests check it there against the same split done in float64 and against the
float64 projection with the exact matrix.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from typing import Any

import array_api_compat

from .errors import TrakValueError

__all__ = ["available", "split_product", "launch_plan"]

log = logging.getLogger("trak_core")

BLOCK_N = 256  # feature columns per tile (8 packed words)
WARPS = 8
WAVES = 4  # aim for about this many programs per streaming multiprocessor (balance across the GPU)
_failed: list[str] = []  # "<launcher>: <error>", launcher "torch" (Triton's own) or "cupy" (CuPy and JAX arrays)


def _launcher(x: Any) -> str:
    """Which launch serves ``x``: Triton's own for torch tensors, ``trak_core._triton_aot`` (CuPy) otherwise."""
    return "torch" if array_api_compat.is_torch_array(x) else "cupy"


def failure(x: Any) -> str | None:
    """Why the launch that serves ``x`` failed in this process (the other may still run); ``None`` if it did not."""
    return next((f for f in _failed if f.startswith(_launcher(x) + ":")), None)


def _has_failed(x: Any) -> bool:
    """Whether the launch that serves ``x`` failed in this process."""
    return failure(x) is not None


def available(x: Any) -> bool:
    """Whether ``x`` can take the Triton kernel (Triton installed, ``TRAK_CORE_TRITON`` not ``0``, no failure of its
    launch yet):
    a torch tensor on CUDA (or on a CPU under ``TRITON_INTERPRET=1``), a CuPy array, or a JAX array on a GPU
    with CuPy installed (``trak_core._triton_aot`` launches those)."""
    if os.environ.get("TRAK_CORE_TRITON", "1") == "0" or _has_failed(x):
        return False
    if array_api_compat.is_torch_array(x):
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return False
        needed = ("triton",)
    elif array_api_compat.is_cupy_array(x):
        needed = ("triton",)
    elif array_api_compat.is_jax_array(x):
        try:
            on_gpu = next(iter(x.devices())).platform == "gpu"
        except Exception:  # a tracer inside jax.jit has no devices: the jitted split path serves it
            return False
        if not on_gpu:
            return False
        needed = ("triton", "cupy")
    else:
        return False
    return all(importlib.util.find_spec(name) is not None for name in needed)


def _kernel() -> Any:
    """The jitted kernel (``trak_core._triton_kernel``, which imports Triton: imported on first use)."""
    from ._triton_kernel import split_projection

    return split_projection


def _rounded(value: int) -> int:
    """``value`` rounded up to two significant bits (1, 1.5 times a power of two): few distinct compiles."""
    if value <= 2:
        return max(1, value)
    top = 1 << (value.bit_length() - 1)
    return top if value == top else (top + top // 2 if value <= top + top // 2 else 2 * top)


def launch_plan(n: int, p: int, k: int, processors: int, *, block_m: int | None = None, block_n: int = BLOCK_N,
                block_k: int | None = None, warps: int = WARPS, stages: int | None = None,
                pairs: bool = False, waves: int = WAVES) -> dict:
    """Tile sizes, the number of slices of ``p``, the steps per slice, warps and pipeline stages per program for
    ``n`` rows on ``processors`` SMs; ``stages=None`` leaves Triton's default.

    The defaults are the leanest plans compiled for sm_90 (``bench/triton_compile.py``: instructions and
    shared-memory accesses a multiply-add, no spills at the GPU check's sizes): 256 columns and 8 warps; 32, 64 or
    128 rows (more rows share each tile of signs); 64 rows of ``P`` a step, 32 with 128 rows (64 spills registers
    when ``p`` is not a multiple of 16). Not yet timed on a GPU: ``bench/triton_sweep.py`` times the others.
    ``pairs``: make the signs two at a time (``trak_core._triton_kernel``), an alternative for the sweep.
    ``waves``: about this many programs per SM (more: smaller tails at the end of the launch, more partial sums).
    """
    block_m = block_m or (32 if n <= 32 else 64 if n <= 64 else 128)
    block_k = block_k or (32 if block_m >= 128 else 64)
    for name, size in dict(block_m=block_m, block_n=block_n, block_k=block_k).items():
        if size < (32 if name == "block_n" else 16) or size & (size - 1):
            raise TrakValueError(f"{name} must be a power of two of at least {32 if name == 'block_n' else 16} "
                                 f"(Triton's tiles, tensor-core products and 32-bit words of signs), got {size}")
    tiles = -(-n // block_m) * -(-k // block_n)
    k_steps = max(1, -(-p // block_k))
    wanted = max(1, min(k_steps, -(-waves * processors // tiles)))
    iters = _rounded(-(-k_steps // wanted))
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, iters=iters, splits=-(-k_steps // iters),
                tiles=tiles, warps=warps, stages=stages, pairs=pairs)


def _processors(x: Any) -> int:
    """Streaming multiprocessors of ``x``'s GPU (4 under Triton's interpreter: a few slices, so that the tests
    cover the sum over slices)."""
    if array_api_compat.is_torch_array(x):
        import torch

        return torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == "cuda" else 4
    import cupy

    device = x.device if array_api_compat.is_cupy_array(x) else cupy.cuda.Device(_jax_ordinal(x))
    return int(device.attributes["MultiProcessorCount"])


def _jax_ordinal(x: Any) -> int:
    """The CUDA device number of a JAX GPU array."""
    device = next(iter(x.devices()))
    local = getattr(device, "local_hardware_id", None)  # 0 is a valid ordinal: not `or` (device.id is global)
    return int(device.id if local is None else local)


def total(partial: Any) -> Any:
    """The sum of a launch's partial sums over its slices of ``p`` (torch or CuPy), in a fixed order."""
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def split_product(grads: Any, words: Any, signs: Any, scales: Any, k: int, n_passes: int,
                  plan: dict | None = None) -> Any | None:
    """``sum over passes (part @ S)`` in float32, shape (n, k), where ``S`` is the ``+-1`` matrix of ``words``.

    ``grads`` (n, p) float32/16 or bfloat16; ``words`` (p, ceil(k/32)) int32 packed bits; ``signs`` (p,)
    float32 row signs; ``scales`` (n,) float32 powers of two (``trak_core._split.row_scales``); torch tensors,
    CuPy arrays or JAX GPU arrays (the latter two through ``trak_core._triton_aot``). The parts are
    those of ``trak_core._split.split_parts`` of ``grads * signs * scales``. ``None`` if the kernel cannot run
    here (the first failure is logged and turns the kernel off for the process and this launch, torch's or
    CuPy's; the caller falls back).
    ``plan``: a :func:`launch_plan` for these sizes (default: its defaults).
    """
    try:
        n, p = grads.shape
        plan = plan or launch_plan(n, p, k, _processors(grads))
        if array_api_compat.is_cupy_array(grads) or array_api_compat.is_jax_array(grads):
            from . import _triton_aot

            if array_api_compat.is_jax_array(grads):
                return _triton_aot.launch_jax(grads, words, signs, scales, k, n_passes, plan)
            with grads.device:
                return total(_triton_aot.launch_cupy(grads, words, signs, scales, k, n_passes, plan))
        import torch

        grads = grads if grads.stride(1) == 1 else grads.contiguous()  # a column slice needs no copy
        partial = torch.empty((plan["splits"], n, k), dtype=torch.float32, device=grads.device)
        grid = (-(-n // plan["block_m"]), -(-k // plan["block_n"]), plan["splits"])
        options = {"num_warps": plan["warps"]} | ({"num_stages": plan["stages"]} if plan["stages"] else {})
        # Triton launches on the current CUDA device: a tensor on another GPU (cuda:1 while cuda:0 is current) would
        # fail the launch and turn the kernel off for the process
        device = torch.cuda.device(grads.device) if grads.device.type == "cuda" else contextlib.nullcontext()
        with device:
            _kernel()[grid](grads, words.contiguous(), signs.contiguous(), scales.contiguous(), partial, n, p, k,
                            grads.stride(0), words.shape[1], BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"],
                            BLOCK_K=plan["block_k"], ITERS=plan["iters"], TWO_PASSES=n_passes == 2,
                            PAIRS=plan.get("pairs", False), **options)
        return total(partial)
    except Exception as exc:  # a compiler or driver that cannot run it: the generic split path still can
        _failed.append(f"{_launcher(grads)}: {type(exc).__name__}: {exc}")
        log.warning("the Triton projection kernel failed (%s); using the generic split projection from now on for "
                    "arrays of this launch (set TRAK_CORE_TRITON=0 to skip the attempt)", _failed[-1][:300])
        return None
