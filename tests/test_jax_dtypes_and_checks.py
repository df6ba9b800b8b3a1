"""JAX backend: half-precision features, non-float leaves left out, x64 settings, the cached checks of each batch
(one trace of apply per batch shape, few compilations per batch size) and errors that name the fix."""
import contextlib
import logging

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
import jax.numpy as jnp  # noqa: E402

import trak_core  # noqa: E402
from trak_core.testing import canonical  # noqa: E402
from trak_core.testing.cases import jax_apply  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402

MLP = jax_apply("mlp")


def _margins(apply):
    """``f(params, x, y)`` of one example: the classification margin, written out for ``jax.vmap(jax.grad)``."""
    def f(params, x, y):
        logits = apply(params, x[None])[0]
        return logits[y] - jax.nn.logsumexp(jnp.where(jnp.arange(logits.shape[0]) == y, -jnp.inf, logits))
    return f


def _reference_gradients(apply, params, x, y):
    """Per-example gradients by hand: ``jax.vmap(jax.grad(margin))``, raveled in tree-leaf order."""
    grads = jax.vmap(jax.grad(_margins(apply)), in_axes=(None, 0, 0))(params, jnp.asarray(x), jnp.asarray(y))
    return np.concatenate([np.asarray(g, np.float64).reshape(len(y), -1) for g in jax.tree_util.tree_leaves(grads)],
                          axis=1)


def test_half_precision_params_are_projected_in_float32():
    """bfloat16 params: the fused step's features are float32 and equal a float64 product of the same bfloat16
    gradients to float32 accuracy (they were bfloat16, 3e-3 off); features and scores through TRAK are float32."""
    model, task = JaxModel(MLP), trak_core.Classification()
    x, y = canonical.inputs("mlp", 30, seed=0, dtype="float32")
    params = [jnp.asarray(w, jnp.bfloat16) for w in canonical.weights("mlp", seed=0, dtype="float32")]
    backend = JaxBackend()
    prepared = backend.prepare(model, params)
    grads, _ = backend.gradients(model, prepared, jnp.asarray(x, jnp.bfloat16), y, task)
    assert grads.dtype == jnp.bfloat16  # per-example gradients in the model's dtype
    for kind in ("rademacher", "gaussian"):
        features, _ = backend.features(model, prepared, jnp.asarray(x, jnp.bfloat16), y, task, k=64, seed=3,
                                       checkpoint=1, kind=kind)
        exact = np.asarray(grads, np.float64) @ trak_core.projection_matrix(grads.shape[1], 64, seed=3, checkpoint=1,
                                                                           kind=kind).astype(np.float64)
        assert features.dtype == jnp.float32
        assert np.linalg.norm(np.asarray(features, np.float64) - exact) / np.linalg.norm(exact) < 1e-5
    for proj_type in ("rademacher", "kronecker"):
        trak = trak_core.TRAK(model, proj_dim=16, proj_type=proj_type, lambda_reg=1.0, progress=False)
        trak.featurize(params, [(jnp.asarray(x, jnp.bfloat16), y)])
        assert trak.store[0].features.dtype == jnp.float32, proj_type
        assert trak.score([(jnp.asarray(x[:3], jnp.bfloat16), y[:3])]).dtype == jnp.float32


def test_non_float_leaves_left_out_enter_as_constants():
    """An integer step counter and a PRNG key (an NNX Dropout's RNG state) left out by params= are constants;
    selected, the error names the fix."""
    x, y = canonical.inputs("mlp", 12, seed=0, dtype="float32")
    weights = [jnp.asarray(w) for w in canonical.weights("mlp", seed=0, dtype="float32")]

    def apply(params, inputs):
        return MLP(params["net"], inputs) * (params["step"] > 0)  # uses the integer leaf

    params = {"key": jax.random.key(0), "net": weights, "step": jnp.asarray(100, jnp.int32)}
    backend = JaxBackend(params=lambda path, leaf: path.startswith("['net']"))
    grads, _ = backend.gradients(apply, backend.prepare(apply, params), x, y, trak_core.Classification())
    np.testing.assert_allclose(np.asarray(grads), _reference_gradients(MLP, weights, x, y), rtol=1e-5, atol=1e-6)
    trak = trak_core.TRAK(JaxModel(apply), proj_dim=8, lambda_reg=1.0, backend=backend, progress=False)
    trak.featurize(params, [(x, y)])  # the digest of the parameters takes the key's bits
    assert trak.store[0].n_params == sum(w.size for w in weights)
    with pytest.raises(TypeError, match=r"\['step'\] has dtype int32.*JaxBackend\(params=.*"
                                        r"nnx.split\(model, nnx.Param"):
        JaxBackend(params=["['step']", "['net'][0]"]).prepare(apply, params)


