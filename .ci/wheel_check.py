"""CI: the installed wheel (not the editable tree) imports from where it was installed and its backends agree.

Run by ``.ci/run`` with the wheel installed in ``sys.argv[1]`` (``pip install --target``) put first on
``PYTHONPATH``: an editable install hides a module or data file that the wheel would lack, which
``tests/test_packaging.py`` checks by name and this run checks in use (every installed backend's scores
against the NumPy float64 reference, within the conformance tolerances, through ``trak-core compare``).
"""
import sys

import trak_core
import trak_jax
import trak_torch
from trak_core.compare import main

site = sys.argv[1]
modules = [trak_core, trak_torch, trak_jax]
assert all(module.__file__.startswith(site) for module in modules), [module.__file__ for module in modules]
rows = main(["--n-train", "300", "--n-targets", "20", "--proj-dim", "256", "--checkpoints", "2"])
failed = [(row["backend"], row["dtype"], row["error"]) for row in rows if not row["pass"]]
assert not failed, f"outside the conformance tolerances: {failed}"
assert {row["backend"] for row in rows} >= {"numpy", "torch", "jax"}, sorted({row["backend"] for row in rows})
print(f"the wheel in {site}: {len(rows)} runs within tolerance")
