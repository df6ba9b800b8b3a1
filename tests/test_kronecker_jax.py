"""The JAX factorized (Kronecker) projection: features against dense per-example gradients times the explicit
matrix (float64), the torch backend's features, and the float64 features in float32."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the JAX factorized path is not exercised")
import jax.numpy as jnp  # noqa: E402

from trak_core import TRAK, Kronecker  # noqa: E402
from trak_core.errors import TrakValueError  # noqa: E402
from trak_core.kronecker import explicit_matrix  # noqa: E402
from trak_core.tasks import get_task  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import jax_apply  # noqa: E402
from trak_jax import JaxBackend  # noqa: E402

TASKS = {"mlp": "classification", "cnn": "classification", "lm": "language_modeling"}


def _factorized(apply, weights, x, y, task, k, *, seed=3, checkpoint=2, options=None, backend=None):
    """``(plan, features, out_to_loss, prepared, backend)`` of the factorized path."""
    backend = backend or JaxBackend(batch_size=4)  # 7 examples: a full batch and a padded one
    prepared = backend.prepare(apply, weights)
    task = get_task(task)
    plan = backend.factorized_plan(apply, prepared, x, y, task, k=k, options=options)
    features, out_to_loss = backend.factorized_features(apply, prepared, x, y, task, k=k, seed=seed,
                                                        checkpoint=checkpoint, options=options)
    return plan, np.asarray(features), np.asarray(out_to_loss), prepared, backend


def _check_exact(apply, weights, x, y, task, k, *, seed=3, checkpoint=2, options=None, backend=None):
    """Factorized features == dense per-example gradients @ explicit Kronecker matrix (float64); returns the plan."""
    with jax.enable_x64(True):
        weights = jax.tree_util.tree_map(lambda w: jnp.asarray(w, dtype=jnp.float64), weights)
        plan, features, out_to_loss, prepared, backend = _factorized(
            apply, weights, x, y, task, k, seed=seed, checkpoint=checkpoint, options=options, backend=backend)
        dense = JaxBackend(params=backend.params)
        grads, dense_out_to_loss = dense.gradients(apply, dense.prepare(apply, weights), x, y, get_task(task))
    shapes = {prepared.paths[i]: prepared.shapes[i] for i in prepared.selected}
    reference = np.asarray(grads) @ explicit_matrix(plan, shapes, seed=seed, checkpoint=checkpoint)
    assert features.shape == (grads.shape[0], k) and features.dtype == np.float64
    error = np.linalg.norm(features - reference) / np.linalg.norm(reference)
    assert error < 1e-6, error
    np.testing.assert_allclose(out_to_loss, np.asarray(dense_out_to_loss), rtol=1e-12)
    return plan


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
def test_canonical_models_equal_the_explicit_kronecker_matrix(kind):
    x, y = canonical.inputs(kind, 7, 1)
    plan = _check_exact(jax_apply(kind), canonical.weights(kind, 0), x, y, TASKS[kind], k=40)
    assert sum(block.k for block in plan.blocks) + plan.k_rest == 40
    layers = [(b.layer.name, b.layer.rows, b.layer.cols, b.layer.bias, b.layer.bias_side) for b in plan.blocks]
    if kind == "mlp":
        assert layers == [("[0]", 6, 9, "[1]", "cols"), ("[2]", 3, 7, "[3]", "cols")] and plan.rest == ()
    elif kind == "cnn":  # the kernel (2, 1, 3, 3): 2 rows, 9 patch columns and the bias
        assert layers == [("[0]", 2, 10, "[1]", "cols"), ("[2]", 3, 73, "[3]", "cols")]
    else:  # tokens looked up (a layer), positions sliced (rest); bo and b2 are added after the residual sum
        assert [name for name, *_ in layers] == ["[0]", "[4]", "[6]", "[8]", "[10]", "[14]", "[16]", "[20]"]
        assert layers[0] == ("[0]", 20, 8, None, None) and layers[4] == ("[10]", 8, 9, "[11]", "cols")
        assert plan.rest == ("[1]", "[2]", "[3]", "[12]", "[13]", "[18]", "[19]")


def _flax_mlp(params, x):
    """Flax layout: kernels (in, out), ``x @ W + b`` with the bias reshaped to (1, out) as flax.linen.Dense does."""
    hidden = jnp.tanh(x @ params["dense0"]["kernel"] + jnp.reshape(params["dense0"]["bias"], (1, -1)))
    return jnp.dot(hidden, params["dense1"]["kernel"]) + params["dense1"]["bias"]


def test_flax_layout_folds_the_bias_as_a_row():
    w1, b1, w2, b2 = canonical.weights("mlp", 4)
    params = {"dense0": {"kernel": w1.T, "bias": b1}, "dense1": {"kernel": w2.T, "bias": b2}}
    x, y = canonical.inputs("mlp", 7, 2)
    plan = _check_exact(_flax_mlp, params, x, y, "classification", k=24)
    assert [(b.layer.name, b.layer.rows, b.layer.cols, b.layer.bias_side) for b in plan.blocks] == [
        ("['dense0']['kernel']", 9, 6, "rows"), ("['dense1']['kernel']", 7, 3, "rows")]


def _zoo(params, inputs):
    """A lookup by jnp.take (gather in fill mode, inside a jit), a product with the weight on the left (its bias
    added after a transpose), a strided, padded, dilated two-channel convolution, a Flax-layout layer."""
    table, kernel, conv_bias, w, b, dense, dense_bias, head, head_bias = params
    ids, image = inputs["ids"], inputs["image"]
    tokens = jnp.take(table, ids, axis=0)  # (n, T, D)
    hidden = jnp.tanh(jnp.moveaxis(jax.lax.dot_general(w, tokens, (((1,), (2,)), ((), ()))), 0, -1) + b)
    maps = jax.lax.conv_general_dilated(image, kernel, (2, 1), ((1, 0), (0, 1)), rhs_dilation=(1, 2),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    maps = jnp.tanh(maps + conv_bias[None, :, None, None])  # (n, 3, 3, 5)
    pooled = jnp.concatenate([hidden.mean(1), maps.reshape(ids.shape[0], -1)], axis=1)
    return jnp.tanh(pooled @ dense + dense_bias) @ head.T + head_bias


def test_every_layer_form_with_strides_padding_and_channels():
    rng = np.random.default_rng(0)
    vocab, width, out, n = 11, 4, 5, 7
    params = [rng.normal(size=(vocab, width)), 0.5 * rng.normal(size=(3, 2, 3, 2)), 0.3 * rng.normal(size=3),
              0.5 * rng.normal(size=(out, width)), 0.3 * rng.normal(size=out), 0.3 * rng.normal(size=(out + 45, 6)),
              0.3 * rng.normal(size=6), rng.normal(size=(3, 6)), 0.3 * rng.normal(size=3)]
    x = {"ids": rng.integers(0, vocab, (n, 3)), "image": rng.normal(size=(n, 2, 7, 6))}
    plan = _check_exact(_zoo, params, x, rng.integers(0, 3, n), "classification", k=30)
    assert [(b.layer.name, b.layer.rows, b.layer.cols, b.layer.bias, b.layer.bias_side) for b in plan.blocks] == [
        ("[0]", 11, 4, None, None), ("[1]", 3, 2 * 3 * 2 + 1, "[2]", "cols"), ("[3]", 5, 5, "[4]", "cols"),
        ("[5]", 51, 6, "[6]", "rows"), ("[7]", 3, 7, "[8]", "cols")]
    assert plan.rest == ()


def test_jitted_apply_and_a_parameter_subset():
    """Layers inside a jit sub-jaxpr are found; with params= the biases left out are constants."""
    x, y = canonical.inputs("mlp", 7, 3)
    weights = canonical.weights("mlp", 1)
    plan = _check_exact(jax.jit(jax_apply("mlp")), weights, x, y, "classification", k=12)
    assert [b.layer.bias for b in plan.blocks] == ["[1]", "[3]"]
    plan = _check_exact(jax_apply("mlp"), weights, x, y, "classification", k=12,
                        backend=JaxBackend(params=["[0]", "[2]"]))
    assert [(b.layer.name, b.layer.cols, b.layer.bias) for b in plan.blocks] == [("[0]", 8, None), ("[2]", 6, None)]


def test_equinox_linear_layers_fold_their_biases_as_torch_does():
    """Equinox's per-example Linear (W @ x under vmap: the weight on the left, the bias added after a transpose)
    gives the same plan and features as the canonical plain function on the same weights."""
    eqx = pytest.importorskip("equinox", reason="Equinox is not installed")
    weights = canonical.weights("mlp", 7)
    with jax.enable_x64(True):
        mlp = eqx.nn.MLP(8, 3, width_size=6, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
        params, static = eqx.partition(mlp, eqx.is_array)
        params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [jnp.asarray(w) for w in weights])

        def apply(p, x):
            return jax.vmap(eqx.combine(p, static))(x)

        x, y = canonical.inputs("mlp", 7, 8)
        plan = _check_exact(apply, params, x, y, "classification", k=16)
        _, expected, _, _, _ = _factorized(jax_apply("mlp"), [jnp.asarray(w) for w in weights], x, y,
                                           "classification", 16)
        _, features, _, _, _ = _factorized(apply, params, x, y, "classification", 16)
    assert [(b.layer.rows, b.layer.cols, b.layer.bias) for b in plan.blocks] == [
        (6, 9, ".layers[0].bias"), (3, 7, ".layers[1].bias")] and plan.rest == ()
    np.testing.assert_allclose(features, expected, rtol=1e-12)


def test_rest_dropped():
    x, y = canonical.inputs("lm", 7, 1)
    plan = _check_exact(jax_apply("lm"), canonical.weights("lm", 2), x, y, "language_modeling", k=30,
                        options=Kronecker(rest="drop"))
    assert plan.rest == () and plan.k_rest == 0 and sum(block.k for block in plan.blocks) == 30


def _tied_lm(params, inputs):
    """One table for the lookup and the head (``x @ E.T + b``), plus a scale used elementwise (the rest)."""
    table, bias, scale = params
    hidden = jnp.tanh(table[inputs["input_ids"]] * scale)
    return hidden @ table.T + bias


def test_tied_weights_add_up_their_uses():
    rng = np.random.default_rng(0)
    vocab, width = canonical.LM_SIZES["vocab"], 5
    params = [rng.normal(scale=0.7, size=(vocab, width)), rng.normal(scale=0.2, size=vocab),
              1 + rng.normal(scale=0.2, size=width)]
    x, y = canonical.inputs("lm", 7, 4)
    plan = _check_exact(_tied_lm, params, x, y, "language_modeling", k=24)
    assert [(b.layer.name, b.layer.rows, b.layer.cols, b.layer.bias) for b in plan.blocks] == [("[0]", 20, 6, "[1]")]
    assert plan.rest == ("[2]",)


def _half_counted(params, x):
    """``W1`` in a product and in a penalty-like term: not a layer (the rest), ``W2`` stays one."""
    w1, b1, w2, b2 = params
    hidden = jnp.tanh(x @ w1.T + b1) + jnp.sum(w1 ** 2)
    return hidden @ w2.T + b2


def test_a_weight_also_used_another_way_goes_to_the_rest():
    x, y = canonical.inputs("mlp", 7, 5)
    plan = _check_exact(_half_counted, canonical.weights("mlp", 5), x, y, "classification", k=16)
    assert [b.layer.name for b in plan.blocks] == ["[2]"] and plan.rest == ("[0]", "[1]")


def test_a_model_without_layers_is_a_clear_error():
    def elementwise(params, x):
        return jnp.tanh(x[:, :3] * params[0] + params[1])

    x, y = canonical.inputs("mlp", 4, 0)
    backend = JaxBackend()
    weights = [np.ones(3), np.zeros(3)]
    prepared = backend.prepare(elementwise, weights)
    with pytest.raises(TrakValueError, match="found no Linear, Conv2d or Embedding layer"):
        backend.factorized_plan(elementwise, prepared, x, y, get_task("classification"), k=4, options=Kronecker())
    with pytest.raises(TrakValueError, match="found no"):
        TRAK(elementwise, proj_dim=4, proj_type="kronecker", backend=backend, progress=False).featurize(
            weights, [(x, y)])


def test_float32_features_agree_with_float64():
    x, y = canonical.inputs("lm", 7, 1)
    weights = canonical.weights("lm", 0)
    with jax.enable_x64(True):
        _, f64, _, _, _ = _factorized(jax_apply("lm"), [jnp.asarray(w) for w in weights], x, y,
                                      "language_modeling", 40)
    with jax.enable_x64(False):
        _, f32, _, _, _ = _factorized(jax_apply("lm"), [jnp.asarray(w, dtype=jnp.float32) for w in weights], x, y,
                                      "language_modeling", 40)
    assert f32.dtype == np.float32
    error = np.linalg.norm(f32 - f64) / np.linalg.norm(f64)
    assert error < 2e-5, error


def test_trak_featurizes_with_the_factorized_step():
    """TRAK(proj_type=Kronecker(...)) on the JAX backend stores the factorized features of each batch."""
    x, y = canonical.inputs("mlp", 9, 6)
    weights = canonical.weights("mlp", 6)
    with jax.enable_x64(True):
        backend = JaxBackend()
        trak = TRAK(jax_apply("mlp"), proj_dim=12, proj_type="kronecker", backend=backend, seed=7,
                    lambda_reg=0.1, progress=False)
        trak.featurize([jnp.asarray(w) for w in weights], [(x[:5], y[:5]), (x[5:], y[5:])])
        stored = np.asarray(trak.store[0].features)
        _, features, _, _, _ = _factorized(jax_apply("mlp"), [jnp.asarray(w) for w in weights], x, y,
                                           "classification", 12, seed=7, checkpoint=0, options=Kronecker())
    np.testing.assert_allclose(stored, features, rtol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
def test_equal_to_the_torch_backend(kind):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: no torch features to compare with")
    from trak_core.testing.cases import torch_model
    from trak_torch import TorchBackend

    backend = TorchBackend()
    if not backend.can_factorize:
        pytest.skip("the torch backend has no factorized projection yet")
    weights = canonical.weights(kind, 0)
    x, y = canonical.inputs(kind, 7, 1)
    model = torch_model(kind, weights)
    tensors = {key: torch.as_tensor(v) for key, v in x.items()} if isinstance(x, dict) else torch.as_tensor(x)
    expected, _ = backend.factorized_features(model, backend.prepare(model, None), tensors, torch.as_tensor(y),
                                              get_task(TASKS[kind]), k=40, seed=5, checkpoint=2,
                                              options=Kronecker())
    with jax.enable_x64(True):
        _, features, _, _, _ = _factorized(jax_apply(kind), [jnp.asarray(w) for w in weights], x, y, TASKS[kind],
                                           40, seed=5, checkpoint=2, options=Kronecker())
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-9, atol=1e-12 * np.abs(features).max())


def _dense_general(inputs, kernel, axes):
    """Flax's ``DenseGeneral``: the inputs' last ``axes`` axes contracted with the kernel's leading ones."""
    first = inputs.ndim - axes
    return jax.lax.dot_general(inputs, kernel, ((tuple(range(first, inputs.ndim)), tuple(range(axes))), ((), ())))


