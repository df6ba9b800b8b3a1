"""The PyTorch backend against one-at-a-time autograd, the NumPy reference and the core projection."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from tests_helpers import STRUCTURED_OUTPUTS  # noqa: E402
from trak_core import TRAK, SoftmaxRegression, project  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

import array_api_compat.torch as xp  # noqa: E402


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.norm = torch.nn.BatchNorm2d(3)
        self.head = torch.nn.Linear(3 * 6 * 6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).double()


def _cnn():
    torch.manual_seed(1)
    model = SmallCNN().double()
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    model.train()  # the backend must switch to eval mode itself, and restore this
    return model


def _one_at_a_time(model, names, x, y):
    """Autograd of each example's margin separately: the independent reference."""
    model.eval()
    rows = []
    for i in range(x.shape[0]):
        params = [dict(model.named_parameters())[n] for n in names]
        out = model(x[i:i + 1])[0]
        others = torch.cat([out[:y[i]], out[y[i] + 1:]])
        margin = out[y[i]] - torch.logsumexp(others, 0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("make,shape,params", [
    (_mlp, (6,), None),
    (_cnn, (1, 8, 8), None),
    (_mlp, (6,), ["2.weight"]),
    (_cnn, (1, 8, 8), lambda name, t: name.startswith("head")),
], ids=["mlp", "cnn-batchnorm", "mlp-subset", "cnn-subset"])
def test_per_example_gradients_equal_one_at_a_time(make, shape, params):
    model = make()
    x = torch.randn(7, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    backend = TorchBackend(params=params, chunk_size=3)
    prepared = backend.prepare(model, None)
    grads, q = backend.gradients(model, prepared, x, y, trak_core.Classification())
    assert model.training  # mode restored
    names = list(prepared.params)
    reference = _one_at_a_time(model, names, x, y)
    assert grads.shape == reference.shape and grads.dtype == torch.float64
    torch.testing.assert_close(grads, reference, rtol=1e-7, atol=1e-10)
    with torch.no_grad():
        p = torch.softmax(model.eval()(x), 1)[torch.arange(7), y]
    torch.testing.assert_close(q, 1 - p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_checkpoints", [1, 3])
def test_linear_classifier_scores_equal_numpy_reference(n_checkpoints, rng):
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    xt, yt = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    reference_model = SoftmaxRegression(5, 3)
    linear = torch.nn.Linear(5, 3).double()
    ours = TRAK(linear, proj_dim=None, lambda_reg=0.1, progress=False)
    ref = TRAK(reference_model, proj_dim=None, lambda_reg=0.1, progress=False)
    assert ours.backend.name == "torch" and ref.backend.name == "numpy"
    for c in range(n_checkpoints):
        theta = reference_model.init(seed=c) * 2
        named = reference_model.params(theta)
        ref.featurize(theta, [(x, y)])
        ours.featurize({k: torch.tensor(v) for k, v in named.items()},
                       [(torch.tensor(x[:25]), torch.tensor(y[:25])), (torch.tensor(x[25:]), torch.tensor(y[25:]))])
    a = ours.score([(torch.tensor(xt), torch.tensor(yt))])
    b = ref.score([(xt, yt)])
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float64
    np.testing.assert_allclose(a.numpy(), b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_torch_projection_equals_reference(kind, rng):
    g = rng.normal(size=(9, 3000))
    reference = project(g, 300, seed=3, checkpoint=2, kind=kind)
    out = TorchBackend().project(torch.tensor(g), 300, seed=3, checkpoint=2, kind=kind)
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-12, atol=1e-12)
    for cache in (None, trak_core.ProjectionCache(3000 * 4 * 10 + 8), trak_core.ProjectionCache(0)):
        out = project(torch.tensor(g), 300, seed=3, checkpoint=2, kind=kind, cache=cache)
        np.testing.assert_allclose(out.numpy(), reference, rtol=1e-12, atol=1e-12)
    signs = trak_core.projection_matrix(500, 70, seed=3, checkpoint=1, xp=xp)
    assert np.array_equal(signs.numpy(), trak_core.projection_matrix(500, 70, seed=3, checkpoint=1))


def test_regression_and_custom_tasks():
    torch.manual_seed(2)
    model = torch.nn.Linear(4, 1).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5)
    backend = TorchBackend()
    prepared = backend.prepare(model, None)
    grads, q = backend.gradients(model, prepared, x, y, trak_core.Regression())
    torch.testing.assert_close(grads, torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1))  # d(wx+b)
    with torch.no_grad():
        torch.testing.assert_close(q, y.double() - model(x)[:, 0])  # Q = y - f
    square = trak_core.CustomTask(lambda out, labels, xp: out[:, 0] ** 2,
                                  lambda out, labels, xp: 2.0 + 0 * out[:, 0])
    grads, q = backend.gradients(model, prepared, x, y, square)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(grads, 2 * out * torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], 1))
    torch.testing.assert_close(q, torch.full((5,), 2.0, dtype=torch.float64))


