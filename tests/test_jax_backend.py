"""JAX-specific behaviour: one compilation, x64 modes, Equinox models, and bad input."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
import jax.numpy as jnp  # noqa: E402

import trak_core  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import jax_apply  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402


def _data(n=50, seed=0):
    x, y = canonical.inputs("mlp", n, seed=seed, dtype="float32")
    return x, y


def test_compiles_once_for_all_batches_and_checkpoints():
    backend = JaxBackend()
    model = JaxModel(jax_apply("mlp"))
    trak = trak_core.TRAK(model, proj_dim=32, lambda_reg=0.1, backend=backend, progress=False)
    x, y = _data(50)
    for c in range(3):
        trak.featurize(canonical.weights("mlp", seed=c, dtype="float32"),
                       [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)])  # 16, 16, 16, 2
    trak.score([(x[:5], y[:5]), (x[5:9], y[5:9])])
    assert backend.compilations == 1
    trak.score([(x[:40], y[:40])])  # larger than the compiled size: split, still no recompilation
    assert backend.compilations == 1


def test_x64_off_gives_float32_features_and_kernel():
    with jax.enable_x64(False):
        trak = trak_core.TRAK(JaxModel(jax_apply("mlp")), proj_dim=16, lambda_reg=0.1, progress=False)
        x, y = _data(20)
        trak.featurize(canonical.weights("mlp", seed=0), [(x, y)])  # float64 NumPy weights become float32
        entry = trak.store[0]
        assert entry.features.dtype == jnp.float32 and entry.factor.arrays[0].dtype == jnp.float32
        assert trak.score([(x[:3], y[:3])]).dtype == jnp.float32


def test_x64_on_gives_float64_and_matches_reference():
    with jax.enable_x64(True):
        trak = trak_core.TRAK(JaxModel(jax_apply("mlp")), proj_dim=16, lambda_reg=0.1, progress=False)
        x, y = canonical.inputs("mlp", 20, seed=0)
        w = canonical.weights("mlp", seed=0)
        trak.featurize([jnp.asarray(a) for a in w], [(x, y)])
        assert trak.store[0].features.dtype == jnp.float64 and trak.store[0].factor.arrays[0].dtype == jnp.float64
        scores = np.asarray(trak.score([(x[:3], y[:3])]))
    ref = trak_core.TRAK(canonical.analytic_model("mlp"), proj_dim=16, lambda_reg=0.1, progress=False)
    ref.featurize(canonical.flat(w), [(x, y)])
    np.testing.assert_allclose(scores, ref.score([(x[:3], y[:3])]), rtol=1e-9)


def test_equinox_model_matches_plain_apply():
    eqx = pytest.importorskip("equinox", reason="Equinox is not installed")
    key = jax.random.PRNGKey(0)
    mlp = eqx.nn.MLP(8, 3, width_size=6, depth=1, activation=jnp.tanh, key=key)
    params, static = eqx.partition(mlp, eqx.is_array)

    def apply(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x, y = _data(30)
    trak = trak_core.TRAK(JaxModel(apply), proj_dim=None, lambda_reg=0.1, progress=False)
    trak.featurize(params, [(x, y)])
    # the same weights in the canonical layout: Equinox Linear stores weight (out, in), bias (out,)
    weights = [np.asarray(a) for a in jax.tree_util.tree_leaves(params)]
    ref = trak_core.TRAK(canonical.analytic_model("mlp"), proj_dim=None, lambda_reg=0.1, progress=False)
    ref.featurize(canonical.flat(weights).astype(np.float32), [(x, y)])
    a, b = np.asarray(trak.score([(x[:4], y[:4])])), ref.score([(x[:4], y[:4])])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4


def test_not_jittable_apply_is_a_clear_error():
    def apply(params, x):
        w, b = params
        if jnp.sum(x) > 0:  # Python control flow on a traced value
            return x @ w.T + b
        return x @ w.T

    x, y = _data(10)
    with pytest.raises(TypeError, match="not jittable.*jnp.where or jax.lax.cond"):
        trak_core.TRAK(JaxModel(apply), proj_dim=8, progress=False).featurize(
            canonical.weights("softmax", seed=0, dtype="float32"), [(x, y)])


def test_params_structure_must_not_change():
    trak = trak_core.TRAK(JaxModel(jax_apply("softmax")), proj_dim=8, lambda_reg=0.1, progress=False)
    x, y = _data(10)
    w, b = canonical.weights("softmax", seed=0, dtype="float32")
    trak.featurize([w, b], [(x, y)])
    with pytest.raises(ValueError, match="different parameter structure"):
        trak.featurize((w, b), [(x, y)])  # a tuple, not a list: same count, other structure
    with pytest.raises(ValueError, match="parameters but checkpoint 0 had"):
        trak.featurize([w[:2], b[:2]], [(x, y)])
    assert trak.n_checkpoints == 1


def test_torch_tensors_are_rejected():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    trak = trak_core.TRAK(JaxModel(jax_apply("softmax")), proj_dim=8, progress=False)
    x, y = _data(10)
    w, b = canonical.weights("softmax", seed=0, dtype="float32")
    with pytest.raises(TypeError, match="torch tensor"):
        trak.featurize([torch.tensor(w), b], [(x, y)])
    with pytest.raises(TypeError, match="inputs are torch tensors"):
        trak.featurize([w, b], [(torch.tensor(x), y)])
    with pytest.raises(ValueError, match="labels out of range"):
        trak.featurize([w, b], [(x, y + 3)])


@pytest.mark.parametrize("matmul_precision,expected", [("float32", "HIGHEST"), (None, "DEFAULT")])
def test_step_multiplies_at_the_asked_precision(matmul_precision, expected):
    """On GPUs JAX's default multiplies float32 in TF32: the step asks for float32 unless told otherwise."""
    import re

    backend = JaxBackend(matmul_precision=matmul_precision)
    x, y = canonical.inputs("cnn", 4, seed=0, dtype="float32")
    params = [jnp.asarray(w) for w in canonical.weights("cnn", seed=0, dtype="float32")]
    step = backend._step(jax_apply("cnn"), trak_core.Classification(), True)[0]
    p = sum(int(np.prod(w.shape)) for w in params)
    text = step.lower(params, jnp.asarray(x), jnp.asarray(y), jnp.ones(p), jnp.ones((p, 8))).as_text()
    found = [(op, re.findall(r"(HIGHEST|HIGH|DEFAULT)", line.split("precision", 1)[1]))
             for line in text.splitlines() for op in ("dot_general", "convolution") if f"stablehlo.{op}" in line]
    assert {op for op, _ in found} == {"dot_general", "convolution"}  # the model's, its gradients', P's
    assert all(levels == [expected, expected] for _, levels in found), found


