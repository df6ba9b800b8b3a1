"""The factorized projection with an on-disk store: an interrupted run resumed gives the bits of one run, and a
model whose ``forward`` now uses its (same) parameters otherwise, so that its layout of blocks differs, is refused
on resume and on reopening, with nothing written; a layout that depends on the data may differ between
checkpoints."""
import hashlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch factorized path is not exercised")
pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import TRAK  # noqa: E402
from trak_core.errors import StoreMismatchError  # noqa: E402

nn = torch.nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class NetByMatmul(Net):
    """The same parameters; the head is a matmul, not a call of ``b``: ``b.weight`` goes to the rest."""

    def forward(self, x):
        return torch.tanh(self.a(x)) @ self.b.weight.T + self.b.bias


NetByMatmul.__qualname__ = "Net"  # Net's forward edited between runs: the store's record of the model (its modules'
# names and classes) cannot tell them apart; the layout of blocks can


class Interrupt(Exception):
    pass


def _batches(x, y, stop_after=None):
    for i, start in enumerate(range(0, len(x), 50)):
        if stop_after is not None and i == stop_after:
            raise Interrupt
        yield x[start:start + 50], y[start:start + 50]


def _files(path):
    digests = {}
    for root, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(root, name), "rb") as handle:
                digests[os.path.join(root, name)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def _setup():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 6, generator=g), torch.randint(0, 3, (300,), generator=g)
    checkpoints = [{k: v + 0.1 * i for k, v in Net().state_dict().items()} for i in range(2)]
    return x, y, checkpoints


def test_an_interrupted_factorized_run_resumes_to_the_bits_of_one_run(tmp_path):
    x, y, checkpoints = _setup()
    whole = TRAK(Net(), proj_type="kronecker", proj_dim=16, progress=False)
    for checkpoint in checkpoints:
        whole.featurize(checkpoint, _batches(x, y))
    trak = TRAK(Net(), proj_type="kronecker", proj_dim=16, progress=False, store=tmp_path / "s")
    trak.featurize(checkpoints[0], _batches(x, y))
    with pytest.raises(Interrupt):
        trak.featurize(checkpoints[1], _batches(x, y, stop_after=4))
    resumed = TRAK(Net(), proj_type="kronecker", proj_dim=16, progress=False, store=tmp_path / "s")
    for checkpoint in checkpoints:
        resumed.featurize(checkpoint, _batches(x, y))
    for c in range(2):
        assert np.array_equal(np.asarray(resumed.store[c].features[:]), np.asarray(whole.store[c].features[:]))
    targets = [(x[:7], y[:7])]
    assert np.array_equal(np.asarray(resumed.score(targets)), np.asarray(whole.score(targets)))


def test_a_changed_forward_is_refused_on_resume_and_on_reopening(tmp_path):
    """Before, the resumed checkpoint held rows of two projections (108% apart) and scoring reopened features with
    new targets mixed them too, silently."""
    x, y, checkpoints = _setup()
    path = tmp_path / "s"
    trak = TRAK(Net(), proj_type="kronecker", proj_dim=16, progress=False, store=path)
    trak.featurize(checkpoints[0], _batches(x, y))
    with pytest.raises(Interrupt):
        trak.featurize(checkpoints[1], _batches(x, y, stop_after=4))
    before = _files(path)
    other = NetByMatmul()
    changed = TRAK(other, proj_type="kronecker", proj_dim=16, progress=False, store=path)
    with pytest.raises(StoreMismatchError, match=r"factorized layers now differ .* now 1 blocks, 27 parameters in "
                                                 "the rest.*nothing was overwritten"):
        changed.featurize(checkpoints[0], _batches(x, y))
        changed.featurize(checkpoints[1], _batches(x, y))
    assert _files(path) == before
    opened = TRAK.open(path, other, checkpoints[:1])
    with pytest.raises(StoreMismatchError, match="factorized layers now differ"):
        opened.score([(x[:5], y[:5])])
    same = TRAK.open(path, Net(), checkpoints[:1])
    reference = TRAK(Net(), proj_type="kronecker", proj_dim=16, progress=False)
    reference.featurize(checkpoints[0], _batches(x, y))
    assert np.array_equal(np.asarray(same.score([(x[:5], y[:5])])), np.asarray(reference.score([(x[:5], y[:5])])))


class Switch(Net):
    """Which head is called depends on the checkpoint (a buffer, as experts routed by the first example depend on
    the router's weights): each checkpoint has its own layout, the other head in the rest."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(8, 3)
        self.register_buffer("route", torch.tensor(1.0))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) if float(self.route) > 0 else self.c(h)


def test_a_layout_per_checkpoint_is_kept_and_reopened(tmp_path):
    x, y, _ = _setup()
    model = Switch()
    checkpoints = []
    for sign in (1.0, -1.0):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["route"] = torch.tensor(sign)
        checkpoints.append(state)
    memory = TRAK(model, proj_type="kronecker", proj_dim=16, progress=False)
    trak = TRAK(model, proj_type="kronecker", proj_dim=16, progress=False, store=tmp_path / "s")
    for checkpoint in checkpoints:
        memory.featurize(checkpoint, _batches(x, y))
        trak.featurize(checkpoint, _batches(x, y))
    targets = [(x[:5], y[:5])]
    expected = np.asarray(memory.score(targets))
    assert np.array_equal(np.asarray(trak.score(targets)), expected)
    assert trak.store.plan_digest(0) != trak.store.plan_digest(1)
    assert np.array_equal(np.asarray(TRAK.open(tmp_path / "s", model, checkpoints).score(targets)), expected)
