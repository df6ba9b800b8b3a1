"""The factorized (Kronecker) projection: torch features against dense gradients times the explicit matrix."""
import math

import numpy as np
import pytest

from trak_core import TRAK, Kronecker, SoftmaxRegression
from trak_core.errors import TrakValueError
from trak_core.kronecker import Layer, explicit_matrix, factor, factor_dims, make_plan

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch factorized path is not exercised")

from trak_core.tasks import get_task  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import torch_model  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402


def _tensors(x):
    return {key: torch.as_tensor(v) for key, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x)


def _check_exact(model, x, y, task, k, seed=3, checkpoint=2, options=None, backend=None):
    """Factorized features == per-example gradients (vmap) @ explicit Kronecker matrix; returns the plan."""
    backend = backend or TorchBackend()
    options = options or Kronecker()
    task = get_task(task)
    prepared = backend.prepare(model, None)
    plan = backend.factorized_plan(model, prepared, x, y, task, k=k, options=options)
    features, q = backend.factorized_features(model, prepared, x, y, task, k=k, seed=seed, checkpoint=checkpoint,
                                              options=options)
    grads, q_dense = backend.gradients(model, prepared, x, y, task)
    matrix = explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=seed,
                             checkpoint=checkpoint)
    reference = grads.detach().numpy() @ matrix
    assert features.shape == (grads.shape[0], k)
    np.testing.assert_allclose(features.numpy(), reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())
    np.testing.assert_allclose(q.numpy(), q_dense.numpy(), rtol=1e-12)
    return plan


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
def test_canonical_models_equal_the_explicit_kronecker_matrix(kind):
    model = torch_model(kind, canonical.weights(kind, 0))
    x, y = canonical.inputs(kind, 7, 1)
    plan = _check_exact(model, _tensors(x), torch.as_tensor(y), "language_modeling" if kind == "lm" else
                        "classification", k=40)
    assert sum(block.k for block in plan.blocks) + plan.k_rest == 40
    if kind == "lm":  # positions are sliced (rest), the token table is looked up (a layer)
        assert "positions.weight" in plan.rest and plan.block("tokens.weight").layer.rows == 20


