"""The benchmark report tools: ratios, tables and plot data from a hand-written pytest-benchmark JSON."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from tests_helpers import load_bench

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    return load_bench(name, "bench")


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


def _gpu_peers():
    pytest.importorskip("torch", reason="torch not installed: bench/gpu_peers.py not exercised")
    return _load("gpu_peers")


def test_gpu_peers_reference_is_the_float64_product_with_the_exact_matrix():
    import numpy as np
    import torch

    import trak_core

    peers = _gpu_peers()
    rows = peers.make_grads(3, 1000, seed=7, device="cpu")
    ref, matrix = peers.reference(rows, 64, seed=5, checkpoint=2, materialize=True, block_bytes=64 * 4 * 96)  # 11 blocks
    exact = trak_core.projection_matrix(1000, 64, seed=5, checkpoint=2, dtype=np.float64)
    expected = rows.double().numpy() @ exact
    np.testing.assert_allclose(ref.numpy(), expected, rtol=1e-12, atol=1e-13)
    assert torch.equal(matrix, torch.from_numpy(exact.astype(np.float32)))  # +-1/8: exact in float32
    noisy = ref + 1e-3 * torch.from_numpy(np.random.default_rng(0).standard_normal(tuple(ref.shape)))
    mine = np.linalg.norm(noisy.numpy() - expected) / np.linalg.norm(expected)
    assert peers.relative_error(noisy.float(), ref) == pytest.approx(mine, rel=1e-4)  # float32 out: ~1e-7 relative


def test_gpu_peers_correlations_and_local_resnet18():
    import numpy as np

    peers = _gpu_peers()
    a = np.random.default_rng(0).standard_normal((50, 4))
    assert peers.correlations(a, 3 * a + 1) == pytest.approx(dict(pearson=1.0, spearman_mean_over_targets=1.0))
    assert peers.correlations(a, -a) == pytest.approx(dict(pearson=-1.0, spearman_mean_over_targets=-1.0))
    assert sum(t.numel() for t in peers.resnet18(10).parameters()) == 11_181_642  # torchvision's resnet18(num_classes=10)


def test_gpu_peers_small_runs_on_a_cpu_and_its_errors_are_right(tmp_path):
    import inspect
    import json

    import numpy as np

    import trak_core

    peers = _gpu_peers()
    path, md = tmp_path / "peers.json", tmp_path / "peers.md"
    result = peers.main(["--small", "--device", "cpu", "--json", str(path), "--md", str(md)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert result["skipped"] == [] and result["fast_jl"] == "skipped: fast_jl needs a CUDA device"
    for case in result["projection"]:
        methods = {m["method"]: m for m in case["methods"]}
        assert methods[peers.FASTJL]["status"] == "skipped: fast_jl needs a CUDA device"
        assert methods[peers.MATMUL]["status"] == "ok" and methods[peers.MATMUL]["rel_error"] < 1e-5
        float32 = methods["trak-core project precision=float32"]
        assert float32["status"] == "ok" and float32["rel_error"] < 1e-5 and float32["float32_grade"]
        assert methods["trak-core torch backend.project"]["rel_error"] < 1e-5
    # the first size's error, recomputed here against NumPy's float64 product with the exact matrix
    n, p, k = peers.SMALL["projection"][0]
    grads = peers.make_grads(n, p, seed=0, device="cpu")
    extra = {"precision": "float32"} if "precision" in inspect.signature(trak_core.project).parameters else {}
    out = trak_core.project(grads, k, seed=0, checkpoint=0, **extra)[:4].double().numpy()
    expected = grads[:4].double().numpy() @ trak_core.projection_matrix(p, k, seed=0, checkpoint=0, dtype=np.float64)
    first = {m["method"]: m for m in result["projection"][0]["methods"]}["trak-core project precision=float32"]
    assert first["rel_error"] == pytest.approx(np.linalg.norm(out - expected) / np.linalg.norm(expected), rel=1e-3)
    e2e = result["end_to_end"]
    assert e2e["params"] == sum(t.numel() for t in peers.resnet18(10, 4).parameters())
    assert e2e["trak_core"]["featurize_examples_per_s"] == pytest.approx(64 / e2e["trak_core"]["featurize_s"])
    if "ratios" in e2e:  # traker installed: it ran on the CPU with its BasicProjector
        assert e2e["traker"]["projector"] == "BasicProjector"
        assert e2e["ratios"]["featurize_speedup"] == pytest.approx(e2e["traker"]["featurize_s"]
                                                                   / e2e["trak_core"]["featurize_s"])
        assert e2e["correlation"]["pearson"] > 0.5  # same scores up to the projections' randomness
    assert "| trak_core |" in md.read_text() and "skipped: fast_jl needs a CUDA device" in md.read_text()
    parts = e2e["trak_core"]["breakdown"]  # the phases timed apart: the torch backend's own chunk rule on a CPU
    assert parts["chunk_rows"] == min(256, 256 * 2**20 // (4 * e2e["params"])) and parts["projection_peak_bytes"] is None
    assert 0 < parts["gradients_s"] and 0 < parts["projection_s"]
    assert parts["per_example"] == "closed form"  # ResNet-18: convolutions, batch norms and a linear head
    assert "(closed form, one backward pass per batch)" in md.read_text()


def test_gpu_scripts_parse():
    import subprocess

    for script in ("gpu_check.sh", "gpu_prepare.sh"):
        subprocess.run(["bash", "-n", str(BENCH / script)], check=True)


def test_gpu_check_says_up_front_whether_a_gpu_is_visible(tmp_path):
    """On a machine with no GPU, gpu_check.sh never said so: each GPU step failed with a reason of its own. Its first
    report line now comes from bench/_gpu_visible.sh, run here alone with stand-ins for nvidia-smi and Python."""
    import os
    import subprocess

    script = (BENCH / "gpu_check.sh").read_text()
    assert 'bash bench/_gpu_visible.sh "$py"' in script
    assert script.index("bench/_gpu_visible.sh") < script.index("step tests")  # before the first step

    def stub(name, text, status=0):
        path = tmp_path / "bin" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"#!/bin/sh\necho '{text}'\nexit {status}\n")
        path.chmod(0o755)
        return str(path)

    plain = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
             if d and not os.path.exists(os.path.join(d, "nvidia-smi"))]  # this machine's nvidia-smi left out

    def visible(python, nvidia_smi=None):
        if nvidia_smi is None:
            (tmp_path / "bin" / "nvidia-smi").unlink(missing_ok=True)
        else:
            stub("nvidia-smi", *nvidia_smi)
        env = dict(os.environ, PATH=os.pathsep.join([str(tmp_path / "bin"), *plain]))
        run = subprocess.run(["bash", str(BENCH / "_gpu_visible.sh"), python], capture_output=True, text=True,
                             timeout=120, env=env)
        return run.returncode, run.stdout.strip()

    no_cuda = stub("py_no_cuda", "False 2.9.0+cpu")
    rc, line = visible(no_cuda)
    assert rc == 1 and line.startswith("NO GPU VISIBLE: no nvidia-smi on PATH; torch 2.9.0+cpu sees no CUDA device")
    assert "GPU steps below will fail" in line
    rc, line = visible(stub("py_no_torch", "", 1))
    assert rc == 1 and "no nvidia-smi on PATH; torch not importable" in line, line
    failing = ("NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver", 9)
    rc, line = visible(no_cuda, failing)
    assert rc == 1 and "NO GPU VISIBLE: nvidia-smi -L lists none (exit 9: NVIDIA-SMI has failed" in line, line
    rc, line = visible(no_cuda, ("GPU 0: NVIDIA H200 (UUID: GPU-0)",))
    assert rc == 0 and line == "GPU visible: 1 listed by nvidia-smi -L, the first: GPU 0: NVIDIA H200 (UUID: GPU-0)"
    rc, line = visible(stub("py_cuda", "True 2.9.0+cu128"))
    assert rc == 0 and line.startswith("GPU visible: torch 2.9.0+cu128 sees a CUDA device (no nvidia-smi on PATH)")


def test_text_vs_traker_quick_agreement(tmp_path):
    """bench/text_vs_traker.py --quick, part (a): tiny BERT, no projection, same ridge; traker's scores are
    trak-core's float64 exact scores times one factor per checkpoint, which the script also predicts.

    How close they can be: traker stores features in float32 and inverts ``K`` in float32, so its
    scores carry a relative error of order ``cond(K) * 2**-24``, whatever the estimator. Here cond(K)
    is about 60 (the bound is 3.8e-6; measured 9e-7); a fixed 1e-6 would hold only by luck of the
    conditioning. Asserted: the bound ``cond(K) * 2**-24`` (measured errors are 0.1 to 0.25 of it)."""
    import json

    pytest.importorskip("torch", reason="torch not installed: bench/text_vs_traker.py not exercised")
    pytest.importorskip("transformers", reason="transformers not installed: bench/text_vs_traker.py not exercised")
    pytest.importorskip("trak", reason="traker not installed (pip install traker): part (a) not exercised")
    bench = _load("text_vs_traker")
    path = tmp_path / "text.json"
    result = bench.main(["--quick", "--only", "agreement", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    (row,) = result["rows"]
    assert row["part"] == "agreement" and row["checkpoints"] == 1 and row["n_train"] == 64
    assert row["params"] == 3346 and row["lambda_traker"] == pytest.approx(row["lambda_trak_core"] / 3346)
    (c,) = row["per_checkpoint"]
    assert row["pearson"] > 0.99 and c["pearson"] > 1 - 1e-9
    assert c["rel_error_fitted"] <= c["cond_K_times_u32"] and c["rel_error_fitted"] < 1e-5
    assert c["rel_error_predicted"] <= c["cond_K_times_u32"]  # the factor predicted from trak-core's features
    assert c["predicted_scale"] == pytest.approx(c["fitted_scale"], rel=1e-5)
    assert row["rel_error_fitted"] <= row["max_cond_K_times_u32"]


def test_triton_sweep_runs_in_the_interpreter(tmp_path):
    """bench/triton_sweep.py on a CPU (Triton's interpreter, in its own process): the plans that ran give the
    default plan's numbers to float32 rounding, and the Markdown table lists every plan."""
    import json
    import subprocess

    for name in ("torch", "triton"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed: bench/triton_sweep.py not exercised")
    path = tmp_path / "sweep.json"
    out = subprocess.run([sys.executable, str(BENCH / "triton_sweep.py"), "--small", "--device", "cpu", "--budget", "4",
                          "--json", str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(path.read_text())["rows"]
    sweep = _load("triton_sweep")
    from trak_core import _triton

    distinct = [len({tuple(sorted(_triton.launch_plan(n, p, k, 4, **options).items())) for options in sweep.PLANS})
                for n, p, k in sweep.SIZES["small"]]  # plans equal to the default at a size are timed once
    assert len(rows) == sum(distinct) + len(distinct) and min(distinct) >= len(sweep.PLANS) - 3
    ran = [r for r in rows if r["status"] == "ok"]
    assert ran and ran[0]["options"] == {} and ran[0]["max_rel_diff"] == 0.0
    assert all(r.get("max_rel_diff", 0.0) < 1e-6 for r in ran)
    assert all(r["status"] in ("ok", "skipped: time budget spent") for r in rows)
    assert out.stdout.count("\n| ") == len(rows) + 1  # the header and one line per plan


def test_closed_form_speed_small_run(tmp_path):
    """bench/closed_form_speed.py on narrow models: both take the closed form, whose gradients equal vmap's,
    and the reported ratio is the ratio of the reported rates."""
    import json

    pytest.importorskip("torch", reason="torch not installed: bench/closed_form_speed.py not exercised")
    speed = _load("closed_form_speed")
    path = tmp_path / "closed.json"
    result = speed.main(["--small", "--batch", "4", "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    rows = {name: row for name, row in result.items() if name != "machine"}
    assert "resnet18-width8" in rows
    for row in rows.values():
        assert row["closed_form_used"] and row["batch"] == 4 and row["max_rel_difference"] < 1e-5
        assert row["speedup"] == pytest.approx(row["closed_form_examples_per_s"] / row["vmap_examples_per_s"])


def test_kronecker_speed_exits_1_when_a_row_failed(tmp_path):
    # the GPU check reads the exit status: a run whose every child failed (here: CUDA asked of a CPU-only torch, or
    # no torch at all) said "ok" before
    import subprocess

    pytest.importorskip("transformers", reason="transformers is not installed: bench/kronecker_speed.py needs it")
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the child would not fail")
    out = subprocess.run([sys.executable, str(BENCH / "kronecker_speed.py"), "--quick", "--only", "gpt2", "--device",
                          "cuda", "--kinds", "kronecker", "--json", str(tmp_path / "k.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "failed rows: gpt2 kronecker" in out.stderr
    rows = __import__("json").loads((tmp_path / "k.json").read_text())["rows"]
    assert [row["model"] for row in rows if "error" in row] == ["gpt2"]


@pytest.mark.parametrize("command, said", [
    (["closed_form_speed.py", "--small", "--only", "foo"], "no model's name starts with ['foo']"),
    (["kronecker_speed.py", "--quick", "--kinds", "foo"], "choose from kronecker, rademacher"),
    (["gpu_projection.py"], "cupy is not installed here"),
])
def test_bench_scripts_refuse_what_they_cannot_run_at_once(command, said):
    """An unknown --only measured nothing and exited 0; an unknown --kinds was a KeyError traceback; the CuPy
    script without CuPy a bare ModuleNotFoundError."""
    import subprocess

    if command[0] == "gpu_projection.py" and importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed here: the script would run")
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: the bench scripts are not exercised")
    out = subprocess.run([sys.executable, str(BENCH / command[0]), *command[1:]], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and said in out.stderr, out.stderr[-2000:]


def test_reports_go_to_folders_made_for_them(tmp_path):
    """A missing --md or --json folder failed after all the measuring."""
    report = _load("_report")
    path = tmp_path / "new" / "deeper" / "out.json"
    assert report.write_json({"a": 1}, str(path)) == {"a": 1}
    assert path.read_text().startswith("{")


def test_the_traker_projected_agreement_in_the_docs_is_what_its_command_measures(tmp_path):
    """docs/traker.md gave "Pearson 0.994, each 0.997 against exact" with no setting; an audit got at most 0.989.
    The page now names the command and the figures it measured; seed 0 of that command is rerun here."""
    import json
    import re

    pytest.importorskip("torch", reason="torch not installed: bench/traker_projected.py not exercised")
    pytest.importorskip("sklearn", reason="the digits come with scikit-learn")
    page = (BENCH.parent / "docs" / "traker.md").read_text()
    command = "python bench/traker_projected.py --hidden 16 --n-train 300 --seeds 0 1 2"
    assert command in " ".join(page.split()) and "0.994 at k" not in page
    pytest.importorskip("trak", reason="traker not installed (pip install traker): the figures not remeasured")
    path = tmp_path / "tp.json"
    result = _load("traker_projected").main(["--hidden", "16", "--n-train", "300", "--seeds", "0", "--json",
                                             str(path)])
    assert json.loads(path.read_text())["p"] == result["p"] == 1210 and result["k"] == 2048
    assert re.search(r"lambda of the exact features, 91\.45", " ".join(page.split()))
    assert f"{result['lambda_reg']:.4g}" == "91.45"
    (row,) = result["rows"]
    assert 0.973 - 2e-3 <= row["trak_core_vs_traker"] <= 0.974 + 2e-3, row  # the page: 0.973 to 0.974
    assert 0.987 - 2e-3 <= row["trak_core_vs_exact"] <= 0.987 + 2e-3, row  # 0.987
    assert 0.986 - 2e-3 <= row["traker_vs_exact"] <= 0.987 + 2e-3, row  # 0.986 to 0.987
    assert result["machine"]["load_average"] != "" and "numpy" in result["machine"]["versions"]
