"""What the benchmark scripts report, checked as a user would: the chart titles name the sizes of their points, every
timing report states the load it ran under, and each ratio is recomputed here from the raw timings of the same run
(an audit of the benchmarking harness)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from tests_helpers import load_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    return load_bench(name, "bench_report")


def _env() -> dict:
    """This tree first on the path; no PYTEST_* variables of an xdist worker (under them pytest-benchmark disables
    itself in the child: "automatically disabled because xdist plugin is active", and times nothing)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    return dict(env, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "backends"),
                                                        os.environ.get("PYTHONPATH", "")]))


def _is_load(text) -> bool:
    """"1.93 4.47 3.88": three non-negative numbers."""
    parts = str(text).split()
    return len(parts) == 3 and all(float(v) >= 0 for v in parts)


def test_featurize_vs_k_chart_is_titled_with_the_p_of_its_points(tmp_path, monkeypatch):
    """The full grid's k chart is at p = 9,610 (the p with three k); its title said p=2,410, the first row's."""
    pytest.importorskip("matplotlib", reason="matplotlib not installed: bench/plots.py not exercised")
    plots = _load("plots")
    n = 1024
    grid = [(2410, 2048), (9610, 2048), (38410, 2048), (9610, 512), (9610, 8192)]  # the full grid's order
    rows = [dict(case="featurize", id="numpy", p=p, k=k, n=n, mean=0.001 * p * k / 2048) for p, k in grid]
    bench = {"benchmarks": [{"extra_info": {key: r[key] for key in ("case", "id", "p", "k", "n")},
                             "stats": {"mean": r["mean"]}} for r in rows]}
    titles = {}

    def keep(fig, path):
        ax = fig.axes[0]
        (line,) = ax.get_lines()
        titles[path.name] = (ax.get_title(), list(zip(line.get_xdata(), line.get_ydata())))
        return path

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_featurize(bench, tmp_path)
    title, points = titles["featurize_vs_k.png"]
    # the p of the plotted points, found from the rows by their (k, examples/s)
    (p,) = {r["p"] for r in rows for k, rate in points if r["k"] == k and r["n"] / r["mean"] == pytest.approx(rate)}
    assert p == 9610 and title.endswith(f"(p={p:,})"), title
    title, points = titles["featurize_vs_p.png"]
    assert {r["k"] for r in rows for p_, rate in points if r["p"] == p_ and r["n"] / r["mean"] == pytest.approx(rate)
            } == {2048} and title.endswith("(k=2,048)"), title


def test_plots_says_when_it_made_no_chart(tmp_path):
    """A --quick report (one size a case) made no chart and said nothing, exit status 0."""
    pytest.importorskip("matplotlib", reason="matplotlib not installed: bench/plots.py not exercised")
    report = tmp_path / "quick.json"
    report.write_text(json.dumps({"benchmarks": [{"extra_info": dict(case="featurize", id="numpy", p=2410, k=512,
                                                                     n=1024), "stats": {"mean": 0.1}}]}))
    out = subprocess.run([sys.executable, str(BENCH / "plots.py"), "--bench", str(report), "--out",
                          str(tmp_path / "img")], capture_output=True, text=True, timeout=120, env=_env())
    assert out.returncode == 0 and "no chart written" in out.stderr, out.stderr[-2000:]
    assert list((tmp_path / "img").iterdir()) == []


