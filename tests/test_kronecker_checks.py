"""The torch factorized (Kronecker) projection's checks: a weight used outside its module in an example other than
the first, a first batch of one example, calls the batched pass cannot follow, and the per-block check's rounding
allowance on a large table. Features against per-example gradients times the explicit matrix
(``test_kronecker._check_exact``)."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch factorized path is not exercised")

from test_kronecker import _check_exact  # noqa: E402
from trak_core import TRAK, Kronecker  # noqa: E402
from trak_core.errors import TrakValueError  # noqa: E402
from trak_core.kronecker import explicit_matrix  # noqa: E402
from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

nn = torch.nn


class SometimesOutside(nn.Module):
    """``lin.weight`` is also used through ``F.linear`` for the examples holding token 1 (not the first one)."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(9, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids))).mean(1)
        special = (ids == 1).any(1, keepdim=True).to(h.dtype)  # lin.weight outside lin's own call, weighted 0 in
        return self.head(h + special * nn.functional.linear(h, self.lin.weight))  # the examples without token 1


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_a_use_outside_the_module_in_a_later_example_is_refused(per_example):
    """Only the first example was checked against its dense gradient: the lin.weight block was 49-93% off in the
    other examples, on both paths, in float64, silently."""
    torch.manual_seed(0)
    model = SometimesOutside().double().eval()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(2, 9, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)
    ids[1:, 2] = 1
    backend = TorchBackend(per_example=per_example)
    with pytest.raises(TrakValueError, match=r"lin\.weight is used by linear outside its layer's call, which the "
                                             r"factorized projection does not see"):
        backend.factorized_features(model, backend.prepare(model, None), ids, y, get_task("classification"), k=32,
                                    seed=0, checkpoint=0, options=Kronecker())


class Positions(nn.Module):
    """Positions looked up on ``arange(T)`` without a batch dimension, weighted down so that the whole-vector check
    of a batched pass (float32's 1e-4) cannot see them."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos, self.lin, self.head = nn.Embedding(20, 16), nn.Embedding(16, 16), nn.Linear(16, 16), \
            nn.Linear(16, 5)

    def forward(self, ids):
        h = self.emb(ids) + 1e-4 * self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(self.lin(h)).mean(1))


def test_a_first_batch_of_one_leaves_the_check_to_the_next_batch():
    """A checkpoint's first batch of one example was checked (where no rows can be misread) and marked checked; the
    next batch took the batched pass on the whole-vector check alone: the positions' block 94.5% off (float32)."""
    torch.manual_seed(0)
    model = Positions().eval()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 20, (9, 8), generator=g), torch.arange(9) % 5
    task, options, backend = get_task("classification"), Kronecker(), TorchBackend()
    prepared = backend.prepare(model, None)
    features = torch.cat([backend.factorized_features(model, prepared, ids[a:b], y[a:b], task, k=64, seed=3,
                                                      checkpoint=0, options=options)[0]
                          for a, b in ((0, 1), (1, 5), (5, 9))])
    plan = backend.factorized_plan(model, prepared, ids, y, task, k=64, options=options)
    model64 = Positions().double().eval()
    model64.load_state_dict({name: t.double() for name, t in model.state_dict().items()})
    dense = TorchBackend(per_example="loop")
    grads, _ = dense.gradients(model64, dense.prepare(model64, None), ids, y, task)
    matrix = torch.as_tensor(explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=3,
                                             checkpoint=0))
    reference = grads @ matrix
    block = plan.block("pos.weight")
    columns = slice(block.start, block.start + block.k)
    error = (features[:, columns].double() - reference[:, columns]).norm() / reference[:, columns].norm()
    assert float(error) < 1e-4, float(error)
    torch.testing.assert_close(features.double(), reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


class Looped(nn.Module):
    """The model's own loop over examples: each call of ``lin`` is on one example, ``(1, T, d)``."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(10, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, ids):
        e = self.emb(ids)
        return self.head(torch.tanh(torch.cat([self.lin(e[i:i + 1]) for i in range(e.shape[0])])).mean(1))


class Global(Looped):
    """A learned ``(1, d)`` vector through a layer, squeezed and added to every token."""

    def __init__(self):
        super().__init__()
        self.g, self.q = nn.Parameter(torch.randn(1, 6)), nn.Linear(6, 6)

    def forward(self, ids):
        return self.head(torch.tanh(self.lin(self.emb(ids) + self.q(self.g).squeeze(0))).mean(1))


@pytest.mark.parametrize("make", [Looped, Global])
def test_calls_of_one_row_that_are_not_shared_by_the_batch_go_to_vmap(make):
    """A call on ``(1, ...)`` was taken for one shared by the batch (positions ``(1, T)``) and its output widened to
    the batch: a bare shape error from inside the model, with no fallback. Now vmap, exact."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 10, (4, 5), generator=g), torch.arange(4) % 3
    _check_exact(make().double().eval(), ids, y, "classification", k=32)


def test_the_per_block_check_refuses_a_large_table_half_off_at_the_loose_tolerance(monkeypatch):
    """The rounding allowance of the check against the dense gradient was the tolerance times the terms' sum of
    absolute values over the features' norm: x159 for a 512 x 128 table, so at half precision's and CUDA's 1e-2 a
    block 62% off passed. Now the terms' root sum of squares (x10 margin) bounds it."""
    from trak_torch import closed_form
    from trak_torch.kronecker_check import check_plan

    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(512, 128), nn.Linear(128, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)).mean(1))

    torch.manual_seed(0)
    model = Table().double().eval()
    g = torch.Generator().manual_seed(2)
    ids, y = torch.randint(0, 512, (3, 64), generator=g), torch.arange(3)
    task, backend = get_task("classification"), TorchBackend()
    prepared = backend.prepare(model, None)
    features, _ = backend.factorized_features(model, prepared, ids, y, task, k=256, seed=0, checkpoint=0,
                                              options=Kronecker())
    state = next(iter(prepared._kronecker.values()))
    block = state.plan.block("emb.weight")
    monkeypatch.setattr(closed_form, "check_tolerance", lambda dtype, device: 1e-2)
    check_plan(backend, model, prepared, state, ids, y, task, False, features)  # the right features pass
    wrong = features.clone()
    wrong[:, block.start:block.start + block.k] *= 1.5  # 50% off
    with pytest.raises(TrakValueError, match="features of layer 'emb.weight' differ"):
        check_plan(backend, model, prepared, state, ids, y, task, False, wrong)