def test_float64_params_where_x64_is_off_are_refused():
    """Featurized inside ``jax.enable_x64(True)``, scored outside: the scores were silently float32 (4.5e-5 off)."""
    x, y = canonical.inputs("mlp", 20, seed=0)
    with jax.enable_x64(True):
        trak = trak_core.TRAK(JaxModel(MLP), proj_dim=16, lambda_reg=0.5, progress=False)
        trak.featurize([jnp.asarray(w) for w in canonical.weights("mlp", seed=0)], [(x, y)])
        inside = np.asarray(trak.score([(x[:3], y[:3])]))
    ref = trak_core.TRAK(canonical.analytic_model("mlp"), proj_dim=16, lambda_reg=0.5, progress=False)
    ref.featurize(canonical.flat(canonical.weights("mlp", seed=0)), [(x, y)])
    np.testing.assert_allclose(inside, ref.score([(x[:3], y[:3])]), rtol=1e-9)
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"float64.*x64 is off.*jax.enable_x64\(True\)"):
            trak.score([(x[:3], y[:3])])
        with pytest.raises(ValueError, match="x64 is off"):
            trak.features([(x[:3], y[:3])])


def test_apply_is_traced_once_per_batch_shape():
    """The checks of a batch trace apply abstractly once per batch shape, not once per batch (540 ms a batch on a
    48-block model whose compiled step takes 23 ms); short and split batches give the hand-written gradients."""
    traces = []

    def apply(params, inputs):
        traces.append(inputs.shape)  # runs only while JAX traces apply
        return MLP(params, inputs)

    x, y = canonical.inputs("mlp", 50, seed=0, dtype="float32")
    trak = trak_core.TRAK(JaxModel(apply), proj_dim=16, lambda_reg=1.0, progress=False)
    counts = []
    for c in range(3):
        trak.featurize(canonical.weights("mlp", seed=c, dtype="float32"),
                       [(x[i:i + 16], y[i:i + 16]) for i in range(0, 50, 16)])  # 16, 16, 16, 2
        counts.append(len(traces))
    # checkpoint 0: the check of (16, 8) and of (2, 8), and the step's batch forward and per-example apply at each
    # of its two sizes (16, and the 2-row bucket of the last batch); nothing in later checkpoints
    assert counts == [6, 6, 6]
    backend, weights = JaxBackend(batch_size=16), [jnp.asarray(w) for w in canonical.weights("mlp", seed=1,
                                                                                             dtype="float32")]
    grads, _ = backend.gradients(apply, backend.prepare(apply, weights), x[:40], y[:40], trak_core.Classification())
    np.testing.assert_allclose(np.asarray(grads), _reference_gradients(MLP, weights, x[:40], y[:40]),
                               rtol=1e-5, atol=1e-6)  # chunks 16, 16 and 8 padded to 16


class _Compilations(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split(" ")[1])


