"""GPU projection throughput: the fused kernel vs a matmul with the matrix already in memory.

    python bench/gpu_projection.py [--p 2000000 --k 4096 --batch 256] [--json out.json]

Measured in one run on one GPU, float32 inputs, TF32 off for the torch baselines:
- ``fused``: ``trak_cupy`` kernel, ``P`` generated tile by tile in shared memory (never materialized);
- ``materialized``: ``torch.matmul(grads, P)`` with ``P`` (p x k float32) already on the GPU;
- ``generate_then_matmul``: make ``P`` on the GPU with trak-core's reference path, then matmul
  (what a non-fused implementation pays per call).
Also reports the fused kernel's extra GPU memory (it should be only the output), and ``trak_core.project`` at its
default precision on the same gradients as CuPy and as torch arrays: one Triton kernel for both (launched by CuPy
for CuPy arrays, ``trak_core._triton_aot``; by Triton for torch tensors), which should agree to float32 rounding.
"""
from __future__ import annotations

import argparse
import json
import time

from _report import write_json


def timed(fn, sync, repeats: int = 5) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def core_projection(grads, shared, k: int, sync) -> dict:
    """``trak_core.project`` (default precision) on CuPy and torch views of the same gradients: seconds, the path
    each took and their largest relative row difference."""
    import cupy
    import torch

    import trak_core
    from trak_core import _triton

    out = {}
    for name, x in (("cupy", shared), ("torch", grads)):
        path = "Triton kernel" if _triton.available(x) else "generic split (no Triton)"
        try:
            out[f"core_{name}_s"] = timed(lambda: trak_core.project(x, k, seed=0, checkpoint=1), sync)
            failed = _triton.failure(x)  # each launch (torch's, CuPy's) fails on its own
            out[f"core_{name}_path"] = f"generic split: {failed[:150]}" if failed else path
        except Exception as exc:  # one framework's failure is a finding, not the end of the benchmark
            out[f"core_{name}_path"] = f"failed: {type(exc).__name__}: {str(exc)[:150]}"
    if "core_cupy_s" in out and "core_torch_s" in out:
        a = torch.from_dlpack(trak_core.project(shared[:8], k, seed=0, checkpoint=1))
        b = trak_core.project(grads[:8], k, seed=0, checkpoint=1)
        out["core_cupy_vs_torch"] = float(((a - b).norm(dim=1) / b.norm(dim=1)).max())
        out["core_cupy_tflops"] = 2.0 * grads.shape[0] * grads.shape[1] * k / out["core_cupy_s"] / 1e12
    cupy.get_default_memory_pool().free_all_blocks()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=2_000_000)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        parser.error("this script measures the CuPy projection on an NVIDIA GPU, and cupy is not installed here "
                     "(pip install cupy-cuda12x or cupy-cuda13x, on a machine with a GPU)")
    import cupy
    import torch

    import array_api_compat.torch as txp
    from trak_core.projection import _shared, row_signs
    from trak_cupy.projection import fused_project

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize
    grads = torch.randn(args.batch, args.p, device="cuda")
    shared = cupy.from_dlpack(grads)
    flops = 2.0 * args.batch * args.p * args.k
    result = dict(p=args.p, k=args.k, batch=args.batch, dtype="float32", gpu=torch.cuda.get_device_name(),
                  torch=torch.__version__, cupy=cupy.__version__)

    # the pool's growth, not its bytes in use: every output is freed (back to the pool) before this line, so
    # used_bytes() read the same before and after (0 B); the pool keeps what the calls took at most
    before = cupy.get_default_memory_pool().total_bytes()
    fused_s = timed(lambda: fused_project(shared, args.k, seed=0, checkpoint=1), sync)
    result["fused_extra_bytes"] = cupy.get_default_memory_pool().total_bytes() - before
    result["fused_s"] = fused_s

    def generate():
        signs = row_signs(0, args.p, seed=0, checkpoint=1, xp=txp, device=grads.device, dtype=torch.float32)
        matrix = _shared(0, args.p, args.k, 0, "rademacher", xp=txp, device=grads.device, dtype=torch.float32)
        return signs, matrix

    generate_s = timed(lambda: (lambda signs, matrix: (grads * signs) @ matrix)(*generate()), sync, repeats=2)
    signs, matrix = generate()
    materialized_s = timed(lambda: (grads * signs) @ matrix, sync)
    check = (grads[:4] * signs) @ matrix
    fused_rows = torch.from_dlpack(fused_project(shared[:4], args.k, seed=0, checkpoint=1))
    result["max_rel_diff_vs_materialized"] = float((fused_rows - check).abs().max() / check.abs().max())
    matrix = None  # free the p x k matrix before the runs below and the report
    result.update(core_projection(grads, shared, args.k, sync))
    result.update(materialized_s=materialized_s, generate_then_matmul_s=generate_s,
                  fused_tflops=flops / fused_s / 1e12, materialized_tflops=flops / materialized_s / 1e12,
                  fused_over_materialized=materialized_s / fused_s, fused_over_generate=generate_s / fused_s)
    print(json.dumps(result, indent=1))
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
