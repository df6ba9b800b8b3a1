"""Closed-form per-example gradients of layers whose weight is a parametrization of the attributed parameters
(``torch.nn.utils.parametrizations.weight_norm``, a user's ``register_parametrization``; Wav2Vec2's positional
convolution), against each model's own backward pass one example at a time (float64)."""
import logging

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the closed-form path is not exercised")

from test_closed_form_functional import _check, _one_at_a_time  # noqa: E402

from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

nn = torch.nn
parametrizations, parametrize = torch.nn.utils.parametrizations, torch.nn.utils.parametrize


class Symmetric(nn.Module):
    """A user's parametrization: the weight is the upper triangle mirrored (a square Linear)."""

    def forward(self, x):
        return x.triu() + x.triu(1).transpose(-1, -2)


class Normed(nn.Module):
    """A weight-normed grouped Conv1d with padding (as Wav2Vec2's positional convolution: dim=2), a weight-normed
    Linear (dim=0), a symmetric Linear and a plain head."""

    def __init__(self, bias=True):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv1d(4, 4, 3, padding=2, groups=2, bias=bias), dim=2)
        self.lin = parametrizations.weight_norm(nn.Linear(4, 5))
        self.square = nn.Linear(5, 5)
        parametrize.register_parametrization(self.square, "weight", Symmetric())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).mean(-1)
        return self.head(torch.tanh(self.square(torch.tanh(self.lin(h)))))


def _data(n=5):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 4, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("bias", [True, False])
def test_parametrized_weights_in_closed_form(bias):
    """The originals' gradients are the weight's per-example gradients through the parametrization's
    vector-Jacobian product: equal to plain autograd one example at a time to 1e-9, with the closed form used."""
    torch.manual_seed(0)
    model = Normed(bias)
    with torch.no_grad():  # weight_norm's g away from ||v||, so the map is not the identity
        model.conv.parametrizations.weight.original0.mul_(1.7)
        model.lin.parametrizations.weight.original0.mul_(0.6)
    x, y = _data()
    _check(model, x, y, True, kinds={"conv", "linear"})


def test_a_parametrization_with_some_originals_left_out_goes_to_vmap():
    """Attributing one of weight_norm's two originals: the weight is not a function of attributed parameters only,
    so the layer is not followed; vmap gives the right gradients of the attributed ones."""
    torch.manual_seed(0)
    model = Normed().double().eval()
    x, y = _data()
    task = get_task("classification")
    keep = [name for name, _ in model.named_parameters() if not name.endswith("lin.parametrizations.weight.original0")]
    backend = TorchBackend(params=lambda name, tensor: name in keep)
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, x, y, task)
    reference = _one_at_a_time(model, x, y, task)
    columns = torch.cat([torch.full((p.numel(),), name in keep) for name, p in model.named_parameters()])
    reference = reference[:, columns]
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-9
    assert prepared._closed_form[id(task)] is None


def test_wav2vec2_takes_the_closed_form(caplog):
    """Wav2Vec2's weight-normed positional convolution kept the closed form out, and vmap cannot run its in-place
    masking (``hidden_states[~mask] = 0``), so it took one example at a time; now the closed form, on a padded batch
    with its mask, equal to each padded row with its mask alone."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: Wav2Vec2 not exercised")
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForSequenceClassification(transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        num_labels=3, classifier_proj_size=8, feat_extract_norm="group", mask_time_prob=0.0)).double().eval()
    with torch.no_grad():
        model.wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original0.mul_(1.5)
    g = torch.Generator().manual_seed(3)
    mask = (torch.arange(120)[None] < torch.tensor([120, 90, 70, 120])[:, None]).long()
    inputs = {"input_values": torch.randn(4, 120, generator=g, dtype=torch.float64) * mask, "attention_mask": mask}
    labels = torch.tensor([0, 2, 1, 2])
    task = get_task("classification")
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    caplog.set_level(logging.INFO, logger="trak_core")
    grads, _ = backend.gradients(model, prepared, inputs, labels, task)

    import array_api_compat.torch as xp

    rows = []
    for i in range(4):
        model.zero_grad()
        one = {key: value[i:i + 1] for key, value in inputs.items()}
        task.output(model(**one).logits, labels[i:i + 1], xp=xp).sum().backward()
        rows.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                               for p in model.parameters()]))
    reference = torch.stack(rows)
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-10
    assert prepared._closed_form[id(task)] is not None, caplog.text