@contextlib.contextmanager
def _compilations():
    """The names of the XLA programs compiled inside the block (from JAX's compile log)."""
    counter, loggers = _Compilations(), [logging.getLogger(name) for name in ("jax._src.interpreters.pxla",
                                                                              "jax._src.dispatch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(counter)
        logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield counter
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(counter)
            logger.setLevel(level)


@pytest.mark.parametrize("factorized", [False, True], ids=["dense", "kronecker"])
def test_a_new_batch_size_compiles_two_small_programs(factorized):
    """A batch of a new size (the last, short one) pads and crops in one jitted function each; the step does not
    recompile. It was 15 XLA programs (conversion, label checks, padding and slicing of each array)."""
    width = 11  # a width no other test uses: nothing of these shapes is compiled yet
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((5, width)).astype(np.float32), np.zeros(5, np.float32),
               rng.standard_normal((3, 5)).astype(np.float32), np.zeros(3, np.float32)]
    x, y = rng.standard_normal((40, width)).astype(np.float32), rng.integers(0, 3, 40)
    backend, model, task = JaxBackend(), JaxModel(MLP), trak_core.Classification()
    prepared = backend.prepare(model, weights)
    if factorized:
        def run(rows):
            return backend.factorized_features(model, prepared, x[rows], y[rows], task, k=8, seed=0, checkpoint=0,
                                               options=None)
    else:
        def run(rows):
            return backend.gradients(model, prepared, x[rows], y[rows], task)
    run(slice(0, 20))
    with _compilations() as counter:
        out, _ = run(slice(20, 33))
        run(slice(20, 40))  # the compiled size: nothing new
    assert len(counter.names) <= 2, counter.names
    assert backend.compilations == 1
    if factorized:
        whole = backend.factorized_features(model, prepared, np.concatenate([x[20:33], x[:7]]),
                                             np.concatenate([y[20:33], y[:7]]), task, k=8, seed=0, checkpoint=0,
                                             options=None)[0][:13]  # the same rows in a batch of the compiled size
        np.testing.assert_allclose(np.asarray(out), np.asarray(whole), rtol=1e-5, atol=1e-6)
    else:
        params = [jnp.asarray(w) for w in weights]
        reference = _reference_gradients(MLP, params, x[20:33], y[20:33])  # float32 sums: entries near 1e-3 of
        np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5,  # gradients of order 1 differ by ~1e-6
                                   atol=1e-5 * float(np.abs(reference).max()))


def _linear(params, x):
    weight, bias = params
    return x @ weight.T + bias


def _nested(params, inputs):
    (weight, bias), = params  # expects [(weight, bias)]
    return inputs @ weight.T + bias


@pytest.mark.parametrize("apply,task,match", [
    (lambda p, inputs: (jnp.sum(inputs, axis=1), _linear(p, inputs)), None,  # (aux, logits): aux taken
     r"labels out of range.*taken from output\[0\].*tuple.*logits_fn="),
    (_linear, trak_core.CustomTask(output=lambda logits, labels, xp: logits[:, :1]),
     r"output.*must return one value per example, shape \(10,\).*returned shape \(10, 1\)"),
    (_linear, trak_core.CustomTask(output=lambda logits, labels, xp: xp.sum(logits)),
     r"output.*must return one value per example, shape \(10,\).*returned shape \(\)"),
], ids=["aux-and-logits", "task-output-column", "task-output-scalar"])
def test_output_errors_name_what_was_taken_and_the_fix(apply, task, match):
    """These were a binary-classifier label error, and JAX's "Gradient only defined for scalar-output functions"
    and "Too many indices" from inside the step."""
    x, y = canonical.inputs("softmax", 10, seed=0, dtype="float32")
    trak = trak_core.TRAK(JaxModel(apply), proj_dim=8, progress=False, **({"task": task} if task else {}))
    with pytest.raises(ValueError, match=match):
        trak.featurize(canonical.weights("softmax", seed=0, dtype="float32"), [(x, y)])


def test_params_that_do_not_fit_apply_get_a_note_on_their_structure():
    x, y = canonical.inputs("softmax", 10, seed=0, dtype="float32")
    with pytest.raises(ValueError, match="too many values to unpack") as info:  # a flat list for [(weight, bias)]
        trak_core.TRAK(JaxModel(_nested), proj_dim=8, progress=False).featurize(
            canonical.weights("softmax", seed=0, dtype="float32"), [(x, y)])
    if not hasattr(info.value, "add_note"):
        pytest.skip("Python < 3.11: no exception notes")
    assert any("structure apply expects" in note and "[0], [1]" in note for note in info.value.__notes__)


def test_a_whole_equinox_module_as_checkpoint_names_eqx_partition():
    eqx = pytest.importorskip("equinox", reason="Equinox is not installed")
    mlp = eqx.nn.MLP(8, 3, width_size=6, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match=r"not an array.*eqx.partition\(model, eqx.is_inexact_array\)"):
        JaxBackend().prepare(lambda m, x: jax.vmap(m)(x), mlp)


