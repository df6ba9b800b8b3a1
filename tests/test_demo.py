"""A reduced run of the README's main command, end to end, on each installed backend."""
import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the demo needs scikit-learn's bundled digits")
pytest.importorskip("matplotlib", reason="the demo draws its PNG with matplotlib")

from trak_core import demo  # noqa: E402


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_reduced_demo(backend, tmp_path, capsys):
    if backend == "torch":
        pytest.importorskip("torch", reason="PyTorch is not installed")
    png = tmp_path / "demo.png"
    args = ["--backend", backend, "--n-train", "400", "--n-targets", "30", "--checkpoints", "3",
            "--subsets", "40", "--proj-dim", "512", "--png", str(png), "--quiet"]
    first = demo.main(args)
    out = capsys.readouterr().out
    assert "TRAK, 3 checkpoints" in out and "retrain for LDS" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert f"saved the figure to {png.resolve()}" in out  # where the PNG went, as an absolute path
    assert first["accuracy"] > 0.85
    lds = {k: v.mean for k, v in first["lds"].items()}
    # the ensemble beats one checkpoint, and TRAK beats the gradient-dot baseline
    assert lds["TRAK, 3 checkpoints"] > lds["TRAK, 1 checkpoint"]
    assert lds["TRAK, 3 checkpoints"] > lds["gradient dot"]
    again = list(args)
    again[again.index("--subsets") + 1] = "3"  # the scores do not depend on the LDS subsets: retrain fewer
    second = demo.main(again)  # seeded: the same scores again
    np.testing.assert_array_equal(second["scores"]["gradient dot"], first["scores"]["gradient dot"])
    np.testing.assert_array_equal(second["scores"]["TRAK, 3 checkpoints"], first["scores"]["TRAK, 3 checkpoints"])


def test_figure_panels_name_true_and_predicted_classes_and_the_extreme_scores():
    from trak_core.demo.figure import panels

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 15))
    y_train, y_targets, predicted = rng.integers(0, 10, 50), rng.integers(0, 10, 15), rng.integers(0, 10, 15)
    shown = panels(scores, y_train, y_targets, predicted)
    assert len(shown) == 12  # a grid of at least 10 targets
    for j, panel in enumerate(shown):
        assert panel["proponent"] == int(np.argmax(scores[:, j])) and panel["opponent"] == int(np.argmin(scores[:, j]))
        assert panel["titles"][0] == f"test #{j}\ntrue {y_targets[j]}, predicted {predicted[j]}"
        assert f"label {y_train[panel['proponent']]}" in panel["titles"][1]


def test_one_checkpoint_is_one_trak_row(tmp_path, capsys):
    png = tmp_path / "one.png"
    result = demo.main(["--backend", "numpy", "--n-train", "60", "--n-targets", "5", "--checkpoints", "1",
                        "--subsets", "3", "--proj-dim", "32", "--png", str(png), "--quiet"])
    out = capsys.readouterr().out
    assert list(result["scores"]) == list(result["lds"]) == ["TRAK, 1 checkpoint", "gradient dot"]
    assert "1 checkpoints" not in out and png.read_bytes()[:4] == b"\x89PNG"  # the figure shows the one model


def test_the_figure_path_printed_is_the_file_written_and_bad_ones_fail_before_training(tmp_path, capsys):
    """``--png noext`` wrote ``noext.png`` but printed ``noext``; a folder wrote ``folder.png`` beside it; ``.xyz``
    failed after all the training."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: the figure is not exercised")
    small = ["--backend", "numpy", "--n-train", "60", "--n-targets", "3", "--checkpoints", "1", "--subsets", "3",
             "--proj-dim", "16", "--quiet"]
    demo.main(small + ["--png", str(tmp_path / "noext")])
    out = capsys.readouterr().out
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "noext").exists()
    assert f"saved the figure to {tmp_path / 'noext.png'}:" in out
    for bad, said in ((str(tmp_path), "is a folder"), (str(tmp_path) + "/", "is a folder"),
                      (str(tmp_path / "fig.xyz"), "cannot write .xyz files")):
        with pytest.raises(SystemExit):
            demo.main(small + ["--png", bad])
        assert said in capsys.readouterr().err


def test_the_saved_figure_is_said_to_show_the_targets_it_shows(tmp_path, capsys):
    """With ``--n-targets 2`` the figure holds 2 test digits (``figure.panels``, the independent count) and the demo
    said "12 test digits"."""
    from trak_core.demo.figure import panels

    png = tmp_path / "two.png"
    result = demo.main(["--backend", "numpy", "--n-train", "40", "--n-targets", "2", "--checkpoints", "1",
                        "--subsets", "3", "--proj-dim", "16", "--png", str(png), "--quiet"])
    out = capsys.readouterr().out
    scores = result["scores"]["TRAK, 1 checkpoint"]
    drawn = len(panels(scores, np.zeros(40, int), np.zeros(2, int), result["predicted"]))
    assert drawn == 2 and f"saved the figure to {png}: 2 test digits (true and predicted" in out