def test_an_untied_bart_keeps_the_batched_pass():
    """BART with ``tie_word_embeddings=False``: ``model.shared`` is never called, so it is in the rest with zero
    gradients; before, it kept the rest from the batched pass, and vmap then failed on BART's classification head."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")
    from test_closed_form_selections import Logits, untied_bart

    bart, ids, y = untied_bart(transformers)
    plan = _check_exact(Logits(bart), ids, y, "classification", k=48, backend=TorchBackend())
    assert "bart.model.shared.weight" in plan.rest


class LongTable(nn.Module):
    """A position table ``(6, 5)`` of the rest (sliced: no layer's) that only sequences longer than 3 use."""

    def __init__(self):
        super().__init__()
        self.lin, self.head, self.table = nn.Linear(5, 5), nn.Linear(5, 3), nn.Parameter(torch.randn(6, 5))

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if x.shape[-2] > 3:
            h = h + self.table[:x.shape[-2]]
        return self.head(h.mean(-2))


def test_a_rest_table_used_by_a_later_batch_takes_vmap_from_then_on():
    """A table of the rest that the first batch does not use (zero gradients in the batched pass), sliced by a later
    batch: that batch and the next take vmap, with the right features."""
    torch.manual_seed(0)
    model = LongTable().double().eval()
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, length, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
               for length in (3, 6, 3)]
    task, options, backend, dense = get_task("classification"), Kronecker(), TorchBackend(), TorchBackend()
    prepared = backend.prepare(model, None)
    plan = backend.factorized_plan(model, prepared, *batches[0], task, k=32, options=options)
    assert plan.rest == ("table",) and list(prepared.params)[0] == "table"
    matrix = torch.as_tensor(explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=0,
                                             checkpoint=0))
    for i, (x, y) in enumerate(batches):
        features, _ = backend.factorized_features(model, prepared, x, y, task, k=32, seed=0, checkpoint=0,
                                                  options=options)
        assert next(iter(prepared._kronecker.values())).batched is (i == 0)
        grads, _ = dense.gradients(model, dense.prepare(model, None), x, y, task)
        table = float(grads[:, :30].norm())  # the module's own parameter comes first
        assert table > 0.1 if i == 1 else table == 0
        torch.testing.assert_close(features, grads @ matrix, rtol=1e-9, atol=1e-12)


