"""Closed-form per-example gradients (trak_torch.closed_form) against vmap(grad), and when they are not used."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the closed-form path is not exercised")

from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402


class Tokens(torch.nn.Module):
    """Embedding (padding_idx) -> Linear on 3-D input -> mean over tokens -> Linear; a tied head option."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(13, 6, padding_idx=1)
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))).mean(1))


class Strided(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=1)
        self.conv2 = torch.nn.Conv2d(4, 3, (2, 3), bias=False)
        self.head = torch.nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.tanh(self.conv(x)))).flatten(1))


class Interacting(torch.nn.Module):
    """Examples interact through the batch mean: the batched backward pass would be wrong."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True))


class Positions(torch.nn.Module):
    """Token embeddings plus position embeddings looked up once, (1, T), for the whole batch (as BERT, GPT-2)."""

    def __init__(self):
        super().__init__()
        self.embed, self.position = torch.nn.Embedding(13, 6), torch.nn.Embedding(5, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, ids):
        h = self.embed(ids) + self.position(torch.arange(ids.shape[1])[None])
        return self.head(torch.tanh(h).mean(1))


class Codebook(torch.nn.Module):
    """A Linear called on 5 stored codes, not on the examples (the closed form cannot split its gradient)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("codes", torch.randn(5, 4))

    def forward(self, x):
        return x @ self.lin(self.codes).T  # (n, 4) @ (4, 5)


class Keywords(torch.nn.Module):
    """A Linear called with its input as a keyword: its forward hook sees no positional input."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(input=x)))


def _data(kind, n=7):
    g = torch.Generator().manual_seed(0)
    if kind == "tokens":
        return torch.randint(0, 13, (n, 5), generator=g), torch.randint(0, 3, (n,), generator=g)
    if kind == "strided":
        return torch.randn(n, 2, 7, 9, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("make,kind,covered", [
    (lambda: torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)), "mlp", True),
    (Tokens, "tokens", True), (Strided, "strided", True), (Interacting, "interacting", False),
    (lambda: torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3)), "norm", True),
    (lambda: torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6, elementwise_affine=False),
                                 torch.nn.Linear(6, 3)), "norm", True),
    (Positions, "tokens", True), (Codebook, "interacting", False), (Keywords, "interacting", False),
], ids=["mlp", "embedding-padding", "conv-strided", "batch-interaction", "layernorm", "layernorm-no-affine",
        "position-embedding-broadcast", "layer-called-on-codes", "input-as-keyword"])
def test_closed_form_equals_vmap_or_is_not_used(make, kind, covered):
    torch.manual_seed(0)
    model = make().double()
    x, y = _data(kind) if kind != "mlp" else (torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,)))
    if kind == "norm":
        x = torch.randn(7, 4, dtype=torch.float64)
    task = get_task("classification")
    auto, vmap = TorchBackend(), TorchBackend(per_example="vmap")
    prepared = auto.prepare(model, None)
    g, q = auto.gradients(model, prepared, x, y, task)
    reference, q_reference = vmap.gradients(model, vmap.prepare(model, None), x, y, task)
    np.testing.assert_allclose(g.numpy(), reference.numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(q.numpy(), q_reference.numpy(), rtol=1e-12)
    assert (prepared._closed_form[id(task)] is not None) == covered


class Normed(torch.nn.Module):
    """Conv2d -> a norm over channels -> Linear on tokens -> a norm over the last dims -> Linear."""

    def __init__(self, channel_norm, token_norm):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.norm1, self.mix, self.norm2 = channel_norm, torch.nn.Linear(4, 6), token_norm
        self.head = torch.nn.Linear(6 * 5 * 3, 5)

    def forward(self, x):  # x (n, 2, 5, 3)
        h = torch.relu(self.norm1(self.conv(x)))  # (n, 4, 5, 3)
        h = self.norm2(torch.tanh(self.mix(h.permute(0, 2, 3, 1))))  # (n, 5, 3, 6)
        return self.head(h.flatten(1))


class ChannelsFirstLayerNorm(torch.nn.LayerNorm):
    """A LayerNorm over dim 1 of (n, C, H, W), as ConvNeXt's: a subclass with its own forward (followed through
    its call of F.layer_norm, trak_torch.closed_form_functional)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norms():
    nn = torch.nn
    return {
        "batchnorm-layernorm": (nn.BatchNorm2d(4), nn.LayerNorm(6), True),
        "groupnorm-layernorm2d-nobias": (nn.GroupNorm(2, 4), nn.LayerNorm((3, 6), bias=False), True),
        "batchnorm-zero-gamma-rmsnorm": (nn.BatchNorm2d(4), nn.RMSNorm(6), True),
        "batchnorm-no-running-stats": (nn.BatchNorm2d(4, track_running_stats=False), nn.LayerNorm(6), False),
        "layernorm-subclass-own-forward": (ChannelsFirstLayerNorm(4), nn.LayerNorm(6), True),  # F.layer_norm's call
    }


