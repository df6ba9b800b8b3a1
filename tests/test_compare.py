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