def _hugging_face(name):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    if name == "t5":
        config = transformers.T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                                       num_heads=2, num_labels=3, decoder_start_token_id=0)
        model, ids = transformers.T5ForSequenceClassification(config), torch.randint(3, 40, (4, 8), generator=g)
        ids[:, -1] = config.eos_token_id
        x = {"input_ids": ids}
    else:
        config = transformers.Wav2Vec2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=16, conv_dim=(4, 4), conv_stride=(5, 2),
                                             conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                                             num_conv_pos_embedding_groups=2, num_labels=3)
        model = transformers.Wav2Vec2ForSequenceClassification(config)
        mask = torch.ones(4, 300, dtype=torch.long)
        mask[1, 200:] = 0  # padded: the encoder zeroes the padded frames in place, which vmap cannot run
        x = {"input_values": torch.randn(4, 300, generator=g, dtype=torch.float64) * mask, "attention_mask": mask}
    return model.double().eval(), x, torch.randint(0, 3, (4,), generator=g)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", ["t5", "wav2vec2"])
def test_models_vmap_cannot_run_are_featurized_one_example_at_a_time(name):
    """T5's classifier (``unique_consecutive``) and Wav2Vec2 (in-place masking, weight-normed convolution in the
    rest) went to vmap, which cannot run them: the factorized path crashed. Now one example at a time in the
    batched pass (any call shape is that example's), the rest by plain autograd."""
    model, x, y = _hugging_face(name)
    backend = TorchBackend()
    with pytest.warns(RuntimeWarning, match="one example at a time"):
        _check_exact(model, x, y, "classification", k=48, backend=backend)


def test_per_example_loop_takes_one_example_at_a_time_without_vmap(caplog):
    """``per_example="loop"`` took vmap on the factorized path; now one example at a time through the batched pass."""
    import logging

    caplog.set_level(logging.INFO, logger="trak_core")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ids, y = torch.randint(0, 20, (5, 8), generator=g), torch.arange(5) % 5
    backend = TorchBackend(per_example="loop")
    model = Positions().double().eval()
    _check_exact(model, ids, y, "classification", k=40, backend=backend)
    assert "factorized features one example at a time: per_example='loop'" in caplog.text


def test_a_swin_with_one_head_goes_to_vmap_exactly():
    """Hugging Face Swin with one attention head: its relative position bias table ``(K, 1)`` looks like a scale
    ``(C, 1)`` and was passed as copies, which the model then indexes: an IndexError from the first batch's
    batched pass ended the run. Now that batch's path is vmap, exact."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")

    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                     window_size=2, num_labels=3)
    model = transformers.SwinForImageClassification(config).double().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 16, 16, generator=g, dtype=torch.float64), torch.arange(3)
    _check_exact(model, x, y, "classification", k=48)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_in_half_precision_a_block_off_under_vmap_is_a_warning(dtype, monkeypatch):
    """bfloat16 EfficientNet's squeeze-excitation blocks are 5-23% from the float64 gradient both in the features
    and in the dense bfloat16 gradient, 33% from each other: the check refused it as a use outside the module. In half
    precision under vmap a block off is now a warning (the watch sees uses outside modules); in float32 an error.
    The check's tolerance is made tiny here, so that rounding alone is more than it allows."""
    from trak_torch import closed_form

    torch.manual_seed(0)
    model = Positions().to(getattr(torch, dtype)).eval()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 20, (4, 8), generator=g), torch.arange(4) % 5
    monkeypatch.setattr(closed_form, "check_tolerance", lambda dtype, device: 1e-12)
    backend = TorchBackend(per_example="vmap")

    def run():
        return backend.factorized_features(model, backend.prepare(model, None), ids, y, get_task("classification"),
                                           k=64, seed=0, checkpoint=0, options=Kronecker())[0]

    if dtype == "float32":
        with pytest.raises(TrakValueError, match="differ from its gradient's projection"):
            run()
        return
    with pytest.warns(RuntimeWarning, match=r"in torch.bfloat16, the first example's features of layer .* no use of "
                                            "it outside its module was seen"):
        features = run()
    model64 = Positions().double().eval()
    model64.load_state_dict({name: t.double() for name, t in model.state_dict().items()})
    reference = TorchBackend(per_example="vmap")
    expected = reference.factorized_features(model64, reference.prepare(model64, None), ids, y,
                                             get_task("classification"), k=64, seed=0, checkpoint=0,
                                             options=Kronecker())[0]
    error = (features.double() - expected).norm() / expected.norm()
    assert float(error) < 3e-2, float(error)  # bfloat16's rounding


