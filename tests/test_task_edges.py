"""Task numbers at the edges a user meets: classes or tokens masked with ``-inf`` (action masking, a vocabulary
padded to a multiple of 64), half-precision sequence weights over long sequences. Each against a margin or weight
worked out by hand."""
import numpy as np
import pytest
from scipy.special import logsumexp

import trak_core
from trak_core.errors import TrakValueError
from trak_core.tasks import get_task

INF = np.inf
# two examples of three classes, class 1 masked: margins by hand, logit_y - logsumexp(other finite logits)
MASKED = np.array([[2.0, -INF, 0.5], [-1.0, -INF, 3.0]])
MASKED_LABELS = np.array([0, 2])
MASKED_MARGINS = np.array([2.0 - 0.5, 3.0 - (-1.0)])


def _namespaces():
    """``(name, to_array, to_numpy)`` of the installed array libraries."""
    out = [("numpy", np.asarray, np.asarray)]
    try:
        import torch

        out.append(("torch", torch.as_tensor, lambda a: a.detach().numpy()))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        out.append(("jax", jnp.asarray, np.asarray))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("name,to,back", _namespaces(), ids=[n for n, _, _ in _namespaces()])
def test_a_class_masked_with_minus_inf_leaves_the_margin_finite(name, to, back):
    """``-inf`` logits drop out of the margin as they drop out of the softmax (they made every margin NaN:
    ``-inf * 0`` in picking the label's logit)."""
    import array_api_compat

    logits, labels = to(MASKED.astype(np.float32)), to(MASKED_LABELS)
    xp = array_api_compat.array_namespace(logits)
    task = get_task("classification")
    np.testing.assert_allclose(back(task.output(logits, labels, xp=xp)), MASKED_MARGINS, rtol=1e-6)
    np.testing.assert_allclose(back(task.out_to_loss(logits, labels, xp=xp)),
                               [1 / (1 + np.exp(1.5)), 1 / (1 + np.exp(4.0))], rtol=1e-6)


def test_the_margin_of_a_masked_class_model_differentiates_to_the_label_less_the_others_softmax():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    logits = torch.tensor(MASKED, requires_grad=True)
    get_task("classification").output(logits, torch.tensor(MASKED_LABELS), xp=xp).sum().backward()
    # d f / d logits: one-hot of the label less the softmax over the other (finite) classes: one class left each
    np.testing.assert_allclose(logits.grad.numpy(), [[1.0, 0.0, -1.0], [-1.0, 0.0, 1.0]], atol=1e-15)


def test_a_language_model_whose_token_0_is_masked_sums_the_counted_margins():
    """Uncounted positions (-100) read token 0 as a stand-in label; a token 0 masked with ``-inf`` made each
    sequence's f NaN (``-inf * 0``)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 6))
    logits[..., 0] = -INF
    labels = rng.integers(1, 6, (2, 5))
    labels[0, 3:] = -100
    labels[1, 0] = -100  # never predicted: the language model's labels are shifted
    expected = [sum(logits[i, t, labels[i, t + 1]] - logsumexp(np.delete(logits[i, t], labels[i, t + 1]))
                    for t in range(4) if labels[i, t + 1] != -100) for i in range(2)]
    np.testing.assert_allclose(get_task("language_modeling").output(logits, labels, xp=np), expected, rtol=1e-12)


def test_a_bfloat16_language_models_weights_count_tokens_exactly():
    """Q is the mean of ``1 - p_t`` over the counted tokens, in float32 for half-precision logits; the count was
    bfloat16 (699 tokens read as 700: Q 1.4e-3 off)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xp

    torch.manual_seed(0)
    logits = torch.randn(1, 701, 5).to(torch.bfloat16)
    labels = torch.randint(0, 5, (1, 701))
    labels[0, 700] = -100  # 699 counted: labels[1:700]
    p = torch.softmax(logits.double()[0, :699], dim=-1)
    expected = float((1 - p[torch.arange(699), labels[0, 1:700]]).mean())
    q = get_task("language_modeling").out_to_loss(logits, labels, xp=xp)
    assert q.dtype == torch.float32
    np.testing.assert_allclose(float(q[0]), expected, rtol=1e-5)


