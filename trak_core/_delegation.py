"""Framework fast paths in one place: the few operations the Array API does not cover, or covers slowly.

One job: take a native path where a framework has one, behind one function each, so the generic
code in ``trak_core.projection``, ``trak_core._split`` and ``trak_core.kernel`` never
branches on a framework. Frameworks are imported only when the arrays already come from them
(never by ``import trak_core``). Every function here gives the numbers of the generic Array API
path (bit for bit, or to float rounding where noted); ``tests/test_delegation.py`` checks each one
against it.

Devices:

- ``is_accelerator``: whether an array lives on a GPU (or another non-CPU device).

Projection (generating and applying the counter-based matrix):

- ``packed_words``: hash words stored as 32-bit words (torch: ``int32``, hashed in NumPy on CPUs).
- ``unpack_signs``: packed sign bits to ``+-scale`` (NumPy ``unpackbits``, a torch byte table).
- ``make_array``: where to make a matrix block: in NumPy and moved (eager JAX; torch's CPU
  transcendental functions), else in the namespace itself.
- ``in_float64``: values computed in float64, in NumPy where the namespace has no float64.
- ``packed_product``: ``(grads * signs) @ unpack(packed)`` block by block: in-cache blocks added in
  place for torch, jitted for JAX.
- ``half_matmul``: ``a @ b`` for float16 operands with float32 products and sums and a float32
  result (tensor cores on GPUs; an exact emulation elsewhere).
- ``row_max_abs``: the largest magnitude of each row in one pass, without an ``abs`` copy (torch).

Kernel:

- ``solve_triangular``: ``L x = b`` or ``L^T x = b`` (SciPy, torch, JAX, cupyx; else a general solve).
- ``full_precision``: matrix products at the full precision of their dtype (JAX on GPUs would
  multiply float32 in TF32 by default), as a context manager or a decorator of ``xp=`` functions.

Functions that return ``None`` have no generic fallback here: ``None`` means "no native path for
this namespace", and the caller runs its generic code.
"""
from __future__ import annotations

import functools
import logging
import math
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import array_api_compat

from ._namespace import has_float64

__all__ = ["is_accelerator", "to_host", "packed_words", "unpack_signs", "make_array", "in_float64",
           "packed_product", "half_matmul", "row_max_abs", "solve_triangular", "full_precision",
           "full_precision_products"]

log = logging.getLogger("trak_core")
_warned: set[str] = set()
F = TypeVar("F", bound=Callable[..., Any])


def is_accelerator(x: Any) -> bool:
    """Whether array ``x`` lives on a GPU: a torch CUDA tensor, a JAX array on a GPU, or any CuPy array."""
    if array_api_compat.is_torch_array(x):
        return x.device.type not in ("cpu", "meta")
    if array_api_compat.is_jax_array(x):
        return any(d.platform != "cpu" for d in x.devices())
    return array_api_compat.is_cupy_array(x)


def to_host(x: Any) -> Any:
    """A NumPy array with ``x``'s values: torch (any device; bfloat16 and float8 as their bytes), CuPy,
    JAX, array-api-strict on any device, or anything ``numpy.asarray`` takes."""
    import numpy as np

    if array_api_compat.is_torch_array(x):
        import torch

        t = x.detach()
        if t.dtype == torch.bfloat16 or str(t.dtype).startswith("torch.float8"):
            return t.contiguous().view(torch.uint8).cpu().numpy()
        return t.cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if type(x).__module__.startswith("array_api_strict"):  # any device: through its CPU device
        import array_api_strict as xs

        return np.asarray(x.to_device(xs.Device("CPU_DEVICE")))
    return np.asarray(x)


def _on_cpu(device: Any) -> bool:
    return device is None or str(device) == "cpu"


def _numpy_dtype(dtype: Any, *, xp: Any) -> Any:
    """NumPy's dtype of the same name as ``xp``'s ``dtype``."""
    import numpy as np

    return np.dtype(str(xp.empty(0, dtype=dtype).dtype).split(".")[-1])


def packed_words(make: Callable[[Any, Any], Any], *, xp: Any, device: Any) -> Any:
    """The hash words ``make(xp, device)`` kept as 32-bit words: ``uint32``, or ``int32`` for torch.

    Notes
    -----
    torch has no ``uint32`` right shift, so its hash runs in ``int64`` (``trak_core.hashing``);
    the words are kept as ``int32`` with the same 32 bits. On a CPU, torch's words are hashed in
    NumPy's ``uint32`` (faster than ``int64`` with masks; the same bits) and shared without a copy.
    """
    if not array_api_compat.is_torch_namespace(xp):
        return make(xp, device)
    if _on_cpu(device):
        import array_api_compat.numpy as np_xp
        import numpy as np
        import torch

        return torch.from_numpy(np.ascontiguousarray(make(np_xp, None)).view(np.int32))
    return _int32_words(make(xp, device), xp=xp)


