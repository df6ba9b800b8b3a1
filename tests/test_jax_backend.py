"""JAX-specific behaviour: one compilation per padded size, x64 modes, Equinox models, dict batches, output shapes per task,
parameter subsets, and bad input."""
import re

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
import jax.numpy as jnp  # noqa: E402

import trak_core  # noqa: E402
from tests_helpers import STRUCTURED_OUTPUTS  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import jax_apply  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402


def _data(n=50, seed=0):
    x, y = canonical.inputs("mlp", n, seed=seed, dtype="float32")
    return x, y


def test_compiles_once_per_bucket_for_all_batches_and_checkpoints():
    """The step compiles once per padded size (16, then buckets of 16 for short batches), not per batch or
    checkpoint; ``JaxBackend(batch_size=16)`` compiles once."""
    x, y = _data(50)
    for backend, counts in ((JaxBackend(), (2, 4)), (JaxBackend(batch_size=16), (1, 1))):
        trak = trak_core.TRAK(JaxModel(jax_apply("mlp")), proj_dim=32, lambda_reg=0.1, backend=backend,
                              progress=False)
        for c in range(3):
            trak.featurize(canonical.weights("mlp", seed=c, dtype="float32"),
                           [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)])  # 16, 16, 16, 2 (padded to 2)
        assert backend.compilations == counts[0]
        trak.score([(x[:5], y[:5]), (x[5:9], y[5:9])])  # padded to 8 and 4
        assert backend.compilations == counts[1]
        trak.score([(x[:40], y[:40]), (x[:2], y[:2])])  # larger than the step's size: 16, 16 and 8; then 2
        assert backend.compilations == counts[1]


def test_a_first_call_of_one_row_does_not_fix_the_step_size():
    """After a one-row call (the Ray driver's template), a real batch compiles once more at its own size instead
    of running one row per call, and gives the bits of a backend that saw it first (3e-8 apart before)."""
    model, task = JaxModel(jax_apply("mlp")), trak_core.Classification()
    x, y = _data(24)
    weights = canonical.weights("mlp", seed=0, dtype="float32")
    late, fresh = JaxBackend(), JaxBackend()
    late.gradients(model, late.prepare(model, weights), x[:1], y[:1], task)
    grads, q = late.gradients(model, late.prepare(model, weights), x, y, task)
    assert late.compilations == 2 and next(iter(late._steps.values()))[1][2] == 24
    expected, expected_q = fresh.gradients(model, fresh.prepare(model, weights), x, y, task)
    assert np.array_equal(np.asarray(grads), np.asarray(expected)) and np.array_equal(np.asarray(q),
                                                                                     np.asarray(expected_q))


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
    with pytest.raises(trak_core.TrakTypeError, match="not jittable.*jnp.where or jax.lax.cond"):
        trak_core.TRAK(JaxModel(apply), proj_dim=8, progress=False).featurize(
            canonical.weights("softmax", seed=0, dtype="float32"), [(x, y)])


def test_a_task_function_that_is_not_jittable_is_named_not_the_apply():
    """A custom out_to_loss with Python control flow on values: the error names out_to_loss (it blamed apply)."""
    def branchy(logits, labels, xp):
        if float(xp.sum(logits)) > 0:
            return xp.ones(logits.shape[0])
        return xp.zeros(logits.shape[0])

    def pick(logits, labels, xp):
        return logits[xp.arange(logits.shape[0]), labels]

    x, y = _data(10)
    weights = canonical.weights("softmax", seed=0, dtype="float32")
    for task, culprit in ((trak_core.CustomTask(pick, branchy), "out_to_loss"),
                          (trak_core.CustomTask(lambda z, t, xp: branchy(z, t, xp) + pick(z, t, xp)), "output")):
        trak = trak_core.TRAK(JaxModel(jax_apply("softmax")), task=task, proj_dim=8, progress=False)
        with pytest.raises(trak_core.TrakTypeError, match=f"'custom': {culprit}\\(logits, labels, xp\\) is not "
                                                          "jittable.*xp.where") as info:
            trak.featurize(weights, [(x, y)])
        assert "apply function" not in str(info.value)


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