class Zoo(torch.nn.Module):
    """Every supported layer in its awkward settings: strides, dilation, no bias, padding_idx, 3-D inputs."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4, padding_idx=0)
        self.conv = torch.nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
        self.lin = torch.nn.Linear(4, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.head = torch.nn.Linear(5 + 3 * 4 * 5, 3)

    def forward(self, ids, image):
        tokens = self.norm(torch.tanh(self.lin(self.embed(ids))))  # (n, T, 5): a 3-D input to lin
        pooled = tokens.mean(1)
        maps = torch.tanh(self.conv(image)).flatten(1)
        return self.head(torch.cat([pooled, maps], 1))


def test_every_layer_type_with_strides_padding_idx_and_no_bias():
    torch.manual_seed(0)
    model = Zoo().double()
    ids = torch.randint(0, 11, (6, 5))
    ids[0, :2] = 0  # padding: no gradient reaches row 0 of the table
    x = {"ids": ids, "image": torch.randn(6, 2, 8, 7, dtype=torch.float64)}
    y = torch.randint(0, 3, (6,))
    plan = _check_exact(model, x, y, "classification", k=30)
    assert [b.layer.name for b in plan.blocks] == ["embed.weight", "conv.weight", "lin.weight", "head.weight"]
    assert plan.block("conv.weight").layer.cols == 2 * 3 * 2 and plan.block("conv.weight").layer.bias is None
    assert plan.rest == ("norm.weight", "norm.bias")


def test_hugging_face_gpt2_conv1d_tied_head_and_padding():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double()
    ids = torch.randint(0, 50, (5, 10))
    mask = torch.ones(5, 10, dtype=torch.long)
    mask[0, 7:] = 0
    labels = ids.clone()
    labels[0, 7:] = -100
    plan = _check_exact(model, {"input_ids": ids, "attention_mask": mask}, labels, "language_modeling", k=64)
    wte = plan.block("transformer.wte.weight").layer  # the embedding and the tied head: one block
    assert (wte.rows, wte.cols) == (50, 16)
    assert plan.block("transformer.h.0.attn.c_attn.weight").layer.bias_side == "rows"  # Conv1D: W is (in, out)


def test_rest_dropped_and_dims_set_by_hand():
    model = torch_model("mlp", canonical.weights("mlp", 0))
    x, y = (torch.as_tensor(a) for a in canonical.inputs("mlp", 5, 1))
    plan = _check_exact(model, x, y, "classification", k=12, options=Kronecker(dims={"2.weight": 5}))
    assert plan.block("2.weight").k == 5 and plan.block("0.weight").k == 7

    class Scaled(torch.nn.Module):  # a free parameter: the rest
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 3)
            self.scale = torch.nn.Parameter(torch.tensor([1.5, 0.5, 1.0]))

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    scaled = Scaled().double()
    x = torch.randn(4, 8, dtype=torch.float64)
    dense = _check_exact(scaled, x, y[:4], "classification", k=10)
    assert dense.rest == ("scale",) and dense.k_rest >= 1
    dropped = _check_exact(scaled, x, y[:4], "classification", k=10, options=Kronecker(rest="drop"))
    assert dropped.rest == () and dropped.k_rest == 0 and dropped.blocks[0].k == 10


def test_the_share_of_k_and_the_factor_sizes():
    layers = [Layer("a", 100, 51, "b", "cols"), Layer("c", 10, 101, "d", "cols")]
    plan = make_plan(layers, [("e", 40)], 256)
    ks = [block.k for block in plan.blocks] + [plan.k_rest]
    assert ks == [212, 42, 2]  # 256 x (5100, 1010, 40) / 6150 = 212.3, 42.0, 1.66: floors, then the largest remainder
    for block in plan.blocks:
        assert block.k_rows * block.k_cols >= block.k and block.k_rows <= block.layer.rows
    assert factor_dims(50257, 768, 1277) == (99, 13)  # GPT-2's token table: sqrt(cols / rows) rule
    # k equal to the number of blocks: one each (the floor of 1 gave 2 + 1 + 1 = 4 > 3, and taking one back from
    # the block most over its ideal left the rest with 0 before)
    tight = make_plan([Layer("a", 16, 13), Layer("c", 3, 17)], [("ln", 32)], 3)
    assert [block.k for block in tight.blocks] + [tight.k_rest] == [1, 1, 1]
    f = factor(300, 64, seed=5, checkpoint=1, index=2, side="cols")
    assert set(np.unique(f)) == {-1.0, 1.0} and abs(f.mean()) < 0.02  # +-1, balanced
    g = factor(300, 64, seed=5, checkpoint=2, index=2, side="cols")
    assert not np.array_equal(f, g)  # checkpoints get different matrices
    np.testing.assert_array_equal(f, factor(300, 64, seed=5, checkpoint=1, index=2, side="cols"))


def test_a_kronecker_block_preserves_inner_products_on_average():
    """E[<Pg, Ph>] = <g, h> over seeds: the kept columns are unbiased, as a dense Rademacher matrix's."""
    rng = np.random.default_rng(0)
    g, h = rng.normal(size=(2, 6 * 5))
    plan = make_plan([Layer("w", 6, 5)], [], 7)
    estimates = []
    for seed in range(400):
        m = explicit_matrix(plan, {"w": (6, 5)}, seed=seed, checkpoint=0)
        estimates.append((g @ m) @ (h @ m))
    assert abs(np.mean(estimates) - g @ h) < 4 * np.std(estimates) / math.sqrt(len(estimates))


def test_bad_requests_get_clear_errors():
    with pytest.raises(TrakValueError, match="no factorized projection"):
        TRAK(SoftmaxRegression(3, 2), proj_type="kronecker", proj_dim=4)
    with pytest.raises(TrakValueError, match="needs a proj_dim"):
        TRAK(torch.nn.Linear(3, 2), proj_type="kronecker", proj_dim=None)
    with pytest.raises(TrakValueError, match="rest"):
        Kronecker(rest="sometimes")
    with pytest.raises(TrakValueError, match="larger than"):
        make_plan([Layer("w", 3, 4)], [], 13)
    with pytest.raises(TrakValueError, match="smaller than the number"):
        make_plan([Layer("w", 3, 4), Layer("v", 3, 4)], [], 1)
    with pytest.raises(TrakValueError, match="not factorized layers"):
        make_plan([Layer("w", 3, 4)], [], 5, Kronecker(dims={"x": 2}))
    with pytest.raises(TrakValueError, match=r"sets 12 of proj_dim=10, leaving -2 for 2 other blocks \(v, the rest\)"):
        make_plan([Layer("w", 3, 4), Layer("v", 3, 4)], [("b", 4)], 10, Kronecker(dims={"w": 12}))
    with pytest.raises(TrakValueError, match=r"sets 3 of proj_dim=30, leaving 27 for v, which hold 12 parameters"):
        make_plan([Layer("w", 3, 4), Layer("v", 3, 4)], [], 30, Kronecker(dims={"w": 3}))  # said proj_dim=27
    assert Kronecker(dims={"w": np.int64(3)}).dims == {"w": 3}
    with pytest.raises(TrakValueError, match="positive integer"):
        Kronecker(dims={"w": 2.0})

    class Free(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, 2))

        def forward(self, x):
            return x @ self.w.T

    trak = TRAK(Free(), proj_type="kronecker", proj_dim=4)
    with pytest.raises(TrakValueError, match="found no Linear"):
        trak.featurize(None, [(torch.ones(2, 2), torch.tensor([0, 1]))])


