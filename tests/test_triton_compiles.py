"""The Triton projection kernel compiled ahead of time for NVIDIA GPUs, on this machine (no GPU needed).

The interpreter tests (``tests/triton_interpreted.py``) check its numbers; these check what only the GPU
compiler sees, for the launch plans the GPU check uses (``bench/gpu_peers.py``'s two projection sizes on an
H200's 132 SMs): that ``ptxas`` accepts it, that a block asks for no more shared memory than the architecture
gives one (else Triton refuses to launch it), that nothing spills to local memory, and that the main loop is
tensor-core products of exactly one step's multiply-adds (read from the disassembly's instruction shapes,
against the closed form ``passes x block_m x block_n x block_k``), and that its PTX entry takes the arguments CuPy's launch
(``trak_core._triton_aot``) passes.
"""
from __future__ import annotations

import pathlib
import sys

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed (the `test` extra installs it on Linux x86_64)")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import triton_compile  # noqa: E402

from trak_core import _triton  # noqa: E402

if not (triton_compile._tools() / "ptxas").exists():
    pytest.skip("this Triton build has no NVIDIA backend tools (ptxas, nvdisasm)", allow_module_level=True)

H200_SMS = 132
SIZES = [(256, 2_000_000, 4096), (32, 11_181_642, 2048),  # bench/gpu_peers.py's projection rows
         (256, 11_181_642, 2048)]  # its ResNet-18 featurize batches (p not a multiple of 16)


@pytest.mark.parametrize("n,p,k", SIZES)
@pytest.mark.parametrize("passes", [2, 1])
def test_default_plans_compile_for_hopper_without_spills(n, p, k, passes):
    plan = _triton.launch_plan(n, p, k, H200_SMS)
    compiled = triton_compile.compile_plan(plan, n, p, k, arch=90, passes=passes)
    assert 0 < compiled["shared"] <= triton_compile.MAX_SHARED[90]
    assert compiled["registers"] <= triton_compile.MAX_REGISTERS
    assert compiled["stack"] == 0 and compiled["local"] == 0  # no spills to local memory
    assert compiled["tensor_core"] == "HGMMA"  # Hopper's warp-group products (the signs' 256 columns are their M)
    # the loop is one step: every multiply-add of a (block_m x block_k) @ (block_k x block_n) tile, once per pass
    assert compiled["loop_multiply_adds"] == passes * plan["block_m"] * plan["block_n"] * plan["block_k"]
    assert compiled["loop"]["I2F"] == 0  # signs made from their bits (bit operations), not int-to-float conversion
    # what trak_core._triton_aot passes when CuPy launches it (tests/triton_aot_interpreted.py writes the same entry)
    entry = compiled["entry"]  # then Triton's scratch pointers: one (Triton 3.3) or two (3.4 and later)
    assert entry[:10] == ["pointer"] * 5 + ["u32"] * 5 and entry[10:] in (["pointer"], ["pointer"] * 2)


@pytest.mark.parametrize("options", [dict(), dict(block_n=128, warps=4), dict(block_k=128, stages=2), dict(stages=4),
                                     dict(pairs=True)])
def test_sweep_plans_fit_an_h200_and_compile_for_ampere(options):
    """Plans ``bench/triton_sweep.py`` times: launchable on sm_90 (shared memory) and accepted for sm_80 (A100)."""
    n, p, k = SIZES[0]
    plan = _triton.launch_plan(n, p, k, H200_SMS, **options)
    assert triton_compile.compile_plan(plan, n, p, k, arch=90)["shared"] <= triton_compile.MAX_SHARED[90]
    ampere = triton_compile.compile_plan(plan, n, p, k, arch=80)
    assert ampere["tensor_core"] == "HMMA" and ampere["shared"] <= triton_compile.MAX_SHARED[80]


def test_bfloat16_and_float16_gradients_compile():
    n, p, k = SIZES[1]
    plan = _triton.launch_plan(n, p, k, H200_SMS)
    for dtype in ("bfloat16", "float16"):
        compiled = triton_compile.compile_plan(plan, n, p, k, arch=90, input_dtype=dtype)
        assert compiled["stack"] == 0 and compiled["loop_multiply_adds"] == 2 * 32 * 256 * 64


def _copy_widths(ptx: str) -> set[str]:
    """Byte widths of the kernel's global-to-shared asynchronous copies (16: vector loads needing 16-byte alignment)."""
    import re

    return set(re.findall(r"cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x\w+|\d+)", ptx))


def test_only_pointers_at_aligned_addresses_are_declared_aligned():
    # a CuPy column view (the split's p-slices, k = 1000) starts at an address that is not a multiple of 16: declared
    # aligned, the kernel's 16-byte copies of it would fault on the GPU
    from trak_core import _triton_aot

    class View:  # what aligned_pointers reads of a CuPy array
        def __init__(self, ptr):
            self.data = type("Memory", (), {"ptr": ptr})()

    assert _triton_aot.aligned_pointers(View(4096 + 4 * 525), View(256), View(1024 + 4 * 525), View(64)) == \
        ("words_ptr", "scales_ptr", "out_ptr")
    n, p, k = 256, 2_000_000, 1000
    plan = _triton.launch_plan(n, p, k, H200_SMS)
    integers = dict(n=n, p=p, k=k, stride_x=p, stride_w=-(-k // 32))
    every = _triton_aot.compile_kernel(plan, integers, arch=90, passes=2, input_dtype="float32")
    views = _triton_aot.compile_kernel(plan, integers, arch=90, passes=2, input_dtype="float32",
                                       aligned_pointers=("words_ptr", "scales_ptr", "out_ptr"))
    assert every is not views
    assert "0x10" in _copy_widths(every.asm["ptx"]) or "16" in _copy_widths(every.asm["ptx"])
    assert _copy_widths(views.asm["ptx"]) <= {"0x4", "4"}, _copy_widths(views.asm["ptx"])