def _int32_words(words: Any, *, xp: Any) -> Any:
    """``int64`` words below ``2**32`` as ``int32`` with the same 32 bits."""
    return xp.astype(words - ((words >> 31) << 32), xp.int32)


def unpack_signs(words: Any, k: int, scale: float, *, xp: Any, dtype: Any) -> Any | None:
    """Signs ``+-scale`` from packed words (bit ``t`` of word ``b`` is column ``32 b + t``), or ``None``.

    NumPy (``unpackbits``) and torch (a 256-entry byte table) read a word's bytes in memory, which
    on little-endian machines are its bits 0-7, 8-15, ...; the result is the generic shift-and-mask
    one bit for bit. ``None`` for other namespaces and byte orders.
    """
    if sys.byteorder != "little":
        return None
    if array_api_compat.is_numpy_namespace(xp):
        import numpy as np

        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :k]
        return np.asarray([scale, -scale], dtype=dtype)[bits]
    if array_api_compat.is_torch_namespace(xp):
        import torch

        table = _byte_table(scale, dtype=dtype, device=words.device)
        index = words.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
        return table.index_select(0, index).reshape(words.shape[0], -1)[:, :k]
    return None


def _byte_table(scale: float, *, dtype: Any, device: Any) -> Any:
    """(256, 8) torch table: row ``v`` holds the 8 signs of byte value ``v``, least significant first."""
    import torch

    values = torch.arange(256, dtype=torch.int32, device=device)[:, None]
    bits = (values >> torch.arange(8, dtype=torch.int32, device=device)) & 1
    return (1 - 2 * bits).to(dtype) * scale


def make_array(make: Callable[[Any, Any, Any], Any], *, xp: Any, device: Any, dtype: Any,
               transcendental: bool = False) -> Any:
    """``make(xp, device, dtype)``, or the same made in NumPy and moved to ``xp`` on ``device``.

    Made in NumPy: always for JAX (eager JAX compiles every new shape; the result is cached by the
    caller anyway), and for ``transcendental`` values (``log``, ``sin``, ``cos``) with torch on a
    CPU, whose results were seen to differ from NumPy's by ~4e-12 relative in some threads.
    Integer and sign results are the same bits either way.
    """
    cpu_torch = array_api_compat.is_torch_namespace(xp) and _on_cpu(device)
    if array_api_compat.is_jax_namespace(xp) or (cpu_torch and transcendental):
        import array_api_compat.numpy as np_xp

        return xp.asarray(make(np_xp, None, _numpy_dtype(dtype, xp=xp)), device=device)
    return make(xp, device, dtype)


def in_float64(make: Callable[[Any, Any], Any], *, xp: Any, device: Any, dtype: Any) -> Any:
    """``make(namespace, device)`` (a float64 array) cast to ``dtype``, computed in float64 everywhere.

    Where ``xp`` has no float64 (JAX without x64, torch on Apple's MPS), ``make`` runs in NumPy's
    float64 and the result moves to ``xp`` on ``device``: computing in float32 instead would lose
    the tails of Gaussian entries.
    """
    if has_float64(xp, device):
        return xp.astype(make(xp, device), dtype)
    import array_api_compat.numpy as np_xp

    values = make(np_xp, None)
    return xp.asarray(values.astype(_numpy_dtype(dtype, xp=xp)), device=device)


def packed_product(grads: Any, signs: Any, packed: Any, k: int, block: int, *, xp: Any) -> Any | None:
    """``(grads * signs) @ R`` for ``R`` given as packed sign words, ``block`` rows at a time; or ``None``.

    torch: each block of ``R`` is unpacked into one reused buffer small enough to stay in the CPU's
    caches (``PACKED_BLOCK_BYTES``) and added into the result in place (``addmm_``), with the row
    signs applied to the block's columns of ``grads`` only: unpacking then costs about a tenth of
    the product instead of half of it, and no flipped copy of ``grads`` is made. JAX: one jitted
    step per block size (``trak_core._jax_blocks``): eager JAX dispatches every slice, shift and
    comparison as its own computation. ``None`` for other namespaces. The blocks' sums are added in
    another order than the generic loop's: the same numbers to float rounding.
    """
    if array_api_compat.is_torch_namespace(xp):
        return _torch_packed_product(grads, signs, packed, k)
    if not array_api_compat.is_jax_namespace(xp):
        return None
    from ._jax_blocks import packed_product as jitted

    return jitted(grads * signs, packed, k, block)


