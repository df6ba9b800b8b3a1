"""pytest-benchmark configuration of the trak-core benchmark suite.

    python -m pytest bench --quick        # CI: one small size per case, JSON in bench/results/quick.json
    python -m pytest bench                # full size grid, JSON in bench/results/full.json
    python -m pytest bench --bench-ids torch:cpu,jax:cpu --benchmark-json out.json
    python -m pytest bench --quick --benchmark-disable   # CI too: every case once, untimed, results checked

Every case is parametrized over the installed ``backend:device`` ids of :data:`_harness.BENCH_IDS`
(a missing framework or GPU skips with the reason) and over the size grid of the mode. Each case
warms up untimed (jit compilation, projection cache) and synchronizes the device inside the timed
call. Ratios of paired cases (ours vs a baseline measured in the same run) are added to the JSON
under ``"trak_core"``, with the load average before and after the run, and printed at the end. Under
``--benchmark-disable`` each case runs its computation once, untimed (``benchmark.stats`` is None), still checks
the result, and no JSON report is written (the last timed run's report stays as it was).
"""
from __future__ import annotations

import importlib.metadata
import os
import pathlib
import sys
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _harness import BENCH_IDS, SIZES, target  # noqa: E402
from _report import load_average  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("trak-core benchmarks")
    group.addoption("--quick", action="store_true", help="one small size per case (what CI runs, < 2 min)")
    group.addoption("--bench-ids", default=",".join(BENCH_IDS),
                    help=f"comma-separated backend:device ids to time (default: {','.join(BENCH_IDS)})")


def _mode(config: pytest.Config) -> str:
    return "quick" if config.getoption("quick") else "full"


def _disabled(config: pytest.Config) -> bool:
    """Whether pytest-benchmark runs the cases untimed (``--benchmark-disable`` without ``--benchmark-enable``)."""
    option = config.option
    return bool(getattr(option, "benchmark_disable", False)) and not getattr(option, "benchmark_enable", False)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config._trak_core_load_before = load_average()  # a shared machine's timings are read against its load
    if _disabled(config):
        return  # nothing is timed: leave the JSON report of the last timed run alone
    if getattr(config.option, "benchmark_json", "absent") is None:  # always write a JSON report
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{_mode(config)}.json"
        # pytest-benchmark < 5.3 takes an open binary file here, 5.3 and later a path (written only when something
        # was timed). The file goes to a temporary name, moved over the report at the end only if it was written:
        # a run where every case skips (GPU ids on a CPU) keeps the last report instead of truncating it
        version = tuple(int(v) for v in importlib.metadata.version("pytest-benchmark").split(".")[:2])
        if version >= (5, 3):
            config.option.benchmark_json = path
        else:
            partial = path.with_name(path.name + ".part")
            config.option.benchmark_json = open(partial, "wb")  # noqa: SIM115
            config._trak_core_json = (config.option.benchmark_json, partial, path)


def pytest_unconfigure(config: pytest.Config) -> None:
    pending = getattr(config, "_trak_core_json", None)
    if pending is not None:
        handle, partial, path = pending
        handle.close()
        if partial.stat().st_size:
            os.replace(partial, path)
        else:
            partial.unlink()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_target" in metafunc.fixturenames:
        ids = [i.strip() for i in metafunc.config.getoption("bench_ids").split(",") if i.strip()]
        unknown = sorted(set(ids) - set(BENCH_IDS))
        if unknown:
            raise pytest.UsageError(f"unknown --bench-ids {unknown}; choose from {list(BENCH_IDS)}")
        metafunc.parametrize("bench_target", ids, indirect=True)
    if "size" in metafunc.fixturenames:
        sizes = SIZES[_mode(metafunc.config)][metafunc.module.CASE]
        metafunc.parametrize("size", sizes, ids=[str(s).replace(" ", "") for s in sizes])


@pytest.fixture(scope="session")
def _targets() -> dict:
    return {}


@pytest.fixture
def bench_target(request: pytest.FixtureRequest, _targets: dict):
    """The :class:`_harness.Target` of the parametrized id (built once per session), or a skip."""
    case_id = request.param
    if case_id not in _targets:
        try:
            _targets[case_id] = target(case_id)
        except LookupError as reason:
            _targets[case_id] = str(reason)
    if isinstance(_targets[case_id], str):
        pytest.skip(_targets[case_id])
    return _targets[case_id]


def ratios(benchmarks: list[dict]) -> list[dict]:
    """``ours / baseline`` mean-time ratios of every pair sharing a ``pair`` key in ``extra_info``."""
    pairs: dict[str, dict[str, dict]] = {}
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "pair" in info:
            pairs.setdefault(info["pair"], {})[info["role"]] = bench
    out = []
    for key, roles in sorted(pairs.items()):
        if "ours" in roles and "baseline" in roles:
            ours, base = roles["ours"]["stats"]["mean"], roles["baseline"]["stats"]["mean"]
            out.append(dict(pair=key, ours_s=ours, baseline_s=base, time_ratio=ours / base,
                            baseline=roles["baseline"]["extra_info"].get("what", "baseline")))
    return out


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    output_json["trak_core"] = dict(mode=_mode(config), load_before=getattr(config, "_trak_core_load_before", "?"),
                                    load_after=load_average(), ratios=ratios(output_json["benchmarks"]))
    config._trak_core_ratios = output_json["trak_core"]["ratios"]
    config._trak_core_json_written = True


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    found = getattr(config, "_trak_core_ratios", None)
    if found:
        terminalreporter.section("trak-core: ours / baseline time (below 1 is faster)")
        terminalreporter.write_line(f"load average {getattr(config, '_trak_core_load_before', '?')} before the run, "
                                    f"{load_average()} after; mean times of the rounds")
        for r in found:
            terminalreporter.write_line(f"{r['pair']:<48} {r['time_ratio']:6.2f}x  ({r['ours_s'] * 1e3:.2f} ms "
                                        f"vs {r['baseline_s'] * 1e3:.2f} ms {r['baseline']})")
    path = getattr(config.option, "benchmark_json", None)
    given = hasattr(path, "write")  # --benchmark-json FILE on pytest-benchmark < 5.3: opened (emptied) at parsing
    path = path.name if given else path  # an open file's name (on 5.3 and later a path: its .name is the basename)
    pending = getattr(config, "_trak_core_json", None)
    if pending is not None:
        path, given = pending[2], False
    if path is not None and getattr(config, "_trak_core_json_written", False):
        terminalreporter.write_line(f"JSON report: {path}")
    elif path is not None and given:
        terminalreporter.write_line(f"no JSON report: nothing was timed, and {path} is empty (pytest-benchmark "
                                    "before 5.3 opens a --benchmark-json file before the run; leave the option out "
                                    "to keep the last report in bench/results/)")
    elif path is not None:
        terminalreporter.write_line(f"no JSON report: nothing was timed, {_kept(path)}")
    elif _disabled(config):
        terminalreporter.write_line(f"no JSON report (--benchmark-disable: nothing was timed), "
                                    f"{_kept(RESULTS / f'{_mode(config)}.json')}")


def _kept(path: Any) -> str:
    """What became of the report at ``path`` that this run did not write: kept, or there was none to keep (the
    message said "left as it was" of a file that did not exist)."""
    if pathlib.Path(path).exists():
        return f"so {path} is left as it was"
    return f"and there is no earlier report: {path} does not exist"
