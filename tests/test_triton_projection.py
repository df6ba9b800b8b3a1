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
