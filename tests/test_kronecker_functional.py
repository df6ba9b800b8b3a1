"""The factorized projection of weights used inside functional calls (trak_torch.kronecker_functional):
``nn.MultiheadAttention``'s projections and Embedding subclasses with their own forward, against dense per-example
gradients (``vmap(grad)``, the same attention) times the explicit Kronecker matrix."""
import sys
from pathlib import Path

import numpy as np
import pytest

from trak_core import Kronecker
from trak_core.kronecker import explicit_matrix

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch factorized path is not exercised")

from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _vit import VisionTransformer  # noqa: E402


def _exact(model, x, y, task, k, options=None, **backend_options):
    """Features == dense per-example gradients @ the explicit matrix, to float64 rounding; the plan and whether the
    features came from one batched pass (then the reference is the closed form's, which runs the model's own
    attention, SDPA, as the batched pass does; else vmap's, in eager attention, as the vmap pass)."""
    options, task = options or Kronecker(), get_task(task)
    backend = TorchBackend(**backend_options)
    prepared = backend.prepare(model, None)
    plan = backend.factorized_plan(model, prepared, x, y, task, k=k, options=options)
    features, _ = backend.factorized_features(model, prepared, x, y, task, k=k, seed=3, checkpoint=2, options=options)
    batched = prepared._kronecker[(k, 3, 2, options)].batched
    dense = TorchBackend(**{**backend_options, "per_example": "auto" if batched else "vmap"})  # the same attention
    grads, _ = dense.gradients(model, dense.prepare(model, None), x, y, task)
    matrix = explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=3, checkpoint=2)
    reference = grads.numpy() @ matrix
    assert np.abs(reference).max() > 1e-6
    np.testing.assert_allclose(features.numpy(), reference, rtol=0, atol=1e-12 * np.abs(reference).max())
    return plan, batched


class ScaledEmbedding(torch.nn.Embedding):
    """An Embedding subclass with its own forward (as Gemma's)."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class TiedScaled(torch.nn.Module):
    """Gemma's layout: a scaled token table, tied to the head."""

    def __init__(self, flatten_large_batches=False):
        super().__init__()
        self.emb, self.lin = ScaledEmbedding(9, 4, padding_idx=0), torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 9, bias=False)
        self.head.weight = self.emb.weight
        self.flatten = flatten_large_batches

    def forward(self, ids):
        if self.flatten and ids.shape[0] > 2:  # a lookup with no row per example, on larger batches only
            e = self.emb(ids.reshape(-1)).reshape(*ids.shape, -1)
        else:
            e = self.emb(ids)
        return self.head(torch.tanh(self.lin(e))).mean(1)


@pytest.mark.parametrize("rest", ["dense", "drop"])
def test_embedding_subclasses_and_their_tied_head_are_one_block(rest):
    """The scaled table is followed through its F.embedding call (its factor is not off by the scale) and its tied
    head adds to the same block; before, the table went to the rest and the head's block failed the check."""
    torch.manual_seed(0)
    ids = torch.randint(0, 9, (6, 3))
    ids[1, 0] = 0  # padding: no gradient reaches row 0 through the lookup
    for model, blocks in ((torch.nn.Sequential(ScaledEmbedding(9, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3)),
                           ["0.weight", "2.weight"]), (TiedScaled(), ["emb.weight", "lin.weight"])):
        plan, batched = _exact(model.double(), ids, torch.randint(0, 3, (6,)), "classification", k=24,
                               options=Kronecker(rest=rest))
        assert [b.layer.name for b in plan.blocks] == blocks and plan.rest == () and batched is True