def _flax_attention(params, x):
    """Flax's ``MultiHeadDotProductAttention`` layout: query, key and value kernels ``(d, heads, head_dim)`` with
    biases ``(heads, head_dim)``, the output kernel ``(heads, head_dim, d)`` contracting two axes; an einsum for
    the last (``(heads, head_dim, d)`` as well)."""
    q, k, v = (_dense_general(x, params[name]["kernel"], 1) + params[name]["bias"]
               for name in ("query", "key", "value"))
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
    heads = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = _dense_general(heads, params["out"]["kernel"], 2) + params["out"]["bias"]
    mixed = jnp.einsum("bqhd,hde->bqe", jnp.tanh(heads), params["mix"])
    return jnp.mean(out + mixed, axis=1) @ params["head"]["kernel"] + params["head"]["bias"]


def test_flax_attention_kernels_of_three_dimensions_are_layers():
    """Kernels of three dimensions, their leading axes contracted: the rows are those axes, the columns the others
    (row-major, as the explicit matrix flattens them); 2-D biases are the rest, a 1-D one is folded."""
    rng = np.random.default_rng(5)
    d, heads, width = 6, 2, 3
    params = {name: {"kernel": rng.normal(size=(d, heads, width)), "bias": rng.normal(size=(heads, width))}
              for name in ("query", "key", "value")}
    params.update(out={"kernel": rng.normal(size=(heads, width, d)), "bias": rng.normal(size=d)},
                  mix=rng.normal(size=(heads, width, d)) * 0.3,
                  head={"kernel": rng.normal(size=(d, 4)), "bias": rng.normal(size=4)})
    x, y = rng.normal(size=(7, 5, d)), rng.integers(0, 4, size=7)
    plan = _check_exact(_flax_attention, params, x, y, "classification", k=60)
    shapes = {b.layer.name: (b.layer.rows, b.layer.cols) for b in plan.blocks}
    assert shapes["['query']['kernel']"] == (d, heads * width) and shapes["['mix']"] == (heads * width, d)
    assert shapes["['out']['kernel']"] == (heads * width + 1, d)  # its bias (d,) follows one axis: folded
    assert shapes["['head']['kernel']"] == (d + 1, 4)
    assert plan.rest == tuple(f"['{name}']['bias']" for name in ("key", "query", "value"))  # (heads, head_dim)


