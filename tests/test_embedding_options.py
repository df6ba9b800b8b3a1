"""``nn.Embedding`` options that change its gradient: ``scale_grad_by_freq`` (a token's gradient divided by its
count in the batch) and ``max_norm`` (rows renormalized in place in ``forward``). Against plain autograd one
example at a time and the explicit Kronecker matrix."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from trak_core import Kronecker  # noqa: E402
from trak_core.errors import TrakValueError  # noqa: E402
from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402


class Bag(torch.nn.Module):
    def __init__(self, subclass=False, **options):
        super().__init__()
        table = type("Own", (torch.nn.Embedding,), {"forward": lambda self, x: super(type(self), self).forward(x)}) \
            if subclass else torch.nn.Embedding
        self.emb, self.head = table(10, 6, **options), torch.nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


# the first two examples repeat no token (the closed form's check cannot see the scaling there); the others do
IDS = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 5, 6], [9, 9, 9, 3]])
LABELS = torch.tensor([0, 1, 2, 0])


def _one_at_a_time(model):
    rows = []
    for i in range(len(LABELS)):
        model.zero_grad()
        logits = model(IDS[i:i + 1])[0]
        y = int(LABELS[i])
        (logits[y] - torch.logsumexp(torch.cat([logits[:y], logits[y + 1:]]), 0)).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("subclass", [False, True])
def test_frequency_scaled_embeddings_get_their_own_gradients(subclass):
    """Each example's table gradient is divided by its tokens' counts in that example: vmap, not the closed form
    (which left the scaling out: 6.7% off on the repeated-token examples, unseen by its two-example check)."""
    torch.manual_seed(0)
    model = Bag(subclass, scale_grad_by_freq=True).double()
    backend = TorchBackend()
    grads, _ = backend.gradients(model, backend.prepare(model, None), IDS, LABELS, get_task("classification"))
    reference = _one_at_a_time(model)
    torch.testing.assert_close(grads, reference, rtol=1e-10, atol=1e-12)
    unscaled = Bag(subclass).double()
    unscaled.load_state_dict(model.state_dict())
    assert float((_one_at_a_time(unscaled)[3] - reference[3]).abs().max()) > 1e-3  # the scaling matters here


@pytest.mark.parametrize("subclass", [False, True])
def test_frequency_scaled_embeddings_are_the_rest_of_the_factorized_projection(subclass):
    from test_kronecker_functional import _exact

    torch.manual_seed(1)
    model = Bag(subclass, scale_grad_by_freq=True).double()
    plan, _ = _exact(model, IDS, LABELS, "classification", k=16, options=Kronecker())
    assert [b.layer.name for b in plan.blocks] == ["head.weight"] and "emb.weight" in plan.rest


def test_renormalized_embeddings_are_refused_with_the_fix():
    """max_norm: a clear error when the table is attributed (vmap cannot run the in-place renormalization); a
    frozen table is fine (the closed form differentiates the head only), equal to plain autograd."""
    torch.manual_seed(2)
    model = Bag(max_norm=1.0).double()
    with pytest.raises(TrakValueError, match=r"embeddings \['emb'\] have max_norm set.*max_norm=None"):
        trak_core.TRAK(model, proj_dim=8, progress=False).featurize(None, [(IDS, LABELS)])
    backend = TorchBackend(params=["head.weight", "head.bias"])
    grads, _ = backend.gradients(model, backend.prepare(model, None), IDS, LABELS, get_task("classification"))
    reference = _one_at_a_time(model)[:, 60:]  # the head's columns (the table: 10 x 6 first)
    np.testing.assert_allclose(grads.numpy(), reference.numpy(), rtol=1e-10, atol=1e-12)
