"""bench/gpu_peers.py's JSON as Markdown: the projection table, the end-to-end table, the phases, ratios, skips."""
from __future__ import annotations

from typing import Any


def _path(parts: dict) -> str:
    """How the per-example gradients were computed: the closed form, or vmap(grad) and its examples per call."""
    if parts.get("per_example") == "closed form":
        return "closed form, one backward pass per batch"
    return f"{parts['chunk_rows']} examples per vmap call"


def markdown(result: dict) -> str:
    """The JSON as Markdown: the projection table, the end-to-end table, ratios, correlations, skipped sections."""
    def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if value is None else format(value * scale, spec)

    lines = [f"# trak-core vs traker 0.3.2 on {result['device_name']} ({result['mode']})", "",
             "| n x p -> k | method | ms | TFLOP/s | rel. error | float32-grade | note |", "|---" * 7 + "|"]
    for case in result.get("projection", []):
        for m in case["methods"]:
            cells = [f"{case['n']} x {case['p']:,} -> {case['k']:,}", m["method"], _fmt(m.get("seconds"), ".1f", 1e3),
                     _fmt(m.get("tflops"), ".1f"), _fmt(m.get("rel_error"), ".2e"),
                     {True: "pass", False: "FAIL"}.get(m.get("float32_grade"), ""),
                     m["note"] if m["status"] == "ok" else m["status"]]
            lines.append("| " + " | ".join(cells) + " |")
    e2e = result.get("end_to_end")
    if e2e:
        lines += ["", f"{e2e['model']}, {e2e['params']:,} parameters, {e2e['n_train']:,} examples (batch "
                  f"{e2e['batch']}), {e2e['n_targets']} targets, k = {e2e['k']:,}, one checkpoint:", "",
                  "| library | featurize ex/s | featurize s | peak MB | score s | peak MB | note |", "|---" * 7 + "|"]
        for lib in ("trak_core", "traker"):
            r = e2e.get(lib, {})
            cells = [lib, _fmt(r.get("featurize_examples_per_s"), ".1f"), _fmt(r.get("featurize_s"), ".2f"),
                     _fmt(r.get("featurize_peak_bytes"), ".0f", 1e-6), _fmt(r.get("score_s"), ".2f"),
                     _fmt(r.get("score_peak_bytes"), ".0f", 1e-6),
                     f"{r.get('status', r.get('projector', ''))} {r.get('note', '')}".strip()]
            lines.append("| " + " | ".join(cells) + " |")
        parts = e2e.get("trak_core", {}).get("breakdown", {})
        if "gradients_s" in parts:
            lines += ["", f"trak-core featurize, phases timed apart: per-example gradients {parts['gradients_s']:.2f} s "
                      f"({_path(parts)}), projection {parts['projection_s']:.2f} s, "
                      f"the rest {e2e['trak_core']['featurize_s'] - parts['gradients_s'] - parts['projection_s']:.2f} s; "
                      f"peak MB: gradients {_fmt(parts.get('gradients_peak_bytes'), '.0f', 1e-6)}, projection "
                      f"{_fmt(parts.get('projection_peak_bytes'), '.0f', 1e-6)}"]
            if "gradients_vmap_s" in parts:
                lines.append(f"(gradients through vmap(grad), {parts['chunk_rows']} examples per call: "
                             f"{parts['gradients_vmap_s']:.2f} s, peak "
                             f"{_fmt(parts['gradients_vmap_peak_bytes'], '.0f', 1e-6)} MB)")
        elif parts:
            lines += ["", f"trak-core breakdown: {parts.get('status')}"]
        if "ratios" in e2e:
            ratio, corr = e2e["ratios"], e2e["correlation"]
            lines += ["", f"featurize speed-up trak-core / traker: {ratio['featurize_speedup']:.2f} (target >= 1.5); "
                      f"score time trak-core / traker: {ratio['score_time_ratio']:.2f} (target <= 1); score "
                      f"correlation: Pearson {corr['pearson']:.3f}, Spearman (mean over targets) "
                      f"{corr['spearman_mean_over_targets']:.3f} (a sanity check)"]
    return "\n".join(lines + [""] + [f"- {item}" for item in result["skipped"]]) + "\n"
