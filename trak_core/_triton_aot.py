"""The Triton projection kernel compiled ahead of time, and launched by CuPy: one kernel for CuPy and JAX too.

One job: compile ``trak_core._triton_kernel.split_projection`` for a given GPU architecture with
``triton.compile`` (no GPU and no torch needed: Triton's own ``ptxas`` makes the cubin) and launch the
cubin on CuPy arrays through ``cupy.RawModule``. Triton's own launcher needs torch for its device and
stream, so torch tensors keep the ``@triton.jit`` launch (``trak_core._triton``); CuPy arrays take this
path, and JAX arrays on GPUs borrow it through DLPack (zero-copy views, no torch imported into a JAX
program).

The launch follows the compiled kernel, not assumptions: the arguments are checked against the
``.entry`` parameters of its PTX (five pointers, five 32-bit integers, then Triton's scratch pointers,
passed as null since the kernel asks for no scratch), the block has ``32 x num_warps`` threads and the
dynamic shared memory is the kernel's own figure. The first launch in a process is also checked
against a float64 product of the same split on a small slice; a mismatch raises, and the caller falls
back to the generic split path.

``bench/triton_compile.py`` uses the same compile step to count the kernel's instructions.
"""
from __future__ import annotations

import atexit
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Sequence

from .errors import BackendError, TrakTypeError

__all__ = ["aligned_pointers", "compile_kernel", "entry_parameters", "launch_cupy", "launch_jax", "signature"]

POINTERS = ("x_ptr", "words_ptr", "signs_ptr", "scales_ptr", "out_ptr")
INTEGERS = ("n", "p", "k", "stride_x", "stride_w")
CONSTANTS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "ITERS", "TWO_PASSES", "PAIRS")
INPUT_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
_compiled: dict[tuple, Any] = {}
_loaded: dict[tuple, Any] = {}
_checked: set[tuple] = set()
_folder: list[tuple[pathlib.Path, int]] = []  # (this process's cubin folder, its pid): made on first use, removed
# at its exit


def signature(input_dtype: str) -> dict[str, str]:
    """The kernel's argument types for ``triton.compile``: ``input_dtype`` gradients, int32 words, float32 rest."""
    if input_dtype not in INPUT_TYPES:
        raise TrakTypeError(f"the Triton kernel takes float32, float16 or bfloat16 gradients, not {input_dtype}")
    types = {name: "*fp32" for name in POINTERS} | {"x_ptr": INPUT_TYPES[input_dtype], "words_ptr": "*i32"}
    return types | {name: "i32" for name in INTEGERS} | {name: "constexpr" for name in CONSTANTS}


def _divisibility(integers: dict[str, int], aligned_pointers: Sequence[str]) -> dict[tuple[int, ...], list]:
    """Triton's alignment facts: each pointer of ``aligned_pointers`` (at a 16-byte aligned address) and each
    integer argument divisible by 16 is declared so, as Triton's launcher would find them. A pointer declared
    aligned that is not (a column view's) makes the kernel's vector loads fault: only real addresses count."""
    names = list(signature("float32"))
    aligned = [name for name in POINTERS if name in aligned_pointers]
    aligned += [name for name, value in integers.items() if value % 16 == 0]
    return {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}


def compile_kernel(plan: dict, integers: dict[str, int], *, arch: int, passes: int, input_dtype: str,
                   aligned_pointers: Sequence[str] = POINTERS) -> Any:
    """``triton.compile`` of the kernel for ``plan`` (a ``trak_core._triton.launch_plan``) on ``sm_<arch>``.

    ``integers``: the values of ``n, p, k, stride_x, stride_w``, for their alignment only (one compile serves
    every size with the same facts); ``aligned_pointers``: the pointer arguments whose addresses are multiples
    of 16 bytes (all of them for arrays as CUDA allocators return them). Cached per process; Triton also caches
    compiles on disk.
    """
    constants = dict(BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"], BLOCK_K=plan["block_k"],
                     ITERS=plan["iters"], TWO_PASSES=passes == 2, PAIRS=plan.get("pairs", False))
    attrs = _divisibility(integers, aligned_pointers)
    key = (arch, input_dtype, tuple(constants.items()), tuple(sorted(attrs)), plan["warps"], plan.get("stages"))
    if key not in _compiled:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from ._triton_kernel import split_projection

        options = {"num_warps": plan["warps"]} | ({"num_stages": plan["stages"]} if plan.get("stages") else {})
        source = ASTSource(fn=split_projection, signature=signature(input_dtype), constexprs=constants, attrs=attrs)
        _compiled[key] = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return _compiled[key]