def test_a_weight_also_used_outside_its_module_is_an_error():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 6), torch.nn.Linear(6, 5)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h) + torch.nn.functional.linear(h, self.b.weight)

    # k = 32: 'b' gets a block of 15 (its share of 35 + 30 parameters), whose features are far from 0; at k = 8 its
    # block of 1 to 4 could be +-1 columns with equal signs, which a margin gradient (summing to 0) maps to 0, and the
    # check compared rounding noise. Here a use is missing: relative error about 0.4 (allowed: 2e-4), and the watch
    # over the batch's ops sees the use itself first
    torch.manual_seed(0)
    trak = TRAK(Twice(), proj_type="kronecker", proj_dim=32)
    with pytest.raises(TrakValueError, match=r"b\.weight is used by linear outside its layer's call.*params="):
        trak.featurize(None, [(torch.randn(6, 4), torch.randint(0, 5, (6,)))])


def test_float32_rounding_in_cancelling_layers_is_not_taken_for_a_missing_use():
    """bench/peers.py's 1.13M-parameter MLP (64-1024-1024-10, ReLU), trained on digits: its last layer's features
    are sums of non-negative inputs times +-1 signs that nearly cancel, and their float32 rounding (2.8e-4 to 5.1e-4
    relative on an AMD EPYC) was refused as a weight used outside its module. They are accepted and equal the
    float64 features of the same checkpoints to float32 rounding."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))[:200]  # the task's training split
    x = torch.tensor(digits.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[order].astype(np.int64))

    def train(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                    torch.nn.ReLU(), torch.nn.Linear(1024, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        for _ in range(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model, {k: v.detach().clone() for k, v in model.state_dict().items()}

    model, first = train(0)
    second = train(1)[1]
    features = {}
    for dtype in (torch.float32, torch.float64):
        trak = TRAK(model.to(dtype), proj_type="kronecker", proj_dim=2048, progress=False)
        for state in (first, second):
            trak.featurize({k: v.to(dtype) for k, v in state.items()}, [(x[:4].to(dtype), y[:4])])
        features[dtype] = [entry.features.double() for entry in trak.store]
    for got, reference in zip(features[torch.float32], features[torch.float64]):
        assert float(torch.linalg.vector_norm(got - reference) / torch.linalg.vector_norm(reference)) < 1e-5


def _digits_like(rng, n, d=6, c=3):
    x = torch.as_tensor(rng.normal(size=(n, d)))
    return x, torch.as_tensor(rng.integers(0, c, n))


def test_trak_scores_equal_the_estimator_on_explicit_features(tmp_path):
    """End to end: TRAK(kronecker) == the estimator's formula on gradients @ explicit matrix (2 checkpoints)."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    checkpoints = []
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        checkpoints.append({n: t.clone() for n, t in model.state_dict().items()})
    (x, y), (xt, yt) = _digits_like(rng, 20), _digits_like(rng, 4)
    lam, k = 0.05, 16
    trak = TRAK(model, proj_type="kronecker", proj_dim=k, lambda_reg=lam, store=tmp_path / "store", seed=7)
    for ckpt in checkpoints:
        trak.featurize(ckpt, [(x[:8], y[:8]), (x[8:], y[8:])])
    scores = np.asarray(trak.score([(xt, yt)]))

    backend, task = TorchBackend(), get_task("classification")
    total, weight = 0.0, 0.0
    for c, ckpt in enumerate(checkpoints):
        prepared = backend.prepare(model, ckpt)
        plan = backend.factorized_plan(model, prepared, x, y, task, k=k, options=Kronecker())
        m = explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=7, checkpoint=c)
        g, q = backend.gradients(model, prepared, x, y, task)
        gt, _ = backend.gradients(model, prepared, xt, yt, task)
        phi, phit = g.numpy() @ m, gt.numpy() @ m
        total = total + phi @ np.linalg.solve(phi.T @ phi + lam * np.eye(k), phit.T)
        weight = weight + q.numpy()
    expected = (total / 2) * (weight / 2)[:, None]
    np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())

    reopened = TRAK.open(tmp_path / "store", model, checkpoints)
    assert reopened.kronecker == Kronecker()
    np.testing.assert_allclose(np.asarray(reopened.score([(xt, yt)])), scores, rtol=1e-12)
    from trak_core.errors import StoreMismatchError

    dense = TRAK(model, proj_dim=k, lambda_reg=lam, store=tmp_path / "store", seed=7)
    with pytest.raises(StoreMismatchError, match="proj_type"):
        dense.featurize(checkpoints[0], [(x, y)])


