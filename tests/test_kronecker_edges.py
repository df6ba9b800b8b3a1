"""The torch factorized (Kronecker) projection on parameters shared in less common ways: a token table tied to a
head with a bias, a negative ``padding_idx`` passed to ``F.embedding``, one bias shared by two layers. Features
against per-example gradients times the explicit matrix (``test_kronecker._check_exact``), in one batched pass and
under ``vmap``."""
import logging

import numpy as np
import pytest

from trak_core import TRAK, Kronecker

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch factorized path is not exercised")

from test_kronecker import _check_exact  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

PATHS = ["auto", "vmap"]


class TiedHead(torch.nn.Module):
    """BERT's masked-LM layout: the token table is the head's weight, and the head has a bias of its own."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid = torch.nn.Embedding(7, 5, padding_idx=0), torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(5, 7)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))).mean(1))


@pytest.mark.parametrize("per_example", PATHS)
def test_a_table_tied_to_a_head_with_a_bias_is_one_block_with_that_bias(per_example):
    """The head's bias is folded into the table's block (7 x (5 + 1)); the lookup's output gradient takes the first
    5 rows of the column factor. Before, it took all 6 and the matrix product failed."""
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (6, 4))
    ids[0, -1] = 0
    y = torch.randint(0, 7, (6,))
    plan = _check_exact(TiedHead().double(), ids, y, "classification", k=24,
                        backend=TorchBackend(per_example=per_example))
    table = plan.block("emb.weight").layer
    assert (table.rows, table.cols, table.bias, table.bias_side) == (7, 6, "head.bias", "cols")


def test_a_table_tied_to_a_head_with_a_bias_equals_the_jax_backend():
    jax = pytest.importorskip("jax", reason="JAX is not installed: no JAX features to compare with")
    import jax.numpy as jnp
    from trak_core.tasks import get_task
    from trak_jax import JaxBackend

    torch.manual_seed(0)
    model = TiedHead().double()
    ids, y = torch.randint(1, 7, (6, 4)), torch.randint(0, 7, (6,))  # no padding: a JAX lookup has none
    task, options = get_task("classification"), Kronecker()
    backend = TorchBackend()
    expected, _ = backend.factorized_features(model, backend.prepare(model, None), ids, y, task, k=24, seed=5,
                                              checkpoint=1, options=options)

    def apply(params, ids):
        table, w, b, bias = params
        return jnp.tanh(table[ids] @ w.T + b).mean(1) @ table.T + bias

    with jax.enable_x64(True):
        weights = [jnp.asarray(p.detach().numpy()) for p in model.parameters()]  # emb, mid.weight, mid.bias, head.bias
        jax_backend = JaxBackend()
        got, _ = jax_backend.factorized_features(apply, jax_backend.prepare(apply, weights), jnp.asarray(ids.numpy()),
                                                 jnp.asarray(y.numpy()), task, k=24, seed=5, checkpoint=1,
                                                 options=options)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=1e-9, atol=1e-12 * np.abs(got).max())


def test_a_bert_masked_lm_head():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16)
    model = transformers.BertForMaskedLM(config).double().eval()
    ids = torch.randint(1, 30, (4, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    plan = _check_exact(model, {"input_ids": ids}, labels, "token_classification", k=64)
    table = plan.block("bert.embeddings.word_embeddings.weight").layer
    assert (table.rows, table.cols, table.bias) == (30, 17, "cls.predictions.bias")


class LastRowPadding(torch.nn.Embedding):
    """An Embedding subclass whose own forward passes ``padding_idx=-1``: torch keeps the last row's gradient at
    zero."""

    def forward(self, ids):
        return torch.nn.functional.embedding(ids, self.weight, -1)


class Pooled(torch.nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb, self.head = emb, torch.nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.parametrize("per_example", PATHS)
def test_a_negative_padding_idx_counts_from_the_end(per_example, caplog):
    """``F.embedding(ids, w, -1)`` pads with row 8 of 9, as ``nn.Embedding(9, 5, padding_idx=-1)`` does. Before,
    the ids were compared with -1, row 8 kept its gradient, and the features were 26% off; the dense closed form
    failed its check the same way and fell back to vmap."""
    torch.manual_seed(0)
    ids = torch.randint(5, 9, (6, 4))
    ids[0] = torch.tensor([5, 6, 7, 5])
    ids[1:, 0] = 8
    y = torch.randint(0, 3, (6,))
    for emb in (LastRowPadding(9, 5), torch.nn.Embedding(9, 5, padding_idx=-1)):
        with caplog.at_level(logging.INFO, logger="trak_core"):
            plan = _check_exact(Pooled(emb).double(), ids, y, "classification", k=24,
                                backend=TorchBackend(per_example=per_example))
        assert [b.layer.name for b in plan.blocks] == ["emb.weight", "head.weight"]
    assert "the closed form differs" not in caplog.text


class SharedBias(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
        self.b.bias = self.a.bias

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("per_example", PATHS)
def test_a_bias_shared_by_two_layers_is_the_rest(per_example):
    """Its gradient sums both layers' output gradients, which no one block sees: it is projected densely, as the
    JAX backend does. Before, it was folded into both blocks and the first example's check blamed 'a.weight'."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    model = SharedBias().double()
    plan = _check_exact(model, x, y, "classification", k=24, backend=TorchBackend(per_example=per_example))
    assert [(b.layer.name, b.layer.bias) for b in plan.blocks] == [("a.weight", None), ("b.weight", None),
                                                                   ("head.weight", "head.bias")]
    assert plan.rest == ("a.bias",)
    trak = TRAK(model, proj_type="kronecker", proj_dim=24, progress=False,
                backend=TorchBackend(per_example=per_example))
    trak.featurize(None, [(x, y)])  # the first example's check passes
    assert trak.store[0].features.shape == (6, 24)


