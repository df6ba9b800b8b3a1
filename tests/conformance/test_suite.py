"""The shared conformance suite (trak_core.testing), collected here for every installed backend."""
from trak_core.testing import *  # noqa: F401,F403