def _per_token_lookup(params, ids):
    """A table looked up one token at a time under vmap (as eqx.nn.Embedding does): a (1, d) gather at (row, 0)."""
    table, weight, bias = params
    rows = jax.vmap(jax.vmap(lambda token: table[token]))(ids)
    return jnp.tanh(rows).sum(1) @ weight.T + bias


def _per_example_conv(params, x):
    """A convolution written for one image and vmapped, its bias (O, 1, 1) broadcast (as eqx.nn.Conv2d has it)."""
    kernel, bias, weight = params

    def one(image):
        out = jax.lax.conv_general_dilated(image[None], kernel, (1, 1), ((1, 1), (1, 1)))[0] + bias
        return jnp.tanh(out).reshape(-1) @ weight.T

    return jax.vmap(one)(x)


def test_per_example_lookups_and_conv_biases_are_layers():
    """A table looked up a token at a time went to the dense rest (2.3x off torch's features for the same
    weights), and so did a (O, 1, 1) convolution bias (0.42 off): both are layers now, exact."""
    rng = np.random.default_rng(0)
    table, weight, bias = rng.normal(size=(9, 4)), rng.normal(size=(3, 4)), rng.normal(size=3)
    ids, y = rng.integers(0, 9, (7, 3)), rng.integers(0, 3, 7)
    plan = _check_exact(_per_token_lookup, [table, weight, bias], ids, y, "classification", k=20)
    assert [b.layer.name for b in plan.blocks] == ["[0]", "[1]"] and plan.rest == ()
    with jax.enable_x64(True):  # the same features as the table looked up whole (E[ids]), as torch's Embedding
        weights = [jnp.asarray(w) for w in (table, weight, bias)]
        batched = _factorized(lambda p, i: jnp.tanh(p[0][i]).sum(1) @ p[1].T + p[2], weights, ids, y,
                              "classification", 20)[1]
        np.testing.assert_allclose(_factorized(_per_token_lookup, weights, ids, y, "classification", 20)[1], batched,
                                   rtol=1e-12, atol=1e-14)
    params = [rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(4, 1, 1)), rng.normal(size=(3, 4 * 36))]
    x = rng.normal(size=(5, 3, 6, 6))
    plan = _check_exact(_per_example_conv, params, x, rng.integers(0, 3, 5), "classification", k=16)
    assert [(b.layer.name, b.layer.rows, b.layer.cols, b.layer.bias) for b in plan.blocks][0] == ("[0]", 4, 28, "[1]")
    assert plan.rest == ()


