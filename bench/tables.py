"""Benchmark-suite JSON -> the markdown tables of docs/benchmarks.md.

    python bench/tables.py docs/bench/harness_cpu.json > docs/bench/harness_cpu.md

One table per case (mean time per call, and throughput where it has one), columns per
``backend:device`` id, plus the ours/baseline ratios the run measured.
"""
from __future__ import annotations

import json
import pathlib
from collections import defaultdict

SIZE_KEYS = {"projection": ("p", "k"), "gradients": ("p",), "featurize": ("p", "k"), "kernel": ("k",),
             "scoring": ("n", "k")}
TITLES = {"projection": "Projection of 64 gradient rows (trak-core's; the matmul baseline is in the ratio table)",
          "gradients": "Per-example gradients of 256 examples (canonical MLP)",
          "featurize": "Featurize 1,024 examples end to end (examples/s in brackets)",
          "kernel": "Cholesky factorization of the kernel", "scoring": "Scoring 64 targets, one checkpoint"}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def tables(bench: dict) -> str:
    cells: dict[str, dict[tuple, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    ids: dict[str, list[str]] = defaultdict(list)
    for b in bench["benchmarks"]:
        info, mean = b["extra_info"], b["stats"]["mean"]
        case = info.get("case")
        if case not in SIZE_KEYS or info.get("role") == "baseline":
            continue
        size = tuple(info[key] for key in SIZE_KEYS[case])
        text = _ms(mean)
        if case == "featurize":
            text += f" ({info['n'] / mean:,.0f}/s)"
        cells[case][size][info["id"]] = text
        if info["id"] not in ids[case]:
            ids[case].append(info["id"])
    out = []
    machine = bench.get("machine_info", {})
    out.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
               f"Python {machine.get('python_version', '?')}; run {bench.get('datetime', '?')[:16]}, "
               f"mode `{bench.get('trak_core', {}).get('mode', '?')}`"
               + (f", load average {bench['trak_core']['load_before']} before, {bench['trak_core']['load_after']} after"
                  if "load_before" in bench.get("trak_core", {}) else "") + ".\n")
    for case in SIZE_KEYS:
        if case not in cells:
            continue
        out.append(f"**{TITLES[case]}**\n")
        out.append("| " + " | ".join(SIZE_KEYS[case]) + " | " + " | ".join(ids[case]) + " |")
        out.append("|" + "---|" * (len(SIZE_KEYS[case]) + len(ids[case])))
        for size in sorted(cells[case]):
            row = [f"{v:,}" for v in size] + [cells[case][size].get(i, "") for i in ids[case]]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    ratios = bench.get("trak_core", {}).get("ratios", [])
    if ratios:
        out.append("**Projection: trak-core time / a matmul with the matrix already in memory** "
                   "(below 1 is faster)\n")
        out.append("| pair | trak-core | matmul | ratio |")
        out.append("|---|---|---|---|")
        for r in ratios:
            out.append(f"| {r['pair']} | {_ms(r['ours_s'])} | {_ms(r['baseline_s'])} | {r['time_ratio']:.2f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    import argparse

    parser = argparse.ArgumentParser(description="Markdown tables (and trak-core's ratios) from a pytest-benchmark "
                                                 "JSON report of `python -m pytest bench`")
    parser.add_argument("report", help="e.g. bench/results/quick.json or docs/bench/harness_cpu.json")
    args = parser.parse_args(argv)
    text = tables(json.loads(pathlib.Path(args.report).read_text()))
    print(text)
    return text


if __name__ == "__main__":
    main()