def test_linen_batch_statistics_left_out_score_like_torch_batchnorm():
    """The recipe of docs/jax.md for a Flax linen model with BatchNorm, on a plain pytree of linen's layout:
    ``params=`` keeps the batch statistics out, as torch's BatchNorm1d buffers are (exact scores, proj_dim=None)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((30, 8)).astype(np.float32), rng.integers(0, 3, 30)
    kernel, kernel2 = rng.standard_normal((8, 6)).astype(np.float32) / 3, rng.standard_normal((6, 3)).astype(np.float32)
    variables = {"params": {"Dense_0": {"kernel": kernel, "bias": np.full(6, 0.1, np.float32)},
                            "BatchNorm_0": {"scale": rng.uniform(0.5, 2, 6).astype(np.float32),
                                            "bias": rng.standard_normal(6).astype(np.float32) * 0.1},
                            "Dense_1": {"kernel": kernel2, "bias": np.zeros(3, np.float32)}},
                 "batch_stats": {"BatchNorm_0": {"mean": rng.standard_normal(6).astype(np.float32) * 0.3,
                                                 "var": rng.uniform(0.5, 2, 6).astype(np.float32)}}}

    def apply(v, inputs):  # linen's Dense, BatchNorm (use_running_average=True), tanh, Dense
        p, stats = v["params"], v["batch_stats"]["BatchNorm_0"]
        h = inputs @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
        h = (h - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
        return jnp.tanh(h) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    backend = JaxBackend(params=lambda path, leaf: path.startswith("['params']"))
    trak = trak_core.TRAK(JaxModel(apply), backend=backend, proj_dim=None, lambda_reg=1.0, progress=False)
    trak.featurize(variables, [(x, y)])
    scores = np.asarray(trak.score([(x[:4], y[:4])]))
    net = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6, eps=1e-5), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3))
    p, stats = variables["params"], variables["batch_stats"]["BatchNorm_0"]
    state = {"0.weight": kernel.T, "0.bias": p["Dense_0"]["bias"], "1.weight": p["BatchNorm_0"]["scale"],
             "1.bias": p["BatchNorm_0"]["bias"], "1.running_mean": stats["mean"], "1.running_var": stats["var"],
             "3.weight": kernel2.T, "3.bias": p["Dense_1"]["bias"]}
    net.load_state_dict({**{k: torch.tensor(np.ascontiguousarray(v)) for k, v in state.items()},
                         "1.num_batches_tracked": torch.tensor(0)})
    net.eval()
    ref = trak_core.TRAK(net, proj_dim=None, lambda_reg=1.0, progress=False)
    ref.featurize(None, [(torch.tensor(x), torch.tensor(y))])
    expected = ref.score([(torch.tensor(x[:4]), torch.tensor(y[:4]))]).numpy()
    assert trak.store[0].n_params == ref.store[0].n_params == 8 * 6 + 6 + 6 + 6 + 6 * 3 + 3
    assert np.linalg.norm(scores - expected) / np.linalg.norm(expected) < 1e-4


def test_a_new_batch_size_through_trak_compiles_one_check_per_array():
    """Through ``TRAK``, a batch of a new size compiles the backend's pad and crop and one sum per checked array
    (features, out-to-loss weights): it was an ``isfinite`` and an ``all`` of each, 6 programs in all."""
    x, y = canonical.inputs("mlp", 60, seed=0, dtype="float32")
    trak = trak_core.TRAK(JaxModel(MLP), proj_dim=16, lambda_reg=1.0, progress=False)
    trak.featurize(canonical.weights("mlp", seed=0, dtype="float32"), [(x[:20], y[:20]), (x[20:40], y[20:40])])
    with _compilations() as counter:
        trak.features([(x[40:57], y[40:57])])  # 17 rows: a size not compiled before
    checks = [name for name in counter.names if "isfinite" in name or "reduce" in name]
    assert len(checks) == 2 and len(counter.names) <= 4, counter.names


def test_string_labels_name_their_dtype_and_the_mapping_to_integer_ids():
    """Class-name labels (``<U3``) were "labels must be a JAX or NumPy array, got ndarray", which they are."""
    x, y = canonical.inputs("softmax", 12, seed=0, dtype="float32")
    names = np.array(["cat", "dog", "emu"])[y]
    trak = trak_core.TRAK(JaxModel(_linear), proj_dim=None, lambda_reg=1.0, progress=False)
    weights = canonical.weights("softmax", seed=0, dtype="float32")
    with pytest.raises(TypeError, match=r"labels have the NumPy dtype <U3.*map the class names to integer ids.*"
                                        r"np.searchsorted\(classes, labels\)") as info:
        trak.featurize(weights, [(x, names)])
    assert "must be a JAX or NumPy array" not in str(info.value)
    with pytest.raises(TypeError, match=r"inputs have the NumPy dtype <U1.*encode the strings as numbers"):
        trak.featurize(weights, [(np.full((12, 4), "a"), y)])
    classes = np.unique(names)  # the message's mapping gives the integer labels back
    np.testing.assert_array_equal(np.searchsorted(classes, names), y)


def test_float16_gradients_that_overflow_the_fused_step_name_float16s_range():
    """JAX projects inside its own step (the fused path): a float16 model whose inputs, weights and outputs fit
    float16 but whose per-example gradients do not got the generic "check the inputs ... and the learning rate";
    it now names float16's range and the fix, as the dense path does."""
    rng = np.random.default_rng(0)
    params = {"w0": jnp.asarray(rng.normal(size=(4, 4)) * 1e-5, jnp.float16),
              "w1": jnp.asarray(rng.normal(size=(4, 3)) * 300, jnp.float16)}
    x, y = jnp.asarray(rng.normal(size=(40, 4)) * 1e3, jnp.float16), jnp.asarray(rng.integers(0, 3, 40))

    def apply(params, inputs):
        return inputs @ params["w0"] @ params["w1"]

    assert bool(jnp.isfinite(apply(params, x)).all())
    loss = lambda p, xi, yi: -jax.nn.log_softmax(apply(p, xi[None]).astype(jnp.float32))[0, yi]  # noqa: E731
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, x, y)
    assert not bool(jnp.isfinite(grads["w0"]).all())  # some example's float16 gradient overflows
    trak = trak_core.TRAK(JaxModel(apply), proj_dim=8, progress=False)
    with pytest.raises(trak_core.TrakCoreError, match=r"features \(projected per-example gradients\) contain NaN or "
                                                      r"inf; .* the gradients are float16, whose largest finite value "
                                                      r"is 65504"):
        trak.featurize(params, [(x, y)])


