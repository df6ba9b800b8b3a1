"""GPU projection throughput: the fused kernel vs a matmul with the matrix already in memory.

    python bench/gpu_projection.py [--p 2000000 --k 4096 --batch 256] [--json out.json]

Measured in one run on one GPU, float32 inputs, TF32 off for the torch baselines:
- ``fused``: ``trak_cupy`` kernel, ``P`` generated tile by tile in shared memory (never materialized);
- ``materialized``: ``torch.matmul(grads, P)`` with ``P`` (p x k float32) already on the GPU;
- ``generate_then_matmul``: make ``P`` on the GPU with trak-core's reference path, then matmul
  (what a non-fused implementation pays per call).
Also reports the fused kernel's extra GPU memory (it should be only the output).
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=2_000_000)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
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

    before = cupy.get_default_memory_pool().used_bytes()
    fused_s = timed(lambda: fused_project(shared, args.k, seed=0, checkpoint=1), sync)
    result["fused_extra_bytes"] = cupy.get_default_memory_pool().used_bytes() - before
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
    matrix = None  # free the p x k matrix before reporting
    result.update(materialized_s=materialized_s, generate_then_matmul_s=generate_s,
                  fused_tflops=flops / fused_s / 1e12, materialized_tflops=flops / materialized_s / 1e12,
                  fused_over_materialized=materialized_s / fused_s, fused_over_generate=generate_s / fused_s)
    print(json.dumps(result, indent=1))
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
