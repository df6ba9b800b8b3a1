"""Every error trak-core raises on purpose derives from TrakCoreError and keeps its built-in base."""
import ast
import pathlib

import numpy as np
import pytest

import trak_core
from trak_core import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUILTIN = {"ValueError", "TypeError", "ImportError", "OSError", "PermissionError", "KeyError", "IndexError",
           "FileExistsError", "FileNotFoundError", "LookupError", "ArithmeticError", "Exception"}


def _raises_of_builtins(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            if node.exc.func.id in BUILTIN:
                yield f"{path.relative_to(ROOT)}:{node.lineno}: raise {node.exc.func.id}(...)"


def test_no_builtin_exception_is_raised_directly():
    files = sorted((ROOT / "trak_core").rglob("*.py")) + sorted((ROOT / "backends").rglob("*.py"))
    assert len(files) > 30
    found = [hit for path in files for hit in _raises_of_builtins(path)]
    assert not found, "raise a trak_core.errors class instead:\n" + "\n".join(found)


def test_the_check_finds_a_builtin_raise(tmp_path):
    """The scan above is not vacuous: it flags a plain ValueError."""
    path = ROOT / "trak_core" / "_probe_for_test.py"
    try:
        path.write_text("def f():\n    raise ValueError('x')\n")
        assert list(_raises_of_builtins(path)) == ["trak_core/_probe_for_test.py:2: raise ValueError(...)"]
    finally:
        path.unlink()


@pytest.mark.parametrize("name,builtin", [("TrakValueError", ValueError), ("TrakTypeError", TypeError),
                                          ("TrakOSError", OSError), ("BackendError", ValueError),
                                          ("UnknownBackendError", ValueError), ("MissingFrameworkError", ImportError),
                                          ("StoreMismatchError", ValueError), ("StoreDamagedError", ValueError)])
def test_hierarchy(name, builtin):
    cls = getattr(trak_core, name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, trak_core.TrakCoreError) and issubclass(cls, builtin)


def test_user_errors_are_caught_by_the_base():
    model = trak_core.MLP(3, 2, 2)
    x, y = np.zeros((4, 3)), np.zeros(4, dtype=int)
    for bad in (lambda: trak_core.TRAK(model, proj_dim=0),
                lambda: trak_core.TRAK(model, backend="no-such-backend"),
                lambda: trak_core.TRAK(model).featurize(model.init(), (x, y)),
                lambda: trak_core.TRAK(model, proj_dim=4).score([(x, y)]),
                lambda: trak_core.project(np.zeros(3), 4),
                lambda: trak_core.TRAK(model, task="ranking")):
        with pytest.raises(trak_core.TrakCoreError):
            bad()