def entry_parameters(ptx: str) -> list[str]:
    """The kinds of the PTX entry's parameters, in order: ``"pointer"``, ``"u32"``, ... (``.param .u64 .ptr``
    is a pointer)."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    if entry is None:
        raise BackendError("no .entry in the compiled kernel's PTX")
    kinds = []
    for param in entry.group(1).split(","):
        words = param.split()
        kinds.append("pointer" if ".ptr" in words else words[1].lstrip("."))
    return kinds


def _arguments(compiled: Any, pointers: list[Any], integers: list[int]) -> tuple:
    """The launch arguments in the entry's order, checked against its parameters (scratch pointers: null)."""
    import numpy as np

    kinds = entry_parameters(compiled.asm["ptx"])
    expected = ["pointer"] * len(POINTERS) + ["u32"] * len(INTEGERS)
    extra = kinds[len(expected):]
    if kinds[:len(expected)] != expected or any(kind != "pointer" for kind in extra):
        raise BackendError(f"the compiled kernel's parameters {kinds} are not {expected} + scratch pointers")
    scratch = (int(getattr(compiled.metadata, "global_scratch_size", 0) or 0)
               + int(getattr(compiled.metadata, "profile_scratch_size", 0) or 0))
    if scratch:
        raise BackendError(f"the compiled kernel asks for {scratch} bytes of scratch memory; only Triton's launcher "
                           "provides it")
    return (*pointers, *(np.int32(value) for value in integers), *(np.uint64(0) for _ in extra))


def _cubin_folder() -> pathlib.Path:
    """This process's folder for cubin files, made once and removed when the process exits.

    CuPy reads a ``RawModule``'s file lazily (at the first launch on each device), so the files stay
    while the process runs; one folder per process, not one per kernel, and nothing left behind.
    """
    if not _folder or _folder[0][1] != os.getpid():  # a forked child makes its own: its parent removes the parent's
        folder = pathlib.Path(tempfile.mkdtemp(prefix="trak_core_triton_"))
        atexit.register(_remove, folder, os.getpid())
        _folder[:] = [(folder, os.getpid())]
    return _folder[0][0]


def _remove(folder: pathlib.Path, pid: int) -> None:
    """Remove ``folder`` at exit, in the process that made it only (a forked child leaves its parent's)."""
    if os.getpid() == pid:
        shutil.rmtree(folder, ignore_errors=True)


def _function(compiled: Any, device_id: int) -> Any:
    """The compiled cubin loaded by CuPy on ``device_id``, its dynamic shared memory allowed."""
    import cupy

    key = (compiled.metadata.hash, device_id)
    if key not in _loaded:
        path = _cubin_folder() / f"{compiled.metadata.hash}_{device_id}_{compiled.metadata.name}.cubin"
        path.write_bytes(compiled.asm["cubin"])
        function = cupy.RawModule(path=str(path)).get_function(compiled.metadata.name)
        if compiled.metadata.shared > 48 * 1024:  # above 48 KB a kernel must opt in
            function.max_dynamic_shared_size_bytes = compiled.metadata.shared
        _loaded[key] = function
    return _loaded[key]


def _launch(compiled: Any, grads: Any, words: Any, signs: Any, scales: Any, out: Any, integers: dict[str, int],
            grid: tuple[int, int, int]) -> None:
    import cupy

    arguments = _arguments(compiled, [grads, words, signs, scales, out], list(integers.values()))
    _function(compiled, cupy.cuda.Device().id)(grid, (32 * compiled.metadata.num_warps,), arguments,
                                               shared_mem=compiled.metadata.shared)


