"""A reduced ``trak-core compare``: every installed backend within the conformance tolerances."""
import pytest

pytest.importorskip("sklearn", reason="compare uses scikit-learn's bundled digits")

from trak_core import cli, compare  # noqa: E402


def test_compare_backends_agree(capsys):
    rows = compare.main(["--n-train", "200", "--n-targets", "20", "--hidden", "16", "--proj-dim", "256"])
    out = capsys.readouterr().out
    assert "within tolerance" in out and "pairwise relative error" in out
    assert {r["backend"] for r in rows} >= {"numpy"}
    for row in rows:
        assert row["pass"], row
        assert row["error"] <= (1e-9 if row["dtype"] == "float64" else 1e-4)


def test_cli_usage_and_dispatch(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main([])
    assert stop.value.code == 2 and "trak-core {demo,compare,store}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", "--help"])
    assert stop.value.code == 0 and "--proj-dim" in capsys.readouterr().out


def test_compare_exits_1_when_a_backend_is_outside_tolerance(monkeypatch, capsys):
    rows = [dict(backend="numpy", dtype="float64", **{"pass": True}), dict(backend="jax", dtype="float32",
                                                                          **{"pass": False})]
    monkeypatch.setattr(compare, "main", lambda argv, prog: rows)
    with pytest.raises(SystemExit) as stop:  # it exited 0 with a "NO" row: scripts could not tell
        cli.main(["compare"])
    assert stop.value.code == 1 and "outside tolerance: jax float32" in capsys.readouterr().err
    rows[1]["pass"] = True
    assert cli.main(["compare"]) is None


def test_a_framework_whose_import_fails_is_left_out_and_said(monkeypatch, capsys):
    """An installed framework whose import raised ended the whole comparison with a traceback."""
    runners = compare._runners()

    def broken(*args):
        raise ImportError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(compare, "_runners", lambda: {"numpy": runners["numpy"], "jax": broken})
    rows = compare.main(["--n-train", "60", "--n-targets", "5", "--hidden", "8", "--proj-dim", "32",
                         "--checkpoints", "1"])
    out = capsys.readouterr().out
    assert {row["backend"] for row in rows} == {"numpy"}
    assert "jax: not compared, importing it failed (ImportError: libcudart.so.13" in out


def test_the_timed_run_of_jax_does_not_compile(monkeypatch):
    """The warm-up ran at 50 rows and k = 64, so JAX's timed run compiled again (6.5 s against 1.9 s after)."""
    pytest.importorskip("jax", reason="JAX is not installed: its compilation is not exercised")
    import trak_jax

    counts, runners = [], compare._runners()

    def counted(*args):
        before = trak_jax.backend.compilations  # TRAK(backend="jax") uses this instance
        out = runners["jax"](*args)
        counts.append(trak_jax.backend.compilations - before)
        return out

    monkeypatch.setattr(compare, "_runners", lambda: {"numpy": runners["numpy"], "jax": counted})
    compare.main(["--n-train", "300", "--n-targets", "5", "--hidden", "8", "--proj-dim", "32", "--checkpoints", "2"])
    assert len(counts) == 4 and counts[1] == counts[3] == 0  # float64, float32: warm-up, then a timed run


def test_the_output_names_the_machine_versions_threads_and_load(monkeypatch, capsys):
    """The benchmark rule: a comparison users run states the machine, the versions, the threads and the load
    (compare printed seconds with none of them)."""
    import importlib.metadata
    import platform
    import re

    runners = compare._runners()
    monkeypatch.setattr(compare, "_runners", lambda: {"numpy": runners["numpy"]})  # the line, not the backends
    rows = compare.main(["--n-train", "60", "--n-targets", "5", "--hidden", "8", "--proj-dim", "32",
                         "--checkpoints", "1"])
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("machine: ")]
    assert f"python {platform.python_version()}" in line
    for name in ("numpy", "torch", "jax"):
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            assert f" {name} " not in line
            continue
        assert f"{name} {version}" in line, name
    assert re.search(r"threads: usable_cores \d+", line)
    loads = re.search(r"load average (\S+) (\S+) (\S+) before, (\S+) (\S+) (\S+) after$", line)
    assert loads, line
    assert all(float(v) >= 0 for v in loads.groups())
    machine = rows[0]["machine"]
    assert machine["versions"]["numpy"] == importlib.metadata.version("numpy") and machine["cores"] >= 1
