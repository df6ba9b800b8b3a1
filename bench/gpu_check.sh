#!/usr/bin/env bash
# One call on a GPU machine (nothing installed from the network): the conformance suite on the GPU ids,
# the CuPy tests and quickstart, the quick benchmark suite on the GPU ids, and the projection benchmark; writes a JSON + Markdown report. At most 8.5 minutes (three timeouts), usually 2-3.
#   bash bench/gpu_check.sh [REPORT_DIR]      (default: $OUT if set, else gpu_report/)
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-${OUT:-gpu_report}}
mkdir -p "$report"
export PYTHONPATH="$PWD:$PWD/backends${PYTHONPATH:+:$PYTHONPATH}"
{
  echo "# trak-core GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  python - <<'PY'
import importlib
for name in ("numpy", "torch", "jax", "cupy", "array_api_compat"):
    try:
        print(f"{name}: {importlib.import_module(name).__version__}")
    except Exception as exc:
        print(f"{name}: not available ({type(exc).__name__})")
PY
} > "$report/versions.txt" 2>&1
timeout 200 python -m pytest -q -rs -p no:cacheprovider tests/conformance tests/test_cupy_backend.py tests/test_docs.py \
  -k "cuda or gpu or cupy" --junitxml="$report/tests.xml" > "$report/tests.txt" 2>&1
tests_rc=$?
timeout 150 python bench/gpu_projection.py --json "$report/projection.json" > "$report/projection.txt" 2>&1
bench_rc=$?
if python -c "import pytest_benchmark" 2>/dev/null; then   # the suite of bench/ on the GPU ids (JSON for bench/tables.py)
  timeout 150 python -m pytest bench --quick -q -p no:cacheprovider --bench-ids torch:cuda,jax:gpu,cupy \
    --benchmark-json "$report/bench_quick.json" > "$report/bench_quick.txt" 2>&1
else
  echo "pytest-benchmark is not installed here: bench/ suite not run (carry its wheel)" > "$report/bench_quick.txt"
fi
python - "$report" "$tests_rc" "$bench_rc" <<'PY'
import json, pathlib, sys
report, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lines = [report.joinpath("versions.txt").read_text(), "",
         f"tests (exit {tests_rc}): " + report.joinpath("tests.txt").read_text().strip().splitlines()[-1]]
bench = report / "projection.json"
if bench.exists():
    b = json.loads(bench.read_text())
    lines += [f"projection p={b['p']} k={b['k']} batch={b['batch']} float32 (TF32 off):",
              f"  fused {b['fused_s']*1e3:.1f} ms ({b['fused_tflops']:.1f} TFLOP/s), materialized matmul "
              f"{b['materialized_s']*1e3:.1f} ms, generate-then-matmul {b['generate_then_matmul_s']*1e3:.1f} ms",
              f"  fused / materialized throughput: {b['fused_over_materialized']:.2f} (target >= 0.70); "
              f"fused vs generate-then-matmul: {b['fused_over_generate']:.1f}x; extra memory {b['fused_extra_bytes']} B"]
else:
    lines.append(f"projection benchmark failed (exit {bench_rc}): see projection.txt")
lines.append("bench suite (quick, GPU ids): " + report.joinpath("bench_quick.txt").read_text().strip().splitlines()[-1])
(report / "report.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
