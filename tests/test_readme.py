"""The README's Python example runs and gives a (n_train, n_targets) score matrix."""
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    pytest.importorskip("sklearn", reason="the example uses scikit-learn's digits")
    pytest.importorskip("torch", reason="the example uses PyTorch")
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    shape, top = out.stdout.strip().split(" [")
    assert shape == "(500, 10)"
    assert len([int(i) for i in top.rstrip("]").split(",")]) == 5
