"""A non-editable install holds what the source tree has: CI installs with ``pip install -e``, which reads the tree
itself and so hides a module, a subpackage or a data file (CuPy's ``kernel.cu``) that a built wheel would lack."""
from __future__ import annotations

import configparser
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("trak_core", "backends/trak_torch", "backends/trak_jax", "backends/trak_cupy")


def _source_files() -> set[str]:
    """The files a wheel must hold, named as in the wheel (``trak_torch/...``, not ``backends/trak_torch/...``)."""
    found = set()
    for package in PACKAGES:
        base = (ROOT / package).parent
        for path in (ROOT / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".cu"):
                found.add(path.relative_to(base).as_posix())
    return found


def test_a_built_wheel_holds_every_module_data_file_and_entry_point(tmp_path):
    if importlib.util.find_spec("setuptools") is None:  # the test extra installs it
        pytest.skip("setuptools is not installed: the wheel is not built (no build isolation in tests)")
    tree = tmp_path / "tree"  # a copy: building in the checkout would write build/ and *.egg-info there
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "-w", str(tmp_path / "dist"), str(tree)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if "deprecated" in out.stderr:  # setuptools gives a date after which such builds stop working
        warnings.warn(f"building the wheel warns of a deprecation: {out.stderr[-1500:]}", UserWarning)
    wheel, = (tmp_path / "dist").glob("trak_core-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
                                 .decode())
    expected = _source_files()
    assert len(expected) > 80 and "trak_cupy/kernel.cu" in expected
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert dict(entry_points["trak_core.backends"]) == {
        "numpy": "trak_core.backends.numpy_backend:backend", "torch": "trak_torch:backend",
        "jax": "trak_jax:backend", "cupy": "trak_cupy:backend"}
    assert entry_points["console_scripts"]["trak-core"] == "trak_core.cli:main"
