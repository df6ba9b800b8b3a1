"""How the suite runs (two worker processes of one thread each) and the shared fixtures.

Workers: ``python -m pytest tests`` runs on two pytest-xdist workers, each taking whole files
(module fixtures such as the Ray cluster start once), unless ``-n`` is given: ``-n 0`` runs in one
process (``--pdb`` and ``--collect-only`` do too). Only runs that load this file are affected, so
``python -m pytest bench`` keeps one process and its timings.

Threads: the suite's models are small (a 64-64-10 MLP on a few hundred digits), so a second BLAS
or OpenMP thread saves little on an idle machine, and on a busy one (two workers on two cores, or
other jobs) the threads spin against each other: the torch demo took 303 s instead of 19 s, NumPy
training was 8x slower. So each process uses one thread, unless ``OMP_NUM_THREADS`` says
otherwise; subprocesses (the SIGKILL resume test, the README example) inherit it. torch reads it
at import, after this file; NumPy's OpenBLAS is already loaded by pytest plugins, so its pool is
resized with threadpoolctl.

Fixtures: the namespaces the core tests run on (numpy and array-api-strict), and a seeded ``rng``.
"""
import os

import numpy as np
import pytest

WORKERS = 2  # CI's machine has two cores

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, os.environ.get("OMP_NUM_THREADS", "1"))
try:
    from threadpoolctl import threadpool_limits
except ImportError:  # scikit-learn brings it; without it BLAS keeps its default threads
    pass
else:
    threadpool_limits(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns -n into workers
def pytest_cmdline_main(config):
    """``-n 2 --dist loadfile`` unless ``-n`` was given (or xdist is absent) or the run debugs or only collects."""
    option, worker = config.option, hasattr(config, "workerinput")
    if not worker:
        if getattr(option, "numprocesses", 0) is not None or option.usepdb or option.collectonly:
            return
        option.numprocesses = WORKERS
        if option.dist == "no":
            option.dist = "loadfile"
    if hasattr(option, "benchmark_disable"):  # tests/ has no benchmarks: no "disabled under xdist" warning
        option.benchmark_disable = True


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
