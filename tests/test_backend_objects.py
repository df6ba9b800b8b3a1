"""A backend passed as an object (``TRAK(backend=obj)``, as the conformance suite passes a plug-in's) is checked as
``register_backend`` and the entry points check theirs, and its ``structure``'s repr is one an on-disk store can hash.

An audit's plug-in named ``"torch"`` passed the whole conformance suite and wrote stores that reopened with trak-core's
torch backend ("the torch backend needs a torch.nn.Module"); one without a name wrote stores that reopened with
"unknown backend ''"; one whose structure had the default ``object`` repr passed the suite, then had its second
checkpoint refused by an on-disk store as "written with another configuration ... use the same arguments".
"""
import pytest

from trak_core import MLP, TRAK, BackendError, TrakTypeError
from trak_core.backends import numpy_backend
from trak_core.testing import suite
from trak_core.testing.cases import NumpyCase
from tests_helpers import ZeroGradients


class NamedTorch(numpy_backend.ArrayAPIBackend):
    """The reference backend under trak-core's torch backend's name (a plug-in's mistake)."""

    name = "torch"


class Nameless(numpy_backend.ArrayAPIBackend):
    name = ""


class Shapes:
    """Equal for equal shapes, with ``object``'s repr (an id, which differs between objects and processes)."""

    def __init__(self, shapes):
        self.shapes = shapes

    def __eq__(self, other):
        return isinstance(other, Shapes) and self.shapes == other.shapes


class IdRepr(numpy_backend.ArrayAPIBackend):
    name = "numpy-id-repr"

    def structure(self, prepared):
        return Shapes([tuple(getattr(value, "shape", ())) for value in prepared.values()])


class Case(NumpyCase):
    def __init__(self, backend):
        self.backend, self.id = backend, backend.name or "nameless"


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    return rng.normal(size=(12, 4)), rng.integers(0, 3, size=12)


def test_an_object_named_like_a_first_party_backend_is_refused():
    with pytest.raises(BackendError, match="named 'torch', the name of trak-core's own backend"):
        TRAK(MLP(4, 5, 3), backend=NamedTorch(), progress=False)


def test_an_object_without_a_name_is_refused():
    with pytest.raises(TrakTypeError, match="non-empty class attribute `name`"):
        TRAK(MLP(4, 5, 3), backend=Nameless(), progress=False)


def test_first_party_backend_objects_and_their_subclasses_are_accepted():
    assert TRAK(MLP(4, 5, 3), backend=ZeroGradients(), progress=False).backend.name == "numpy"
    assert TRAK(MLP(4, 5, 3), backend=numpy_backend.ArrayAPIBackend(), progress=False).backend.name == "numpy"
    pytest.importorskip("trak_torch")
    from trak_torch import TorchBackend

    assert TRAK(MLP(4, 5, 3), backend=TorchBackend(chunk_size=8), progress=False).backend.name == "torch"


@pytest.mark.parametrize("backend", [NamedTorch(), Nameless(), IdRepr()], ids=["torch-name", "nameless", "id-repr"])
def test_the_conformance_contract_fails_such_backends(backend):
    with pytest.raises((AssertionError, BackendError, TrakTypeError)):
        suite.test_conformance_contract(Case(backend))


def test_the_conformance_contract_passes_the_reference_backend_under_its_own_name():
    suite.test_conformance_contract(Case(numpy_backend.ArrayAPIBackend()))


def test_an_on_disk_store_names_a_structure_whose_repr_holds_an_id(tmp_path):
    x, y = _data()
    model = MLP(4, 5, 3)
    trak = TRAK(model, proj_dim=8, backend=IdRepr(), store=tmp_path / "store", progress=False)
    trak.featurize(model.init(seed=0), [(x, y)])
    with pytest.raises(BackendError, match=r"backend 'numpy-id-repr': structure\(\) of checkpoint 1 .* repr differs"):
        trak.featurize(model.init(seed=1), [(x, y)])


def test_in_memory_a_structure_whose_repr_holds_an_id_still_works():
    x, y = _data()
    model = MLP(4, 5, 3)
    trak = TRAK(model, proj_dim=8, backend=IdRepr(), progress=False)
    for seed in range(2):
        trak.featurize(model.init(seed=seed), [(x, y)])
    assert tuple(trak.score([(x[:2], y[:2])]).shape) == (12, 2)


class TorchWeights(numpy_backend.ArrayAPIBackend):
    """NumPy gradients with torch out-to-loss weights."""

    name = "numpy-torch-weights"

    def gradients(self, model, prepared, inputs, labels, task):
        torch = pytest.importorskip("torch", reason="torch is not installed: a torch array is not made")
        grads, out_to_loss = super().gradients(model, prepared, inputs, labels, task)
        return grads, torch.as_tensor(out_to_loss)


class TorchGradients(numpy_backend.ArrayAPIBackend):
    """torch gradients with NumPy out-to-loss weights: joining the batches' weights failed with a bare TypeError."""

    name = "torch-gradients-numpy-weights"

    def gradients(self, model, prepared, inputs, labels, task):
        torch = pytest.importorskip("torch", reason="torch is not installed: a torch array is not made")
        grads, out_to_loss = super().gradients(model, prepared, inputs, labels, task)
        return torch.as_tensor(grads), out_to_loss


@pytest.mark.parametrize("backend", [TorchWeights(), TorchGradients()], ids=lambda b: b.name)
def test_weights_of_another_framework_join_the_gradients_framework(backend):
    """The weights, ``(n,)``, are taken into the gradients' framework: the NumPy backend's scores, in the gradients'
    framework (torch gradients and NumPy weights crashed; NumPy gradients and torch weights worked already)."""
    import numpy as np

    x, y = _data()
    model = MLP(4, 5, 3)
    reference = TRAK(model, proj_dim=8, progress=False)
    trak = TRAK(model, proj_dim=8, backend=backend, progress=False)
    for estimator in (reference, trak):
        estimator.featurize(model.init(seed=0), [(x[:5], y[:5]), (x[5:], y[5:])])
    scores = trak.score([(x[:3], y[:3])])
    assert type(scores).__module__.split(".")[0] == ("torch" if isinstance(backend, TorchGradients) else "numpy")
    np.testing.assert_allclose(np.asarray(scores), reference.score([(x[:3], y[:3])]), rtol=1e-12, atol=1e-15)