def test_matmul_precision_is_checked():
    with pytest.raises(ValueError, match="matmul_precision must be None or one of"):
        JaxBackend(matmul_precision="float16")


def _margin_gradients_one_at_a_time(apply, params, x, y):
    """``jax.grad`` of each example's margin separately: the independent reference."""
    def margin(p, xi, yi):
        out = apply(p, xi[None])[0]
        others = jnp.where(jnp.arange(out.shape[0]) == yi, -jnp.inf, out)
        return out[yi] - jax.scipy.special.logsumexp(others)

    rows = [jax.grad(margin)(params, x[i], y[i]) for i in range(x.shape[0])]
    return np.stack([np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(row)]) for row in rows])


class _Logits:
    def __init__(self, logits, hidden):
        self.logits, self.hidden = logits, hidden


@pytest.mark.parametrize("pack,logits_fn", [
    (lambda out: (out, out.sum(1)), None),
    (lambda out: [out, out * 2], None),
    (lambda out: {"hidden": out * 2, "logits": out}, None),
    (lambda out: _Logits(out, out * 2), None),
    (lambda out: {"scores": out, "hidden": out * 2}, lambda output: output["scores"]),
], ids=["tuple", "list", "dict", "object", "logits-fn"])
def test_structured_outputs_give_the_plain_apply_gradients(pack, logits_fn):
    plain = jax_apply("mlp")
    with jax.enable_x64(True):
        x, y = canonical.inputs("mlp", 9, seed=1)
        params = [jnp.asarray(w) for w in canonical.weights("mlp", seed=0)]
        backend = JaxBackend(batch_size=4, logits_fn=logits_fn)  # 4 + 4 + 1 (padded)
        model = JaxModel(lambda p, inputs: pack(plain(p, inputs)))
        prepared = backend.prepare(model, params)
        grads, q = backend.gradients(model, prepared, x, y, trak_core.Classification())
        reference = _margin_gradients_one_at_a_time(plain, params, jnp.asarray(x), jnp.asarray(y))
        p = jax.nn.softmax(plain(params, jnp.asarray(x)), axis=1)[np.arange(9), y]
        assert grads.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(grads), reference, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.asarray(q), 1 - np.asarray(p), rtol=1e-9, atol=1e-12)


def test_structured_output_in_the_fused_step_scores_like_the_plain_apply():
    plain = jax_apply("mlp")
    x, y = _data(20)
    weights = canonical.weights("mlp", seed=0, dtype="float32")
    scores = []
    for apply in (plain, lambda p, inputs: {"logits": plain(p, inputs), "hidden": inputs}):
        trak = trak_core.TRAK(JaxModel(apply), proj_dim=16, lambda_reg=0.1, progress=False)
        trak.featurize(weights, [(x, y)])
        scores.append(np.asarray(trak.score([(x[:3], y[:3])])))
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pack,match", [
    (lambda out: 3, "output has type int; expected an array.*logits_fn"),
    (lambda out: "logits", "output has type str; expected an array.*logits_fn"),
    (lambda out: {"hidden": out}, "mapping \\(dict\\) with keys \\['hidden'\\] and no 'logits'.*logits_fn"),
], ids=["int", "str", "dict-without-logits"])
def test_unusable_outputs_are_a_clear_error(pack, match):
    plain = jax_apply("softmax")
    x, y = _data(10)
    with pytest.raises(TypeError, match=match):
        trak_core.TRAK(JaxModel(lambda p, inputs: pack(plain(p, inputs))), proj_dim=8, progress=False).featurize(
            canonical.weights("softmax", seed=0, dtype="float32"), [(x, y)])
    with pytest.raises(TypeError, match="logits_fn must be a function"):
        JaxBackend(logits_fn="logits")