def launch_cupy(grads: Any, words: Any, signs: Any, scales: Any, k: int, n_passes: int, plan: dict) -> Any:
    """The kernel on CuPy arrays: partial sums over the plan's slices of ``p``, float32 ``(splits, n, k)``.

    ``grads`` (n, p) with unit column stride (row stride free: column slices need no copy).
    """
    import cupy

    n, p = grads.shape
    if grads.strides[1] != grads.itemsize:
        grads = cupy.ascontiguousarray(grads)
    words, signs, scales = (cupy.ascontiguousarray(a) for a in (words, signs, scales))
    integers = dict(n=n, p=p, k=k, stride_x=grads.strides[0] // grads.itemsize, stride_w=words.shape[1])
    arch = int(cupy.cuda.Device().compute_capability)
    aligned = aligned_pointers(grads, words, signs, scales)
    compiled = compile_kernel(plan, integers, arch=arch, passes=n_passes, input_dtype=str(grads.dtype),
                              aligned_pointers=aligned)
    check = (arch, str(grads.dtype), n_passes, aligned)
    if check not in _checked:
        _first_use_check(compiled, grads, words, signs, scales, integers, n_passes, plan)
        _checked.add(check)
    partial = cupy.empty((plan["splits"], n, k), dtype=cupy.float32)
    _launch(compiled, grads, words, signs, scales, partial, integers,
            (-(-n // plan["block_m"]), -(-k // plan["block_n"]), plan["splits"]))
    return partial


def aligned_pointers(grads: Any, words: Any, signs: Any, scales: Any) -> tuple[str, ...]:
    """The kernel's pointer arguments whose CuPy arrays start at a 16-byte aligned address (the output, allocated
    by CuPy, always does); a column view of ``grads`` or a slice of ``words`` or ``signs`` may not."""
    arrays = dict(x_ptr=grads, words_ptr=words, signs_ptr=signs, scales_ptr=scales)
    return tuple(name for name in POINTERS if name == "out_ptr" or _address(arrays[name]) % 16 == 0)


def _address(array: Any) -> int:
    """The device address of a CuPy array's first element (a NumPy array's host address: tests' stand-in)."""
    pointer = getattr(getattr(array, "data", None), "ptr", None)
    return int(pointer if pointer is not None else array.__array_interface__["data"][0])


def _first_use_check(compiled: Any, grads: Any, words: Any, signs: Any, scales: Any, integers: dict[str, int],
                     n_passes: int, plan: dict) -> None:
    """The kernel on the first rows of ``P`` (at most 4,096, within one slice of the plan: the same compile and
    alignment facts) against a float64 product of the same split and bits, on the first 4 rows of ``grads``;
    raises on a mismatch."""
    import cupy

    from ._namespace import namespace
    from ._split import split_parts
    from .projection import _unpack

    n, k = integers["n"], integers["k"]
    head = min(integers["p"], plan["iters"] * plan["block_k"], 4096)  # a multiple of 16, or p: the same facts
    out = cupy.empty((1, n, k), dtype=cupy.float32)
    _launch(compiled, grads[:, :head], words[:head], signs[:head], scales, out, integers | {"p": head},
            (-(-n // plan["block_m"]), -(-k // plan["block_n"]), 1))
    xp, rows = namespace(grads), min(n, 4)
    parts = split_parts(grads[:rows, :head].astype(cupy.float32) * signs[None, :head] * scales[:rows, None], n_passes,
                        xp=xp)  # the kernel's split, as the generic path makes it
    product = parts.astype(cupy.float64) @ _unpack(words[:head], k, xp=xp, dtype=xp.float64, scale=1.0)
    expected = product if n_passes == 1 else product[:rows] + product[rows:]
    error = float(cupy.linalg.norm(out[0, :rows] - expected) / max(float(cupy.linalg.norm(expected)), 1e-300))
    if not error <= 1e-5:  # float32 sums of float16 products: about 1e-7
        raise BackendError(f"the Triton kernel launched by CuPy is {error:.1e} off a float64 product of the same split "
                           "on its first use")


def launch_jax(grads: Any, words: Any, signs: Any, scales: Any, k: int, n_passes: int, plan: dict) -> Any:
    """:func:`launch_cupy` on JAX GPU arrays through DLPack (zero-copy); the summed (n, k) float32 JAX array."""
    import cupy
    import jax

    from ._triton import _jax_ordinal, total

    for array in (grads, words, signs, scales):  # JAX computes asynchronously; CuPy's stream does not wait on it
        array.block_until_ready()
    with cupy.cuda.Device(_jax_ordinal(grads)):
        views = [cupy.from_dlpack(array) for array in (grads, words, signs, scales)]
        out = total(launch_cupy(*views, k, n_passes, plan))
        cupy.cuda.get_current_stream().synchronize()  # JAX's stream does not wait on CuPy's
    return jax.dlpack.from_dlpack(out)
