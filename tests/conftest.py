"""Shared fixtures: the namespaces the core tests run on (numpy and array-api-strict); one thread per BLAS.

The suite's models are small (a 64-64-10 MLP on a few hundred digits): a second BLAS or OpenMP thread
saves little on an idle machine, and on a busy one (CI beside other jobs, two pytest workers on
two cores) the threads spin against each other, making the torch demo 17x and NumPy training 8x
slower. So the tests use one thread each, unless ``OMP_NUM_THREADS`` says otherwise; subprocesses
(the SIGKILL resume test, the README example) inherit it. torch reads it at import, after this file;
NumPy's OpenBLAS is already loaded by pytest plugins, so its pool is resized with threadpoolctl.
"""
import os

import numpy as np
import pytest

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, os.environ.get("OMP_NUM_THREADS", "1"))
try:
    from threadpoolctl import threadpool_limits
except ImportError:  # scikit-learn brings it; without it BLAS keeps its default threads
    pass
else:
    threadpool_limits(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(params=["numpy", "array_api_strict"])
def xp(request):
    """An Array API namespace: compat-wrapped numpy, or array-api-strict when installed."""
    if request.param == "numpy":
        import array_api_compat.numpy as xp
        return xp
    return pytest.importorskip("array_api_strict")


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
