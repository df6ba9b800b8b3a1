"""The closed form on a selection of the parameters: biases alone (BitFit: ``params=`` keeping ``*.bias``), a norm's
bias without its weight, and weights without their biases, against each model's own backward pass one example at a
time (float64) on the selected columns."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the closed-form path is not exercised")

from test_closed_form_functional import _one_at_a_time  # noqa: E402

from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

nn = torch.nn


class Mixed(nn.Module):
    """A Conv2d, a BatchNorm2d with running statistics, a GroupNorm, a LayerNorm and Linear layers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn, self.gn = nn.BatchNorm2d(4), nn.GroupNorm(2, 4)
        self.lin, self.ln, self.head = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.gn(self.bn(self.conv(x)))).mean((2, 3))
        return self.head(torch.tanh(self.ln(self.lin(h))))


@pytest.mark.parametrize("keep", [
    lambda name: name.endswith("bias"),
    lambda name: name.endswith("weight"),
    lambda name: name in ("bn.bias", "ln.bias", "head.weight", "conv.bias"),
], ids=["biases-alone", "weights-alone", "some"])
def test_a_selection_of_parameters_in_closed_form(keep):
    """Before, a bias whose layer's weight was not attributed was no layer's: the closed form was refused ("a bare
    parameter (4,) is used by conv2d") and the model took vmap."""
    torch.manual_seed(0)
    model = Mixed().double().eval()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=g, dtype=torch.float64))
        model.bn.running_mean.normal_(0, 0.2, generator=g)
        model.bn.running_var.uniform_(0.5, 1.5, generator=g)
    x, y = torch.randn(5, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    task = get_task("classification")
    backend = TorchBackend(params=lambda name, tensor: keep(name))
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, x, y, task)
    columns = torch.cat([torch.full((p.numel(),), keep(name)) for name, p in model.named_parameters()])
    reference = _one_at_a_time(model, x, y, task)[:, columns]
    assert grads.shape == reference.shape
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-12
    assert prepared._closed_form[id(task)] is not None


class TiedDirect(nn.Module):
    """An embedding table looked up by its layer and also multiplied directly (``x @ table.T``), both scaled by
    ``weight``: the table's gradient has a part no layer call shows."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight
        self.emb, self.lin, self.head = nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        ids = (x.abs() * 3).long().clamp(max=6)
        side = self.emb(ids).sum(1) + (torch.tanh(x) @ self.emb.weight.T)[:, :5]
        return self.head(torch.tanh(self.lin(x)) + self.weight * side)


@pytest.mark.parametrize("weight", [1.0, 1e-12])
def test_a_weight_used_outside_its_layer_goes_to_vmap(weight, caplog):
    """Only the lookup's part of the table's gradient reaches the closed form: 6-8% of it was missing at CUDA's
    tolerance. At weight 1e-12 the table's part of the gradient is far below even float64's tolerance, so only the
    watch over the table's uses tells: the closed form is refused, the table's gradients right."""
    import logging

    caplog.set_level(logging.INFO, logger="trak_core")
    torch.manual_seed(0)
    model = TiedDirect(weight).double().eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    task = get_task("classification")
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, x, y, task)
    reference = _one_at_a_time(model, x, y, task)
    table = slice(0, 35)  # emb.weight comes first
    norm = torch.linalg.vector_norm
    error = norm(grads[:, table] - reference[:, table]) / norm(reference[:, table])
    assert float(error) < 1e-9, float(error)
    assert prepared._closed_form[id(task)] is None
    assert "emb.weight is used by" in caplog.text and "outside its layer's call" in caplog.text


class SometimesTable(nn.Module):
    """A table ``(4, 5)`` no layer owns: unused by a batch of small inputs, sliced and added by one with a large
    input (control flow on the data), and a table never used at all."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(5, 5), nn.Linear(5, 3)
        self.table, self.never = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if bool(x.abs().max() > 10):
            h = h + self.table[:2].sum(0)
        return self.head(h)