def test_bad_input_errors():
    model = _mlp()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    trak = TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(ValueError, match="missing keys \\['2.bias'\\]"):
        trak.featurize({k: v for k, v in model.state_dict().items() if k != "2.bias"}, [(x, y)])
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        trak.featurize({**model.state_dict(), "extra": torch.zeros(1)}, [(x, y)])
    with pytest.raises(TypeError, match="integers"):
        trak.featurize(None, [(x, y.double())])
    with pytest.raises(ValueError, match="labels out of range"):
        trak.featurize(None, [(x, y + 4)])
    with pytest.raises(ValueError, match="are on meta but the model is on cpu"):
        trak.featurize(None, [(x.to("meta"), y)])
    with pytest.raises(ValueError, match="shape \\(batch, n_outputs\\)"):
        TRAK(torch.nn.Conv1d(1, 2, 3).double(), proj_dim=8, progress=False).featurize(
            None, [(torch.randn(4, 1, 5, dtype=torch.float64), y)])
    with pytest.raises(ValueError, match="not parameters of the model"):
        TorchBackend(params=["nope"]).prepare(model, None)
    with pytest.raises(TypeError, match="torch tensors"):
        trak.featurize(None, [(x.numpy(), y)])
    assert trak.n_checkpoints == 0


def test_checkpoint_snapshot_is_independent_of_later_training():
    model = _mlp()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    state = model.state_dict()
    trak = TRAK(model, proj_dim=16, lambda_reg=0.1, progress=False)
    trak.featurize(state, [(x, y)])
    before = trak.score([(x[:2], y[:2])])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # state_dict tensors alias the parameters: the snapshot must not
    torch.testing.assert_close(trak.score([(x[:2], y[:2])]), before)


def test_torch_int64_hash_path_equals_numpy_uint32():
    # the path CUDA tensors take: the hash in int64 masked to 32 bits, then the bits kept in int32
    import array_api_compat.numpy as npx
    from trak_core import hashing
    from trak_core.projection import _words

    a = _words(12345, 2**32 - 5, 2**32 + 60, 9, xp=npx, device=None)
    b = _words(12345, 2**32 - 5, 2**32 + 60, 9, xp=xp, device=None)
    assert b.dtype == torch.int64 and np.array_equal(a.astype(np.int64), b.numpy())
    as_int32 = xp.astype(b - ((b >> 31) << 32), xp.int32)
    assert np.array_equal(as_int32.numpy(), a.view(np.int32))
    assert hashing.word_dtype(xp) == torch.int64


def test_chunk_rows_from_free_memory():
    from trak_torch.vmapped import chunk_rows

    assert chunk_rows(9_610, 4, None) == 256  # CPU: 256 MiB of gradients, at most 256 rows
    assert chunk_rows(1_130_000, 4, None) == (256 * 2**20) // (4 * 1_130_000)
    assert chunk_rows(11_181_642, 4, 139 * 2**30) == (6 * 2**30) // (4 * 11_181_642)  # GPU: the 6 GiB cap (144)
    assert chunk_rows(11_181_642, 4, 16 * 2**30) == (2 * 2**30) // (4 * 11_181_642)  # 1/8 of 16 GiB free
    assert chunk_rows(10**10, 4, 2**30) == 1