def dense_product(grads: Any, signs: Any, shared: Any, *, xp: Any) -> Any | None:
    """``(grads * signs) @ shared`` without a flipped copy of ``grads``: torch on CPUs, column blocks of ``grads``
    flipped into one reused buffer that stays in the CPU's caches and added into the result in place. A full
    flipped copy is a fresh allocation as large as ``grads`` (its page faults cost 15-20% of the product at
    256 x 177,362, k = 512). ``None`` elsewhere (the caller multiplies)."""
    if not array_api_compat.is_torch_namespace(xp) or grads.device.type != "cpu":
        return None
    import torch

    n, p = grads.shape
    block = max(256, min(p, PACKED_BLOCK_BYTES // max(1, n * (torch.finfo(grads.dtype).bits // 8))))
    if block >= p:
        return None  # one block: the plain product is as good
    out = torch.zeros((n, shared.shape[1]), dtype=grads.dtype, device=grads.device)
    buffer = torch.empty((n, block), dtype=grads.dtype, device=grads.device)
    for start in range(0, p, block):
        stop = min(p, start + block)
        flipped = buffer[:, :stop - start]
        torch.mul(grads[:, start:stop], signs[start:stop], out=flipped)
        out.addmm_(flipped, shared[start:stop])
    return out


PACKED_BLOCK_BYTES = 4 * 2**20  # one unpacked block of R on the torch path: within a CPU's L2 + L3 caches
_DEVICE_BLOCK_BYTES = 64 * 2**20  # on GPUs (float64 there; float32 takes trak_core._split): fewer, larger launches


def _torch_packed_product(grads: Any, signs: Any, packed: Any, k: int) -> Any:
    import torch

    n, p = grads.shape
    width = packed.shape[1] * 32
    itemsize = torch.finfo(grads.dtype).bits // 8
    budget = PACKED_BLOCK_BYTES if grads.device.type == "cpu" else _DEVICE_BLOCK_BYTES
    block = max(1, min(p, budget // (width * itemsize)))
    table = _byte_table(1.0 / math.sqrt(k), dtype=grads.dtype, device=grads.device)
    out = torch.zeros((n, k), dtype=grads.dtype, device=grads.device)
    buffer = torch.empty((block * width // 8, 8), dtype=grads.dtype, device=grads.device)
    for start in range(0, p, block):
        stop = min(p, start + block)
        index = packed[start:stop].contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
        unpacked = torch.index_select(table, 0, index, out=buffer[:index.numel()])
        out.addmm_(grads[:, start:stop] * signs[start:stop], unpacked.view(stop - start, width)[:, :k])
    return out


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


def row_max_abs(x: Any, *, xp: Any) -> Any | None:
    """``max(|x|, axis=1)`` as float32 (exact), or ``None``: torch reduces in one pass without writing ``|x|``
    (``vector_norm`` of order infinity); other namespaces take the caller's block loop."""
    if not array_api_compat.is_torch_namespace(xp):
        return None
    import torch

    return torch.linalg.vector_norm(x, ord=float("inf"), dim=1).to(torch.float32)


def solve_triangular(lower: Any, rhs: Any, *, transpose: bool, xp: Any) -> Any:
    """Solve ``L x = rhs`` (or ``L^T x = rhs``) for lower-triangular ``L``.

    Native triangular solves: SciPy for NumPy (when installed), torch, ``jax.scipy`` and cupyx.
    Elsewhere a general ``xp.linalg.solve`` (the same solution to float rounding, slower).
    """
    if array_api_compat.is_numpy_namespace(xp):
        try:
            from scipy.linalg import solve_triangular as scipy_solve
        except ImportError:  # scipy is optional
            scipy_solve = None
        if scipy_solve is not None:
            return scipy_solve(lower, rhs, lower=True, trans="T" if transpose else "N")
    elif array_api_compat.is_torch_namespace(xp):
        import torch

        matrix = lower.mT if transpose else lower
        return torch.linalg.solve_triangular(matrix, rhs, upper=transpose)
    elif array_api_compat.is_jax_namespace(xp):
        from jax.scipy.linalg import solve_triangular as jax_solve

        return jax_solve(lower, rhs, lower=True, trans="T" if transpose else "N")
    elif array_api_compat.is_cupy_namespace(xp):
        from cupyx.scipy.linalg import solve_triangular as cupy_solve

        return cupy_solve(lower, rhs, lower=True, trans="T" if transpose else "N")
    matrix = xp.matrix_transpose(lower) if transpose else lower
    return xp.linalg.solve(matrix, rhs)


@contextmanager
def full_precision(xp: Any) -> Iterator[None]:
    """Matrix products inside at the full precision of their dtype, for namespace ``xp`` (``None``: nothing).

    JAX multiplies float32 in TF32 (10-bit mantissas) on recent NVIDIA GPUs and in bfloat16 passes
    on TPUs unless told otherwise: the kernel, its solves and the scores would then be good to about
    1e-3 instead of float32's 1e-7. For JAX this enters ``jax.default_matmul_precision("float32")``
    (eager operations and anything traced inside, including ``jax.jit`` functions); for other
    namespaces it does nothing: torch multiplies float32 at full precision unless the user chose
    otherwise (``torch.set_float32_matmul_precision``), and so do CuPy and NumPy.
    """
    if xp is not None and array_api_compat.is_jax_namespace(xp):
        import jax

        with jax.default_matmul_precision("float32"):
            yield
    else:
        yield


def full_precision_products(fn: F) -> F:
    """Decorate a function taking the namespace as keyword ``xp``: it runs under :func:`full_precision`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with full_precision(kwargs.get("xp")):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
