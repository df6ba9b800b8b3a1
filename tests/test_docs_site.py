"""The documentation site: it builds strictly and quietly, renders no raw Sphinx roles, and every API
object the Markdown names exists."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROLES = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|ref):(?:`|<code>)")  # raw, or rendered
NAME = re.compile(r"`((?:trak_core|trak_torch|trak_jax|trak_cupy)(?:\.[A-Za-z_]\w*)+)")


def _pages() -> list[pathlib.Path]:
    return [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").rglob("*.md") if "bench" not in p.parts)


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except (ImportError, ValueError):
            continue
        obj = importlib.import_module(module)
        try:
            for attribute in parts[cut:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            return False
        return True
    return False


def test_every_api_object_named_in_the_docs_exists():
    """Dotted names in code spans (``trak_core.project``, ``trak_torch.kronecker``...) and ``:::`` entries."""
    named = set()
    for page in _pages():
        text = page.read_text()
        named |= set(NAME.findall(text)) | set(re.findall(r"^::: ([\w.]+)", text, re.M))
    needs = {"trak_cupy": "cupy"}
    missing = [n for n in sorted(named) if not (n.split(".")[0] in needs and importlib.util.find_spec("cupy") is None
                                               and n.count(".") > 1) and not _resolve(n)]
    assert len(named) >= 40 and not missing, f"names in the docs that do not exist: {missing}"


def test_site_builds_strictly_without_warnings_or_sphinx_roles(tmp_path):
    pytest.importorskip("mkdocs", reason="MkDocs is not installed (the docs extra): site not built")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not installed: site not built")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    noise = [line for line in out.stderr.splitlines() if "WARNING" in line or "Black or Ruff" in line
             or "end of life" in line]
    assert not noise, noise
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 15
    raw = {str(p.relative_to(site)): len(ROLES.findall(p.read_text())) for p in pages}
    assert sum(raw.values()) == 0, {k: v for k, v in raw.items() if v}
    api = (site / "api" / "index.html").read_text()
    assert "trak_core.kronecker" in api and "factorized_features" in api
