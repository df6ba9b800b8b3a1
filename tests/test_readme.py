"""The README's Python example runs, prints what it says, and its scores equal an independent reference."""
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1, "the README has one Python block: test any new one here"
    return blocks[0]


def test_readme_example_matches_the_numpy_reference_backend(tmp_path, monkeypatch, capsys):
    """Run in-process, then the NumPy backend in float64 on the same trained weights (hand-written
    gradients: an independent implementation) gives the same scores."""
    pytest.importorskip("sklearn", reason="the example uses scikit-learn's digits")
    pytest.importorskip("torch", reason="the example uses PyTorch")
    from test_docs import _mlp_reference_scores, _relative_error

    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    exec(compile(_example(), "README.md[python]", "exec"), namespace)  # noqa: S102
    trak, models = namespace["trak"], namespace["models"]
    weights = [[p.detach().numpy() for p in (m.hidden.weight, m.hidden.bias, m.out.weight, m.out.bias)]
               for m in models]
    n = namespace
    reference = _mlp_reference_scores(weights, n["x_train"].numpy(), n["y_train"].numpy(), n["x_test"].numpy(),
                                      n["y_test"].numpy(), 1024, [float(v) for v in trak.lambdas])
    shape, top = capsys.readouterr().out.strip().split(" [")  # what it prints
    assert shape == "(500, 10)"
    assert [int(i) for i in top.rstrip("]").split(",")] == n["scores"].argmax(0)[:5].tolist()
    scores = n["scores"].numpy()
    assert scores.shape == (500, 10)
    assert _relative_error(scores.astype(np.float64), np.asarray(reference)) < 1e-3