class Attention(torch.nn.Module):
    """``nn.MultiheadAttention`` in its settings: self-attention on the raw input (the fused fast path), cross
    (row slices of ``in_proj_weight`` and ``in_proj_bias``), ``kdim``/``vdim`` (separate q/k/v weights, the bias
    chunked across them), sequence-first with a padding mask and returned weights."""

    def __init__(self, case):
        super().__init__()
        self.case = case
        kdim = 5 if case == "kdim" else None
        self.att = torch.nn.MultiheadAttention(6, 2, kdim=kdim, vdim=kdim, batch_first=case == "self",
                                               bias=case != "nobias")
        self.mem = None if case == "self" else torch.nn.Linear(3, kdim or 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        if self.case == "self":  # batch-first, on the model's input: nothing requires gradients
            return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))
        q, m = x[:, :4].transpose(0, 1), self.mem(x[:, 4:, :3]).transpose(0, 1)
        mask = x[:, 4:, 1] > 0.8  # padding, each example's own
        return self.head(self.att(q, m, m, key_padding_mask=mask)[0].mean(0))


@pytest.mark.parametrize("case", ["self", "cross", "kdim", "nobias"])
@pytest.mark.parametrize("rest", ["dense", "drop"])
def test_multihead_attention_projections_are_blocks(case, rest):
    torch.manual_seed(0)
    model = Attention(case).double().eval()
    x, y = torch.randn(5, 7, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    plan, batched = _exact(model, x, y, "classification", k=30, options=Kronecker(rest=rest))
    names = [b.layer.name for b in plan.blocks]
    if case == "kdim":
        assert names[:4] == ["att.q_proj_weight", "att.k_proj_weight", "att.v_proj_weight", "att.out_proj.weight"]
        assert plan.rest == (("att.in_proj_bias",) if rest == "dense" else ())  # chunked over three weights
    else:
        assert names[:2] == ["att.in_proj_weight", "att.out_proj.weight"]
        assert plan.block("att.in_proj_weight").layer.bias == (None if case == "nobias" else "att.in_proj_bias")
        assert plan.rest == ()
    assert batched is (plan.rest == ())  # in_proj_bias, chunked over q/k/v weights, is not in closed form: vmap
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while a pass runs


@pytest.mark.parametrize("rest", ["dense", "drop"])
def test_a_vision_transformer_and_a_transformer_encoder(rest):
    """torchvision's ViT layout (class token and position embeddings in the rest) and ``nn.TransformerEncoder``:
    every attention and MLP weight a block."""
    torch.manual_seed(0)
    vit = VisionTransformer(image=8, patch=4, width=8, depth=2, heads=2, num_classes=3).double().eval()
    plan, batched = _exact(vit, torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,)),
                           "classification", k=40, options=Kronecker(rest=rest))
    assert batched is True  # a dense rest of a class token, position embeddings and layer norms: in the pass
    assert len(plan.blocks) == 2 + 4 * 2 and "layers.1.self_attention.in_proj_weight" in [b.layer.name for b in
                                                                                          plan.blocks]

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            layer = torch.nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.enc(x)[:, 0])

    plan, _ = _exact(Encoder().double().eval(), torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,)),
                     "classification", k=30, options=Kronecker(rest=rest))
    assert sum(b.layer.name.endswith("self_attn.in_proj_weight") for b in plan.blocks) == 2


