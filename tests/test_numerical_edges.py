"""Numbers at the edges of float32 and half precision: confident examples, gradients far from 1 in scale, ridges
beyond float32, half-precision models without a projection, and the errors that say what to do."""
import copy
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from trak_core import TrakCoreError  # noqa: E402

N, D, C = 40, 4, 3


def _linear(scale=1.0, dtype=torch.float32, seed=0):
    """A linear classifier and data whose per-example gradients (the inputs) are of order ``scale``; its logits,
    hence its scores at lambda_reg="auto", do not depend on ``scale``."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, C, bias=False)
    with torch.no_grad():
        model.weight.div_(scale)
    x, y = torch.randn(N, D) * scale, torch.randint(0, C, (N,))
    return model.to(dtype), x.to(dtype), y


def _scores(model, x, y, **options):
    trak = trak_core.TRAK(model, proj_dim=8, progress=False, **options)
    trak.featurize(None, [(x, y)])
    return trak, trak.score([(x[:5], y[:5])])


def test_confident_examples_keep_their_scores():
    """Margins of 18 to 49: Q = 1 - p_y rounded to 0 in float32 and every score was 0. Now the float32 scores equal
    the float64 model's, whose Q is exact there."""
    torch.manual_seed(0)
    x = torch.randn(8, 2)
    x[:, 0] = torch.sign(x[:, 0]) * (0.5 + x[:, 0].abs())
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-15.0, 0.0], [15.0, 0.0]]))
        model.bias.zero_()
    wide = torch.nn.Linear(2, 2).double()
    wide.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    _, narrow_scores = _scores(model, x, y, lambda_reg=1.0)
    trak, wide_scores = _scores(wide, x.double(), y, lambda_reg=1.0)
    logits = wide(x.double()).detach()
    margins = (logits[torch.arange(8), y] - logits[torch.arange(8), 1 - y]).numpy()
    assert margins.min() > 17
    np.testing.assert_allclose(trak.store[0].out_to_loss.numpy(), 1 / (1 + np.exp(margins)), rtol=1e-12)
    assert np.count_nonzero(narrow_scores.numpy()) == narrow_scores.numel()
    np.testing.assert_allclose(narrow_scores.double().numpy(), wide_scores.numpy(), rtol=1e-4,
                               atol=1e-5 * float(wide_scores.abs().max()))


@pytest.mark.parametrize("scale", [1e-30, 1e-22, 1e22])
def test_gradient_scale_does_not_change_the_scores(scale):
    """At lambda_reg="auto" the scores do not depend on the gradients' scale; a float32 kernel under- or overflows
    at these scales (NaN scores, a false "every feature is zero", a raw LinAlgError), so "auto" makes it in
    float64. An explicit kernel_dtype="float32" gets an error naming the fix."""
    _, expected = _scores(*_linear())
    trak, scores = _scores(*_linear(scale))
    assert trak.store[0].kernel_dtype == "float64" and scores.dtype == torch.float32
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    match = r"kernel_dtype='float64'" if scale == 1e-30 else r"float32 kernel cannot be factorized; use kernel_dtype"
    with pytest.raises(TrakCoreError, match=match):
        _scores(*_linear(scale), kernel_dtype="float32")