def test_benchmark_report_states_the_load_and_its_ratio_is_the_mean_rounds(tmp_path):
    """The suite's JSON named the machine but not its load; the ratio is recomputed from the raw rounds."""
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark not installed")
    path = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "bench_projection.py"), "--quick",
                          "--bench-ids", "numpy", "-p", "no:cacheprovider", "-q", "--benchmark-json", str(path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(path.read_text())
    facts = report["trak_core"]
    assert _is_load(facts["load_before"]) and _is_load(facts["load_after"]), facts
    assert "load average" in out.stdout
    rounds = {b["extra_info"]["role"]: b["stats"]["data"] for b in report["benchmarks"]}
    (ratio,) = facts["ratios"]
    assert ratio["time_ratio"] == pytest.approx(statistics.fmean(rounds["ours"]) / statistics.fmean(rounds["baseline"]))
    tables = _load("tables")
    assert f"load average {facts['load_before']} before" in tables.tables(report)


def test_peers_rows_carry_their_ratio_to_trak_core_and_the_run_its_load(tmp_path, monkeypatch):
    """peers.py's table had seconds but no ratio (the docs divided by hand) and no date or load."""
    pytest.importorskip("sklearn", reason="bench/peers.py's tasks use scikit-learn's digits")
    peers = _load("peers")
    rows = [dict(id=v, library=lib, version="1", settings="s", M=m, seconds=s, peak_rss_mb=500.0, import_rss_mb=300.0)
            for v, lib, m, s in (("trak-core", "trak-core", 1, 0.25), ("trak-core", "trak-core", 2, 0.5),
                                 ("traker-fp32", "traker", 1, 1.5), ("traker-fp32", "traker", 2, 3.5),
                                 ("dattri", "dattri", 5, 9.0))]
    monkeypatch.setattr(peers, "measure", lambda *args: [dict(r) for r in rows])
    monkeypatch.setattr(peers, "machine", lambda: dict(cpu="cpu", cores=2, python="3", torch="2", torch_threads=1))
    json_path, md_path = tmp_path / "p.json", tmp_path / "p.md"
    peers.main(["--task", "digits-mlp-1m", "--ms", "1", "2", "5", "--json", str(json_path), "--md", str(md_path)])
    data = json.loads(json_path.read_text())
    assert _is_load(data["machine"]["load_before"]) and _is_load(data["machine"]["load_after"])
    assert data["machine"]["date"][:2] == "20"
    ratios = {(r["id"], r["M"]): r.get("x_trak_core") for r in data["rows"]}
    assert ratios == {("trak-core", 1): 1.0, ("trak-core", 2): 1.0, ("traker-fp32", 1): 1.5 / 0.25,
                      ("traker-fp32", 2): 3.5 / 0.5, ("dattri", 5): None}  # no trak-core row at M = 5
    table = md_path.read_text()
    assert "| x trak-core |" in table and "| 6.00x |" in table and "| 7.00x |" in table
    assert f"load average {data['machine']['load_before']} before" in table


def test_jax_vs_torch_small_run_states_its_ratio_runs_and_load(tmp_path):
    """jax_vs_torch.py printed one ratio and nothing of the machine's load; --help had no word on its options."""
    pytest.importorskip("torch", reason="torch not installed")
    pytest.importorskip("jax", reason="jax not installed")
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn")
    help_text = subprocess.run([sys.executable, str(BENCH / "jax_vs_torch.py"), "--help"], capture_output=True,
                               text=True, timeout=120, env=_env()).stdout
    assert "(default: 128)" in help_text and "--repeats" in help_text
    path = tmp_path / "jt.json"
    out = subprocess.run([sys.executable, str(BENCH / "jax_vs_torch.py"), "--hidden", "8", "--n-train", "100",
                          "--batch", "50", "--checkpoints", "1", "--proj-dim", "64", "--repeats", "3", "--json",
                          str(path)], capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(path.read_text())
    assert len(result["torch_seconds"]) == len(result["jax_seconds"]) == 3
    examples = 100 * 1
    assert result["torch_examples_per_s"] == pytest.approx(examples / statistics.median(result["torch_seconds"]))
    assert result["jax_over_torch"] == pytest.approx(
        statistics.median([t / j for t, j in zip(result["torch_seconds"], result["jax_seconds"])]))
    assert _is_load(result["load_before"]) and _is_load(result["load_after"])
    assert result["jax_recompilations_after_warmup"] == 0
    assert f"{result['jax_over_torch']:.2f}x (above 1: JAX is faster" in out.stdout


def test_featurize_vs_traker_rows_name_versions_threads_and_load(tmp_path, monkeypatch):
    """The rows (and docs/bench/featurize_vs_traker_cpu.json) had threads but no date, versions or load, although the
    ratio moves 2.4x between one and two torch threads on a loaded machine."""
    pytest.importorskip("torch", reason="torch not installed")
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn")
    bench = _load("featurize_vs_traker")
    monkeypatch.setattr(bench, "SIZES", {"small": dict(hidden=[8], n_train=64, checkpoints=1)})
    (row,) = bench.main(["--only", "small", "--proj-dim", "32", "--batch", "32", "--json", str(tmp_path / "f.json")])
    assert _is_load(row["load_before"]) and _is_load(row["load_after"]) and row["date"][:2] == "20"
    assert row["versions"]["torch"] == importlib.metadata.version("torch")
    if importlib.util.find_spec("trak") is not None:
        assert row["versions"]["traker"] == importlib.metadata.version("traker")
        assert row["ratio_rademacher_vs_traker"] == pytest.approx(row["trak_core_rademacher_examples_per_s"]
                                                                  / row["traker_examples_per_s"])


@pytest.mark.parametrize("script", ["run.py", "select_lambda.py", "kronecker.py"])
def test_quality_scripts_refuse_an_unknown_task_at_once(script):
    """``--tasks foo`` was a KeyError traceback, after the tasks listed before it had run."""
    pytest.importorskip("sklearn", reason="bench/quality's tasks use scikit-learn's data")
    pytest.importorskip("torch", reason="bench/quality's tasks use torch")
    out = subprocess.run([sys.executable, str(BENCH / "quality" / script), "--tasks", "foo"], capture_output=True,
                         text=True, timeout=300, env=_env())
    assert out.returncode == 2 and "invalid choice: 'foo'" in out.stderr, out.stderr[-2000:]


def test_quality_run_writes_its_json_into_a_new_folder_and_its_lds_is_scipys(tmp_path, monkeypatch):
    """``--json new/folder/q.json`` failed after all the measuring (FileNotFoundError); the LDS it reports for
    trak-core's defaults is recomputed here with scipy's Spearman correlation from the same ground truth."""
    pytest.importorskip("sklearn", reason="bench/quality's tasks use scikit-learn's data")
    pytest.importorskip("torch", reason="bench/quality's tasks use torch")
    stats = pytest.importorskip("scipy.stats", reason="scipy gives the independent Spearman correlation")
    import numpy as np

    import trak_core

    run = _load("quality/run")
    monkeypatch.setattr(sys.modules["ground_truth"], "CACHE", tmp_path / "cache")  # not the repository's cache
    path = tmp_path / "new" / "folder" / "q.json"
    run.main(["--tasks", "synthetic-regression", "--ks", "16", "--ms", "1", "--subsets", "12", "--json", str(path)])
    data = json.loads(path.read_text())
    (row,) = [r for r in data["rows"] if r["method"] == "trak-core defaults"]
    task = sys.modules["tasks"].TASKS["synthetic-regression"]()
    masks, outputs = sys.modules["ground_truth"].ground_truth(task, 12)
    trak = trak_core.TRAK(task.model, task=task.task, proj_dim=16, backend=task.backend, seed=0, progress=False)
    trak.featurize(task.train(task.x, task.y, 0), [(task.x, task.y)])
    scores = np.asarray(trak.score([(task.xt, task.yt)]), dtype=np.float64)
    predicted = masks.astype(np.float64) @ scores
    rho = [stats.spearmanr(predicted[:, t], outputs[:, t])[0] for t in range(scores.shape[1])]
    assert row["lds"] == pytest.approx(float(np.mean(rho)), abs=1e-6)


def test_ground_truth_says_when_it_retrains(tmp_path, monkeypatch, capsys):
    """bench/peers.py's first run spent a silent minute retraining the ground truth's 128 models; a cached run says
    nothing, and reads back the same outputs."""
    pytest.importorskip("sklearn", reason="bench/quality's tasks use scikit-learn's data")
    module = _load("quality/ground_truth")
    monkeypatch.setattr(module, "CACHE", tmp_path / "cache")
    monkeypatch.syspath_prepend(str(BENCH / "quality"))
    task = importlib.import_module("tasks").TASKS["synthetic-regression"]()
    masks, outputs = module.ground_truth(task, 4)
    said = capsys.readouterr().err
    assert "retraining 4 models" in said and str(tmp_path / "cache") in said
    again = module.ground_truth(task, 4)
    assert capsys.readouterr().err == "" and (again[1] == outputs).all() and masks.sum(1).tolist() == [50] * 4


@pytest.mark.parametrize("earlier", [False, True], ids=["no-earlier-report", "earlier-report"])
def test_a_run_that_times_nothing_says_truly_what_became_of_the_report(tmp_path, earlier):
    """A run that timed nothing said "<mode>.json is left as it was" when there was no such file (and a
    --benchmark-disable run said nothing of it). The suite's conftest runs in a copy of bench/, so the report it
    speaks of is the copy's, never this tree's bench/results/."""
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark not installed")
    import shutil

    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("conftest.py", "_harness.py", "_report.py", "bench_projection.py"):
        shutil.copy(BENCH / name, bench / name)
    results = bench / "results"
    if earlier:
        results.mkdir()
        for mode in ("quick", "full"):
            (results / f"{mode}.json").write_text('{"benchmarks": [], "sentinel": "%s"}' % mode)
    runs = {"full": ["-k", "no_such_case"],  # nothing selected, so nothing timed
            "quick": ["--quick", "--bench-ids", "numpy", "--benchmark-disable"]}  # each case once, untimed
    for mode, options in runs.items():
        out = subprocess.run([sys.executable, "-m", "pytest", str(bench / "bench_projection.py"), "-q", "-p",
                              "no:xdist", "-p", "no:cacheprovider", "-p", "no:randomly", *options],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
        assert out.returncode in (0, 5), out.stdout[-2000:] + out.stderr[-2000:]
        report = results / f"{mode}.json"
        (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("no JSON report")]
        assert str(report) in line, line
        if earlier:
            assert line.endswith(f"so {report} is left as it was"), line
            assert report.read_text() == '{"benchmarks": [], "sentinel": "%s"}' % mode
        else:
            assert "left as it was" not in line and line.endswith(f"{report} does not exist"), line
            assert not report.exists()