def test_in_half_precision_a_use_outside_the_module_is_still_an_error():
    torch.manual_seed(0)
    model = SometimesOutside().to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(2, 9, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)
    ids[1:, 2] = 1
    backend = TorchBackend(per_example="vmap")
    with pytest.raises(TrakValueError, match=r"lin\.weight is used by linear outside its layer's call"):
        backend.factorized_features(model, backend.prepare(model, None), ids, y, get_task("classification"), k=32,
                                    seed=0, checkpoint=0, options=Kronecker())


@pytest.mark.parametrize("hidden, named", [
    (8, r"cannot follow torch.utils.checkpoint \(gradient checkpointing written in the model's forward; torch: "),
    (6, r"or the layer runs inside torch.utils.checkpoint \(gradient checkpointing written in forward\)")])
def test_a_layer_under_torch_utils_checkpoint_is_refused_naming_it(hidden, named):
    """A layer called inside ``torch.utils.checkpoint`` in ``forward``: the recomputation runs it again without the
    factorized path's perturbations. Where shapes then differ, torch raised its CheckpointError (no word of what to
    do); where they agree, the captured gradient is wrong (1.45 relative in an audit) and the first batch's check
    blamed a use of the weight outside its module, which there was not. Both errors now name the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, hidden), torch.nn.Linear(hidden, 3)

        def forward(self, x):
            return self.b(checkpoint(lambda h: torch.tanh(self.a(h)), x, use_reentrant=False))

    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    trak = TRAK(Checkpointed(), proj_type="kronecker", proj_dim=16, progress=False)
    with pytest.raises(TrakValueError, match=named):
        trak.featurize(None, [(x, y)])


class Unpadded(nn.Module):
    """Unpadded tokens (``hidden[mask]``, as flash attention's varlen path and ModernBERT take them) through ``lin``."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(20, 6), nn.Linear(6, 8), nn.Linear(8, 7)

    def forward(self, ids, attention_mask):
        keep = attention_mask.bool()
        tokens = torch.tanh(self.lin(self.emb(ids)[keep]))  # (tokens in the batch, 8)
        hidden = tokens.new_zeros((*ids.shape, 8)).masked_scatter(keep[..., None], tokens)
        return self.head(hidden.sum(1) / attention_mask.sum(1, keepdim=True))


@pytest.mark.filterwarnings("ignore:proj_type='kronecker'.*one example at a time:RuntimeWarning")
def test_unpadded_tokens_whose_count_divides_by_the_batch_are_not_taken_for_examples():
    """A first batch without padding took the batched pass; a later one of 12 unpadded tokens (5, 3, 2, 2) over 4
    examples was read as 3 tokens per example, and lin's block was 76% off, silently. Now rows picked by a mask send
    the checkpoint off the batched pass: lin's block equals its gradients times the factors, built here by hand."""
    import math

    import array_api_compat.torch as xp
    from trak_core.kronecker import factor

    torch.manual_seed(0)
    model, backend, task, k = Unpadded().double().eval(), TorchBackend(), get_task("classification"), 40
    prepared = backend.prepare(model, None)
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 20, (4, 5), generator=g), torch.randint(0, 7, (4,), generator=g)
    full, unpadded = torch.ones_like(ids), (torch.arange(5)[None] < torch.tensor([5, 3, 2, 2])[:, None]).long()
    backend.factorized_features(model, prepared, {"ids": ids, "attention_mask": full}, y, task, k=k, seed=0,
                                checkpoint=0, options=Kronecker())
    x = {"ids": ids, "attention_mask": unpadded}
    features, _ = backend.factorized_features(model, prepared, x, y, task, k=k, seed=0, checkpoint=0,
                                              options=Kronecker())
    block = backend.factorized_plan(model, prepared, x, y, task, k=k, options=Kronecker()).block("lin.weight")
    rows, cols = (torch.as_tensor(factor(d, kk, seed=0, checkpoint=0, index=block.index, side=side, dtype="float64"))
                  for d, kk, side in ((8, block.k_rows, "rows"), (7, block.k_cols, "cols")))
    for i in range(4):
        one = {key: value[i:i + 1] for key, value in x.items()}
        margin = task.output(model(**one), y[i:i + 1], xp=xp)[0]
        weight, bias = torch.autograd.grad(margin, [model.lin.weight, model.lin.bias])
        gradient = torch.cat([weight, bias[:, None]], 1)  # (8 outputs, 6 inputs + the bias)
        expected = (rows.T @ gradient @ cols).reshape(-1)[:block.k] / math.sqrt(block.k)
        got = features[i, block.start:block.start + block.k]
        assert float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected)) < 1e-12