@pytest.mark.parametrize("pack,logits_fn", [case[:2] for case in STRUCTURED_OUTPUTS],
                         ids=[case[2] for case in STRUCTURED_OUTPUTS])
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


def _scaled_mlp(params, inputs):
    """The canonical MLP on a dict batch: ``x`` scaled per example by ``scale`` (two arrays of different shapes)."""
    return jax_apply("mlp")(params, inputs["x"] * inputs["scale"][:, None])


def test_dict_batches_are_mapped_and_padded_in_every_array():
    with jax.enable_x64(True):
        x, y = canonical.inputs("mlp", 9, seed=1)
        scale = np.linspace(0.5, 2.0, 9)
        params = [jnp.asarray(w) for w in canonical.weights("mlp", seed=0)]
        backend = JaxBackend(batch_size=4)  # 4 + 4 + 1: the last chunk is padded in both arrays
        prepared = backend.prepare(_scaled_mlp, params)
        grads, q = backend.gradients(_scaled_mlp, prepared, {"x": x, "scale": scale}, y, trak_core.Classification())
        reference = _margin_gradients_one_at_a_time(jax_apply("mlp"), params, jnp.asarray(x * scale[:, None]),
                                                    jnp.asarray(y))
        np.testing.assert_allclose(np.asarray(grads), reference, rtol=1e-9, atol=1e-12)
        p = jax.nn.softmax(jax_apply("mlp")(params, jnp.asarray(x * scale[:, None])), axis=1)[np.arange(9), y]
        np.testing.assert_allclose(np.asarray(q), 1 - np.asarray(p), rtol=1e-9, atol=1e-12)
        assert backend.compilations == 1


def test_dict_batches_through_trak_score_like_arrays():
    x, y = _data(20)
    scale = np.linspace(0.5, 2.0, 20).astype("float32")
    weights = canonical.weights("mlp", seed=0, dtype="float32")
    dict_trak = trak_core.TRAK(JaxModel(_scaled_mlp), proj_dim=16, lambda_reg=0.1, progress=False)
    dict_trak.featurize(weights, [{"x": x[i:i + 8], "scale": scale[i:i + 8], "labels": y[i:i + 8]}
                                  for i in range(0, 20, 8)])  # 8, 8, 4 (padded)
    plain = trak_core.TRAK(JaxModel(jax_apply("mlp")), proj_dim=16, lambda_reg=0.1, progress=False)
    plain.featurize(weights, [(x * scale[:, None], y)])
    a = np.asarray(dict_trak.score([{"x": x[:3], "scale": scale[:3], "labels": y[:3]}]))
    b = np.asarray(plain.score([(x[:3] * scale[:3, None], y[:3])]))
    # float32 both ways, x * scale rounded inside the model or before it: XLA's CPU kernels differ by version (jax
    # 0.10.2: one of 60 scores 8.4e-7 off, above 1e-6 of the largest); wrong dict batching is off by O(1)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_bad_dict_batches_are_clear_errors():
    x, y = _data(6)
    scale = np.ones(6, dtype="float32")
    weights = canonical.weights("mlp", seed=0, dtype="float32")
    backend = JaxBackend()
    prepared = backend.prepare(_scaled_mlp, weights)
    task = trak_core.Classification()
    missing = re.escape("looked up 'scale', which the dict batch does not have: its inputs are ['x']")
    with pytest.raises(ValueError, match=missing):
        backend.gradients(_scaled_mlp, prepared, {"x": x}, y, task)
    with pytest.raises(ValueError, match="inputs\\['scale'\\] has 5 rows but inputs\\['x'\\] has 6"):
        backend.gradients(_scaled_mlp, prepared, {"x": x, "scale": scale[:5]}, y, task)
    with pytest.raises(ValueError, match="labels has 5 rows"):
        backend.gradients(_scaled_mlp, prepared, {"x": x, "scale": scale}, y[:5], task)
    with pytest.raises(ValueError, match="dict batch has no inputs"):
        backend.gradients(_scaled_mlp, prepared, {}, y, task)
    with pytest.raises(TypeError, match="inputs\\['scale'\\] must be a JAX or NumPy array, got str"):
        backend.gradients(_scaled_mlp, prepared, {"x": x, "scale": "1.0"}, y, task)
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    with pytest.raises(TypeError, match="inputs\\['scale'\\] are torch tensors"):
        backend.gradients(_scaled_mlp, prepared, {"x": x, "scale": torch.ones(6)}, y, task)


