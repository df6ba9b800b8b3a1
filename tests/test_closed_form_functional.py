"""Closed-form per-example gradients through nn.MultiheadAttention, LayerNorm subclasses and bare parameters
(vision transformers, ConvNeXt), against each model's own backward pass one example at a time, and when they are
not used (trak_torch.closed_form_functional)."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the closed-form path is not exercised")

from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

nn = torch.nn


def _bench(name):
    """A model module of bench/ (torchvision's layouts without torchvision)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    return importlib.import_module(name)


def _one_at_a_time(model, x, y, task):
    """Plain autograd through the model's own forward, one example at a time: shares no code with the backend."""
    import array_api_compat.torch as xp

    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        task.output(model(x[i:i + 1]), y[i:i + 1], xp=xp).sum().backward()
        rows.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                               for p in model.parameters()]))
    return torch.stack(rows)


def _check(model, x, y, covered, kinds=()):
    """The backend's gradients equal the reference to 1e-9 (float64); the closed form is used or not, as said."""
    task = get_task("classification")
    model = model.double().eval()
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, x, y, task)
    reference = _one_at_a_time(model, x, y, task)
    assert float(torch.linalg.vector_norm(reference)) > 1e-3
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-9
    uses = prepared._closed_form[id(task)]
    assert (uses is not None) == covered
    if covered:
        assert set(kinds) <= {kind for _, kind, _, _ in uses}
    assert torch.nn.functional.linear is torch._C._nn.linear  # the interception is gone


class Attending(nn.Module):
    """Linear embeddings of (n, T, 3) inputs -> one nn.MultiheadAttention configuration -> mean -> Linear."""

    def __init__(self, variant):
        super().__init__()
        self.variant, d = variant, 9 if variant == "odd-heads-no-bias" else 8
        self.embed = nn.Linear(3, d)
        if variant in ("cross", "kdim-vdim"):
            self.memory = nn.Linear(3, 5 if variant == "kdim-vdim" else d)
        options = {"self-batch-first": dict(num_heads=2, batch_first=True),
                   "self-seq-first-mask-weights": dict(num_heads=2),
                   "cross": dict(num_heads=2, batch_first=True),
                   "kdim-vdim": dict(num_heads=4, batch_first=True, kdim=5, vdim=5),
                   "odd-heads-no-bias": dict(num_heads=3, batch_first=True, bias=False),
                   "bias-kv": dict(num_heads=2, batch_first=True, add_bias_kv=True)}[variant]
        self.attention = nn.MultiheadAttention(d, **options)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        if self.variant == "self-seq-first-mask-weights":  # (T, n, d), a key padding mask, weights returned
            mask = x[..., 0] > 1.0
            mask[:, 0] = False  # every query sees one key at least
            out, weights = self.attention(h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1),
                                          key_padding_mask=mask, need_weights=True)
            return self.head(out.transpose(0, 1).mean(1)) + weights.sum(1)[:, :4]
        if self.variant in ("cross", "kdim-vdim"):
            m = torch.tanh(self.memory(x))
            out, _ = self.attention(h, m, m, need_weights=False)
        else:
            out, _ = self.attention(h, h, h, need_weights=False)
        return self.head(out.mean(1))


@pytest.mark.parametrize("variant, covered", [("self-batch-first", True), ("self-seq-first-mask-weights", True),
                                              ("cross", True), ("kdim-vdim", True), ("odd-heads-no-bias", True),
                                              ("bias-kv", False)])
def test_multihead_attention_in_closed_form(variant, covered):
    """Packed and separate projections, row slices of the packed weight (cross-attention), sequence- or
    batch-first, a key padding mask and returned weights: closed form, equal to autograd; bias_k/bias_v: vmap."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 6, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (5,), generator=g)
    _check(Attending(variant), x, y, covered, kinds={"mha"} if covered else ())


def test_vision_transformer_in_closed_form():
    """A torchvision-style ViT: every parameter in closed form (layers, attention, class token and position
    embeddings), equal to autograd one example at a time to 1e-9."""
    torch.manual_seed(0)
    model = _bench("_vit").VisionTransformer(image=8, patch=4, width=8, depth=2, heads=2, mlp=16, num_classes=5)
    with torch.no_grad():
        model.class_token.normal_()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
    _check(model, x, y, True, kinds={"mha", "copies", "conv", "layernorm", "linear"})


class Squashed(nn.Module):
    """A (1, d) parameter that is not broadcast over the batch: its sum of squares scales every output."""

    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(4, 3), nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        return self.lin(x * self.scale) * (self.scale ** 2).sum()


def test_a_leading_one_parameter_used_otherwise_goes_to_vmap():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    _check(Squashed(), x, y, False)


class RawAttention(nn.Module):
    """nn.MultiheadAttention first, on the raw input (nothing upstream requires gradients: its fast path)."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