def test_free_memory_counts_what_torch_holds_unused(monkeypatch):
    """The chunk rule read the driver's free memory alone: memory torch's caching allocator reserved and freed (an
    earlier batch's gradients) counted as taken, so chunks shrank after the first batch. No GPU here: torch.cuda's
    three readings are replaced by given numbers (driver free 4 GiB, reserved 10 GiB, allocated 3 GiB)."""
    from trak_torch.vmapped import _free_bytes, chunk_rows

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * 2**30)
    assert _free_bytes(torch.device("cuda", 0)) == (4 + 10 - 3) * 2**30
    assert chunk_rows(11_181_642, 4, _free_bytes(torch.device("cuda", 0))) == (11 * 2**30 // 8) // (4 * 11_181_642)
    assert _free_bytes(torch.device("cpu")) is None



class _Wrapped(torch.nn.Module):
    """The `_mlp` network behind a forward that returns its logits inside a tuple, a dict or an object."""

    def __init__(self, net, pack):
        super().__init__()
        self.net, self.pack = net, pack

    def forward(self, x):
        return self.pack(self.net(x))


@pytest.mark.parametrize("pack,logits_fn", [case[:2] for case in STRUCTURED_OUTPUTS],
                         ids=[case[2] for case in STRUCTURED_OUTPUTS])
def test_structured_outputs_give_the_plain_models_gradients(pack, logits_fn):
    plain = _mlp()
    wrapped = _Wrapped(_mlp(), pack)  # the same seed: the same weights, under names "net.*"
    x = torch.randn(7, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    backend = TorchBackend(chunk_size=3, logits_fn=logits_fn)
    prepared = backend.prepare(wrapped, None)
    grads, q = backend.gradients(wrapped, prepared, x, y, trak_core.Classification())
    reference = _one_at_a_time(plain, [n for n, _ in plain.named_parameters()], x, y)
    torch.testing.assert_close(grads, reference, rtol=1e-7, atol=1e-10)
    with torch.no_grad():
        p = torch.softmax(plain(x), 1)[torch.arange(7), y]
    torch.testing.assert_close(q, 1 - p, rtol=1e-12, atol=1e-12)


def test_structured_output_through_the_estimator_scores_like_the_plain_model():
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 4, (12,))
    scores = []
    for model in (_mlp(), _Wrapped(_mlp(), lambda out: (out, {"hidden": out}))):
        trak = TRAK(model, proj_dim=16, lambda_reg=0.1, progress=False)
        trak.featurize(None, [(x, y)])
        scores.append(trak.score([(x[:3], y[:3])]))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pack,match", [
    (lambda out: 3, "output has type int; expected a tensor.*logits_fn"),
    (lambda out: "logits", "output has type str; expected a tensor.*logits_fn"),
    (lambda out: (), "output has type tuple; expected a tensor"),
    (lambda out: {"hidden": out}, "mapping \\(dict\\) with keys \\['hidden'\\] and no 'logits'.*logits_fn"),
    (lambda out: ("text", out), "output\\[0\\] of a tuple has type str, not a tensor.*logits_fn"),
], ids=["int", "str", "empty-tuple", "dict-without-logits", "tuple-of-str"])
def test_unusable_outputs_are_a_clear_error(pack, match):
    model = _Wrapped(_mlp(), pack)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.raises(TypeError, match=match):
        TRAK(model, proj_dim=8, progress=False).featurize(None, [(x, y)])
    with pytest.raises(TypeError, match="logits_fn must be a function"):
        TorchBackend(logits_fn="logits")


@pytest.mark.parametrize("model_dtype,batch_dtype,fix", [
    (torch.float32, torch.float64, "inputs.float\\(\\), or the model with model.double\\(\\)"),
    (torch.float64, torch.float32, "inputs.double\\(\\), or the model with model.float\\(\\)"),
])
def test_dtype_mismatch_is_a_clear_error(model_dtype, batch_dtype, fix):
    torch.manual_seed(0)
    for model, shape in ((_mlp().to(model_dtype), (6,)), (_cnn().to(model_dtype), (1, 8, 8))):
        x, y = torch.randn(4, *shape, dtype=batch_dtype), torch.randint(0, 4, (4,))
        batch, params = str(batch_dtype)[6:], str(model_dtype)[6:]
        message = (f"inputs are {batch} but the model's parameters are {params} \\(torch: .*\\); "
                   f"convert the batch with {fix}$")
        backend = TorchBackend()
        with pytest.raises(trak_core.TrakTypeError, match="^" + message):  # it starts with what is wrong
            backend.gradients(model, backend.prepare(model, None), x, y, trak_core.Classification())
        with pytest.raises(TypeError, match=message):
            TRAK(model, proj_dim=8, progress=False).featurize(None, [(x, y)])
        trak = TRAK(model, proj_dim=8, progress=False)  # the fix works
        trak.featurize(None, [(x.to(model_dtype), y)])
        assert trak.n_checkpoints == 1