def test_a_ridge_beyond_float32_is_applied_in_float64():
    model, x, y = _linear()
    _, expected = _scores(model.double(), x.double(), y, lambda_reg=1e39)
    trak, scores = _scores(model.float(), x, y, lambda_reg=1e39)
    assert trak.store[0].kernel_dtype == "float64" and bool(torch.isfinite(scores).all())
    np.testing.assert_allclose(scores.double().numpy(), expected.numpy(), rtol=1e-4)
    with pytest.raises(TrakCoreError, match=r"lambda_reg=1e\+39 is beyond float32's range"):
        _scores(model.float(), x, y, lambda_reg=1e39, kernel_dtype="float32")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_without_a_projection_scores_in_float32(dtype):
    """proj_dim=None: the gradients are the features, made float32 as projected ones are (float16 scores of ~1e5
    overflowed to inf); regression residuals of labels of 1e5 are float32 too (float16: inf)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randn(16) * 1e5
    model = torch.nn.Linear(3, 1).to(dtype)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    targets = [(x[:2].to(dtype) * 5000, y[:2])]
    half = trak_core.TRAK(model, task="regression", proj_dim=None, lambda_reg=1e-3, progress=False)
    half.featurize(None, [(x.to(dtype), y)])
    full = trak_core.TRAK(reference, task="regression", proj_dim=None, lambda_reg=1e-3, progress=False)
    full.featurize(None, [(x.to(dtype).float(), y)])
    scores, expected = half.score(targets), full.score([(t.float(), labels) for t, labels in targets])
    assert scores.dtype == torch.float32 and half.store[0].out_to_loss.dtype == torch.float32
    residuals = y - reference(x.to(dtype).float()).detach()[:, 0]
    np.testing.assert_allclose(half.store[0].out_to_loss.numpy(), residuals.numpy(), rtol=1e-2)
    tolerance = 1e-2 if dtype == torch.float16 else 2e-2  # the half-precision forward and gradients
    assert float((scores - expected).norm() / expected.norm()) < tolerance


def test_integer_inputs_to_a_float_model_name_the_conversion():
    model = torch.nn.Linear(D, C)
    trak = trak_core.TRAK(model, proj_dim=8, progress=False)
    with pytest.raises(TrakCoreError, match=r"inputs are int64 .* float32 .* convert the batch with inputs.float\(\)"):
        trak.featurize(None, [(torch.randint(0, 5, (6, D)), torch.zeros(6, dtype=torch.long))])


@pytest.mark.parametrize("options", [dict(soft_threshold="0.5"), dict(soft_threshold=True), dict(lambda_reg=True)])
def test_options_of_the_wrong_type_are_refused(options):
    with pytest.raises(TrakCoreError, match=next(iter(options))):
        trak_core.TRAK(torch.nn.Linear(D, C), **options)


def test_jax_without_x64_warns_that_lambda_zero_needs_float64():
    jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on in this process: the float32-only case is not exercised")
    from trak_core.testing import canonical
    from trak_core.testing.cases import jax_apply
    from trak_jax import JaxModel

    x, y = canonical.inputs("mlp", 30, seed=0, dtype="float32")
    trak = trak_core.TRAK(JaxModel(jax_apply("mlp")), proj_dim=64, lambda_reg=0.0, progress=False)
    with pytest.warns(RuntimeWarning, match=r"lambda_reg=0 needs a float64 kernel .* jax_enable_x64"):
        trak.featurize(canonical.weights("mlp", seed=0, dtype="float32"), [(x, y)])


@pytest.mark.parametrize("scale", [3e9, 1e-14])
def test_kernels_float32_holds_stay_float32(scale):
    """Largest kernel eigenvalues of 7e20 and 8e-27 are well inside float32's range: the range check squared
    them in its power iteration (overflow past 1.8e19, underflow below 1e-22) and refused or remade them."""
    _, expected = _scores(*_linear())
    trak, scores = _scores(*_linear(scale), kernel_dtype="float32")
    assert trak.store[0].kernel_dtype == "float32"
    np.testing.assert_allclose(scores.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    auto, _ = _scores(*_linear(scale))
    assert auto.store[0].kernel_dtype == "auto"  # not remade in float64


def test_a_float32_kernel_remade_in_float64_says_nothing_on_numpy():
    """NumPy warned "overflow encountered in matmul" while making the float32 kernel that "auto" then makes again in
    float64 (the scores were right): the remaking is logged, not warned."""
    import warnings

    from trak_core.testing import canonical

    x, y = canonical.inputs("softmax", 30, seed=0, dtype="float32")
    weights = canonical.flat(canonical.weights("softmax", seed=0, dtype="float32"))
    model = canonical.analytic_model("softmax")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trak = trak_core.TRAK(model, proj_dim=16, progress=False)
        trak.featurize(weights, [(x * np.float32(1e20), y)])
        scores = trak.score([(x[:3] * np.float32(1e20), y[:3])])
    reference = trak_core.TRAK(model, proj_dim=16, progress=False)
    reference.featurize(weights.astype(np.float64), [(x.astype(np.float64) * 1e20, y)])
    expected = reference.score([(x[:3].astype(np.float64) * 1e20, y[:3])])
    assert trak.store[0].kernel_dtype == "float64"
    assert np.linalg.norm(scores - expected) / np.linalg.norm(expected) < 1e-5



def _linear_margin_gradients(weight, inputs, labels):
    """Float64 NumPy per-example gradients of a linear classifier's margin with respect to ``weight`` (rows: the
    flattened ``(onehot(y) - softmax over the other classes) x^T``) and ``Q = 1 - p_y``."""
    inputs, labels = inputs.double().numpy(), labels.numpy()
    logits = inputs @ weight.T
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    others = np.exp(others - others.max(axis=1, keepdims=True))
    coefficients = -others / others.sum(axis=1, keepdims=True)
    coefficients[np.arange(len(labels)), labels] = 1.0
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    q = 1 - shifted[np.arange(len(labels)), labels] / shifted.sum(axis=1)
    return (coefficients[:, :, None] * inputs[:, None, :]).reshape(len(labels), -1), q

def _reference_scores(model, x, y, targets, target_labels, lambda_reg="auto"):
    """Scores of the linear classifier without a projection, in float64 with NumPy: the margin's gradient with respect
    to ``weight`` is ``(onehot(y) - softmax over the other classes) x^T``, ``Q = 1 - p_y``."""
    weight = model.weight.detach().double().numpy()

    def gradients(inputs, labels):
        return _linear_margin_gradients(weight, inputs, labels)

    phi, q = gradients(x, y)
    psi, _ = gradients(targets, target_labels)
    kernel = phi.T @ phi
    lam = np.trace(kernel) / min(phi.shape) if lambda_reg == "auto" else lambda_reg
    return phi @ np.linalg.solve(kernel + lam * np.eye(kernel.shape[0]), psi.T) * q[:, None], lam


@pytest.mark.parametrize("kernel_dtype", ["auto", "float32"])
def test_an_automatic_ridge_whose_trace_overflows_float32(kernel_dtype):
    """A float32 kernel whose entries fit float32 (up to 2.2e38) but whose trace does not (2.0e39): lambda_reg="auto"
    summed it in float32, got inf, and the inf ridge led to "the kernel Phi^T Phi is zero: every training feature is
    zero". Now the ridge (1.6e38, above a quarter of float32's largest) is applied in float64; "float32" says so, with
    the fix."""
    model, x, y = _linear(3e18)
    expected, lam = _reference_scores(model, x, y, x[:5], y[:5])
    kernel = trak_core.TRAK(model, proj_dim=None, kernel_dtype="float64", progress=False)
    kernel.featurize(None, [(x, y)])
    assert np.diag(kernel.store[0].kernel.numpy()).max() < np.finfo(np.float32).max < np.trace(
        kernel.store[0].kernel.numpy())
    if kernel_dtype == "float32":
        with pytest.raises(TrakCoreError, match=r"lambda_reg=1\.\d+e\+38 \(chosen by 'auto' from the features\) is "
                                                r"beyond float32's range.*use kernel_dtype='auto' or 'float64'"):
            trak_core.TRAK(model, proj_dim=None, kernel_dtype="float32", progress=False).featurize(None, [(x, y)])
        return
    trak = trak_core.TRAK(model, proj_dim=None, progress=False)
    trak.featurize(None, [(x, y)])
    scores = trak.score([(x[:5], y[:5])])
    assert trak.lambdas[0] == pytest.approx(lam, rel=1e-6) and trak.store[0].kernel_dtype == "float64"
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_a_float32_kernel_remade_in_float64_does_not_warn_of_its_cholesky():
    """Duplicated examples and a tiny ridge: "auto" remakes the float32 kernel in float64 (lambda_max / lambda is
    about 1e10). It used to factorize the float32 kernel first, and its failed Cholesky warned "using an
    eigendecomposition instead" though the scores came from the float64 kernel's Cholesky."""
    import warnings

    model, x, y = _linear()
    x, y = torch.cat([x[:10], x[:10]]), torch.cat([y[:10], y[:10]])
    expected, _ = _reference_scores(model, x, y, x[:5], y[:5], lambda_reg=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=1e-8, progress=False)
        trak.featurize(None, [(x, y)])
        scores = trak.score([(x[:5], y[:5])])
    assert trak.store[0].kernel_dtype == "float64" and trak.store[0].factor.kind == "cholesky"
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_jax_without_x64_names_its_fix_for_features_whose_squares_underflow():
    """Features of 1e-20: their squares (1e-40) are flushed to zero by XLA on CPU, and the kernel is zero. The error
    said "kernel_dtype='float64' keeps them", which without x64 is float32 again; it now names jax_enable_x64 (with
    it on, "auto" makes the kernel in float64 and the scores are right)."""
    jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    if jax.config.jax_enable_x64:
        pytest.skip("x64 is on in this process: the float32-only case is not exercised")
    from trak_jax import JaxModel

    model, x, y = _linear(1e-20)
    trak = trak_core.TRAK(JaxModel(lambda params, inputs: inputs @ params.T), proj_dim=8, progress=False)
    with pytest.raises(TrakCoreError, match=r"underflow float32 \(set jax_enable_x64 to keep them\)"):
        trak.featurize(model.weight.detach().numpy(), [(x.numpy(), y.numpy())])