def test_attention_on_the_raw_input_is_right():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(5, 6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    _check(RawAttention(), x, y, True, kinds={"mha"})


class Encoder(nn.Module):
    """nn.TransformerEncoder (batch-first) over embedded tokens, with a key padding mask from the inputs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8, padding_idx=0)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0)[:, 0])


def test_transformer_encoder_in_closed_form():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 11, (5, 7), generator=g)
    ids[1:, 5:] = 0
    _check(Encoder(), ids, torch.randint(0, 3, (5,), generator=g), True, kinds={"mha", "embedding", "layernorm"})


class PixelLogits(nn.Module):
    """A Hugging Face image classifier as ``x -> logits`` (the reference calls the model on a tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def test_hugging_face_vit_in_closed_form():
    """Hugging Face's ViT: its cls_token and position_embeddings are bare (1, ., d) parameters."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=16, num_labels=4)
    model = transformers.ViTForImageClassification(config)
    with torch.no_grad():
        model.vit.embeddings.cls_token.normal_()

    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g)
    _check(PixelLogits(model), x, y, True, kinds={"copies", "conv", "linear"})


def test_the_interception_is_undone_after_an_error():
    from trak_torch.closed_form_functional import intercept

    F = torch.nn.functional
    original = F.linear, F.layer_norm
    one = torch.ones(1, 1)
    with pytest.raises(ValueError):
        with intercept(linear=lambda x, w, b, out: out):
            with intercept(linear=lambda x, w, b, out: out * 2):  # nested: the inner one applies, then the outer again
                assert float(F.linear(one, one).sum()) == 2.0
            assert float(F.linear(one, one).sum()) == 1.0
            raise ValueError("inside")
    assert (F.linear, F.layer_norm) == original


def test_convnext_in_closed_form():
    """A torchvision-style ConvNeXt: channels-first LayerNorm2d (F.layer_norm called by its own forward) and
    layer scales (C, 1, 1) in closed form, equal to autograd one example at a time to 1e-9."""
    torch.manual_seed(0)
    model = _bench("_convnext").ConvNeXt(dims=(4, 8), depths=(1, 1), patch=2, num_classes=5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layer_scale"):
                parameter.normal_()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_()
                module.bias.normal_()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (5,), generator=g)
    _check(model, x, y, True, kinds={"layer_norm_call", "copies", "conv", "layernorm", "linear"})


class BareTokens(nn.Module):
    """A position table (T, d) sliced by the model (copies would be indexed: its slice [:T] would take the first T
    copies, right when n <= T, an error when n > T, which the check on two examples would not see), or a layer
    scale (d,) on tokens (n, T, d), as DeiT-III's (followed through the product, also in place), or a class token
    (d,) expanded over the batch, as CLIP's (followed), or one also used otherwise (vmap)."""

    def __init__(self, bare, length=4):
        super().__init__()
        self.lin, self.head, self.kind = nn.Linear(3, 4), nn.Linear(4, 2), bare
        self.bare = nn.Parameter(torch.randn(length, 4) if bare == "table" else torch.randn(4))

    def forward(self, x):
        if self.kind == "inplace-scale":  # timm's LayerScale(inplace=True)
            return self.head(torch.tanh(self.lin(x).mul_(self.bare)).mean(1))
        h = torch.tanh(self.lin(x)).to(self.bare.dtype)  # reading a bare parameter's dtype is not a use of it
        if self.kind == "scale-used-otherwise":  # the product is right, the norm is not a per-example use
            return self.head((self.bare * h).mean(1)) * self.bare.norm()
        if self.kind == "class-token":  # CLIP's: (d,) expanded to (n, 1, d), and to (n, T, d) as well
            tokens = torch.cat([self.bare.expand(x.shape[0], 1, -1), h, self.bare.expand((x.shape[0], 2, 4))], 1)
            return self.head(torch.tanh(tokens)[:, :2].mean(1) + tokens[:, -1])
        h = h + self.bare[:x.shape[1]] if self.kind == "table" else self.bare * h
        return self.head(h.mean(1))


@pytest.mark.parametrize("bare, covered", [("table", False), ("token-scale", True), ("inplace-scale", True),
                                           ("class-token", True), ("scale-used-otherwise", False)])
def test_bare_tables_go_to_vmap_and_token_scales_are_followed(bare, covered):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(7, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (7,), generator=g)
    _check(BareTokens(bare), x, y, covered, kinds={"scale"} if covered else ())


def test_vision_transformer_on_cuda_takes_the_closed_form():
    """On CUDA (SDPA's fused kernels, float32, cuDNN's TF32 patch convolution): a ViT's attention and bare
    parameters in closed form, within 1e-2 of float64 gradients computed one example at a time on the CPU (the
    closed form's check tolerance on CUDA; 5e-7 in float32 on a CPU)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the closed form through attention on a GPU is not exercised")
    torch.manual_seed(0)
    model = _bench("_vit").VisionTransformer(width=64, depth=2, heads=4).eval()
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    task = get_task("classification")
    reference = _one_at_a_time(model.double(), x.double(), y, task)
    model = model.float().cuda()
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, x.cuda(), y.cuda(), task)
    assert {"mha", "copies"} <= {kind for _, kind, _, _ in prepared._closed_form[id(task)]}
    error = float(torch.linalg.vector_norm(grads.double().cpu() - reference) / torch.linalg.vector_norm(reference))
    assert error < 1e-2


class KeywordWhenLarge(nn.Module):
    """Calls its head with a keyword (no positional tensor for the closed form's hook) on batches of more than
    three: the checked first two examples (and three, for the row count) take the closed form, the batch cannot."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h) if x.shape[0] <= 3 else self.head(input=h)


def test_a_batch_the_closed_form_cannot_take_goes_to_vmap_from_then_on():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    x, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g)
    _check(KeywordWhenLarge(), x, y, False)


def test_intercept_refuses_an_unknown_function():
    from trak_core.errors import TrakTypeError
    from trak_torch.closed_form_functional import intercept

    with pytest.raises(TrakTypeError, match="conv2d"):
        with intercept(conv2d=lambda *args: args[-1]):
            pass
    assert torch.nn.functional.linear is torch._C._nn.linear


def test_hugging_face_convnext_in_closed_form():
    """Hugging Face's ConvNeXt: its channels-first LayerNorm subclass (through F.layer_norm) and its layer scales
    (C,) on channels-last features (through their products)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")

    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[4, 8, 8, 8],
                                         depths=[1, 1, 1, 1], num_labels=3, image_size=32, layer_scale_init_value=0.5)
    model = transformers.ConvNextForImageClassification(config)

    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    _check(PixelLogits(model), x, y, True, kinds={"layer_norm_call", "scale", "conv"})


class Centered(nn.Module):
    """Examples interact through the batch mean: the one-pass closed form would be wrong."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(torch.tanh(x - x.mean(0)))


@pytest.mark.parametrize("make, said", [
    (lambda: BareTokens("token-scale"), "in closed form (3 uses: linear, scale"),
    (lambda: BareTokens("table"), "bare (4, 4) is used by an operation the closed form does not follow"),
    (lambda: BareTokens("scale-used-otherwise"), "through vmap: the closed form failed on the first two examples"),
    (Centered, "through vmap: the closed form differs from plain autograd"),
    (KeywordWhenLarge, "through vmap from this batch on"),
])
def test_the_path_each_checkpoint_takes_is_logged_with_its_reason(make, said, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="trak_core")
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(5, 4, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g)
    model = make().double().eval()
    if isinstance(model, (Centered, KeywordWhenLarge)):
        x = x[:, 0]
    TorchBackend().gradients(model, TorchBackend().prepare(model, None), x, y, get_task("classification"))
    assert any(said in record.getMessage() for record in caplog.records), [r.getMessage() for r in caplog.records]


def test_hugging_face_clip_vision_in_closed_form():
    """Hugging Face's CLIP image classifier: its class embedding (d,) expanded over the batch, position embeddings
    looked up on a (1, T) buffer, pre- and post-layer norms."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")

    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(image_size=8, patch_size=4, hidden_size=8, intermediate_size=16,
                                           num_hidden_layers=2, num_attention_heads=2, projection_dim=8)
    config = transformers.CLIPConfig(vision_config=vision.to_dict(), text_config={"hidden_size": 8,
                                     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2},
                                     num_labels=3)
    model = transformers.CLIPForImageClassification(config)
    g = torch.Generator().manual_seed(12)
    x, y = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    _check(PixelLogits(model), x, y, True, kinds={"scale", "conv", "embedding", "layernorm"})
