"""The Triton projection kernel in Triton's interpreter: tests/triton_interpreted.py (the kernel, torch's launch)
and tests/triton_aot_interpreted.py (CuPy's and JAX's launch, with a NumPy stand-in for CuPy), in a fresh process.

Triton reads ``TRITON_INTERPRET`` when it is imported, and other tests in a worker (transformers')
import it first, so the kernel's checks run in their own ``pytest`` process with ``TRITON_INTERPRET=1``.
"""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
FILES = ("triton_interpreted.py", "triton_aot_interpreted.py")
CHECKS = 27  # their tests (parametrized cases counted)


def test_the_triton_kernel_in_the_interpreter(tmp_path):
    for name in ("torch", "triton"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed: the Triton projection kernel is not exercised")
    env = dict(os.environ, TRITON_INTERPRET="1", TMPDIR=str(tmp_path))  # the launches' cubin folder goes there
    env.pop("TRAK_CORE_TRITON", None)
    out = subprocess.run([sys.executable, "-m", "pytest", *(str(HERE / name) for name in FILES), "-q", "-n", "0",
                          "-p", "no:cacheprovider"], env=env, cwd=HERE.parent, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(rf"\b{CHECKS} passed\b", out.stdout) and "skipped" not in out.stdout, out.stdout[-2000:]
    assert not list(tmp_path.glob("trak_core_triton_*"))  # the cubins' folder went with the process that wrote it


def test_a_forked_child_writes_its_cubins_in_a_folder_of_its_own(monkeypatch):
    """The parent removes its folder when it exits (a forked child does not): a child that wrote there lost its
    files. The child is this process under another pid (no fork: JAX or torch threads may be running here)."""
    from trak_core import _triton_aot

    monkeypatch.setattr(_triton_aot, "_folder", [])
    parent = _triton_aot._cubin_folder()
    monkeypatch.setattr(os, "getpid", lambda pid=os.getpid(): pid + 1)
    child = _triton_aot._cubin_folder()
    assert child != parent and parent.is_dir() and _triton_aot._cubin_folder() == child
    monkeypatch.undo()
    child.rmdir()  # registered for removal by its (other) pid only