@pytest.mark.parametrize("name", list(_norms()))
def test_norm_layers_in_closed_form_equal_vmap(name):
    """Per-example gradients through norm layers equal vmap(grad) to 1e-9 (float64), with the checkpoint's running
    statistics (not the module's) and zero gammas; batch statistics (no running stats) go to vmap."""
    torch.manual_seed(0)
    channel, token, covered = _norms()[name]
    model = Normed(channel, token).double()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for key, value in state.items():  # a checkpoint whose statistics and affine parameters are not the defaults
        if key.endswith("running_mean") or key.endswith(("norm1.bias", "norm2.bias")):
            value.normal_()
        elif key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith(("norm1.weight", "norm2.weight")):
            value.normal_()
            if "zero-gamma" in name and key.startswith("norm1"):
                value.zero_()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
    task = get_task("classification")
    auto, vmap = TorchBackend(), TorchBackend(per_example="vmap")
    prepared = auto.prepare(model, state)
    grads, _ = auto.gradients(model, prepared, x, y, task)
    reference, _ = vmap.gradients(model, vmap.prepare(model, state), x, y, task)
    assert (prepared._closed_form[id(task)] is not None) == covered
    assert float(torch.linalg.vector_norm(reference)) > 1.0
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-9
    if covered and "batchnorm" in name:  # the module's own statistics give other gradients: the checkpoint's count
        own = {key: model.state_dict()[key] if "running" in key else value for key, value in state.items()}
        other, _ = auto.gradients(model, auto.prepare(model, own), x, y, task)
        assert float(torch.linalg.vector_norm(other - reference)) > 1e-3 * float(torch.linalg.vector_norm(reference))


class Convolutions(torch.nn.Module):
    """A Conv2d then a Conv1d over its rows, with the given options; a linear head."""

    def __init__(self, two_d, one_d):
        super().__init__()
        self.two_d = torch.nn.Conv2d(4, 6, **two_d)
        self.one_d = torch.nn.Conv1d(6, 6, **one_d)
        self.head = torch.nn.LazyLinear(3)

    def forward(self, x):  # (n, 4, 7, 9)
        h = torch.tanh(self.two_d(x))  # (n, 6, H, W)
        h = torch.tanh(self.one_d(h.mean(2)))  # (n, 6, W')
        return self.head(h.flatten(1))


@pytest.mark.parametrize("two_d,one_d", [
    (dict(kernel_size=3, groups=2, stride=2, padding=1), dict(kernel_size=3, groups=6, dilation=2)),  # depthwise
    (dict(kernel_size=(2, 4), padding="same", padding_mode="reflect"), dict(kernel_size=4, padding="same")),
    (dict(kernel_size=3, padding=2, padding_mode="circular", dilation=2, bias=False),
     dict(kernel_size=2, stride=2, padding=1, padding_mode="replicate", groups=3)),
], ids=["grouped-depthwise-strided-dilated", "same-asymmetric-reflect", "circular-replicate-grouped"])
def test_convolutions_of_any_groups_and_padding_in_closed_form_equal_vmap(two_d, one_d):
    torch.manual_seed(0)
    model = Convolutions(two_d, one_d).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 4, 7, 9, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    model(x[:1])  # the head's input size
    task = get_task("classification")
    auto = TorchBackend()
    prepared = auto.prepare(model, None)
    grads, _ = auto.gradients(model, prepared, x, y, task)
    vmap = TorchBackend(per_example="vmap")
    reference, _ = vmap.gradients(model, vmap.prepare(model, None), x, y, task)
    assert prepared._closed_form[id(task)] is not None
    assert float(torch.linalg.vector_norm(reference)) > 1.0
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-9


def test_float32_closed_form_within_1e6_of_vmap_and_tied_weights():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(11, 4)
            self.head = torch.nn.Linear(4, 11)
            self.head.weight = self.embed.weight  # one parameter, two layers

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)).mean(1))

    torch.manual_seed(1)
    model = Tied()
    ids, y = torch.randint(0, 11, (9, 4)), torch.randint(0, 11, (9,))
    task = get_task("classification")
    auto = TorchBackend()
    prepared = auto.prepare(model, None)
    g, _ = auto.gradients(model, prepared, ids, y, task)
    reference, _ = TorchBackend(per_example="vmap").gradients(model, prepared, ids, y, task)
    assert prepared._closed_form[id(task)] is not None
    assert float((g - reference).abs().max() / reference.abs().max()) < 1e-6


