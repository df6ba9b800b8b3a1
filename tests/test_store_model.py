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
    with pytest.raises(StoreMismatchError, match=r"featurized with another model \(model: stored 'Sequential \(4 "
                                                 r"modules, [0-9a-f]{12}\)', now 'Sequential \(4 modules, "
                                                 r"[0-9a-f]{12}\)'\): its modules' names or classes differ"):
        trak_core.TRAK.open(tmp_path / "s", relu, states, progress=False)
    with pytest.raises(StoreMismatchError, match=r"another model \(model: stored 'Sequential .*', now '_Functional "
                                                 r"\(3 modules, [0-9a-f]{12}\)'\)"):
        trak_core.TRAK(_Functional(), proj_dim=16, store=tmp_path / "s", progress=False).featurize(states[1], [(x, y)])
    assert _files(tmp_path / "s") == before  # nothing written
    reopened = trak_core.TRAK.open(tmp_path / "s", _net(torch.nn.Tanh), states, progress=False)  # a new instance
    assert np.array_equal(reopened.score([(x[:4], y[:4])]), expected)


def test_modules_that_do_nothing_in_eval_mode_are_left_out():
    """A LoRA dropout of 0.1 is ``nn.Dropout``, of 0 ``nn.Identity``: the same function in eval mode, where
    attribution runs; the record differed and a store refused the other. An activation still counts."""
    from trak_torch.checkpoint import module_classes

    def net(middle, activation):
        return torch.nn.Sequential(torch.nn.Linear(D, H), middle, activation(), torch.nn.Linear(H, C))

    dropped = module_classes(net(torch.nn.Dropout(0.1), torch.nn.Tanh))
    assert dropped == module_classes(net(torch.nn.Identity(), torch.nn.Tanh))
    assert dropped == module_classes(net(torch.nn.AlphaDropout(0.2), torch.nn.Tanh))
    assert dropped != module_classes(net(torch.nn.Identity(), torch.nn.ReLU))


def test_a_compiled_model_is_its_eager_modules():
    """``torch.compile`` wraps the model (``OptimizedModule``); the backend runs the module it holds, and the
    store's record is that module's (nothing is compiled here: the wrapper is never called)."""
    from trak_torch.checkpoint import module_classes

    tanh = _net(torch.nn.Tanh)
    assert module_classes(torch.compile(tanh)) == module_classes(tanh) == module_classes(_net(torch.nn.Tanh))
    assert module_classes(_net(torch.nn.ReLU)) != module_classes(tanh)


def test_a_store_written_before_the_model_was_recorded_still_opens(tmp_path):
    """Stores of earlier versions hold no ``model`` attribute: opened as before, not checked. It is kept beside the
    configuration, not in it: earlier versions compare the configuration key by key and would refuse a new key."""
    x, y = _data()
    tanh = _net(torch.nn.Tanh)
    trak = trak_core.TRAK(tanh, proj_dim=16, store=tmp_path / "s", progress=False)
    trak.featurize(tanh.state_dict(), [(x, y)])
    expected = trak.score([(x[:4], y[:4])])
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    assert "model" not in root.attrs["trak_core"]  # beside the configuration, which earlier versions compare whole
    assert root.attrs["model"].startswith("Sequential (4 modules, ")
    del root.attrs["model"]
    reopened = trak_core.TRAK.open(tmp_path / "s", tanh, [tanh.state_dict()], progress=False)
    assert np.array_equal(reopened.score([(x[:4], y[:4])]), expected)


def _two_states(net):
    states = [copy.deepcopy(net.state_dict())]
    torch.manual_seed(5)
    return states + [{k: torch.randn_like(v) for k, v in states[0].items()}]


def _records():
    tanh, relu = _net(torch.nn.Tanh), _net(torch.nn.ReLU)
    backend = trak_core.TRAK(tanh, proj_dim=16, progress=False).backend
    return tanh, relu, backend.model_identity(tanh), backend.model_identity(relu)


def _tanh_scores(states, targets):
    x, y = _data()
    reference = trak_core.TRAK(_net(torch.nn.Tanh), proj_dim=16, progress=False)
    for state in states:
        reference.featurize(state, [(x, y)])
    return reference.score(targets)


