"""An on-disk store records what the model is made of (the torch backend: its modules' names and classes), so that
the same parameters in another architecture are refused. Before, a ReLU network opened a store featurized through a
tanh one (same parameter names and shapes) and scored it silently, and added its own checkpoints to it."""
import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
zarr = pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

import trak_core  # noqa: E402
from trak_core import StoreMismatchError  # noqa: E402

N, D, H, C = 48, 5, 6, 3


def _net(activation):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, H), activation(), torch.nn.Linear(H, C))


class _Functional(torch.nn.Module):
    """The tanh network's parameters (``0.*``, ``2.*``) with ReLU applied in ``forward``, not by a module."""

    def __init__(self):
        super().__init__()
        self.add_module("0", torch.nn.Linear(D, H))
        self.add_module("2", torch.nn.Linear(H, C))

    def forward(self, x):
        return self.get_submodule("2")(torch.relu(self.get_submodule("0")(x)))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def _files(path):
    return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs}


def test_another_architecture_with_the_same_parameters_is_refused(tmp_path):
    x, y = _data()
    tanh = _net(torch.nn.Tanh)
    states = [copy.deepcopy(tanh.state_dict())]
    torch.manual_seed(5)
    states.append({k: torch.randn_like(v) for k, v in states[0].items()})
    trak = trak_core.TRAK(tanh, proj_dim=16, store=tmp_path / "s", progress=False)
    for state in states:
        trak.featurize(state, [(x, y)])
    expected = trak.score([(x[:4], y[:4])])
    relu = _net(torch.nn.ReLU)
    relu_scores = trak_core.TRAK(relu, proj_dim=16, progress=False)
    for state in states:
        relu_scores.featurize(state, [(x, y)])
    gap = float(np.abs(relu_scores.score([(x[:4], y[:4])]) - expected).max())
    assert gap > 1e-3 * float(np.abs(expected).max())  # what a silent open gave: another function's scores
    before = _files(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match=r"model: stored 'Sequential \(4 modules, [0-9a-f]{12}\)', now "
                                                 r"'Sequential \(4 modules, [0-9a-f]{12}\)'\); its modules' names or "
                                                 r"classes are not those the store was featurized with; use the same"):
        trak_core.TRAK.open(tmp_path / "s", relu, states, progress=False)
    with pytest.raises(StoreMismatchError, match=r"configuration \(model: stored 'Sequential .*', now '_Functional "
                                                 r"\(3 modules, [0-9a-f]{12}\)'\); its modules'"):
        trak_core.TRAK(_Functional(), proj_dim=16, store=tmp_path / "s", progress=False).featurize(states[1], [(x, y)])
    assert _files(tmp_path / "s") == before  # nothing written
    reopened = trak_core.TRAK.open(tmp_path / "s", _net(torch.nn.Tanh), states, progress=False)  # a new instance
    assert np.array_equal(reopened.score([(x[:4], y[:4])]), expected)


def test_a_compiled_model_is_its_eager_modules():
    """``torch.compile`` wraps the model (``OptimizedModule``); the backend runs the module it holds, and the
    store's record is that module's (nothing is compiled here: the wrapper is never called)."""
    from trak_torch.checkpoint import module_classes

    tanh = _net(torch.nn.Tanh)
    assert module_classes(torch.compile(tanh)) == module_classes(tanh) == module_classes(_net(torch.nn.Tanh))
    assert module_classes(_net(torch.nn.ReLU)) != module_classes(tanh)


def test_a_store_written_before_the_model_was_recorded_still_opens(tmp_path):
    """Stores of earlier versions hold no ``model`` in their configuration: opened as before, not checked."""
    x, y = _data()
    tanh = _net(torch.nn.Tanh)
    trak = trak_core.TRAK(tanh, proj_dim=16, store=tmp_path / "s", progress=False)
    trak.featurize(tanh.state_dict(), [(x, y)])
    expected = trak.score([(x[:4], y[:4])])
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    config = dict(root.attrs["trak_core"])
    assert config.pop("model").startswith("Sequential (4 modules, ")
    root.attrs["trak_core"] = config
    reopened = trak_core.TRAK.open(tmp_path / "s", tanh, [tanh.state_dict()], progress=False)
    assert np.array_equal(reopened.score([(x[:4], y[:4])]), expected)
