"""Turn ``run.py --json`` output into the Markdown tables of ``docs/quality.md``.

    python bench/quality/report.py docs/bench/quality.json
"""
from __future__ import annotations

import json

METHODS = ["trak-core defaults", "lambda = 0", "best grid", "gradient dot", "traker defaults",
           "defaults + soft-threshold 0.5", "defaults + unit-normalized features",
           "defaults + normalized checkpoint weighting"]


def main(path: str) -> str:
    data = json.load(open(path))
    rows = data["summary"]
    out = []
    for task in sorted({r["task"] for r in rows}):
        out.append(f"\n### {task}\n")
        configs = sorted({(r["k"], r["M"]) for r in rows if r["task"] == task})
        out.append("| method | " + " | ".join(f"k={k}, M={m}" for k, m in configs) + " |")
        out.append("|---|" + "---|" * len(configs))
        for method in METHODS:
            cells = []
            for k, m in configs:
                match = [r for r in rows if r["task"] == task and r["k"] == k and r["M"] == m
                         and r["method"].startswith(method)]
                if not match:
                    cells.append("")
                    continue
                r = match[0]
                alpha = f" (x{r['method'].split('alpha=')[1].rstrip(')')})" if "alpha=" in r["method"] else ""
                cells.append(f"{r['lds']:.3f} ± {r['sem']:.3f}{alpha}")
            if any(cells):
                out.append(f"| {method} | " + " | ".join(cells) + " |")
    timing = data.get("timing", [])
    if timing:
        counts = {t.get("checkpoints", 10) for t in timing}  # run.py times its max(--ms) checkpoints (older JSON: 10)
        count = counts.pop() if len(counts) == 1 else None
        header = "featurize" if count is None else f"featurize ({count} checkpoint{'s' if count > 1 else ''})"
        out.append(f"\n| task | k | {header} | choosing lambda | share |")
        out.append("|---|---|---|---|---|")
        for t in timing:
            out.append(f"| {t['task']} | {t['k']} | {t['featurize_s']:.2f} s | {1000 * t['choose_lambda_s']:.1f} ms | "
                       f"{100 * t['choose_lambda_s'] / t['featurize_s']:.2f}% |")
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The Markdown tables of docs/quality.md from bench/quality/run.py's "
                                                 "--json output")
    parser.add_argument("path", help="e.g. docs/bench/quality.json")
    main(parser.parse_args().path)