def test_a_job_that_began_a_shared_store_at_once_with_another_model_is_refused(tmp_path):
    """One job per checkpoint, two models with the same parameters: job B (ReLU) found no store and created its root,
    then job A (tanh) wrote the root's configuration and its checkpoint 0, then B wrote its own configuration over
    A's (the model record took no part in what the jobs compared) and its checkpoint 1: the store mixed two
    architectures, and TRAK.open with the ReLU net scored it. Now B reads the root again just before writing it,
    and is refused naming both models; nothing is written, and A's checkpoint scores as before."""
    import re

    x, y = _data()
    tanh, relu, tanh_record, relu_record = _records()
    states = _two_states(tanh)
    job_b = trak_core.TRAK(relu, proj_dim=16, store=tmp_path / "s", progress=False)
    job_b.store.shared = True  # as featurize(..., index=i) makes it
    job_b.store.root  # B found no store and created the root: no configuration in it yet
    trak_core.TRAK(tanh, proj_dim=16, store=tmp_path / "s", progress=False).featurize(states[0], [(x, y)], index=0)
    before = _files(tmp_path / "s")
    with pytest.raises(StoreMismatchError, match=re.escape(f"another model (model: stored {tanh_record!r}, now "
                                                           f"{relu_record!r})")):
        job_b.featurize(states[1], [(x, y)], index=1)
    assert _files(tmp_path / "s") == before
    opened = trak_core.TRAK.open(tmp_path / "s", _net(torch.nn.Tanh), [states[0]], progress=False)
    np.testing.assert_array_equal(opened.score([(x[:4], y[:4])]), _tanh_scores(states[:1], [(x[:4], y[:4])]))


def test_a_checkpoint_of_another_model_than_the_stores_is_refused(tmp_path, monkeypatch):
    """Jobs that both read the root before either wrote it each write theirs, and the last one stays: job A's
    (tanh) checkpoint went on under job B's (ReLU) root, was marked complete, and TRAK.open with the ReLU net
    scored it. Each checkpoint of a shared store records its job's model: refused before it is marked complete,
    and by TRAK.open and trak-core store; A's configuration put back, its checkpoint scores as before."""
    import re

    from trak_core import disk_writer
    from trak_core.store_report import describe

    x, y = _data()
    tanh, relu, tanh_record, relu_record = _records()
    states = _two_states(tanh)
    trak_core.TRAK(relu, proj_dim=16, store=tmp_path / "b", progress=False).featurize(states[1], [(x, y)], index=1)
    theirs = dict(zarr.open_group(str(tmp_path / "b"), mode="r").attrs)
    theirs = {k: theirs[k] for k in ("trak_core", "model", "configuration_sha256") if k in theirs}  # B's root write
    def named(store):
        return re.escape(f"checkpoint 0 in {store} was featurized with another model than the store's (model: the "
                         f"store's {relu_record!r}, checkpoint 0's {tanh_record!r}; another job began the store at the "
                         "same moment with another model)")

    finish = disk_writer.DiskWriter.finish

    def their_root_lands(self, *args, **kwargs):  # B's root write, after A's, while A featurizes
        zarr.open_group(str(tmp_path / "s"), mode="r+").attrs.update(theirs)
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(disk_writer.DiskWriter, "finish", their_root_lands)
    with pytest.raises(StoreMismatchError, match=named(tmp_path / "s")):
        trak_core.TRAK(tanh, proj_dim=16, store=tmp_path / "s", progress=False).featurize(states[0], [(x, y)], index=0)
    monkeypatch.undo()
    assert not zarr.open_group(str(tmp_path / "s"), mode="r")["c0"].attrs.get("complete", False)
    trak_core.TRAK(tanh, proj_dim=16, store=tmp_path / "t", progress=False).featurize(states[0], [(x, y)], index=0)
    root = zarr.open_group(str(tmp_path / "t"), mode="r+")
    mine = {k: root.attrs[k] for k in theirs}
    root.attrs.update(theirs)  # B's root write lands after A's checkpoint is complete
    with pytest.raises(StoreMismatchError, match=named(tmp_path / "t")):
        trak_core.TRAK.open(tmp_path / "t", relu, {0: states[0]}, progress=False)
    report = describe(str(tmp_path / "t"))
    assert report["checkpoints"][0]["configuration"] == "other" and report["opens"] == []
    root.attrs.update(mine)
    opened = trak_core.TRAK.open(tmp_path / "t", _net(torch.nn.Tanh), [states[0]], progress=False)
    np.testing.assert_array_equal(opened.score([(x[:4], y[:4])]), _tanh_scores(states[:1], [(x[:4], y[:4])]))