@pytest.mark.parametrize("name", ["mistral", "qwen2", "phi", "gpt_neox", "falcon", "bloom", "gemma", "opt"])
def test_hugging_face_causal_lms(name):
    """Tiny causal LMs of several families, with padding, exact with the rest dense and dropped: one batched pass in
    the model's own attention (SDPA), the rest's layer and RMS norms in it (OPT's on flattened tokens), except for
    Gemma's dense rest (its RMSNorm computes in float32, 3.8e-8 from float64 autograd, over the 1e-9 check: vmap,
    in eager attention). Bloom's autograd.Function cannot run under vmap: per_example="vmap" takes one example at a
    time through the batched pass (it failed with a note before).
    Gemma's
    scaled token table tied to its head and OPT's offset positions are blocks, not the rest (Gemma's failed the
    check before); OPT's layers take tokens flattened, (T, d), on one example too; Falcon's Linear subclass
    computes F.linear its own way and is a block."""
    pytest.importorskip("transformers", reason="transformers is not installed: these models are not exercised")
    import transformers
    from test_closed_form_hf import _causal_lm_config, _padded_lm_batch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_causal_lm_config(transformers, name)).double()
    batch, labels = _padded_lm_batch(seed=5, low=2, shape=(4, 10), padded_from=7)
    options = {"attention_mask": "pass" if name in ("bloom", "opt") else "auto"}
    tables = {"gemma": ["model.embed_tokens.weight"], "opt": ["model.decoder.embed_tokens.weight",
                                                              "model.decoder.embed_positions.weight"]}.get(name, [])
    for rest in ("dense", "drop"):
        plan, batched = _exact(model, batch, labels, "language_modeling", k=64, options=Kronecker(rest=rest), **options)
        names = [b.layer.name for b in plan.blocks]
        assert names[:len(tables)] == tables and batched is (rest == "drop" or name != "gemma")
        assert name != "falcon" or "transformer.h.0.self_attention.query_key_value.weight" in names
    if name == "bloom":  # vmap cannot run it: one example at a time through the batched pass, exact
        with pytest.warns(RuntimeWarning, match=r"vmap cannot run this model \(RuntimeError: In order to use an "
                                                "autograd.Function.*one example at a time"):
            _exact(model, batch, labels, "language_modeling", k=64, per_example="vmap", **options)


class OwnLinear(torch.nn.Linear):
    """A Linear subclass with its own forward: the same product (Falcon's), or another one."""

    def __init__(self, *args, doubled=False):
        super().__init__(*args)
        self.doubled = doubled

    def forward(self, x):
        if self.doubled:
            return 2 * torch.nn.functional.linear(x, self.weight, self.bias)
        return x @ self.weight.T + self.bias