def test_float32_features_agree_with_float64():
    kind = "lm"
    ws = canonical.weights(kind, 0)
    x, y = canonical.inputs(kind, 6, 1)
    out = []
    for dtype in ("float64", "float32"):
        model = torch_model(kind, [w.astype(dtype) for w in ws])
        backend, task = TorchBackend(), get_task("language_modeling")
        prepared = backend.prepare(model, None)
        f, _ = backend.factorized_features(model, prepared, _tensors(x), torch.as_tensor(y), task, k=32, seed=0,
                                           checkpoint=0, options=Kronecker())
        out.append(f.double().numpy())
    assert np.abs(out[1] - out[0]).max() / np.abs(out[0]).max() < 1e-5


def test_one_batched_pass_when_examples_are_independent_and_vmap_when_they_interact():
    from test_closed_form import Interacting  # examples interact through the batch mean

    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    independent = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    for model, batched in ((independent, True), (Interacting().double(), False)):
        backend = TorchBackend()
        prepared = backend.prepare(model, None)
        features, _ = backend.factorized_features(model, prepared, x, y, get_task("classification"), k=6, seed=0,
                                                  checkpoint=0, options=Kronecker())
        assert [state.batched for state in prepared._kronecker.values()] == [batched]
        vmap = TorchBackend(per_example="vmap")
        reference, _ = vmap.factorized_features(model, vmap.prepare(model, None), x, y, get_task("classification"),
                                                k=6, seed=0, checkpoint=0, options=Kronecker())
        np.testing.assert_allclose(features.numpy(), reference.numpy(), rtol=1e-10, atol=1e-14)
        # a first batch of one example cannot show interaction: it is computed alone, and the next batch decides
        prepared = backend.prepare(model, None)
        for rows in (slice(0, 1), slice(0, 6)):
            features, _ = backend.factorized_features(model, prepared, x[rows], y[rows], get_task("classification"),
                                                      k=6, seed=0, checkpoint=0, options=Kronecker())
            assert [state.batched for state in prepared._kronecker.values()] == [None if rows.stop == 1 else batched]
        np.testing.assert_allclose(features.numpy(), reference.numpy(), rtol=1e-10, atol=1e-14)


class Signal(torch.nn.Module):
    """1-D convolutions (strides, dilation, padding, with and without a bias; one with groups, in the rest) on
    (n, channels, length) signals."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv1d(4, 3, 2, dilation=2, bias=False, padding="valid")
        self.norm = torch.nn.BatchNorm1d(4)  # running statistics (eval mode): a rest the batched pass takes
        self.depthwise = torch.nn.Conv1d(3, 3, 3, groups=3, padding=1)
        self.head = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.norm.running_mean.normal_(0, 0.3)
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.norm(self.conv1(x)))))
        return self.head(self.depthwise(h).mean(-1))


def test_one_dimensional_convolutions_are_layers():
    torch.manual_seed(0)
    x, y = torch.randn(5, 2, 11, dtype=torch.float64), torch.randint(0, 2, (5,))
    plan = _check_exact(Signal().double(), x, y, "classification", k=20)
    layers = {b.layer.name: (b.layer.rows, b.layer.cols) for b in plan.blocks}
    assert layers == {"conv1.weight": (4, 2 * 3 + 1), "conv2.weight": (3, 4 * 2), "head.weight": (2, 4)}
    assert plan.rest == ("norm.weight", "norm.bias", "depthwise.weight", "depthwise.bias")
    model = Signal().double()  # the rest dropped, or only the batch norm in it: one batched pass, equal to vmap's
    for options in (Kronecker(rest="drop"), Kronecker()):
        out = []
        for per_example in ("auto", "vmap"):
            backend = TorchBackend(per_example=per_example, params=lambda name, _: "depthwise" not in name)
            prepared = backend.prepare(model, None)
            out.append(backend.factorized_features(model, prepared, x, y, get_task("classification"), k=20, seed=0,
                                                   checkpoint=0, options=options)[0].numpy())
            assert [state.batched for state in prepared._kronecker.values()] == [backend.per_example == "auto"]
        np.testing.assert_allclose(out[0], out[1], rtol=1e-10, atol=1e-14)
