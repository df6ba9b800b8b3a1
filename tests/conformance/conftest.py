"""Runs the conformance suite over every first-party backend id; missing ones skip with the reason."""
import pytest

from trak_core.testing.cases import FIRST_PARTY, unavailable


@pytest.fixture(params=list(FIRST_PARTY))
def conformance_case(request):
    reason = unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return FIRST_PARTY[request.param][2]()
