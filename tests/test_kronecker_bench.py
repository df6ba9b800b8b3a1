"""The factorized-projection benchmarks run end to end in ``--quick`` mode and report consistent figures.

``bench/kronecker_speed.py`` (kronecker vs dense on a tiny GPT-2, ResNet and ViT) and ``bench/logra_peers.py``
(trak-core vs dattri's LoGra on a small MLP and a tiny nanoGPT) are started together, each in its own
interpreter (they start one child process per configuration), with one torch thread per child.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"

pytest.importorskip("torch")
pytest.importorskip("transformers")


def _start(script: str, out: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH / script), "--quick", "--threads", "1", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: pathlib.Path) -> dict:
    try:
        log, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        pytest.fail(f"{proc.args[1]} --quick timed out:\n{log[-3000:]}")
    assert proc.returncode == 0, log[-3000:]
    result = json.loads(out.read_text())
    assert result["mode"] == "quick"
    for row in result["rows"]:
        assert "error" not in row, row["error"]
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("kronecker_bench")
    runs = {"kronecker_speed": _start("kronecker_speed.py", tmp / "kronecker_speed.json")}
    if importlib.util.find_spec("dattri") is not None:
        runs["logra_peers"] = _start("logra_peers.py", tmp / "logra_peers.json")
    return {name: _finish(proc, tmp / f"{name}.json") for name, proc in runs.items()}


def test_kronecker_speed_quick(results):
    result = results["kronecker_speed"]
    rows = {(row["model"], row["kind"]): row for row in result["rows"]}
    assert set(rows) == {(m, k) for m in ("gpt2", "resnet18", "vit") for k in ("kronecker", "rademacher")}
    for row in rows.values():
        assert row["examples_per_s"] > 0
        assert row["peak_rss_mib"] >= row["model_rss_mib"] > 0
    assert {s["model"] for s in result["summary"]} == {"gpt2", "resnet18", "vit"}
    assert rows[("vit", "kronecker")]["layers"] == 2 + 4 * 2  # patches, head; per block: attention in and out, MLP
    for s in result["summary"]:
        assert s["kronecker_examples_per_s"] == rows[(s["model"], "kronecker")]["examples_per_s"]
        assert s["rademacher_examples_per_s"] == rows[(s["model"], "rademacher")]["examples_per_s"]
        assert s["ratio"] == pytest.approx(s["kronecker_examples_per_s"] / s["rademacher_examples_per_s"], rel=1e-12)


def test_logra_peers_quick(results):
    if "logra_peers" not in results:
        pytest.skip("dattri is not installed")
    result = results["logra_peers"]
    rows = {(row["model"], row["library"]): row for row in result["rows"]}
    assert set(rows) == {(m, lib) for m in ("mlp", "gpt") for lib in ("trak_core", "dattri")}
    for row in rows.values():
        assert row["examples_per_s"] > 0
        assert row["peak_rss_mib"] > 0
    for s in result["summary"]:
        assert s["trak_core_proj_dim"] == s["dattri_proj_dim"]  # the same total k, the same per layer
        assert s["ratio"] == pytest.approx(s["trak_core_examples_per_s"] / s["dattri_examples_per_s"], rel=1e-12)
    agreement = next(s["agreement"] for s in result["summary"] if s["model"] == "mlp")
    assert agreement["pearson_trak_core_exact"] > 0 and agreement["pearson_dattri_exact"] > 0