@pytest.mark.parametrize("kernel_dtype", ["auto", "float64"])
def test_subnormal_features_are_warned_of(kernel_dtype):
    """Inputs of 1e-43 to a linear classifier of weights of order 1: its gradients (the inputs times a coefficient) are
    float32 subnormals with a few significant bits, and the scores were 0.4% off the float64 ones, silently; now a
    warning says so and names the fix. Features of 1e-37 (normal) stay silent and right."""
    import warnings

    model, x, y = _linear()
    for scale, tolerance in [(1e-37, 1e-5), (1e-43, 0.5)]:
        tiny = (x * scale).double()  # the float32 inputs, exactly, for the float64 reference
        expected, _ = _reference_scores(model, tiny, y, tiny[:5], y[:5])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trak = trak_core.TRAK(model, proj_dim=None, kernel_dtype=kernel_dtype, progress=False)
            trak.featurize(None, [(x * scale, y)])
            scores = trak.score([(x[:5] * scale, y[:5])])
        error = float(np.linalg.norm(scores.double().numpy() - expected) / np.linalg.norm(expected))
        warned = [str(w.message) for w in caught if "subnormal" in str(w.message)]
        assert error < tolerance
        if scale == 1e-37:
            assert not warned
        else:
            assert error > 1e-3  # what the warning is for
            assert len(warned) == 1 and re.search(r"every feature is subnormal in torch.float32 .* rescale the model's "
                                                  r"output .* or use a float64 model", warned[0])


