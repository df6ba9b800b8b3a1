"""The JAX backend's caches are bounded: it is one object per process and its caches hold the user's models."""
import gc
import weakref

import pytest

pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")

import trak_core  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import jax_apply  # noqa: E402
from trak_jax import JaxBackend  # noqa: E402


class _Held:
    """What a user's apply function holds (its closure: a module, constants), to see whether it is kept."""


def test_attributing_one_new_model_after_another_keeps_only_the_last_ones():
    """The process-wide backend (``TRAK(..., backend="jax")``) kept every apply function it had compiled a step or
    traced a batch for, with all its closure held: a program attributing one new model after another grew by
    each (21 of 21 models alive, RSS +223 MiB after 20 models each holding 8 MB). The last few are kept, and a
    model kept is not compiled again."""
    backend = JaxBackend()
    weights = canonical.weights("mlp", seed=0, dtype="float32")
    x, y = canonical.inputs("mlp", 20, seed=0, dtype="float32")
    plain = jax_apply("mlp")
    alive = []
    for _ in range(12):
        held = _Held()

        def apply(params, inputs, held=held):
            return plain(params, inputs)

        alive.append(weakref.ref(held))
        trak = trak_core.TRAK(apply, backend=backend, proj_dim=16, lambda_reg=10.0, progress=False)
        trak.featurize(weights, [(x, y)])
        trak.score([(x[:4], y[:4])])
        del held
    gc.collect()
    kept = [ref() is not None for ref in alive]
    assert sum(kept) == 8 and kept[-8:] == [True] * 8  # the last 8 models (the bound), not all 12
    compiled = backend.compilations
    again = trak_core.TRAK(apply, backend=backend, proj_dim=16, lambda_reg=10.0, progress=False)
    again.featurize(weights, [(x, y)])  # the last model again: its step is still compiled
    assert backend.compilations == compiled


def test_a_copy_of_recent_keeps_its_entries_order_and_bound():
    """``OrderedDict.copy`` reads each entry through ``Recent.__getitem__``, which moves it to the end while the copy
    walks the entries: the copy lost entries, the original was reordered, and the bound became the default."""
    from trak_jax.recent import Recent

    recent = Recent(3)
    for key in "abc":
        recent[key] = key.upper()
    copied = recent.copy()
    assert list(copied.items()) == list(recent.items()) == [("a", "A"), ("b", "B"), ("c", "C")]
    assert copied.max_entries == 3