def test_label_errors_name_the_dtype_passed_not_jaxs_cast():
    """With x64 off JAX casts float64 NumPy labels to float32 on the way in: the error said "got dtype float32" for
    float64 labels; it names float64 now. int64 labels are checked as passed too: 2**32 + 1 was cast to 1, a valid
    class, and featurized silently; it is out of range now. In-range int64 labels give int32 labels' features."""
    assert not jax.config.jax_enable_x64
    x, y = canonical.inputs("mlp", 12, seed=0, dtype="float32")
    weights = canonical.weights("mlp", seed=0, dtype="float32")
    trak = trak_core.TRAK(JaxModel(MLP), proj_dim=16, lambda_reg=1.0, progress=False)
    for dtype in ("float64", "float32"):
        with pytest.raises(TypeError, match=rf"classification labels must be integers, got dtype {dtype};"):
            trak.featurize(weights, [(x, y.astype(dtype))])
    wrapped = y.astype(np.int64)
    wrapped[0] = 2 ** 32 + 1
    with pytest.raises(ValueError, match=r"labels out of range: found labels in \[0, 4294967297\]"):
        trak.featurize(weights, [(x, wrapped)])
    features = []
    for dtype in (np.int64, np.int32):
        trak = trak_core.TRAK(JaxModel(MLP), proj_dim=16, lambda_reg=1.0, progress=False)
        trak.featurize(weights, [(x, y.astype(dtype))])
        features.append(np.asarray(trak.store[0].features))
    np.testing.assert_array_equal(features[0], features[1])