def _projected_reference(model, x, y, targets, target_labels, k, lambda_reg):
    """Float64 NumPy scores of the linear classifier projected to ``k`` (the same matrix, made in float64), its
    features ``Phi`` (the float32 inputs' exact gradients, projected) and ``lambda_reg``."""
    weight = model.weight.detach().double().numpy()

    def gradients(inputs, labels):
        return _linear_margin_gradients(weight, inputs, labels)

    (grads, q), (target_grads, _) = gradients(x, y), gradients(targets, target_labels)
    matrix = np.asarray(trak_core.projection_matrix(grads.shape[1], k, seed=0, checkpoint=0, dtype=np.float64))
    phi, psi = grads @ matrix, target_grads @ matrix
    return phi @ np.linalg.solve(phi.T @ phi + lambda_reg * np.eye(k), psi.T) * q[:, None]


@pytest.mark.parametrize("width, proj_dim", [(4, None), (2000, 32)])
def test_the_subnormal_warnings_error_is_the_measured_one(width, proj_dim):
    """The warning's error was the spacing of subnormals over the *largest* feature, "or more": 2e-6 where 2.8e-4 was
    measured (2,000 inputs, 6,000 parameters projected to 32: each feature sums 6,000 rounded products), 3e-5 where
    5.2e-5 was (4 inputs, unprojected). It is now the spacing times sqrt(the roundings per feature) over the
    features' RMS: at least the measured error of the scores against float64 NumPy ones, and within 10x of it
    (1e-3 and 2e-4 stated: 3.6x and 3.8x)."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Linear(width, C, bias=False)
    x, y = torch.randn(N, width) * 1e-41, torch.randint(0, C, (N,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trak = trak_core.TRAK(model, proj_dim=proj_dim, progress=False)
        trak.featurize(None, [(x, y)])
        scores = trak.score([(x[:5], y[:5])]).double().numpy()
    if proj_dim is None:
        expected, _ = _reference_scores(model, x.double(), y, x[:5].double(), y[:5], lambda_reg=trak.lambdas[0])
    else:
        expected = _projected_reference(model, x, y, x[:5], y[:5], proj_dim, trak.lambdas[0])
    measured = float(np.linalg.norm(scores - expected) / np.linalg.norm(expected))
    warned = [str(w.message) for w in caught if "subnormal" in str(w.message)]
    assert len(warned) == 1
    stated = float(re.search(r"off by up to about (\S+) relative", warned[0]).group(1))
    assert measured <= stated <= 10 * measured, (measured, stated)


def _float16_overflowing():
    """A float32 model and data whose inputs (1e3), weights and logits (2.5) fit float16 but whose per-example
    gradients (up to 6.5e5, the inputs times the second layer's weights) do not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 4, bias=False), torch.nn.Linear(4, C, bias=False))
    with torch.no_grad():
        model[0].weight.mul_(1e-5)
        model[1].weight.mul_(300)
    return model, torch.randn(N, D) * 1e3, torch.randint(0, C, (N,))


def test_float16_gradients_that_overflow_name_float16s_range():
    """A float16 model whose inputs (1e3), weights and logits (2.5) fit float16 but whose per-example gradients (up to
    6.5e5, the inputs times the second layer's weights) do not: the error blamed the inputs, the weights and the
    learning rate; it now names float16's range and the fix."""
    model, x, y = _float16_overflowing()
    assert bool(torch.isfinite(x.half()).all()) and float(model(x).detach().abs().max()) < 10
    trak = trak_core.TRAK(model.half(), proj_dim=8, progress=False)
    with pytest.raises(TrakCoreError, match=r"the gradients are torch.float16, whose largest finite value is 65504: "
                                            r"larger ones overflow .* model in float32 \(for torch: model.float\(\)\)"):
        trak.featurize(None, [(x.half(), y)])
    scores = trak_core.TRAK(model.float(), proj_dim=8, progress=False)  # the fix named
    scores.featurize(None, [(x.half().float(), y)])
    assert bool(torch.isfinite(scores.score([(x[:2].half().float(), y[:2])])).all())


def test_a_float64_kernel_that_overflows_is_an_error_naming_the_fix():
    """Gradients of 1e160 in a float64 model: their squares overflow float64, and torch's eigh raised a raw
    "linalg.eigh: The algorithm failed to converge". At 1e150 the scores are those of the unscaled model."""
    model, x, y = _linear(dtype=torch.float64)
    expected, _ = _reference_scores(model, x, y, x[:5], y[:5])

    def scaled(scale):
        big = torch.nn.Linear(D, C, bias=False).double()
        with torch.no_grad():
            big.weight.copy_(model.weight / scale)
        return big, x * scale

    big, x_big = scaled(1e150)
    trak = trak_core.TRAK(big, proj_dim=None, progress=False)
    trak.featurize(None, [(x_big, y)])
    np.testing.assert_allclose(trak.score([(x_big[:5], y[:5])]).numpy(), expected, rtol=1e-9,
                               atol=1e-12 * np.abs(expected).max())
    big, x_big = scaled(1e160)
    with pytest.raises(TrakCoreError, match=r"the kernel holds inf or NaN: the training features' squares overflow "
                                            r"torch.float64, so it cannot be factorized; rescale the model's output"):
        trak_core.TRAK(big, proj_dim=None, progress=False).featurize(None, [(x_big, y)])


def test_all_zero_features_in_a_float64_kernel_blame_no_underflow():
    """float32 features' squares cannot underflow a float64 kernel: its all-zero kernel means all-zero features, and
    the error named an underflow of float64 with a rescaling that cannot help."""
    model = torch.nn.Linear(D, C, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    x, y = torch.zeros(N, D), torch.randint(0, C, (N,))
    for options in (dict(), dict(kernel_dtype="float64")):
        with pytest.raises(TrakCoreError, match=r"every training feature is zero") as caught:
            trak_core.TRAK(model, proj_dim=8, progress=False, **options).featurize(None, [(x, y)])
        assert "underflow float64" not in str(caught.value)


def test_a_float32_kernel_chooses_its_automatic_lambda_once(monkeypatch):
    """The float32-or-float64 decision resolves lambda_reg='auto' before factorizing; factorizing used it again."""
    from trak_core import _fitting

    calls = []
    choose = _fitting.choose_lambda
    monkeypatch.setattr(_fitting, "choose_lambda", lambda *args, **kwargs: calls.append(1) or choose(*args, **kwargs))
    trak, _ = _scores(*_linear())
    assert trak.store[0].kernel_dtype == "auto" and len(calls) == 1


def test_the_subnormal_check_reads_no_stored_features(tmp_path, monkeypatch):
    """The check needs the features' dtype only: on an on-disk store, slicing a row read and hashed a whole chunk of
    features (4,096 rows) at each float64 factorization."""
    from trak_core import disk_writer

    reads = []
    read = disk_writer.DiskFeatures.__getitem__
    monkeypatch.setattr(disk_writer.DiskFeatures, "__getitem__", lambda self, key: reads.append(key) or read(self, key))
    model, x, y = _linear()
    trak = trak_core.TRAK(model, proj_dim=8, kernel_dtype="float64", progress=False, store=tmp_path / "store")
    trak.featurize(None, [(x, y)])
    reads.clear()
    trak.refit(1.0)
    assert reads == []


@pytest.mark.parametrize("proj_dim", [8, None])
def test_float64_features_whose_squares_underflow_are_named(proj_dim):
    """Gradients of 1e-160 in a float64 model: their squares are float64 subnormals and the scores were 4e-5 off the
    unscaled model's, silently; below 1e-162 the kernel is zero and the error said only that every feature was zero.
    At 1e-150 the scores are the unscaled model's to float64 rounding, and nothing is said."""
    import warnings

    model, x, y = _linear(dtype=torch.float64)

    def scaled(scale):
        small = torch.nn.Linear(D, C, bias=False).double()
        with torch.no_grad():
            small.weight.copy_(model.weight / scale)
        return small, x * scale

    def scores(scale):
        small, x_small = scaled(scale)
        trak = trak_core.TRAK(small, proj_dim=proj_dim, progress=False)
        trak.featurize(None, [(x_small, y)])
        return trak.score([(x_small[:5], y[:5])]).numpy()

    expected = scores(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where float64 holds the squares
        np.testing.assert_allclose(scores(1e-150), expected, rtol=1e-12, atol=1e-13 * np.abs(expected).max())
    with pytest.warns(RuntimeWarning, match=r"checkpoint 0: the training features are so small .* their squares are "
                                            r"float64 subnormals, .* off by \de-0[4-6] relative; rescale the model"):
        off = scores(1e-160)
    assert 1e-7 < np.linalg.norm(off - expected) / np.linalg.norm(expected) < 1e-3  # the warning's error, measured
    with pytest.raises(TrakCoreError, match=r"every training feature is zero \(all-zero gradients\?\), .* if the "
                                            r"gradients are not zero, every feature is below about 1e-162, so that "
                                            r"its square underflows float64: rescale the model's output"):
        scores(1e-170)


def test_float16_overflow_on_the_factorized_path_is_told_apart_from_a_use_outside_a_module():
    """The float16 model above under proj_type="kronecker": its dense gradient overflows float16, but the factorized
    features are made in float32 from the layers' inputs and output gradients and are finite. The first example's
    check compared them with the overflowed gradient (relative error nan) and blamed "a use of the weight outside
    its module". Now it warns that the block could not be checked, and the features are the float32 model's to
    float16's rounding; a NaN input is an error that names the gradient (and float16's range in float16)."""
    model, x, y = _float16_overflowing()
    half = copy.deepcopy(model).half()
    assert not bool(torch.isfinite(torch.func.grad(  # the float16 gradient overflows: an independent check
        lambda w: torch.nn.functional.cross_entropy(x[:1].half() @ w.T @ half[1].weight.T, y[:1]))(
        half[0].weight)).all())
    trak = trak_core.TRAK(half, proj_dim=8, proj_type="kronecker", progress=False)
    with pytest.warns(RuntimeWarning, match=r"first example's torch.float16 gradient of layer '0.weight' overflows "
                                            r"torch.float16 .* could not be checked against it"):
        trak.featurize(None, [(x.half(), y)])
    wide = trak_core.TRAK(model, proj_dim=8, proj_type="kronecker", progress=False)
    wide.featurize(None, [(x, y)])
    got, expected = trak.features([(x.half(), y)]), wide.features([(x, y)])
    assert float((got.float() - expected).norm() / expected.norm()) < 2e-2
    bad = x.clone()
    bad[0, 0] = float("nan")
    for dtype, hint in ((torch.float16, True), (torch.float32, False)):
        with pytest.raises(TrakCoreError, match=r"first example's gradient of layer '0.weight' holds NaN or inf; "
                                                r"check the inputs") as caught:
            trak_core.TRAK(copy.deepcopy(model).to(dtype), proj_dim=8, proj_type="kronecker",
                           progress=False).featurize(None, [(bad.to(dtype), y)])
        assert ("whose largest finite value is 65504" in str(caught.value)) == hint


def test_kernel_warnings_and_errors_name_their_checkpoint():
    """With several checkpoints, the rank warning and the zero-kernel error said nothing of which checkpoint's
    kernel they were about. Checkpoint 1 here has a zero first layer, so that every gradient through the ReLU is
    zero; duplicated examples make both Gram matrices rank-deficient at lambda_reg=0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D, 6, bias=False), torch.nn.ReLU(), torch.nn.Linear(6, C, bias=False))
    x, y = torch.randn(N, D), torch.randint(0, C, (N,))
    x[N // 2:], y[N // 2:] = x[:N // 2], y[:N // 2]
    good = copy.deepcopy(model.state_dict())
    other = copy.deepcopy(good)
    other["2.weight"] = torch.randn(C, 6)
    dead = copy.deepcopy(good)
    dead["0.weight"] = torch.zeros(6, D)
    trak = trak_core.TRAK(model, proj_dim=64, lambda_reg=0, progress=False)
    with pytest.warns(RuntimeWarning) as got:
        for checkpoint in (good, other):
            trak.featurize(checkpoint, [(x, y)])
    ranks = sorted(str(w.message).split(": the kernel")[0] for w in got if "rank-deficient" in str(w.message))
    assert ranks == ["checkpoint 0", "checkpoint 1"], [str(w.message) for w in got]
    trak = trak_core.TRAK(model, proj_dim=64, progress=False)
    trak.featurize(good, [(x, y)])
    with pytest.raises(TrakCoreError, match=r"^checkpoint 1: the kernel Phi\^T Phi is zero: every training feature"):
        trak.featurize(dead, [(x, y)])
