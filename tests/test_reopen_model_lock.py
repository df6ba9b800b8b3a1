"""A user's thread that holds a torch model's lock (``trak_torch.locks.model_lock``, as docs/store.md tells a user's
own forward to run) and makes the first call on a ``TRAK.open``'ed estimator while another thread loads its
checkpoints: the loader held the loading lock and waited for the model's, the user's thread the reverse."""
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import torch_model  # noqa: E402

WAIT = 20.0


def test_a_first_call_under_the_model_lock_while_another_thread_loads(tmp_path, monkeypatch):
    import sys

    import trak_torch.backend  # noqa: F401
    from trak_torch.locks import model_lock

    backend_module = sys.modules["trak_torch.backend"]
    x, y = canonical.inputs("mlp", 40, seed=0, dtype="float32")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    model = torch_model("mlp", canonical.weights("mlp", seed=0, dtype="float32"))
    checkpoint = {name: value.detach().clone() for name, value in model.state_dict().items()}
    trak = trak_core.TRAK(model, proj_dim=16, store=tmp_path / "store", progress=False)
    trak.featurize(checkpoint, [(x[:32], y[:32])])
    targets = [(x[32:], y[32:])]
    expected = trak.score(targets)
    opened = trak_core.TRAK.open(tmp_path / "store", model, [checkpoint])

    user_holds, loading = threading.Event(), threading.Event()
    gradients = backend_module.TorchBackend.gradients

    def announced(self, *args, **kwargs):
        if threading.current_thread().name == "loader":
            loading.set()  # the loading's gradient pass: the model's lock is asked for next
        return gradients(self, *args, **kwargs)

    monkeypatch.setattr(backend_module.TorchBackend, "gradients", announced)
    out = {}

    def loader():
        user_holds.wait(WAIT)
        out["loader"] = opened.score(targets)

    def user():
        with model_lock(model):
            user_holds.set()
            loading.wait(2.0)  # the loader holds the loading lock now (before the fix; after it, it waits)
            model(x[:2])
            out["user"] = opened.score(targets)

    threads = [threading.Thread(target=loader, name="loader", daemon=True),
               threading.Thread(target=user, name="user", daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads), "deadlocked"
    for name in ("loader", "user"):
        assert np.array_equal(out[name].numpy(), expected.numpy()), name
