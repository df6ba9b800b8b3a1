"""What a partial install meets: a feature whose extra is missing says which package and which extra.

CI installs every extra at once, so the missing package is simulated here (``sys.modules[name] = None`` makes
``import name`` raise ImportError), with whatever else the feature needs installed.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

import trak_core
from trak_core.errors import MissingFrameworkError


def _data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 5)), rng.integers(0, 3, size=24)
    return trak_core.MLP(5, 6, 3), x, y


def test_featurize_with_ray_missing_names_ray_and_its_extra(tmp_path, monkeypatch):
    """executor="ray" with zarr installed and Ray not: the featurize step raised a bare
    ``ModuleNotFoundError: No module named 'ray'`` (an ``import ray`` ran before the check that names the extra)."""
    pytest.importorskip("zarr", reason="zarr is not installed: the Ray executor's store cannot be made")
    monkeypatch.setitem(sys.modules, "ray", None)
    model, x, y = _data()
    trak = trak_core.TRAK(model, proj_dim=8, executor="ray", store=str(tmp_path / "store"), progress=False)
    with pytest.raises(MissingFrameworkError, match=r'executor="ray" needs Ray: pip install ray zarr .*\.\[ray\]'):
        trak.featurize(model.init(seed=0), [(x, y)])


def test_scoring_with_ray_missing_names_ray_and_its_extra(tmp_path, monkeypatch):
    """A store featurized in one process, reopened with executor="ray" where Ray is missing."""
    pytest.importorskip("zarr", reason="zarr is not installed: no on-disk store to reopen")
    model, x, y = _data()
    checkpoints = [model.init(seed=s) for s in range(2)]
    trak = trak_core.TRAK(model, proj_dim=8, store=str(tmp_path / "store"), progress=False)
    for checkpoint in checkpoints:
        trak.featurize(checkpoint, [(x, y)])
    monkeypatch.setitem(sys.modules, "ray", None)
    reopened = trak_core.TRAK.open(str(tmp_path / "store"), model, checkpoints, executor="ray", progress=False)
    with pytest.raises(MissingFrameworkError, match=r'executor="ray" needs Ray: .*\.\[ray\]'):
        reopened.score([(x[:3], y[:3])])


def test_an_on_disk_store_with_zarr_missing_names_the_store_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "zarr", None)
    model, _, _ = _data()
    with pytest.raises(MissingFrameworkError, match=r'on-disk stores need zarr .*pip install zarr .*\.\[store\]'):
        trak_core.TRAK(model, proj_dim=8, store=str(tmp_path / "store"), progress=False)


def test_compare_with_scikit_learn_missing_names_compare_and_the_demo_extra(monkeypatch):
    """``trak-core compare`` without scikit-learn said "the demo needs scikit-learn ...": the user ran compare."""
    from trak_core import cli

    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "--n-train", "50", "--n-targets", "5"])
    assert info.value.code == ('trak-core compare needs scikit-learn for its bundled digits: pip install '
                               'scikit-learn (or, in a trak-core checkout, pip install -e ".[demo]")')


@pytest.mark.parametrize("name,hint", [
    ("torch", 'pip install torch (or, in a trak-core checkout, pip install -e ".[torch]"); a bare torch may be a '
              "multi-GB CUDA build: for a CPU-only or a given CUDA version's wheel, install torch first with the "
              "command from https://pytorch.org/get-started/locally/"),
    ("jax", 'pip install jax (or, in a trak-core checkout, pip install -e ".[jax]"); that is JAX for CPU: for an '
            'NVIDIA GPU, pip install "jax[cuda12]" (or "jax[cuda13]"; see '
            "https://docs.jax.dev/en/latest/installation.html)"),
    ("cupy", 'pip install cupy-cuda12x (or cupy-cuda13x) (or, in a trak-core checkout, pip install -e ".[cupy]"); '
             "take the CuPy of your CUDA driver's major version (nvidia-smi shows it): \".[cupy-cuda12]\" or "
             '".[cupy-cuda13]" in a checkout'),
])
def test_a_missing_framework_says_which_build_a_bare_install_gets(name, hint, monkeypatch):
    """A missing torch was answered with a bare ``pip install torch`` (a multi-GB CUDA build on Linux, where a CPU
    one was wanted), a missing jax with ``pip install jax`` (CPU only, where a GPU one may be wanted)."""
    from trak_core.backends import registry

    monkeypatch.setattr(registry, "_importable", lambda module: module is None or module.split(".")[0] != name)
    monkeypatch.setattr(registry, "_loaded", {})
    with pytest.raises(MissingFrameworkError) as info:
        registry.get_backend(name)
    assert str(info.value).endswith(f"install it with: {hint}")
    assert "trak-core[" not in str(info.value)  # trak-core is not on PyPI


# What each third-party import of a documented example needs: one of these extras (pyproject.toml).
EXTRAS_OF = {"sklearn": {"demo", "test"}, "matplotlib": {"demo", "test"}, "scipy": {"demo", "test"},
             "torch": {"torch"}, "jax": {"jax"}, "cupy": {"cupy", "cupy-cuda12", "cupy-cuda13"},
             "transformers": {"huggingface", "test"}, "zarr": {"store", "ray", "test"}, "ray": {"ray", "test"}}
OURS = {"trak_core", "trak_torch", "trak_jax", "trak_cupy", "numpy", "array_api_compat"}  # the core's own


def _pages():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    return [root / "README.md", root / "docs" / "index.md"] + sorted((root / "docs" / "quickstart").glob("*.md"))


def test_each_examples_install_line_brings_what_it_imports():
    """A reader installs the extras of the install line above an example (the last ``pip install -e ".[...]"``
    before it that is not the test/CI set) and runs it: every third-party module it imports is in those extras.
    The README's and docs/index.md's torch examples load scikit-learn's digits, which the ``torch`` extra lacks (the
    README's only install line was CI's, every extra); the CuPy quickstart loaded scikit-learn's breast cancer data
    after ``pip install -e ".[cupy]"``."""
    import re

    problems = []
    for page in _pages():
        text = page.read_text()
        for block in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            lines = [set(m.group(1).split(",")) for m in re.finditer(r'pip install -e "\.\[([a-z0-9,-]+)\]"',
                                                                     text[:block.start()])]
            lines = [extras for extras in lines if "test" not in extras]
            modules = {m.split(".")[0] for m in re.findall(r"^(?:from|import) ([\w.]+)", block.group(1), re.M)}
            modules = {m for m in modules - OURS if m not in sys.stdlib_module_names}
            if modules and not lines:
                problems.append(f"{page.name}: an example imports {sorted(modules)} with no install line above it "
                                "but the test/CI set")
                continue
            extras = lines[-1] if lines else set()
            for module in sorted(modules):
                assert module in EXTRAS_OF, f"{page.name}: add {module!r} to EXTRAS_OF (which extra brings it?)"
                if not EXTRAS_OF[module] & extras:
                    problems.append(f"{page.name}: imports {module} after installing [{','.join(sorted(extras))}]")
    assert not problems, problems