def test_jax_finds_rows_mixed_by_a_model_with_a_masked_class():
    """Batch statistics make an example's output alone differ from its row's in the batch; a class masked with
    ``-inf`` hid it (NaN margins, and an infinite scale for the difference)."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from trak_jax import JaxModel

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 2, 8)
    params = {"w": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}

    def apply(p, inputs):
        hidden = inputs @ p["w"]
        hidden = hidden - hidden.mean(0, keepdims=True)  # batch statistics: the rows are mixed
        return hidden @ p["v"] + jnp.array([0.0, 0.0, -jnp.inf])

    trak = trak_core.TRAK(JaxModel(apply), proj_dim=None, lambda_reg=0.1, progress=False)
    with pytest.raises(TrakValueError, match="does not treat the batch's rows independently"):
        trak.featurize(params, [(x, y)])


# Row 3 of 8 leaves one class: every other logit is masked (the mask is the inputs' last 3 columns)
CERTAIN_ROW = 3
_RNG = np.random.default_rng(1)
_X = _RNG.normal(size=(8, 4)).astype(np.float32)
_Y = _RNG.integers(0, 3, 8)


def _mask(fill: float, rows=(CERTAIN_ROW,)) -> np.ndarray:
    mask = np.zeros((8, 3), np.float32)
    for row in rows:
        mask[row] = fill
        mask[row, _Y[row]] = 0.0
    return mask


def _estimator(backend: str, proj_dim):
    """``(trak, checkpoint, batch of inputs with mask columns)``: a linear classifier whose logits are
    ``x @ w (+ b) + mask``, on torch or JAX, and the closed form of the margin's gradient for one row."""
    if backend == "torch":
        torch = pytest.importorskip("torch")

        class Masked(torch.nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.linear = torch.nn.Linear(4, 3)

            def forward(self, inputs):
                return self.linear(inputs[:, :4]) + inputs[:, 4:]

        model = Masked()
        trak = trak_core.TRAK(model, proj_dim=proj_dim, lambda_reg=0.1, progress=False)
        to = torch.as_tensor
        # torch's parameters: weight (3, 4) row by row, then bias (3,)
        grad = lambda x, g: np.concatenate([np.outer(g, x).ravel(), g])  # noqa: E731
        return trak, model.state_dict(), to, grad
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from trak_jax import JaxModel

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)}
    trak = trak_core.TRAK(JaxModel(lambda p, inputs: inputs[:, :4] @ p["w"] + inputs[:, 4:]), proj_dim=proj_dim,
                          lambda_reg=0.1, progress=False)
    return trak, params, np.asarray, lambda x, g: np.outer(x, g).ravel()


BACKENDS = ["torch", "jax"]


def test_a_row_that_leaves_one_class_has_an_infinite_margin_and_no_weight():
    """The margin ``log(p_y / (1 - p_y))`` of ``p_y = 1`` is ``+inf`` (it was NaN: ``exp(-inf - -inf)``), ``Q`` is
    0; its gradient is undefined (NaN), which the estimator refuses (below)."""
    logits = np.array([[1.5, -INF, -INF], [2.0, -INF, 0.5]])
    task = get_task("classification")
    with np.errstate(divide="ignore", invalid="ignore"):
        assert task.output(logits, np.array([0, 0]), xp=np).tolist() == [INF, 1.5]
    q = task.out_to_loss(logits, np.array([0, 0]), xp=np)
    assert q[0] == 0.0
    np.testing.assert_allclose(q[1], 1 / (1 + np.exp(1.5)), rtol=1e-15)
    with np.errstate(divide="ignore", invalid="ignore"):
        assert np.isnan(task.output_grad(logits, np.array([0, 0]), xp=np)[0]).all()


@pytest.mark.parametrize("proj_dim", [16, None], ids=["projected", "unprojected"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_featurize_names_a_training_row_of_p_1_and_the_fix(backend, proj_dim):
    """A training row whose logits are -inf for every class but the label's: NaN features, which were refused
    as "the per-example gradients contain NaN or inf; check the inputs, the checkpoint's weights, and the learning
    rate": none of which is the cause. Both backends now name the training row, the cause and the fix."""
    trak, checkpoint, to, _ = _estimator(backend, proj_dim)
    inputs = np.concatenate([_X, _mask(-INF)], axis=1)
    data = [(to(inputs[:5]), to(_Y[:5])), (to(inputs[5:]), to(_Y[5:]))]
    with pytest.raises(TrakValueError, match=rf"training rows \[{CERTAIN_ROW}\] have p_y = 1 exactly .* the "
                                             r"margin log\(p_y / \(1 - p_y\)\) is \+inf .*Drop those examples.* "
                                             r"most negative finite number instead of -inf"):
        trak.featurize(checkpoint, data)


@pytest.mark.parametrize("backend", BACKENDS)
def test_score_names_a_target_row_of_p_1_and_its_batch(backend):
    trak, checkpoint, to, _ = _estimator(backend, 16)
    clean = np.concatenate([_X, _mask(0.0)], axis=1)
    trak.featurize(checkpoint, [(to(clean), to(_Y))])
    targets = np.concatenate([_X, _mask(-INF, rows=(1, 6))], axis=1)
    with pytest.raises(TrakValueError, match=r"targets batch 0, checkpoint 0: rows \[1, 6\] of the batch have "
                                             r"p_y = 1 exactly"):
        trak.score([(to(targets), to(_Y))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_fix_the_error_names_gives_the_margin_s_gradient(backend):
    """Masked with the dtype's most negative finite number (the fix the error names), the row featurizes: its
    weight is 0 and its gradient the closed form ``d f / d logits = e_y - (the other classes' softmax)``, here
    ``e_y - 1/2`` for each of the two masked classes (equal logits), chained through the linear layer."""
    trak, checkpoint, to, grad = _estimator(backend, None)
    inputs = np.concatenate([_X, _mask(np.finfo(np.float32).min)], axis=1)
    trak.featurize(checkpoint, [(to(inputs), to(_Y))])
    entry = trak.store[0]
    features, weights = np.asarray(entry.features), np.asarray(entry.out_to_loss)
    g = np.full(3, -0.5)
    g[_Y[CERTAIN_ROW]] = 1.0
    assert weights[CERTAIN_ROW] == 0.0 and np.isfinite(features).all()
    np.testing.assert_allclose(features[CERTAIN_ROW], grad(_X[CERTAIN_ROW].astype(np.float64), g), rtol=1e-6,
                               atol=1e-6)
