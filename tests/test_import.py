"""Importing trak_core imports no framework (STYLE.md rule 2)."""
import subprocess
import sys


def test_import_leaves_frameworks_out():
    code = ("import sys, trak_core; trak_core.available_backends(); "
            "print(sorted(m for m in ('torch', 'jax', 'cupy', 'jaxlib', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