def _one_channel_head(params, x):
    """A 1x1 convolution to one channel: its kernel (1, C, 1, 1) has one axis above 1, as a (C, 1, 1) bias has."""
    kernel, head = params
    out = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID")
    return jnp.tanh(out).reshape(x.shape[0], -1) @ head.T


def test_a_kernel_with_one_axis_above_one_stays_a_layer():
    rng = np.random.default_rng(1)
    params, x = [rng.normal(size=(1, 3, 1, 1)), rng.normal(size=(3, 16))], rng.normal(size=(5, 3, 4, 4))
    plan = _check_exact(_one_channel_head, params, x, rng.integers(0, 3, 5), "classification", k=8)
    assert [(b.layer.name, b.layer.rows, b.layer.cols) for b in plan.blocks] == [("[0]", 1, 3), ("[1]", 3, 16)]


def test_int64_batches_made_with_x64_on_featurize_with_x64_off():
    """Ids and labels made while x64 was on stay int64 arrays after it is switched off. The dense step's jnp calls
    convert them; the factorized step re-bound the traced program's primitives on them as they were, and lax.eq
    raised a TypeError (int64 against the int32 it was traced with). Now they are converted to the traced dtypes."""
    x, y = canonical.inputs("lm", 7, 1)
    with jax.enable_x64(True):
        wide = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=jnp.int64), (x, y))
    with jax.enable_x64(False):
        assert wide[1].dtype == jnp.int64 and wide[0]["input_ids"].dtype == jnp.int64
        weights = [jnp.asarray(w, dtype=jnp.float32) for w in canonical.weights("lm", 0)]
        plan, features, _, prepared, _ = _factorized(jax_apply("lm"), weights, *wide, "language_modeling", 40)
        narrow = _factorized(jax_apply("lm"), weights, x, y, "language_modeling", 40)[1]
        dense = JaxBackend()
        grads, _ = dense.gradients(jax_apply("lm"), dense.prepare(jax_apply("lm"), weights), *wide,
                                   get_task("language_modeling"))
    np.testing.assert_allclose(features, narrow, rtol=1e-6, atol=1e-6 * np.abs(narrow).max())
    shapes = {prepared.paths[i]: prepared.shapes[i] for i in prepared.selected}
    reference = np.asarray(grads, dtype=np.float64) @ explicit_matrix(plan, shapes, seed=3, checkpoint=2)
    error = np.linalg.norm(features - reference) / np.linalg.norm(reference)
    assert features.dtype == np.float32 and error < 2e-5, error


