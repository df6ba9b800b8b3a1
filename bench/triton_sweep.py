"""Launch plans of trak-core's Triton projection kernel, timed on one GPU: data for choosing the defaults.

    python bench/triton_sweep.py [--json out.json] [--budget SECONDS]
    python bench/triton_sweep.py --small --device cpu          # a rehearsal in Triton's interpreter

At the two projection sizes of bench/gpu_peers.py (256 x 2,000,000 -> 4,096 and 32 x 11,181,642 -> 2,048), float32
random gradients, ``precision="float32"`` (two float16 passes): each plan's median synchronized seconds after a
warm-up (which compiles it), effective TFLOP/s (2 n p k / t, as fast_jl's are counted) and its largest relative
difference from the default plan's result (the same split summed in another order: about 1e-7). The default plan
is also timed with ``precision="fast"``. Prints a Markdown table (bench/gpu_check.sh puts it in report.md); plans
start only while ``--budget`` seconds remain, so a slow compiler costs rows, not the run.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import require_cuda, write_json  # noqa: E402
from gpu_peers import phase  # noqa: E402

SIZES = dict(full=[(256, 2_000_000, 4096), (32, 11_181_642, 2048)], small=[(40, 3000, 256), (8, 2000, 128)])
PLANS = [dict(), dict(pairs=True), dict(waves=8), dict(warps=4), dict(block_n=128), dict(block_k=32), dict(block_k=64),
         dict(block_m=64), dict(block_m=128), dict(block_n=128, warps=4), dict(pairs=True, block_n=128, warps=4),
         dict(block_k=128, stages=2), dict(stages=4)]  # most telling first: the budget may end the list
# (a plan equal to the default at a size, such as block_k=64 for 32 rows or block_m=128 for 256, is timed once)


def _case(n: int, p: int, k: int, device: torch.device) -> dict:
    """Random float32 gradients at one size, with the bits, row signs and scales the kernel takes."""
    import array_api_compat.torch as xp

    from trak_core import _triton
    from trak_core._split import row_scales
    from trak_core.projection import _rademacher_words, row_signs

    grads = torch.randn(n, p, generator=torch.Generator(device=device).manual_seed(0), device=device)
    return dict(n=n, p=p, k=k, grads=grads, words=_rademacher_words(0, p, k, 0, xp=xp, device=device),
                signs=row_signs(0, p, seed=0, checkpoint=0, xp=xp, device=device, dtype=xp.float32),
                scales=row_scales(grads, p, xp=xp), processors=_triton._processors(grads), reference=None, seen=set())


def _time(case: dict, options: dict, passes: int, device: torch.device, deadline: float, repeats: int) -> dict | None:
    """One plan at one size: median synchronized seconds after a warm-up; ``None`` if it equals a plan timed."""
    from trak_core import _triton

    n, p, k = case["n"], case["p"], case["k"]
    plan = _triton.launch_plan(n, p, k, case["processors"], **options)
    if (passes, *sorted(plan.items())) in case["seen"]:
        return None
    case["seen"].add((passes, *sorted(plan.items())))
    row = dict(n=n, p=p, k=k, precision="float32" if passes == 2 else "fast", options=options,
               plan={key: plan[key] for key in ("block_m", "block_n", "block_k", "warps", "stages", "splits", "pairs")})
    if time.perf_counter() > deadline:
        return row | dict(status="skipped: time budget spent")

    def run():
        return _triton.split_product(case["grads"], case["words"], case["signs"], case["scales"], k, passes, plan=plan)

    try:
        _, compile_s, _ = phase(device, run)
        if _triton._failed:
            raise RuntimeError(_triton._failed.pop())
        times = []
        for _ in range(repeats):
            out, seconds, _ = phase(device, run)
            times.append(seconds)
        seconds = statistics.median(times)
        row.update(status="ok", first_call_s=compile_s, seconds=seconds, tflops=2.0 * n * p * k / seconds / 1e12)
        if passes == 2:
            case["reference"] = out if case["reference"] is None else case["reference"]
            reference = case["reference"]
            row["max_rel_diff"] = float(((out - reference).norm(dim=1) / reference.norm(dim=1)).max())
    except Exception as exc:  # one plan that does not compile must not cost the others
        row["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    return row


def sweep(sizes: list[tuple[int, int, int]], device: torch.device, deadline: float, repeats: int) -> list[dict]:
    """The default at both precisions, then every other plan of ``PLANS``, each at every size, while time remains
    (plan by plan, so that a short budget still compares the sizes); rows in the order of ``sizes``."""
    cases = [_case(n, p, k, device) for n, p, k in sizes]
    order = [(PLANS[0], 2), (PLANS[0], 1)] + [(options, 2) for options in PLANS[1:]]
    rows = [row for options, passes in order for case in cases
            if (row := _time(case, options, passes, device, deadline, repeats)) is not None]
    return sorted(rows, key=lambda row: sizes.index((row["n"], row["p"], row["k"])))


def markdown(rows: list[dict], device_name: str) -> str:
    lines = [f"Triton projection kernel, launch plans on {device_name} (bench/triton_sweep.py):", "",
             "| n x p -> k | precision | plan (options) | splits | ms | TFLOP/s (2npk/t) | first call s | max rel. diff |",
             "|---" * 8 + "|"]
    for r in rows:
        options = ", ".join(f"{key}={value}" for key, value in r["options"].items()) or "default"
        if r["status"] != "ok":
            cells = [options, str(r["plan"]["splits"]), r["status"], "", "", ""]
        else:
            cells = [options, str(r["plan"]["splits"]), f"{r['seconds'] * 1e3:.2f}", f"{r['tflops']:.1f}",
                     f"{r['first_call_s']:.2f}", f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-"]
        lines.append(f"| {r['n']} x {r['p']:,} -> {r['k']:,} | {r['precision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="small sizes (the interpreter on a CPU)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds: no plan starts after them")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    require_cuda(parser, args.device)
    device, deadline = torch.device(args.device), time.perf_counter() + args.budget
    if device.type == "cpu":  # Triton's interpreter; read when Triton is imported (not yet: trak_core imports it late)
        os.environ["TRITON_INTERPRET"] = "1"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = sweep(SIZES["small" if args.small else "full"], device, deadline, repeats=1 if args.small else 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)"
    write_json(dict(device=name, rows=rows), args.json)
    print(markdown(rows, name))
    return rows


if __name__ == "__main__":
    main()