def test_per_example_option_is_checked():
    from trak_core.errors import TrakValueError

    with pytest.raises(TrakValueError, match="per_example"):
        TorchBackend(per_example="fast")


class OldStyleTanh(torch.autograd.Function):
    """An autograd.Function without setup_context (as Bloom's GeLU): torch.func cannot run it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_models_vmap_cannot_run_get_closed_form_gradients_checked_one_example_at_a_time():
    import array_api_compat.torch as xp

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm, self.head = torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.norm(OldStyleTanh.apply(self.lin(x))))

    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    task = get_task("classification")
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, x, y, task)
    assert prepared._closed_form[id(task)] is not None
    rows = []  # the reference: the model's own backward pass, one example at a time
    for i in range(5):
        model.zero_grad()
        task.output(model(x[i:i + 1]), y[i:i + 1], xp=xp).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    reference = torch.stack(rows)
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-12
    with pytest.warns(RuntimeWarning, match="vmap cannot take .*setup_context"):  # vmap cannot run it: a loop
        looped, _ = TorchBackend(per_example="vmap").gradients(model, prepared, x, y, task)
    assert float(torch.linalg.vector_norm(looped - reference) / torch.linalg.vector_norm(reference)) < 1e-12


def test_tf32_convolutions_on_cuda_keep_the_closed_form_and_the_factorized_check():
    """On CUDA, cuDNN runs float32 convolutions in TF32 by default, and each path rounds differently: the closed
    form is still taken (its check allows 1e-2 there), its gradients are within 1e-2 of float64 ones computed on
    the CPU, and proj_type='kronecker' does not take TF32 rounding for a weight used outside its module."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the closed form under TF32 convolutions is not exercised")
    import sys
    from pathlib import Path

    import trak_core

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from _resnet import resnet18

    torch.manual_seed(0)
    model = resnet18(10, 16).eval()
    torch.backends.cudnn.allow_tf32 = True  # the default, said out loud
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    task = get_task("classification")
    vmap = TorchBackend(per_example="vmap")
    reference, _ = vmap.gradients(model.double(), vmap.prepare(model, None), x.double(), y, task)
    model = model.float().cuda()
    auto = TorchBackend()
    prepared = auto.prepare(model, None)
    grads, _ = auto.gradients(model, prepared, x.cuda(), y.cuda(), task)
    assert prepared._closed_form[id(task)] is not None
    error = float(torch.linalg.vector_norm(grads.double().cpu() - reference) / torch.linalg.vector_norm(reference))
    assert error < 1e-2
    trak = trak_core.TRAK(model, proj_type="kronecker", proj_dim=512, progress=False)
    trak.featurize(None, [(x.cuda(), y.cuda())])  # check_plan on the first example: no error
    assert trak.score([(x[:4].cuda(), y[:4].cuda())]).shape == (16, 4)


class UnbatchedPositions(torch.nn.Module):
    """Position embeddings looked up on ``arange(T)`` with no batch dimension, ``(T, d)``, broadcast over the batch
    (Whisper's encoder, Wav2Vec2-BERT's relative distances), scaled by ``weight``."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight
        self.embed, self.position = torch.nn.Embedding(13, 4), torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        h = self.embed(ids) + self.weight * self.position(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("weight", [1.0, 1e-12])
def test_a_lookup_without_a_batch_dimension_is_not_taken_for_the_batch(weight, caplog):
    """Six positions (6, d) for a batch of six (or two, or three) examples: one row per example, or the batch's
    tokens flattened, by their shapes. Their gradients are right (vmap); at weight 1e-12 the positions' part of the
    gradient is below the check's tolerance (1e-9 of the whole), so only the row count across two batch sizes
    tells: before, each example got one position's gradients, 100% off."""
    import logging

    caplog.set_level(logging.INFO, logger="trak_core")
    torch.manual_seed(0)
    model = UnbatchedPositions(weight).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 13, (6, 6), generator=g), torch.randint(0, 3, (6,), generator=g)
    task = get_task("classification")
    auto, vmap = TorchBackend(), TorchBackend(per_example="vmap")
    prepared = auto.prepare(model, None)
    got, _ = auto.gradients(model, prepared, x, y, task)
    reference, _ = vmap.gradients(model, vmap.prepare(model, None), x, y, task)
    block = slice(13 * 4, 13 * 4 + 6 * 4)  # position.weight, after embed.weight
    assert dict(model.named_parameters())["position.weight"].numel() == 24
    norm = torch.linalg.vector_norm
    error = norm(got[:, block] - reference[:, block]) / norm(reference[:, block])
    assert float(error) < 1e-9, float(error)
    assert prepared._closed_form[id(task)] is None
    assert any("rows that are not the batch's" in record.getMessage() for record in caplog.records)