def test_a_parameter_no_call_uses_has_zero_gradients_until_a_batch_uses_it(caplog):
    """Before, any attributed parameter that was neither a supported layer's nor broadcast over the batch sent the
    model to vmap (an untied BART's ``model.shared.weight``, whose module is never called). Now it has zero gradients
    while autograd finds no use of it; a later batch that uses it goes to vmap, with the right numbers."""
    import logging

    caplog.set_level(logging.INFO, logger="trak_core")
    torch.manual_seed(0)
    model = SometimesTable().double().eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    task = get_task("classification")
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    norm = torch.linalg.vector_norm
    grads, _ = backend.gradients(model, prepared, x[:3], y[:3], task)
    reference = _one_at_a_time(model, x[:3], y[:3], task)
    assert float(norm(grads - reference) / norm(reference)) < 1e-12
    assert prepared._closed_form[id(task)] is not None
    assert "unused" in caplog.text
    x[4, 0] = 20.0  # this batch slices the table: not a use the closed form follows
    grads, _ = backend.gradients(model, prepared, x[3:], y[3:], task)
    reference = _one_at_a_time(model, x[3:], y[3:], task)
    assert float(norm(reference[:, 48:68])) > 0.1  # the table's gradients (after lin, head) are there
    assert float(norm(grads - reference) / norm(reference)) < 1e-12
    assert prepared._closed_form[id(task)] is None
    assert "table (4, 5) is used by an operation the closed form does not follow" in caplog.text


class Logits(nn.Module):
    """A Hugging Face classifier called on a tensor of token ids: its logits."""

    def __init__(self, model):
        super().__init__()
        self.bart = model

    def forward(self, ids):
        return self.bart(input_ids=ids).logits


def untied_bart(transformers):
    """A tiny ``BartForSequenceClassification`` with ``tie_word_embeddings=False`` (float64, eval) and a batch of
    four: ``model.shared`` is never called, the encoder's and decoder's tables are their own."""
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=40, d_model=8, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16, max_position_embeddings=16, num_labels=3,
                                     tie_word_embeddings=False)
    model = transformers.BartForSequenceClassification(config).double().eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 40, (4, 6), generator=g)
    ids[:, -1] = config.eos_token_id
    return model, ids, torch.randint(0, 3, (4,), generator=g)


def test_an_untied_bart_takes_the_closed_form():
    """BART with ``tie_word_embeddings=False``: ``model.shared`` is never called (the encoder's and decoder's tables
    are their own); its gradients are zero, the rest in closed form, against BART's own backward pass one example at
    a time (float64). It took vmap before."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")

    model, ids, y = untied_bart(transformers)
    task = get_task("classification")
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, {"input_ids": ids}, y, task)
    reference = _one_at_a_time(Logits(model), ids, y, task)
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-12
    assert prepared._closed_form[id(task)] is not None
    assert "model.shared.weight" in prepared.params and model.model.shared.weight is not \
        model.model.encoder.embed_tokens.weight


@pytest.mark.parametrize("per_example", ["auto", "vmap", "loop"])
def test_a_selection_that_no_op_uses_has_zero_gradients(per_example):
    """Only ``never`` attributed: the one-example loop (the closed form's check, the Kronecker rest's check, the
    ``loop`` path) asked autograd for the gradients of an output that depends on no attributed parameter and
    crashed ("element 0 of tensors does not require grad")."""
    torch.manual_seed(0)
    model = SometimesTable().double().eval()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    task = get_task("classification")
    backend = TorchBackend(per_example=per_example, params=lambda name, tensor: name == "never")
    grads, _ = backend.gradients(model, backend.prepare(model, None), x, y, task)
    columns = torch.cat([torch.full((p.numel(),), name == "never") for name, p in model.named_parameters()])
    reference = _one_at_a_time(model, x, y, task)[:, columns]
    assert grads.shape == (4, 6) and float(reference.abs().max()) == 0.0
    torch.testing.assert_close(grads, reference, rtol=0, atol=0)
