"""The torch backend's fixed work per batch: what it finds by walking the model's modules is found once per batch.

Whether a dict batch's mask is causal (``TorchBackend._causal``, a walk of every module) was found twice per batch of
the closed form and three times per batch of the factorized projection; ``eval_mode`` walked the module tree four
times (its three lists and ``checkpointing_off``). The counts are against the number of batches; the gradients
against plain autograd one example at a time, so the work left out changes no number.
"""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402
from trak_torch.looped import eval_mode  # noqa: E402

from tests_helpers import batched_margin_gradients  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return [(x[i:i + 3], y[i:i + 3]) for i in range(0, 12, 3)], x, y


def _counting_causal(monkeypatch):
    calls = []
    causal = TorchBackend._causal

    def counted(self, model):
        calls.append(model)
        return causal(self, model)

    monkeypatch.setattr(TorchBackend, "_causal", counted)
    return calls


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_the_causal_walk_runs_once_per_batch(monkeypatch, per_example):
    calls = _counting_causal(monkeypatch)
    model = _mlp()
    batches, x, y = _batches()
    trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=1.0, progress=False,
                          backend=TorchBackend(per_example=per_example))
    trak.featurize(None, batches)
    assert len(calls) == len(batches)  # was 2 per batch
    reference = torch.cat([batched_margin_gradients(model(x[i:i + 1]), y[i:i + 1], list(model.parameters()))
                           for i in range(x.shape[0])])
    assert float((trak.store[0].features - reference).abs().max()) < 1e-12


def test_the_factorized_projection_finds_causal_once_per_batch(monkeypatch):
    calls = _counting_causal(monkeypatch)
    batches, _, _ = _batches()
    trak = trak_core.TRAK(_mlp(), proj_dim=8, proj_type="kronecker", lambda_reg=1.0, progress=False,
                          backend=TorchBackend())
    trak.featurize(None, batches)
    plans = 1  # the layout, found once per checkpoint (factorized_plan)
    assert len(calls) == len(batches) + plans  # was 3 per batch and 2 for the plan
    assert tuple(trak.store[0].features.shape) == (12, 8)


def test_eval_mode_walks_the_module_tree_once():
    model = _mlp()
    model[2].eval()  # a submodule in another mode than its parent: restored as it was
    walks = []
    modules = model.modules

    def counted():
        walks.append(1)
        return modules()

    model.modules = counted
    before = [module.training for module in modules()]
    with eval_mode(model):
        assert [module.training for module in modules()] == [False] * 4
    assert len(walks) == 1  # was 4: three lists and checkpointing_off
    assert [module.training for module in modules()] == before == [True, True, True, False]
