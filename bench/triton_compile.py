"""Compile trak-core's Triton projection kernel for an NVIDIA GPU on any machine, no GPU needed.

    python bench/triton_compile.py [--arch 90] [--json out.json]

Triton compiles ahead of time: the kernel goes through Triton's own pipeline to PTX and, with the ``ptxas`` that
ships in Triton's wheel, to a cubin for the chosen architecture (80: A100, 90: H100/H200). This catches what
Triton's interpreter (the CPU tests) cannot: a kernel the GPU compiler rejects, a launch plan that needs more
shared memory than a block may have (Triton refuses to launch it), register spills to local memory, and
products that do not run on the tensor cores. It also counts the instructions of the main loop (one step of
``block_k`` rows of ``P``) from the disassembly: static figures for comparing kernel variants before a GPU
measures them (``bench/triton_sweep.py``). The disassembly tools (``cuobjdump``, ``nvdisasm``) also ship in
Triton's wheel.

Prints one Markdown row per launch plan of ``bench/triton_sweep.py`` at the sizes of ``bench/gpu_peers.py``, with
the main loop's warp instructions a step and, per 1,000 useful multiply-adds, the cycles an SM needs to issue
them (4 warp instructions a cycle) and to serve its shared-memory accesses (about 1 a cycle). These are lower
bounds from counting, not timings: an H200's tensor cores need about 0.53 cycles per 1,000 float16
multiply-adds (989 TFLOP/s on 132 SMs at 1.98 GHz), so about 1.1 for the two passes of ``precision="float32"``.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

# Shared memory one block may use (opt-in maximum, bytes): CUDA C Programming Guide, "Technical Specifications
# per Compute Capability". Triton refuses to launch a kernel that asks for more.
MAX_SHARED = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
MAX_REGISTERS = 255  # per thread, every architecture since sm_35


def _tools() -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _loop_body(sass: str) -> str:
    """The main loop's disassembly: the shortest span from a label back-branched to that holds the products."""
    lines = sass.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(lines) if re.match(r"\s*\.L_x_\d+:", line)}
    spans = []
    for i, line in enumerate(lines):
        jump = re.search(r"BRA `?\(?(\.L_x_\d+)\)?", line)
        if jump and labels.get(jump.group(1), i) < i:
            body = "\n".join(lines[labels[jump.group(1)]:i + 1])
            if "HGMMA" in body or "HMMA" in body:
                spans.append(body)
    return min(spans, key=len) if spans else ""


def _opcodes(sass: str) -> list[str]:
    """The opcode of each instruction with its modifiers (``LDG.E.128``), predicates dropped."""
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)", sass)


