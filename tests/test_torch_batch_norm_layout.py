"""PyTorch's CPU backward of an eval-mode BatchNorm2d on a batch of ONE example, whose output is read as tokens
(``.flatten(2).transpose(1, 2)``, as LeViT's and CvT's patch embeddings do), takes the output gradient's strides for
channels-last and gives wrong input and parameter gradients (O(1) here; LeViT 1.5e-2, CvT 1.4e-4). trak-core's
one-example loop, the closed form's check (whose reference that loop is) and a batch of one ran into it: the loop
was wrong, and the check refused a correct closed form. The reference here is batched autograd: in eval mode the
examples do not interact, so each margin's gradient can be taken from the whole batch's forward."""
import logging

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

from tests_helpers import batched_margin_gradients  # noqa: E402


class Tokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.register_buffer("position", torch.randn(16, 4))  # a scale per token and channel
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        tokens = self.norm(self.conv(x)).flatten(2).transpose(1, 2)  # (n, H W, C)
        return self.head(torch.tanh((tokens * self.position).mean(1)))


def _model():
    torch.manual_seed(0)
    model = Tokens().double()
    with torch.no_grad():  # running statistics away from 0 and 1
        for _ in range(3):
            model(torch.randn(8, 3, 4, 4, dtype=torch.float64) * 2 + 1)
    return model.eval()


def _batched_reference(model, x, y):
    return batched_margin_gradients(model(x), y, list(model.parameters()))


@pytest.mark.parametrize("per_example", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("sizes", [(4,), (1, 3), (3, 1)])
def test_token_read_batch_norm_gradients(per_example, sizes, caplog):
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=1.0, progress=False,
                          backend=TorchBackend(per_example=per_example))
    with caplog.at_level(logging.INFO, logger="trak_core"):
        trak.featurize(None, [(x[s:s + n], y[s:s + n]) for s, n in zip(starts, sizes)])
    reference = _batched_reference(model, x, y)
    features = trak.store[0].features
    assert float((features - reference).norm() / reference.norm()) < 1e-12
    if per_example == "auto" and sizes[0] > 1:  # the check no longer refuses it against a wrong reference, and the
        assert "in closed form" in caplog.text   # closed form takes a later batch of one (3, 1) right


def test_kronecker_features_of_a_batch_of_one():
    """The factorized projection takes its output gradients from one batched backward: a batch of one example ran
    into the same BatchNorm backward. Features of batches (3, 1) equal the batched reference times the explicit
    factorized matrix."""
    import numpy as np

    from trak_core.kronecker import Kronecker, explicit_matrix

    model = _model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    backend, task = TorchBackend(), trak_core.tasks.get_task("classification")
    prepared = backend.prepare(model, None)
    plan = backend.factorized_plan(model, prepared, x[:3], y[:3], task, k=24, options=Kronecker())
    features = [backend.factorized_features(model, prepared, x[s], y[s], task, k=24, seed=0, checkpoint=0,
                                            options=Kronecker())[0] for s in (slice(0, 3), slice(3, 4))]
    matrix = explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=0, checkpoint=0)
    reference = _batched_reference(model, x, y).numpy() @ matrix
    got = torch.cat(features).numpy()
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 1e-12