def test_a_batched_pass_that_misreads_positions_goes_to_vmap():
    """Positions looked up on arange(T) without a batch dimension, T a multiple of the batch: the batched pass took
    them for the batch's tokens flattened. Its two-example check missed it where their gradients are small
    (weight 1e-12), the per-layer check against the dense gradient then refused the whole run ("used outside its
    module"). Now that batch and the next take vmap: the same features as each example featurized alone."""
    from test_closed_form import UnbatchedPositions

    torch.manual_seed(0)
    model = UnbatchedPositions(1e-12).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 13, (6, 6), generator=g), torch.randint(0, 3, (6,), generator=g)
    features = []
    for size in (6, 1):
        trak = TRAK(model, proj_dim=64, proj_type="kronecker", progress=False)
        trak.featurize(None, [(x[i:i + size], y[i:i + size]) for i in range(0, 6, size)])
        features.append(torch.as_tensor(trak.store[0].features[:]))
    assert float(features[1].norm()) > 1e-3
    torch.testing.assert_close(features[0], features[1], rtol=1e-10, atol=1e-12)


class Experts(torch.nn.Module):
    """Tokens routed to one of two experts by their id's parity; an example of even ids reaches expert 1 with none."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 5)
        self.experts = torch.torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    def forward(self, ids):
        tokens, flat = self.emb(ids).reshape(-1, 4), ids.reshape(-1)
        out = torch.zeros_like(tokens)
        for parity, expert in enumerate(self.experts):  # called on (0, 4) where no token is routed to it
            rows = torch.nonzero(flat % 2 == parity).squeeze(-1)
            out = out.index_add(0, rows, torch.tanh(expert(tokens[rows])))
        return self.head(out.reshape(*ids.shape, 4).mean(1))


def test_an_expert_called_on_no_token_adds_nothing():
    """One example at a time (vmap cannot take the routing), an expert called on no row of the example stopped the
    run: "cannot reshape tensor of 0 elements into shape [0, -1, 4]". Now it adds nothing to its block: the experts'
    blocks equal their gradients times the factors, built here by hand."""
    import math

    import array_api_compat.torch as xp
    from trak_core.kronecker import factor
    from trak_core.tasks import get_task

    torch.manual_seed(0)
    model, task, k = Experts().double().eval(), get_task("classification"), 30
    backend = TorchBackend(per_example="loop")
    ids, y = torch.tensor([[2, 4, 6], [1, 2, 3], [5, 7, 9]]), torch.tensor([0, 3, 4])
    features, _ = backend.factorized_features(model, backend.prepare(model, None), ids, y, task, k=k, seed=0,
                                              checkpoint=0, options=Kronecker())
    plan = backend.factorized_plan(model, backend.prepare(model, None), ids, y, task, k=k, options=Kronecker())
    for parity, expert in enumerate(model.experts):
        block = plan.block(f"experts.{parity}.weight")
        rows, cols = (torch.as_tensor(factor(d, kk, seed=0, checkpoint=0, index=block.index, side=side,
                                             dtype="float64"))
                      for d, kk, side in ((4, block.k_rows, "rows"), (5, block.k_cols, "cols")))
        for i in range(3):
            margin = task.output(model(ids[i:i + 1]), y[i:i + 1], xp=xp)[0]
            weight, bias = torch.autograd.grad(margin, [expert.weight, expert.bias])
            expected = (rows.T @ torch.cat([weight, bias[:, None]], 1) @ cols).reshape(-1)[:block.k]
            got = features[i, block.start:block.start + block.k] * math.sqrt(block.k)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
