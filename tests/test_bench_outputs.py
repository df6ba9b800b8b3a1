"""What the benchmark scripts write, and where: a user's run never overwrites the tables the docs show, a run that
measured nothing leaves the last results alone, and every script has --help (a benchmark user's audit)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(path: pathlib.Path, name: str):
    sys.path.insert(0, str(path.parent))
    sys.path.insert(0, str(BENCH / "quality"))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(path.parent))
        sys.path.remove(str(BENCH / "quality"))


@pytest.fixture
def peers(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="bench/peers.py's tasks use scikit-learn's digits")
    module = _load(BENCH / "peers.py", "bench_peers_outputs")
    monkeypatch.setattr(module, "HERE", tmp_path / "bench")  # docs/bench and bench/results under tmp_path
    monkeypatch.setattr(module, "machine", lambda: {})
    written = {}
    monkeypatch.setattr(module, "write_json", lambda data, path: written.setdefault("json", (path, data)))
    monkeypatch.setattr(module, "markdown", lambda rows, facts, k, batch, task, command=None:
                        (written.setdefault("command", command), "table")[1])
    return module, written


def test_a_run_that_measured_nothing_writes_nothing(peers, monkeypatch, capsys):
    module, written = peers
    monkeypatch.setattr(module, "measure", lambda *args: [])  # every library missing or failed
    with pytest.raises(SystemExit) as stop:
        module.main(["--task", "digits-mlp-1m", "--ms", "1", "--libraries", "traker"])
    assert stop.value.code == 1 and written == {}  # was: an empty table over docs/bench/peers.md
    assert "nothing was measured" in capsys.readouterr().err


def test_only_the_default_run_writes_the_docs_tables(peers, monkeypatch, tmp_path):
    module, written = peers
    monkeypatch.setattr(module, "measure", lambda *args: [{"id": "trak-core"}])
    module.main(["--task", "digits-mlp-1m", "--ms", "1", "--libraries", "trak-core"])
    path, data = written["json"]
    assert pathlib.Path(path) == tmp_path / "bench" / "results" / "peers.json" and data["rows"] == [{"id": "trak-core"}]
    assert (tmp_path / "bench" / "results" / "peers.md").read_text() == "table"
    assert written["command"] == "python bench/peers.py --task digits-mlp-1m --ms 1 --libraries trak-core"
    assert not (tmp_path / "docs").exists()


def test_report_and_tables_have_help_and_the_timing_header_counts_checkpoints(tmp_path):
    for script in (BENCH / "tables.py", BENCH / "quality" / "report.py"):
        run = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "usage:" in run.stdout, run.stderr[-500:]  # was FileNotFoundError: '--help'
    report = _load(BENCH / "quality" / "report.py", "bench_quality_report")
    data = {"summary": [], "timing": [dict(task="t", k=8, checkpoints=1, featurize_s=2.0, choose_lambda_s=0.01)]}
    (tmp_path / "q.json").write_text(json.dumps(data))
    assert "| task | k | featurize (1 checkpoint) |" in report.main(str(tmp_path / "q.json"))  # was "10 checkpoints"


def test_memory_store_shows_the_childs_error(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()  # zarr made to look absent in the measuring process
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['zarr'] = None\n")
    env = {"PYTHONPATH": f"{shim}:{ROOT}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(BENCH / "memory_store.py"), "--sizes", "64"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode != 0
    assert "pip install zarr" in run.stderr and "CalledProcessError" not in run.stderr, run.stderr[-800:]


def test_a_benchmark_run_where_every_case_skips_keeps_the_last_report(tmp_path):
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    report = results / "quick.json"
    before = report.read_bytes() if report.exists() else None
    if before is None:
        report.write_text('{"benchmarks": [], "sentinel": true}')
    kept = report.read_bytes()
    try:  # GPU ids on a CPU machine: nothing is timed (was: quick.json truncated to 0 bytes, "JSON report: ...")
        run = subprocess.run([sys.executable, "-m", "pytest", "bench", "--quick", "--bench-ids", "torch:cuda", "-q",
                              "-p", "no:cacheprovider", "-p", "no:randomly"], cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode in (0, 5), run.stdout[-2000:]
        if "no GPU for torch:cuda" in run.stdout or "skipped" in run.stdout:
            assert report.read_bytes() == kept
            assert "left as it was" in run.stdout and not (results / "quick.json.part").exists()
    finally:
        if before is None:
            report.unlink()


def test_the_ground_truth_cache_key_names_labels_and_the_training_recipe():
    """The key of the retrained models' outputs held the task's inputs only: a task with every label flipped, or
    another learning rate, read the old outputs (off by up to 57 in an audit)."""
    import numpy as np

    ground_truth = _load(BENCH / "quality" / "ground_truth.py", "quality_ground_truth")

    def recipe(lr):
        def train(x, y, seed):
            return lr * seed

        return train

    def outputs(checkpoint, x, y):
        return np.zeros(len(y))

    x, y = np.arange(12.0).reshape(6, 2), np.array([0, 1, 0, 1, 0, 1])
    task = SimpleNamespace(name="toy", x=x, y=y, xt=x[:2], yt=y[:2], train=recipe(0.1), outputs=outputs)
    key = ground_truth._key(task, 8, 0)
    assert key == ground_truth._key(SimpleNamespace(**{**vars(task), "train": recipe(0.1)}), 8, 0)  # same recipe
    assert key != ground_truth._key(SimpleNamespace(**{**vars(task), "y": 1 - y}), 8, 0)
    assert key != ground_truth._key(SimpleNamespace(**{**vars(task), "yt": 1 - y[:2]}), 8, 0)
    assert key != ground_truth._key(SimpleNamespace(**{**vars(task), "train": recipe(0.2)}), 8, 0)
    assert key.startswith("toy-S8-seed0-")