def test_flax_dense_layers_computing_in_bfloat16_are_layers():
    """``nn.Dense(dtype=jnp.bfloat16)`` with float32 params casts each kernel and bias before its use: the layers
    were all the rest ("found no ... layer"); they are layers now, followed through the casts. bfloat16 keeps 8
    significant bits (rounding 2**-8 = 3.9e-3): the inputs, kernels, hidden activations and output gradients are
    each rounded once, so the features are a few roundings, within 2e-2, of the float32-compute model's (that one
    equal to float64 gradients times the explicit matrix), and TRAK's scores (lambda 1, condition ~30) are off
    as the dense path's bfloat16 scores are, each within 2e-2 of the float32 model's."""
    nn = pytest.importorskip("flax.linen", reason="Flax is not installed")
    from trak_jax import JaxModel

    class MLP(nn.Module):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            hidden = jnp.tanh(nn.Dense(16, dtype=self.dtype)(x))
            return nn.Dense(3, dtype=self.dtype)(hidden)

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 3, 40)
    models = {"float32": MLP(), "bfloat16": MLP(dtype=jnp.bfloat16)}
    params = models["float32"].init(jax.random.PRNGKey(0), x[:1])
    found = {name: _factorized(model.apply, params, x, y, "classification", 24, checkpoint=0)
             for name, model in models.items()}
    plan, prepared = found["bfloat16"][0], found["bfloat16"][3]
    assert [(b.layer.name, b.layer.rows, b.layer.cols) for b in plan.blocks] == [
        ("['params']['Dense_0']['kernel']", 9, 16), ("['params']['Dense_1']['kernel']", 17, 3)] and not plan.rest
    with jax.enable_x64(True):  # the reference: float64 gradients of the float32 model times the explicit matrix
        dense = JaxBackend()
        p64 = jax.tree_util.tree_map(lambda w: jnp.asarray(w, jnp.float64), params)
        grads, _ = dense.gradients(models["float32"].apply, dense.prepare(models["float32"].apply, p64),
                                   x.astype(np.float64), y, get_task("classification"))
    shapes = {prepared.paths[i]: prepared.shapes[i] for i in prepared.selected}
    reference = np.asarray(grads) @ explicit_matrix(plan, shapes, seed=3, checkpoint=0)

    def rel(a, b):
        return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)

    assert found["bfloat16"][1].dtype == np.float32 and rel(found["float32"][1], reference) < 1e-6
    assert 1e-4 < rel(found["bfloat16"][1], reference) < 2e-2  # computed in bfloat16 (3.2e-3 measured)
    assert rel(found["bfloat16"][1], found["float32"][1]) < 2e-2
    scores = {}
    for proj_type in ("rademacher", "kronecker"):
        for name, model in models.items():
            trak = TRAK(JaxModel(model.apply), proj_dim=24, proj_type=proj_type, lambda_reg=1.0, progress=False)
            trak.featurize(params, [(x[:30], y[:30])])
            scores[proj_type, name] = np.asarray(trak.score([(x[30:], y[30:])]), np.float64)
    errors = {p: rel(scores[p, "bfloat16"], scores[p, "float32"]) for p in ("rademacher", "kronecker")}
    assert all(1e-4 < e < 2e-2 for e in errors.values()), errors  # 1.1e-2 dense, 9.5e-3 Kronecker measured


