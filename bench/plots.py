"""Benchmark JSON -> PNG charts for the docs.

    python bench/plots.py --bench docs/bench/harness_cpu.json --peers docs/bench/peers.json --out docs/img

Charts (each written only when its input has the data):

- ``featurize_vs_p.png``: featurize throughput (examples/s) against the parameter count p, one
  line per ``backend:device`` id, at the largest k the run has for every p;
- ``featurize_vs_k.png``: the same against k at a fixed p;
- ``projection_ratio.png``: time of trak-core's projection over a matmul with a materialized matrix;
- ``lds_vs_checkpoints.png``: LDS on the digits task against the number of checkpoints, per library.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections import defaultdict
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _featurize(bench: dict) -> list[dict]:
    return [dict(b["extra_info"], mean=b["stats"]["mean"]) for b in bench["benchmarks"]
            if b["extra_info"].get("case") == "featurize"]


def _save(fig: Any, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def featurize_fixed(rows: list[dict], fixed: str) -> int | None:
    """The value of ``fixed`` ("p" or "k") that :func:`featurize_lines` holds fixed: the most common (then the
    largest) among ``rows``; ``None`` without rows."""
    counts: dict[int, int] = defaultdict(int)
    for r in rows:
        counts[r[fixed]] += 1
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def featurize_lines(rows: list[dict], along: str, fixed: str) -> dict[str, list[tuple[int, float]]]:
    """``{id: [(x, examples/s), ...]}`` along ``along`` ("p" or "k") at the most common value of ``fixed``."""
    value = featurize_fixed(rows, fixed)
    if value is None:
        return {}
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r[fixed] == value:
            lines[r["id"]].append((r[along], r["n"] / r["mean"]))
    return {k: sorted(v) for k, v in lines.items() if len(v) > 1}


def plot_featurize(bench: dict, out: pathlib.Path) -> list[pathlib.Path]:
    rows, made = _featurize(bench), []
    for along, fixed, label in (("p", "k", "parameters p"), ("k", "p", "projection dimension k")):
        lines = featurize_lines(rows, along, fixed)
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for backend_id, points in sorted(lines.items()):
            ax.plot(*zip(*points), marker="o", label=backend_id)
        fixed_value = featurize_fixed(rows, fixed)  # was the first row's: p=2,410 titled a k chart at 9,610
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="featurize throughput (examples/s)",
               title=f"featurize, {rows[0]['n']} examples, {fixed} fixed ({fixed}={fixed_value:,})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        made.append(_save(fig, out / f"featurize_vs_{along}.png"))
    return made


def plot_projection(bench: dict, out: pathlib.Path) -> list[pathlib.Path]:
    ratios = bench.get("trak_core", {}).get("ratios", [])
    infos = {b["extra_info"]["pair"]: b["extra_info"] for b in bench["benchmarks"] if "pair" in b["extra_info"]}
    lines: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in ratios:
        info = infos[r["pair"]]
        lines[(info["id"], info["k"])].append((info["p"], r["time_ratio"]))
    lines = {key: sorted(v) for key, v in lines.items() if len(v) > 1}
    if not lines:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for (backend_id, k), points in sorted(lines.items()):
        ax.plot(*zip(*points), marker="o", label=f"{backend_id}, k={k}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="parameters p", ylabel="time: trak-core / materialized matmul",
           title="projection cost relative to a matmul with P in memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return [_save(fig, out / "projection_ratio.png")]


def plot_peers(peers: dict | list, out: pathlib.Path) -> list[pathlib.Path]:
    rows = peers["rows"] if isinstance(peers, dict) else peers
    lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        if r.get("lds") is not None:
            lines[f"{r['library']} ({r.get('settings', '')})"].append((r["M"], r["lds"], r.get("sem") or 0.0))
    if not lines:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in sorted(lines.items()):
        m, lds, sem = zip(*sorted(points))
        ax.errorbar(m, lds, yerr=sem, marker="o", capsize=3, label=name)
    ax.set(xlabel="checkpoints M", ylabel="LDS (digits MLP, 100 targets)", title="LDS vs number of checkpoints")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return [_save(fig, out / "lds_vs_checkpoints.png")]


def main(argv: list[str] | None = None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", help="pytest-benchmark JSON (python -m pytest bench --benchmark-json ...)")
    parser.add_argument("--peers", help="JSON of bench/peers.py")
    parser.add_argument("--out", default="docs/img")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made: list[pathlib.Path] = []
    if args.bench:
        bench = json.loads(pathlib.Path(args.bench).read_text())
        made += plot_featurize(bench, out) + plot_projection(bench, out)
    if args.peers:
        made += plot_peers(json.loads(pathlib.Path(args.peers).read_text()), out)
    for path in made:
        print(path)
    if not made:  # a --quick report (one size per case) made no chart, and said nothing
        print(f"no chart written to {out}: each needs two or more sizes of one backend:device id along p or k (a full "
              "`python -m pytest bench` report, not --quick) or rows with an LDS (--peers)", file=sys.stderr)
    return made


if __name__ == "__main__":
    main()
