"""The layering rules of DESIGN.md, checked by reading every import statement with ``ast``.

Packages: the core ``trak_core`` and the plugins ``trak_torch``, ``trak_jax``, ``trak_cupy``
(``backends/``). Every ``import`` and ``from ... import`` is read, at module level or inside a
function, as are ``importlib.import_module("...")`` and ``__import__("...")`` with a literal name.

1. The core never imports a plugin (it finds backends through the registry's entry points).
2. A plugin never imports another plugin.
3. Nothing outside a package imports its private parts: a module path with a component that starts
   with ``_`` (other than dunders such as ``__init__``), e.g. ``trak_core._split`` or
   ``from trak_core.projection import _shared``, may be imported only from inside that package.
   The plugins (``backends/``) and the code of the documentation (``README.md``, ``docs/**.md``,
   ``backends/README.md``) are held to it. ``tests/`` and ``bench/`` are exempt: they are white-box
   (they check and time private pieces on purpose).

Also here: ``import trak_core.compare`` (and the conformance cases) must not need pytest.
"""
from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE = "trak_core"
PLUGINS = ("trak_torch", "trak_jax", "trak_cupy")
PACKAGES = (CORE, *PLUGINS)
WHITE_BOX = ("tests", "bench")
_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _module_name(path: pathlib.Path) -> tuple[str, bool]:
    """Dotted module name of a package file and whether it is a package ``__init__``."""
    rel = path.relative_to(ROOT / "backends" if path.parts[len(ROOT.parts)] == "backends" else ROOT)
    parts = list(rel.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """Absolute module of ``from <node.module> import ...`` written in ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(source: str, module: str = "", is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, dotted target)`` of every import in ``source``; ``from a import b`` gives ``a.b``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            found += [(node.lineno, base if alias.name == "*" else f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _private(target: str) -> bool:
    return any(part.startswith("_") and not (part.startswith("__") and part.endswith("__"))
               for part in target.split(".")[1:])


def violations(owner: str, target: str) -> list[str]:
    """The rules ``owner`` (a package, ``tests``, ``bench`` or ``docs``) breaks by importing ``target``."""
    top = target.split(".")[0]
    broken = []
    if owner == CORE and top in PLUGINS:
        broken.append("the core imports a plugin")
    if owner in PLUGINS and top in PLUGINS and top != owner:
        broken.append("a plugin imports another plugin")
    if top in PACKAGES and top != owner and owner not in WHITE_BOX and _private(target):
        broken.append(f"a private part of {top} imported from outside it")
    return broken


def _sources() -> list[tuple[str, str, list[tuple[int, str]]]]:
    """``(owner, file, imports)`` for every Python file and documentation code block of the repository."""
    out = []
    for path in sorted((ROOT / CORE).rglob("*.py")):
        out.append((CORE, path, imports(path.read_text(), *_module_name(path))))
    for plugin in PLUGINS:
        for path in sorted((ROOT / "backends" / plugin).rglob("*.py")):
            out.append((plugin, path, imports(path.read_text(), *_module_name(path))))
    for folder in WHITE_BOX:
        for path in sorted((ROOT / folder).rglob("*.py")):
            out.append((folder, path, imports(path.read_text())))
    pages = [ROOT / "README.md", ROOT / "backends" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for path in pages:
        for block in _FENCE.findall(path.read_text()):
            out.append(("docs", path, imports(block)))
    return [(owner, str(path.relative_to(ROOT)), found) for owner, path, found in out]


def _broken(rule: str) -> list[str]:
    return [f"{file}:{line}: {target} ({owner})" for owner, file, found in _sources() for line, target in found
            if any(rule in v for v in violations(owner, target))]


def test_the_sources_are_all_read():
    owners = {owner for owner, _, found in _sources() if found}
    assert owners >= {CORE, *PLUGINS, "tests", "bench", "docs"}


def test_the_core_never_imports_a_plugin():
    assert _broken("the core imports a plugin") == []


def test_plugins_never_import_each_other():
    assert _broken("a plugin imports another plugin") == []


def test_no_private_module_is_imported_across_packages():
    assert _broken("a private part") == []


@pytest.mark.parametrize("owner, source, module, expected", [
    (CORE, "def f():\n    import trak_jax\n", "trak_core.compare", "the core imports a plugin"),
    (CORE, "from trak_torch.backend import TorchBackend\n", "trak_core.x", "the core imports a plugin"),
    (CORE, "import importlib\nimportlib.import_module('trak_cupy')\n", "trak_core.x", "the core imports a plugin"),
    ("trak_torch", "from trak_cupy import projection\n", "trak_torch.backend", "a plugin imports another plugin"),
    ("trak_cupy", "from trak_core import _hash\n", "trak_cupy.projection", "a private part"),
    ("trak_jax", "from trak_core.projection import _shared\n", "trak_jax.backend", "a private part"),
    ("trak_jax", "import trak_core._split as s\n", "trak_jax.backend", "a private part"),
    ("docs", "from trak_core.backends.numpy_backend import _grads\n", "", "a private part"),
])
def test_the_checker_catches_each_rule(owner, source, module, expected):
    found = [v for _, target in imports(source, module) for v in violations(owner, target)]
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("owner, source, module", [
    (CORE, "from ._split import split_project\nfrom . import hashing\n", "trak_core.projection"),
    (CORE, "from .._namespace import namespace\n", "trak_core.testing.suite"),
    ("trak_cupy", "from trak_core import hashing\nfrom .backend import CupyBackend\n", "trak_cupy"),
    ("trak_jax", "from trak_core import __version__\n", "trak_jax.backend"),
    ("tests", "from trak_core._split import split_parts\nimport trak_jax\n", ""),
    ("bench", "from trak_core.projection import _shared\n", ""),
])
def test_the_checker_allows_what_the_rules_allow(owner, source, module):
    is_package = module.count(".") == 0 and bool(module)
    assert [v for _, target in imports(source, module, is_package) for v in violations(owner, target)] == []


def test_relative_imports_resolve_to_their_package():
    assert imports("from .. import _cache\n", "trak_core.testing.suite") == [(1, "trak_core._cache")]
    assert imports("from . import canonical\n", "trak_core.testing", is_package=True) == [
        (1, "trak_core.testing.canonical")]


def test_compare_and_the_conformance_cases_import_without_pytest():
    code = ("import sys\n"
            "sys.modules['pytest'] = sys.modules['_pytest'] = None  # unimportable\n"
            "import trak_core.compare, trak_core.testing.cases, trak_core.testing.canonical\n"
            "import trak_core.testing\n"
            "try:\n"
            "    trak_core.testing.test_conformance_scores\n"
            "except ImportError:\n"
            "    print('suite needs pytest')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "suite needs pytest"


def test_the_suite_is_collected_through_the_package():
    import trak_core.testing as testing
    from trak_core.testing import suite

    assert testing.__all__ == suite.__all__
    namespace: dict = {}
    exec("from trak_core.testing import *", namespace)
    assert all(namespace[name] is getattr(suite, name) for name in suite.__all__)