def _cast_apply(variant):
    """An MLP whose weights are cast to float64 before use (as a Flax layer's ``dtype=`` casts them), plain, with the
    cast weight also used another way, or with the leaf also used uncast."""
    def apply(p, x):
        w1 = p["w1"].astype(jnp.float64)
        h = jnp.tanh(x @ w1 + p["b1"].astype(jnp.float64))
        out = h @ p["w2"].astype(jnp.float64)
        if variant == "cast weight reused":
            out = out + jnp.sum(w1 ** 2)
        if variant == "leaf reused":
            out = out + jnp.sum(p["w1"])
        return out
    return apply


@pytest.mark.parametrize("variant, layers, tolerance", [("plain", 2, 1e-12), ("cast weight reused", 1, 1e-6),
                                                        ("leaf reused", 1, 1e-6)])
def test_a_float_cast_is_followed_exactly(variant, layers, tolerance):
    """A cast to another float is followed to the layer (the layers of a bfloat16-compute Flax model were all left
    in the rest). Casts to float64 are exact, so the factorized features equal float64 per-example gradients times
    the explicit matrix to rounding; a cast weight used another way too stays in the rest (never half-counted), whose
    gradients are the float32 leaf's (measured 7.5e-8)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.integers(0, 3, 7)
    params = {"w1": rng.normal(size=(5, 6)).astype(np.float32), "b1": np.zeros(6, np.float32),
              "w2": rng.normal(size=(6, 3)).astype(np.float32)}
    apply = _cast_apply(variant)
    with jax.enable_x64(True):
        plan, features, _, prepared, _ = _factorized(apply, params, x, y, "classification", 16, checkpoint=0)
        dense = JaxBackend()
        wide = {name: jnp.asarray(w, jnp.float64) for name, w in params.items()}
        grads, _ = dense.gradients(apply, dense.prepare(apply, wide), x, y, get_task("classification"))
        shapes = {prepared.paths[i]: prepared.shapes[i] for i in prepared.selected}
        reference = np.asarray(grads, np.float64) @ explicit_matrix(plan, shapes, seed=3, checkpoint=0)
    assert len(plan.blocks) == layers
    error = np.linalg.norm(np.asarray(features, np.float64) - reference) / np.linalg.norm(reference)
    assert error < tolerance
