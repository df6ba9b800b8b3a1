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
    assert stop.value.code == 2 and "trak-core {demo,compare}" in capsys.readouterr().out
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
