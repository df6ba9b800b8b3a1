"""The torch backend on models and module states an architecture audit found wrong or failing: a first batch of
one example, per-submodule train/eval flags, recurrent layers, sparse embeddings, torch.utils.checkpoint and
TorchScript. Per-example gradients (``proj_dim=None``) against plain autograd one example at a time."""
import sys
import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402


def _reference(model, x, y):
    """Gradients of the classification margin, one example at a time, in named_parameters() order."""
    params = [p for _, p in model.named_parameters()]
    rows = []
    for i in range(x.shape[0]):
        logits = model(x[i:i + 1])[0]
        others = torch.cat([logits[:y[i]], logits[y[i] + 1:]])
        margin = logits[y[i]] - torch.logsumexp(others, 0)
        grads = torch.autograd.grad(margin, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
                               for g, p in zip(grads, params)]))
    return torch.stack(rows)


def _features(model, batches, **backend_options):
    trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=1.0, progress=False,
                          backend=TorchBackend(**backend_options))
    trak.featurize(None, batches)
    return trak.store[0].features


class SequenceFirst(torch.nn.Module):
    """A layer over (sequence, batch, features): examples are dim 1, which the closed form must not split by rows."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):  # x: (n, T, 4)
        h = torch.tanh(self.mix(x.transpose(0, 1)))  # (T, n, 4)
        return self.head(h.mean(0))


def test_a_first_batch_of_one_example_does_not_choose_the_closed_form_unchecked():
    """One example shows no interaction between examples: the closed form was chosen on it and gave 28-76% wrong
    gradients for sequence-first layers on every later batch. Now that batch takes vmap and the check waits."""
    torch.manual_seed(0)
    model = SequenceFirst().double().eval()
    x, y = torch.randn(7, 6, 4, dtype=torch.float64), torch.randint(0, 3, (7,))  # 6 steps: a multiple of 3 rows
    features = _features(model, [(x[:1], y[:1]), (x[1:4], y[1:4]), (x[4:], y[4:])])
    torch.testing.assert_close(features, _reference(model, x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("proj_type", ["rademacher", "kronecker"])
def test_each_submodules_training_flag_is_restored(proj_type):
    """model.train() with a BatchNorm frozen in eval(), and model.eval() with a Dropout left in train() (MC
    dropout): featurize set every flag to the top module's."""
    torch.manual_seed(0)
    norm, dropout = torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), norm, torch.nn.ReLU(), dropout, torch.nn.Linear(8, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    for top, frozen in ((True, norm), (False, dropout)):
        model.train(top)
        frozen.train(not top)
        trak = trak_core.TRAK(model, proj_dim=16, proj_type=proj_type, progress=False)
        trak.featurize(None, [(x, y)])
        assert model.training is top and frozen.training is (not top)
        assert all(m.training is top for m in model if m is not frozen)


class Recurrent(torch.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell", [torch.nn.GRU, torch.nn.RNN, torch.nn.LSTM], ids=["gru", "rnn", "lstm"])
def test_recurrent_layers_that_vmap_cannot_batch_loop_with_a_warning(cell):
    """vmap failed inside nn.GRU / nn.RNN (and float64 nn.LSTM) with a raw broadcasting error; the backend now
    takes those gradients one example at a time, says so once, and per_example="loop" asks for it."""
    torch.manual_seed(0)
    model = Recurrent(cell).double().eval()
    x, y = torch.randn(6, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        features = _features(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    looped = [w for w in caught if "vmap cannot take" in str(w.message)]
    assert len(looped) <= 1
    torch.testing.assert_close(features, _reference(model, x, y), rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(_features(model, [(x, y)], per_example="loop"), features, rtol=1e-12, atol=1e-14)


class Bag(torch.nn.Module):
    def __init__(self, bag, sparse):
        super().__init__()
        self.table = torch.nn.EmbeddingBag(10, 6, sparse=sparse) if bag else torch.nn.Embedding(10, 6, sparse=sparse)
        self.head = torch.nn.Linear(6, 3)
        self.bag = bag

    def forward(self, tokens):
        return self.head(self.table(tokens) if self.bag else self.table(tokens).mean(1))


@pytest.mark.parametrize("bag", [False, True], ids=["embedding", "embedding_bag"])
@pytest.mark.parametrize("proj_type", ["rademacher", "kronecker"])
def test_sparse_embeddings_give_the_dense_ones_gradients(bag, proj_type):
    """sparse=True changes only the gradient's format: features equal the sparse=False model's (they crashed in
    aten::view for the SparseCPU backend), and the flag is restored."""
    torch.manual_seed(0)
    sparse = Bag(bag, sparse=True).double()
    dense = Bag(bag, sparse=False).double()
    dense.load_state_dict(sparse.state_dict())
    tokens, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    scores = []
    for model in (sparse, dense):
        trak = trak_core.TRAK(model, proj_dim=32, proj_type=proj_type, lambda_reg=1.0, progress=False)
        trak.featurize(None, [(tokens, y)])
        scores.append(trak.score([(tokens[:2], y[:2])]))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-12, atol=1e-14)
    assert sparse.table.sparse is True
    torch.testing.assert_close(_features(sparse, [(tokens, y)]), _reference(dense, tokens, y), rtol=1e-10,
                               atol=1e-12)


def test_non_reentrant_activation_checkpointing_loops():
    """torch.utils.checkpoint(use_reentrant=False) registers saved-tensor hooks that torch.func refuses."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(checkpoint(self.body, x, use_reentrant=False))

    torch.manual_seed(0)
    model = Checkpointed().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.warns(RuntimeWarning, match="saved tensor hooks|_NoopSaveInputs"):  # torch >= 2.12 | 2.11
        features = _features(model, [(x, y)], per_example="vmap")
    torch.testing.assert_close(features, _reference(model, x, y), rtol=1e-10, atol=1e-12)


def test_torchscript_modules_get_the_eager_module_hint():
    model = torch.jit.script(torch.nn.Linear(4, 3))
    with pytest.raises(trak_core.TrakTypeError, match="TorchScript module .* pass the eager nn.Module"):
        trak_core.TRAK(model, proj_dim=8, progress=False).featurize(None, [(torch.randn(4, 4),
                                                                             torch.zeros(4, dtype=torch.long))])


def test_data_parallel_wrappers_get_the_inner_module_hint():
    """A bare "stateless API can't be used with nn.DataParallel" error before."""
    model = torch.nn.DataParallel(torch.nn.Linear(4, 3))
    with pytest.raises(trak_core.TrakTypeError, match=r"DataParallel wrapper .* pass the model it wraps, model.module"):
        trak_core.TRAK(model, proj_dim=8, progress=False).featurize(None, [(torch.randn(4, 4),
                                                                             torch.zeros(4, dtype=torch.long))])


def test_tuple_inputs_get_the_dict_batch_hint():
    """A model of two inputs given a tuple batch: the error named the tuple, not the dict batch that works."""
    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, a, b):
            return self.lin(a * b)

    model = TwoInputs().double()
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    with pytest.raises(trak_core.TrakTypeError, match=r"dict batch, called as model\(\*\*inputs\)"):
        trak_core.TRAK(model, proj_dim=None, progress=False).featurize(None, [((a, b), y)])
    with pytest.raises(trak_core.TrakTypeError, match=r"labels must be an array .*got list: make it an array of the "
                                                 r"model's framework, e.g. torch.as_tensor\(labels\)"):  # no dict hint
        trak_core.TRAK(model, proj_dim=None, progress=False).featurize(None, [({"a": a, "b": b}, y.tolist())])
    trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=1.0, progress=False)
    trak.featurize(None, [({"a": a, "b": b}, y)])  # as the hint says: gradients as plain autograd's
    rows = []
    for i in range(5):
        logits = model(a[i:i + 1], b[i:i + 1])[0]
        margin = logits[y[i]] - torch.logsumexp(torch.cat([logits[:y[i]], logits[y[i] + 1:]]), 0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, list(model.parameters()))]))
    torch.testing.assert_close(trak.store[0].features, torch.stack(rows), rtol=1e-10, atol=1e-12)


def test_errors_a_loop_would_hide_are_raised_with_what_to_do(monkeypatch):
    """Random numbers in eval mode (F.dropout without training=...) looped silently into noisy scores, and an
    out-of-memory inside vmap sent the checkpoint to the slow loop: both are raised, with the fix."""
    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.nn.functional.dropout(torch.tanh(self.lin(x)), 0.5))  # on in eval() too

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.raises(RuntimeError, match="randomness") as info:
        _features(Noisy(), [(x, y)], per_example="vmap")
    assert any("deterministic in eval mode" in note for note in info.value.__notes__)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")

    monkeypatch.setattr(sys.modules["trak_torch.backend"], "vmap_in_attention", out_of_memory)
    model = torch.nn.Linear(4, 3)
    with pytest.raises(RuntimeError, match="can't allocate memory") as info:
        _features(model, [(x, y)], per_example="vmap", chunk_size=8)
    assert any("smaller TorchBackend(chunk_size=...)" in note and "(now 8)" in note for note in info.value.__notes__)


def test_modes_are_restored_through_train_so_overrides_run():
    """A LoRA-style layer merges its update into the weight in eval() and unmerges it in train(): setting the
    training flags back directly left a training model merged (its update then counted twice)."""
    class Merging(torch.nn.Linear):
        def __init__(self):
            super().__init__(4, 3)
            self.update, self.merged = torch.nn.Parameter(torch.full((3, 4), 0.1)), False

        def train(self, mode=True):
            if mode == self.merged:  # merging on eval(), unmerging on train()
                with torch.no_grad():
                    self.weight += -self.update if mode else self.update
                self.merged = not mode
            return super().train(mode)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight if self.merged else self.weight + self.update, self.bias)

    torch.manual_seed(0)
    layer = Merging()
    model = torch.nn.Sequential(layer).train()
    weight = layer.weight.detach().clone()
    trak_core.TRAK(model, proj_dim=8, progress=False).featurize(None, [(torch.randn(6, 4),
                                                                         torch.randint(0, 3, (6,)))])
    assert layer.training and not layer.merged
    torch.testing.assert_close(layer.weight.detach(), weight)


def test_a_float64_model_that_makes_float32_constants_gets_the_default_dtype_hint():
    """transformers' XGLM makes ``torch.full((), finfo(float64).min)`` without dtype=: a float64 model fails in its
    own forward, and trak-core's note blamed its attention mask. The note names torch.set_default_dtype, which
    works (gradients then equal plain autograd's)."""
    class Floor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            z = self.lin(x)
            return torch.max(z, torch.full((), torch.finfo(z.dtype).min, device=z.device))

    torch.manual_seed(0)
    model = Floor().double().eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match="without overflow") as info:
        trak_core.TRAK(model, proj_dim=None, progress=False).featurize(None, [(x, y)])
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "torch.set_default_dtype(torch.float64)" in notes and "attention_mask" not in notes
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        trak = trak_core.TRAK(model, proj_dim=None, progress=False, backend=TorchBackend(per_example="vmap"))
        trak.featurize(None, [(x, y)])
        assert float(torch.linalg.vector_norm(trak.store[0].features - _reference(model, x, y))) < 1e-12
    finally:
        torch.set_default_dtype(before)


def test_a_plain_module_reading_its_own_attention_mask_gets_it_as_it_is():
    """attention_mask="auto" turned a plain module's 2-D mask into an additive 4-D one (a masked mean pooling
    crashed, with a note naming OPT and Bloom); only Hugging Face models get the 4-D mask."""
    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(20, 6), torch.nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask):
            h = self.embed(input_ids) * attention_mask[..., None]
            return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))

    torch.manual_seed(0)
    model = Pooled().double()
    ids, mask = torch.randint(0, 20, (5, 6)), torch.ones(5, 6, dtype=torch.float64)
    mask[1, 4:], mask[3, 2:] = 0, 0
    y = torch.randint(0, 3, (5,))
    trak = trak_core.TRAK(model, proj_dim=None, progress=False)
    trak.featurize(None, [{"input_ids": ids, "attention_mask": mask, "labels": y}])

    class Call(torch.nn.Module):  # the reference: the module on one example at a time
        def __init__(self, i):
            super().__init__()
            self.model, self.i = model, i

        def forward(self, _):
            return self.model(ids[self.i:self.i + 1], mask[self.i:self.i + 1])

    reference = torch.cat([_reference(Call(i), torch.zeros(1), y[i:i + 1]) for i in range(5)])
    assert float(torch.linalg.vector_norm(trak.store[0].features - reference)) < 1e-12


def test_non_finite_tensors_are_named(caplog):
    """NaN weights were refused without a name, and a NaN BatchNorm statistic (not attributed) only surfaced as NaN
    out-to-loss weights that said "check the checkpoint's weights"."""
    import logging

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)).eval()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["2.weight"][1, 2] = float("nan")
    with pytest.raises(trak_core.TrakValueError, match=r"parameters contain NaN or inf: \['2\.weight'\]"):
        trak_core.TRAK(model, proj_dim=8, progress=False).featurize(state, [(x, y)])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.running_var"][0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="trak_core"), pytest.raises(trak_core.TrakValueError, match="NaN"):
        trak_core.TRAK(model, proj_dim=8, progress=False).featurize(state, [(x, y)])
    assert "['1.running_var'], which are not attributed, contain NaN" in caplog.text