def test_output_dimensions_follow_the_task():
    """Classification takes (n, C) or a 1-D binary logit; a 3-D output needs a sequence task; ``logits_ndim=None``
    passes any shape to the task as it is."""
    with jax.enable_x64(True):
        x, y = canonical.inputs("mlp", 7, seed=3)
        y = y % 2
        w = jnp.asarray(canonical.weights("softmax", seed=0)[0][0])  # one logit: z = x . w
        backend = JaxBackend()

        def binary(params, inputs):  # (n,): one logit per example
            return inputs @ params[0]

        grads, q = backend.gradients(binary, backend.prepare(binary, [w]), x, y, trak_core.Classification())
        sign = 2 * y - 1  # d/dw of the signed logit (2y - 1) x . w
        np.testing.assert_allclose(np.asarray(grads), sign[:, None] * x, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(q), 1 - 1 / (1 + np.exp(-sign * (x @ np.asarray(w)))), rtol=1e-12)

        params = [jnp.asarray(a) for a in canonical.weights("mlp", seed=0)]

        def cube(p, inputs):  # (n, 2, C): the logits and twice the logits
            return jnp.stack([jax_apply("mlp")(p, inputs), 2 * jax_apply("mlp")(p, inputs)], 1)

        with pytest.raises(ValueError, match=r"the model's output with shape \(batch, n_outputs\), got \(7, 2, 3\)"):
            backend.gradients(cube, backend.prepare(cube, params), x, y, trak_core.Classification())
        # any shape: f = the sum of both rows' margins, against the plain model's gradients
        classification = trak_core.Classification()
        task = trak_core.CustomTask(
            lambda logits, labels, xp: (classification.output(logits[:, 0], labels, xp=xp)
                                        + classification.output(logits[:, 1], labels, xp=xp)),
            logits_ndim=None, name="two rows")
        grads, _ = backend.gradients(cube, backend.prepare(cube, params), x, y, task)
        one = _margin_gradients_one_at_a_time(jax_apply("mlp"), params, jnp.asarray(x), jnp.asarray(y))
        doubled = _margin_gradients_one_at_a_time(lambda p, inputs: 2 * jax_apply("mlp")(p, inputs), params,
                                                  jnp.asarray(x), jnp.asarray(y))
        np.testing.assert_allclose(np.asarray(grads), one + doubled, rtol=1e-9, atol=1e-12)


def _widths(params):
    return [int(np.prod(np.shape(w))) for w in params]


@pytest.mark.parametrize("selection,leaves", [
    (["[2]", "[3]"], [2, 3]),
    (["[3]", "[0]"], [0, 3]),  # tree-leaf order, whatever the order asked
    (lambda path, leaf: leaf.ndim == 2, [0, 2]),
], ids=["names", "names-reordered", "predicate"])
def test_params_subsets_are_columns_of_the_full_gradients(selection, leaves):
    with jax.enable_x64(True):
        x, y = canonical.inputs("mlp", 9, seed=1)
        weights = canonical.weights("mlp", seed=0)
        params = [jnp.asarray(w) for w in weights]
        backend = JaxBackend(batch_size=4, params=selection)
        prepared = backend.prepare(jax_apply("mlp"), params)
        grads, q = backend.gradients(jax_apply("mlp"), prepared, x, y, trak_core.Classification())
        full = _margin_gradients_one_at_a_time(jax_apply("mlp"), params, jnp.asarray(x), jnp.asarray(y))
    from trak_core.backends.numpy_backend import backend as numpy_backend

    model = canonical.analytic_model("mlp")  # the analytic gradients: no JAX in the reference
    analytic, q_ref = numpy_backend.gradients(model, numpy_backend.prepare(model, canonical.flat(weights)), x, y,
                                              trak_core.Classification())
    starts = np.cumsum([0] + _widths(weights))
    columns = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in leaves])
    assert backend.n_params(prepared) == columns.size == grads.shape[1]
    np.testing.assert_allclose(np.asarray(grads), full[:, columns], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(grads), analytic[:, columns], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(q), q_ref, rtol=1e-9)
    assert backend.structure(prepared) != JaxBackend().structure(JaxBackend().prepare(jax_apply("mlp"), params))


