"""Shared fixtures: the namespaces the core tests run on (numpy and array-api-strict)."""
import numpy as np
import pytest


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