def _multiply_adds(opcodes: list[str], warps: int) -> int:
    """Multiply-adds of the tensor-core instructions among ``opcodes``, for all ``warps`` of a program: an
    ``HGMMA.MxNxK`` is one warp group's (4 warps) M x N x K product, an ``HMMA.16816`` one warp's 16 x 8 x 16."""
    total = 0
    for op in opcodes:
        if shape := re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op):
            total += (warps // 4) * int(shape[1]) * int(shape[2]) * int(shape[3])
        elif op.startswith("HMMA.16816"):
            total += warps * 16 * 8 * 16
        elif op.startswith("HMMA"):
            raise ValueError(f"unexpected tensor-core instruction shape {op}")
    return total


def compile_plan(plan: dict, n: int, p: int, k: int, *, arch: int = 90, passes: int = 2,
                 input_dtype: str = "float32") -> dict[str, Any]:
    """Compile the kernel for one :func:`trak_core._triton.launch_plan` and report its resources.

    The compile is ``trak_core._triton_aot.compile_kernel``'s, the one CuPy and JAX arrays launch (torch's
    ``@triton.jit`` launch compiles the same source with the same alignment facts).

    Returns ``shared`` (bytes), ``registers``, ``stack`` and ``local`` (bytes a thread; spills show here), the
    tensor-core instruction of the products (``HGMMA`` on Hopper's warp groups, ``HMMA`` otherwise; ``None``:
    no tensor cores), ``loop`` (opcode counts of the main loop's body, one step of ``block_k`` rows of ``P``,
    modifiers dropped), ``loop_multiply_adds`` (its tensor-core multiply-adds, all warps together), ``entry``
    (the kinds of the PTX entry's parameters, which CuPy's launch follows) and ``seconds`` to compile. Raises what Triton or ``ptxas`` raise for a kernel they reject.
    """
    from trak_core._triton_aot import compile_kernel, entry_parameters

    integers = dict(n=n, p=p, k=k, stride_x=p, stride_w=-(-k // 32))  # their alignment, as a launch would find it
    start = time.perf_counter()
    compiled = compile_kernel(plan, integers, arch=arch, passes=passes, input_dtype=input_dtype)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        cubin = pathlib.Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(_tools() / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(_tools() / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    registers, stack, local = (int(v) for v in re.search(r"REG:(\d+).*STACK:(\d+).*LOCAL:(\d+)", usage).groups())
    names = [op.split(".")[0] for op in _opcodes(sass)]
    tensor_core = next((op for op in ("HGMMA", "HMMA") if op in names), None)
    loop = _opcodes(_loop_body(sass))
    return dict(shared=int(compiled.metadata.shared), registers=registers, stack=stack, local=local,
                tensor_core=tensor_core, loop=collections.Counter(op.split(".")[0] for op in loop),
                loop_multiply_adds=_multiply_adds(loop, plan["warps"]), seconds=seconds,
                entry=entry_parameters(compiled.asm["ptx"]))


def triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED))
    parser.add_argument("--processors", type=int, default=132, help="SMs of the GPU the plans are made for")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from triton_sweep import PLANS, SIZES  # noqa: E402  (imports torch: the plans are the sweep's)

    from trak_core import _triton

    rows = []
    print(f"Triton projection kernel compiled for sm_{args.arch} (Triton {triton_version()}), main loop per step; "
          "cycles a 1,000 useful multiply-adds (rows past n not counted) at 4 warp instructions and 1 shared-memory "
          "access a cycle per SM:\n")
    print(f"| n x p -> k | plan | shared KB (max {MAX_SHARED[args.arch] // 1024}) | registers | spilled bytes | "
          "tensor cores | warp instructions | issue cycles / 1k MAC | shared-memory cycles / 1k MAC |")
    print("|---" * 9 + "|")
    for n, p, k in SIZES["full"]:
        seen = set()
        for options in PLANS:
            plan = _triton.launch_plan(n, p, k, args.processors, **options)
            if tuple(sorted(plan.items())) in seen:
                continue
            seen.add(tuple(sorted(plan.items())))
            try:
                row = compile_plan(plan, n, p, k, arch=args.arch)
            except Exception as exc:  # one rejected plan is a finding, not the end of the table
                row = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
            label = ", ".join(f"{key}={value}" for key, value in options.items()) or "default"
            if "error" in row:
                rows.append(dict(n=n, p=p, k=k, options=options, error=row["error"]))
                print(f"| {n} x {p:,} -> {k:,} | {label} | {row['error']} |||||||")
                continue
            loop, useful = row["loop"], min(n, plan["block_m"]) * plan["block_n"] * plan["block_k"] / 1000
            instructions = sum(loop.values()) * plan["warps"]
            shared = sum(loop[op] for op in ("LDS", "LDSM", "STS", "STSM")) * plan["warps"]
            rows.append(dict(n=n, p=p, k=k, options=options, plan=plan, warp_instructions=instructions,
                             issue_cycles_per_kmac=instructions / 4 / useful, shared_cycles_per_kmac=shared / useful)
                        | {key: value for key, value in row.items() if key != "loop"} | {"loop": dict(loop)})
            print(f"| {n} x {p:,} -> {k:,} | {label} | {row['shared'] / 1024:.0f} | {row['registers']} | "
                  f"{row['stack'] + row['local']} | {row['tensor_core']} | {instructions:,} | "
                  f"{instructions / 4 / useful:.2f} | {shared / useful:.2f} |")
    if args.json:
        from _report import write_json

        write_json(dict(arch=args.arch, processors=args.processors, triton=triton_version(), rows=rows), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
