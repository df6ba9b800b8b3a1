"""The benchmark report tools: ratios, tables and plot data from a hand-written pytest-benchmark JSON."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def _bench(case, mean, **info):
    return {"extra_info": dict(case=case, **info), "stats": {"mean": mean}}


SAMPLE = {"benchmarks": [
    _bench("projection", 0.003, id="numpy", p=4096, k=512, n=64, role="ours", pair="projection numpy p=4096 k=512"),
    _bench("projection", 0.002, id="numpy", p=4096, k=512, n=64, role="baseline", pair="projection numpy p=4096 k=512",
           what="matmul"),
    _bench("featurize", 0.5, id="numpy", p=2410, k=2048, n=1000),
    _bench("featurize", 2.0, id="numpy", p=9610, k=2048, n=1000),
    _bench("featurize", 0.25, id="torch:cpu", p=2410, k=2048, n=1000),
    _bench("featurize", 1.0, id="torch:cpu", p=9610, k=2048, n=1000),
    _bench("featurize", 4.0, id="torch:cpu", p=9610, k=8192, n=1000),
]}


def test_ratios_are_ours_over_baseline():
    conftest = _load("conftest")
    (ratio,) = conftest.ratios(SAMPLE["benchmarks"])
    assert ratio["time_ratio"] == pytest.approx(1.5)
    assert ratio["baseline"] == "matmul"


def test_featurize_lines_are_examples_per_second():
    pytest.importorskip("matplotlib", reason="matplotlib not installed: bench/plots.py not exercised")
    plots = _load("plots")
    lines = plots.featurize_lines([dict(b["extra_info"], mean=b["stats"]["mean"]) for b in SAMPLE["benchmarks"]
                                   if b["extra_info"]["case"] == "featurize"], "p", "k")
    assert lines == {"numpy": [(2410, 2000.0), (9610, 500.0)], "torch:cpu": [(2410, 4000.0), (9610, 1000.0)]}


def test_plots_and_tables_are_written(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: bench/plots.py not exercised")
    import json

    plots, tables = _load("plots"), _load("tables")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(dict(SAMPLE, trak_core={"mode": "full", "ratios": _load("conftest").ratios(
        SAMPLE["benchmarks"])})))
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"rows": [dict(library="trak-core", settings="k=2048", M=m, lds=0.6 + m / 100, sem=0.01)
                                          for m in (1, 5)]}))
    made = plots.main(["--bench", str(path), "--peers", str(peers), "--out", str(tmp_path / "img")])
    assert sorted(p.name for p in made) == ["featurize_vs_k.png", "featurize_vs_p.png", "lds_vs_checkpoints.png"]
    assert all(p.stat().st_size > 5000 for p in made)
    text = tables.tables(json.loads(path.read_text()))
    assert "| 2,410 | 2,048 | 500.0 ms (2,000/s) | 250.0 ms (4,000/s) |" in text
    assert "| projection numpy p=4096 k=512 | 3.0 ms | 2.0 ms | 1.50 |" in text