def test_params_subset_of_the_cnn_equals_finite_differences():
    with jax.enable_x64(True):
        x, y = canonical.inputs("cnn", 5, seed=2)
        weights = canonical.weights("cnn", seed=1)
        backend = JaxBackend(params=["[0]", "[1]"])  # the convolution's kernel and bias: behind the tanh
        prepared = backend.prepare(jax_apply("cnn"), [jnp.asarray(w) for w in weights])
        grads, _ = backend.gradients(jax_apply("cnn"), prepared, x, y, trak_core.Classification())
    reference = canonical.cnn_gradients(weights, x, y)[:, :sum(_widths(weights[:2]))]
    np.testing.assert_allclose(np.asarray(grads), reference, rtol=1e-6, atol=1e-6 * np.abs(reference).max())


def test_params_subset_through_trak_compiles_once_and_scores_like_the_last_layer_alone():
    """The last layer of the MLP is a softmax regression on the hidden features ``tanh(x W1^T + b1)``."""
    backend, model = JaxBackend(params=["[2]", "[3]"]), JaxModel(jax_apply("mlp"))
    x, y = _data(20)
    for n_checkpoints in (2, 1):  # the second TRAK reuses the compiled step
        trak = trak_core.TRAK(model, proj_dim=8, lambda_reg=0.1, backend=backend, progress=False)
        for c in range(n_checkpoints):
            trak.featurize(canonical.weights("mlp", seed=c, dtype="float32"), [(x[:12], y[:12]), (x[12:], y[12:])])
        assert trak.store[0].features.shape == (20, 8)
    assert backend.compilations == 1
    w1, b1, w2, b2 = canonical.weights("mlp", seed=0, dtype="float32")
    scores = np.asarray(trak.score([(x[:3], y[:3])]))
    ref = trak_core.TRAK(canonical.analytic_model("softmax", [w2, b2]), proj_dim=8, lambda_reg=0.1, progress=False)
    ref.featurize(canonical.flat([w2, b2]), [(np.tanh(x @ w1.T + b1), y)])
    expected = ref.score([(np.tanh(x[:3] @ w1.T + b1), y[:3])])
    assert np.linalg.norm(scores - expected) / np.linalg.norm(expected) < 1e-4


def test_params_selection_errors():
    params = canonical.weights("mlp", seed=0, dtype="float32")
    apply = jax_apply("mlp")
    leaves = re.escape("['[0]', '[1]', '[2]', '[3]']")
    with pytest.raises(ValueError, match=re.escape("params paths ['[7]'] are not leaves") + ".*" + leaves):
        JaxBackend(params=["[7]"]).prepare(apply, params)
    with pytest.raises(ValueError, match="selects no leaf"):
        JaxBackend(params=lambda path, leaf: False).prepare(apply, params)
    with pytest.raises(TypeError, match="wrap it in a list: params=\\['\\[0\\]'\\]"):
        JaxBackend(params="[0]")
    with pytest.raises(TypeError, match="sequence of path strings"):
        JaxBackend(params=[0, 1])


def test_boolean_binary_labels_under_jax_without_x64_do_not_warn():
    """Boolean labels of a one-logit classifier: the same margins as 0/1 integers, and no int64 truncation warning
    from JAX with x64 off (there were two per batch)."""
    import warnings

    jax = pytest.importorskip("jax", reason="JAX is not installed: its x64-off labels are not exercised")
    import jax.numpy as jnp
    from array_api_compat import array_namespace

    from trak_core.tasks import get_task

    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process: the int64 warning cannot show")
    logits = jnp.asarray([[0.3], [-1.2], [2.0]], dtype=jnp.float32)
    labels = jnp.asarray([True, False, True])
    xp, task = array_namespace(logits), get_task("classification")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.check_labels(labels, 1, xp=xp)
        out = task.output(logits, labels, xp=xp)
    np.testing.assert_allclose(np.asarray(out), [0.3, 1.2, 2.0], rtol=1e-6)  # the signed logit (2y - 1) z