def test_linear_subclasses_are_blocks_where_they_compute_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential(OwnLinear(4, 5), torch.nn.Tanh(), OwnLinear(5, 3, doubled=True)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    plan, _ = _exact(model, x, y, "classification", k=12)
    assert [b.layer.name for b in plan.blocks] == ["0.weight"] and plan.rest == ("2.weight", "2.bias")


def test_a_later_lookup_without_a_row_per_example_goes_to_vmap():
    """The batched pass is chosen on two examples; a later batch whose lookup is flattened goes to vmap."""
    torch.manual_seed(0)
    model = TiedScaled(flatten_large_batches=True).double()
    ids, y = torch.randint(0, 9, (6, 3)), torch.randint(0, 9, (6,))
    _, batched = _exact(model, ids, y, "classification", k=16, options=Kronecker(rest="drop"))
    assert batched is False


def test_a_slice_the_first_example_did_not_use_goes_to_vmap(caplog):
    """The batched pass meets a lookup in rows the first example did not use: it was an error; now that batch takes
    vmap, where each example runs alone (as the first did), exact."""
    import logging

    class Sliced(torch.nn.Embedding):
        def forward(self, ids):  # the whole table on one example, its first rows on more
            table = self.weight if ids.shape[0] == 1 else self.weight[:5]
            return torch.nn.functional.embedding(ids % 5, table)

    caplog.set_level(logging.INFO, logger="trak_core")
    torch.manual_seed(0)
    model = torch.nn.Sequential(Sliced(9, 4), torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    ids, y = torch.randint(0, 9, (4, 3)), torch.randint(0, 3, (4,))
    _, batched = _exact(model, ids, y, "classification", k=8, options=Kronecker(rest="drop"))
    assert batched is False
    assert "rows 0 to 5 of '0.weight', which the batch's first example did not use" in caplog.text


def test_a_lookup_shared_by_the_batch_takes_the_batched_pass():
    """GPT-2's position table is looked up on (1, T), shared by the batch: the batched pass gives each example its
    own perturbation of that call (before, the shared one summed the batch's gradients, and GPT-2 kept vmap)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: GPT-2 not exercised")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()
    ids = torch.randint(0, 50, (5, 10))
    plan, batched = _exact(model, {"input_ids": ids}, ids, "language_modeling", k=64, options=Kronecker(rest="drop"))
    assert batched is True and plan.block("transformer.wpe.weight").layer.rows == 16


@pytest.mark.parametrize("rest", ["dense", "drop"])
def test_a_vision_transformer_on_cuda(rest):
    """On CUDA (float32, TF32 convolutions, SDPA's fused kernels in the batched pass): the factorized features of a
    ViT, attention projections included, within 1e-2 of the same features in float64 on the CPU (exact there)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the factorized projection on a GPU is not exercised")
    torch.manual_seed(0)
    model = VisionTransformer(width=64, depth=2, heads=4).eval()
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    options, task, out = Kronecker(rest=rest), get_task("classification"), []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        net, backend = model.to(device=device, dtype=dtype), TorchBackend()
        features, _ = backend.factorized_features(net, backend.prepare(net, None), x.to(device, dtype), y.to(device),
                                                  task, k=256, seed=0, checkpoint=0, options=options)
        out.append(features.double().cpu())
    assert float(torch.linalg.vector_norm(out[1] - out[0]) / torch.linalg.vector_norm(out[0])) < 1e-2


class Scaled(torch.nn.Module):
    """A layer scale (d,) in the rest: not in the batched pass (vmap)."""

    def __init__(self):
        super().__init__()
        self.lin, self.scale = torch.nn.Linear(4, 3), torch.nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x):
        return self.lin(x) * self.scale


class NormUsedOutside(torch.nn.Module):
    """A layer norm whose gain is also used outside the layer: the batched pass's rest gradients miss that use, the
    check against plain autograd sees it (vmap)."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.head = torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.lin(x)))) * self.norm.weight.sum()


@pytest.mark.parametrize("model", [Scaled, NormUsedOutside])
def test_a_rest_the_batched_pass_cannot_take_goes_to_vmap(model):
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    net = model().double()
    if model is NormUsedOutside:
        with torch.no_grad():
            net.norm.weight.uniform_(0.5, 1.5)
    _, batched = _exact(net, x, y, "classification", k=8)
    assert batched is False


def test_the_path_of_the_factorized_features_is_logged_with_its_reason(caplog):
    """One INFO line on the trak_core logger per checkpoint: one batched pass, or vmap and why."""
    import logging

    from test_closed_form import Interacting  # examples interact through the batch mean

    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    cases = [(torch.nn.Sequential(torch.nn.Linear(4, 3)), Kronecker(), "in one batched pass: the first two"),
             (Interacting(), Kronecker(), "through vmap (examples interact)"),
             (Scaled(), Kronecker(), "through vmap: the rest (3 parameters outside factorizable layers) is not only"),
             (NormUsedOutside(), Kronecker(), "the rest's gradients in the batched pass are")]
    for model, options, message in cases:
        backend, model = TorchBackend(), model.double()
        with caplog.at_level(logging.INFO, logger="trak_core"):
            caplog.clear()
            backend.factorized_features(model, backend.prepare(model, None), x, y, get_task("classification"), k=6,
                                        seed=0, checkpoint=0, options=options)
        lines = [r.getMessage() for r in caplog.records if "factorized features" in r.getMessage()]
        assert len(lines) == 1 and message in lines[0], lines


def test_a_first_batch_of_one_example_is_checked_in_the_attention_it_ran():
    """A first batch of one example takes the batched pass (SDPA) undecided; its check against the dense gradient
    runs in the same attention (eager attention there is 1e-8 off in float64: its softmax is float32)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: Llama not exercised")
    from test_closed_form_hf import _causal_lm_config, _padded_lm_batch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_causal_lm_config(transformers, "mistral")).double()
    batch, labels = _padded_lm_batch(seed=5, low=2, shape=(4, 10), padded_from=7)
    backend, options = TorchBackend(), Kronecker(rest="drop")
    prepared = backend.prepare(model, None)
    for rows in (slice(0, 1), slice(1, 4)):
        backend.factorized_features(model, prepared, {key: v[rows] for key, v in batch.items()}, labels[rows],
                                    get_task("language_modeling"), k=64, seed=0, checkpoint=0, options=options)
    assert [state.batched for state in prepared._kronecker.values()] == [True]
