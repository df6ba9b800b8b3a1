"""The conformance tests themselves: pytest fixtures and ``test_conformance_*`` functions.

One job: the checks listed in ``trak_core.testing``. This module imports pytest; collect it
with ``from trak_core.testing import *`` (the package loads it on first use, so that
``trak_core.testing.cases`` and ``trak_core.testing.canonical`` import without pytest).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

from ..backends import Backend, get_backend
from ..backends.registry import check_backend_object
from ..evaluation import spearman
from ..projection import project, projection_matrix
from ..tasks import Classification, get_task
from ..trak import TRAK
from . import canonical

__all__ = ["test_conformance_contract", "test_conformance_projection_matrix", "test_conformance_backend_projection",
           "test_conformance_gradients", "test_conformance_scores", "test_conformance_lm_scores",
           "test_conformance_kronecker_features", "test_conformance_kronecker_lm_scores", "test_conformance_features",
           "test_conformance_custom_task", "test_conformance_projection_widths", "test_conformance_leaves_inputs_alone",
           "test_conformance_prepare_snapshots", "test_conformance_many_rows", "conformance_active"]


@pytest.fixture(autouse=True)
def conformance_active(request):
    """Enter the case's context (e.g. JAX x64) around each conformance test."""
    if "conformance_case" not in request.fixturenames:
        yield
        return
    with request.getfixturevalue("conformance_case").active():
        yield


def _dtype(case) -> str:
    """float64 where the backend keeps it, float32 otherwise (JAX without x64)."""
    return str(case.array(np.zeros(1)).dtype).split(".")[-1]


def _ulp(values: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(values).astype(values.dtype))


def _namespace(case):
    import array_api_compat

    like = case.array(np.zeros(1))
    return array_api_compat.array_namespace(like), array_api_compat.device(like), like.dtype


def _classifier(case) -> str:
    """The canonical classifier the case builds: the MLP, else softmax regression (a linear-models backend)."""
    for kind in ("mlp", "softmax"):
        if kind in case.kinds:
            return kind
    pytest.skip(f"{case.id} builds neither the canonical 'mlp' nor the 'softmax' model (kinds={case.kinds})")


def test_conformance_contract(conformance_case):
    """The backend is a ``trak_core.Backend``, and its optional methods keep their contracts.

    ``owns`` answers a bool (a plain function may be owned only when named, as JAX's are);
    ``n_params`` matches the canonical weights; ``parameters_digest`` (when given) is the same for
    equal checkpoints and differs for others; ``model_identity`` (when given) is the same for two models of one
    architecture; ``structure`` is equal for two checkpoints of one
    model, and so is its ``repr`` (an on-disk store hashes it); the name is not one of trak-core's own;
    ``features`` returns ``None`` or ``(n, k)`` features (their values:
    ``test_conformance_features``).
    """
    case = conformance_case
    backend = get_backend(case.backend) if isinstance(case.backend, str) else case.backend
    assert isinstance(backend, Backend) and isinstance(backend.name, str) and backend.name, \
        f"{backend!r} is not a trak_core Backend with a non-empty name"
    check_backend_object(backend)  # a name of its own (not trak-core's numpy, torch, ...): stores reopen by it
    dtype, kind = _dtype(case), _classifier(case)
    model, checkpoint = case.model(kind, canonical.weights(kind, seed=0, dtype=dtype))
    _, same = case.model(kind, canonical.weights(kind, seed=0, dtype=dtype))
    other_model, other = case.model(kind, canonical.weights(kind, seed=1, dtype=dtype))
    assert backend.owns(model) in (True, False), f"owns(model) returned {backend.owns(model)!r}, not a bool"
    identities = [backend.model_identity(m) for m in (model, other_model)]  # both alive: their ids differ
    assert identities == [None, None] or (isinstance(identities[0], str) and identities[0] == identities[1]), \
        f"model_identity is {identities[0]!r} and {identities[1]!r} for two models of one architecture: an on-disk " \
        "store records it and refuses a model with another, so it must be a str equal in every process (no object ids)"
    for stranger in (object(), "a string", None):  # owns must be specific: TRAK(model) asks every backend
        assert backend.owns(stranger) is False, f"owns({stranger!r}) is not False: owns must answer False for " \
                                                "models it does not know (an isinstance check of its own types)"
    prepared = [backend.prepare(model, c) for c in (checkpoint, same, other)]
    expected = sum(w.size for w in canonical.weights(kind, seed=0))
    assert backend.n_params(prepared[0]) == expected, \
        f"n_params is {backend.n_params(prepared[0])}, the canonical {kind!r} model has {expected}"
    digests = [backend.parameters_digest(p) for p in prepared]
    if digests[0] is not None:
        assert digests[0] == digests[1] != digests[2], \
            f"parameters_digest must be equal for equal checkpoints and differ for others: {digests}"
    assert backend.structure(prepared[0]) == backend.structure(prepared[2]), \
        "structure() differs between two checkpoints of one model"
    structures = [backend.structure(p) for p in (prepared[0], prepared[2])]  # both alive: ids in a repr differ
    assert repr(structures[0]) == repr(structures[1]), \
        f"repr(structure()) differs between two checkpoints of one model ({structures[0]!r} and " \
        f"{structures[1]!r}): an on-disk store hashes it into its configuration and refuses the second " \
        "checkpoint, so it must be the same in every process (no object ids: give its type a __repr__ of its contents)"
    x, y = canonical.inputs(kind, 5, seed=1)
    features = backend.features(model, prepared[0], case.array(x.astype(dtype)), case.array(y), Classification(),
                                k=16, seed=0, checkpoint=0, kind="rademacher")
    if features is not None:
        assert tuple(features[0].shape) == (5, 16) and tuple(features[1].shape) == (5,), \
            f"features() gave shapes {tuple(features[0].shape)} and {tuple(features[1].shape)}, not (5, 16) and (5,)"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_conformance_projection_matrix(conformance_case, kind):
    case = conformance_case
    xp, device, dtype = _namespace(case)
    dtype_name = _dtype(case)
    reference = projection_matrix(300, 70, seed=7, checkpoint=2, offset=2**32 - 100, kind=kind,
                                  dtype=np.float64).astype(dtype_name)
    matrix = case.to_numpy(projection_matrix(300, 70, seed=7, checkpoint=2, offset=2**32 - 100, kind=kind,
                                             xp=xp, device=device, dtype=dtype))
    assert matrix.dtype == reference.dtype, f"projection_matrix dtype {matrix.dtype}, expected {reference.dtype}"
    if kind == "rademacher":
        assert np.array_equal(matrix, reference), \
            f"{int(np.sum(matrix != reference))} of {matrix.size} signs differ from the reference matrix's"
    else:
        assert np.all(np.abs(matrix - reference) <= 4 * _ulp(reference)), \
            f"Gaussian entries up to {np.max(np.abs(matrix - reference) / _ulp(reference)):.0f} ulp off (4 allowed)"


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_conformance_backend_projection(conformance_case, kind):
    case = conformance_case
    backend = get_backend(case.backend) if isinstance(case.backend, str) else case.backend
    grads = np.random.default_rng(3).normal(size=(5, 700)).astype(_dtype(case))
    reference = project(grads.astype(np.float64), 96, seed=11, checkpoint=1, kind=kind)
    out = backend.project(case.array(grads), 96, seed=11, checkpoint=1, kind=kind)
    case.check_array(out, case.array(grads))
    rtol = 1e-12 if _dtype(case) == "float64" else 1e-5
    np.testing.assert_allclose(case.to_numpy(out), reference, rtol=rtol, atol=rtol * np.abs(reference).max())


@pytest.mark.parametrize("kind, precision", [("rademacher", "float32"), ("gaussian", "float32"),
                                             ("rademacher", "fast")])
def test_conformance_features(conformance_case, kind, precision):
    """A fused ``features`` step (where the backend has one) gives the reference gradients times the reference
    projection for the ``kind``, seed and checkpoint asked, and the reference out-to-loss weights: within
    dtype tolerance at ``precision="float32"``, to a relative error ``<= 1e-3`` at ``"fast"`` (float16 inputs)."""
    case = conformance_case
    backend = get_backend(case.backend) if isinstance(case.backend, str) else case.backend
    dtype, model_kind = _dtype(case), _classifier(case)
    weights, x, y = _gradient_data(model_kind)
    model, checkpoint = case.model(model_kind, [w.astype(dtype) for w in weights])
    for seed, index in ((5, 2), (6, 0)):  # a step that ignores the seed or the checkpoint fails one of them
        out = backend.features(model, backend.prepare(model, checkpoint), case.array(x.astype(dtype)), case.array(y),
                               Classification(), k=40, seed=seed, checkpoint=index, kind=kind, precision=precision)
        if out is None:
            pytest.skip(f"{case.id}: backend {backend.name!r} has no fused features step here (features() is None)")
        grads, weights_q = _analytic(model_kind)
        reference = project(grads, 40, seed=seed, checkpoint=index, kind=kind)
        features, q = case.to_numpy(out[0]), case.to_numpy(out[1])
        assert features.shape == reference.shape and q.shape == weights_q.shape, \
            f"features() gave shapes {features.shape} and {q.shape}, expected {reference.shape} and {weights_q.shape}"
        if precision == "fast":
            error = np.linalg.norm(features - reference) / np.linalg.norm(reference)
            assert error <= 1e-3, f"fast features {error:.1e} from the reference (1e-3 allowed)"
        else:
            rtol = 1e-9 if dtype == "float64" else 2e-4
            np.testing.assert_allclose(features, reference, rtol=rtol, atol=rtol * np.abs(reference).max())
        rtol = 1e-9 if dtype == "float64" else 2e-5
        np.testing.assert_allclose(q, weights_q, rtol=rtol, atol=rtol)


GRADIENT_DATA = dict(weights_seed=1, inputs_seed=2, n=6)  # what the gradient test differentiates


def _gradient_data(kind: str) -> tuple[list, np.ndarray | dict, np.ndarray]:
    x, y = canonical.inputs(kind, GRADIENT_DATA["n"], seed=GRADIENT_DATA["inputs_seed"])
    return canonical.weights(kind, seed=GRADIENT_DATA["weights_seed"]), x, y


@functools.cache
def _reference_gradients(kind: str) -> np.ndarray:
    """float64 gradients of ``_gradient_data``: analytic (softmax, MLP) or central finite differences
    (CNN, LM); computed once per session."""
    weights, x, y = _gradient_data(kind)
    if kind in ("cnn", "lm"):
        return canonical.finite_difference_gradients(kind, weights, x, y)
    return _analytic(kind)[0]


@functools.cache
def _analytic(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 gradients and out-to-loss weights of ``_gradient_data`` from the closed forms (softmax, MLP)."""
    from ..backends.numpy_backend import backend

    weights, x, y = _gradient_data(kind)
    model = canonical.analytic_model(kind)
    return backend.gradients(model, backend.prepare(model, canonical.flat(weights)), x, y, Classification())


def _task(kind: str):
    """The task of the canonical model ``kind`` (the shared instance: a JAX step compiled for it is reused)."""
    return get_task("language_modeling") if kind == "lm" else Classification()


def _case_inputs(case, x, dtype: str):
    """A batch's inputs as the case's arrays: floating arrays in ``dtype``, a dict batch key by key."""
    if isinstance(x, dict):
        return {key: case.array(value) for key, value in x.items()}
    return case.array(x.astype(dtype))


@pytest.mark.parametrize("precision", ["default", "float32"])
@pytest.mark.parametrize("kind", canonical.KINDS)
def test_conformance_gradients(conformance_case, kind, precision):
    """Per-example gradients of every canonical model the case builds, against the analytic reference
    (softmax, MLP) or float64 central finite differences (CNN; the LM's summed per-token margins on a
    padded dict batch with ignored labels): in the case's own dtype, and in float32 (a float32 path of a
    float64 backend that differs passed before)."""
    case = conformance_case
    if kind not in case.kinds:
        pytest.skip(f"{case.id} does not build the canonical {kind!r} model")
    dtype = _dtype(case)
    if precision == "float32":
        if dtype == "float32":
            pytest.skip(f"{case.id} computes in float32 already (the 'default' case)")
        dtype = "float32"
    weights, x, y = _gradient_data(kind)
    reference = _reference_gradients(kind)
    model, checkpoint = case.model(kind, [w.astype(dtype) for w in weights])
    backend = get_backend(case.backend) if isinstance(case.backend, str) else case.backend
    prepared = backend.prepare(model, checkpoint)
    grads, _ = backend.gradients(model, prepared, _case_inputs(case, x, dtype), case.array(y), _task(kind))
    grads = case.to_numpy(grads)
    assert grads.shape == reference.shape and grads.dtype == np.dtype(dtype), \
        f"gradients {grads.shape} {grads.dtype}, expected {reference.shape} {dtype} (the checkpoint's dtype)"
    if dtype == "float64":
        rtol = 1e-6 if kind in ("cnn", "lm") else 1e-9  # finite differences are good to ~1e-8
    else:
        rtol = 2e-4
    np.testing.assert_allclose(grads, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


def _scores(case, dtype: str, n_checkpoints: int):
    kind = _classifier(case)
    x, y = canonical.inputs(kind, 40, seed=5)
    xt, yt = canonical.inputs(kind, 7, seed=6)
    model, _ = case.model(kind, canonical.weights(kind, seed=0, dtype=dtype))
    trak = TRAK(model, proj_dim=32, lambda_reg=0.1, seed=3, backend=case.backend, progress=False)
    for c in range(n_checkpoints):
        _, checkpoint = case.model(kind, canonical.weights(kind, seed=c, dtype=dtype))
        batches = [(case.array(x[i:i + 16].astype(dtype)), case.array(y[i:i + 16])) for i in range(0, 40, 16)]
        trak.featurize(checkpoint, batches)
    targets = case.array(xt.astype(dtype))
    scores = trak.score([(targets, case.array(yt))])
    case.check_array(scores, targets)
    reference = TRAK(canonical.analytic_model(kind), proj_dim=32, lambda_reg=0.1, seed=3, backend="numpy",
                     progress=False)
    for c in range(n_checkpoints):
        reference.featurize(canonical.flat(canonical.weights(kind, seed=c)), [(x, y)])
    return case.to_numpy(scores), reference.score([(xt, yt)])


@pytest.mark.parametrize("n_checkpoints", [1, 3])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conformance_scores(conformance_case, dtype, n_checkpoints):
    case = conformance_case
    if dtype == "float64" and _dtype(case) != "float64":
        pytest.skip(f"{case.id} has no float64 here")
    scores, reference = _scores(case, dtype, n_checkpoints)
    assert scores.shape == reference.shape == (40, 7), f"scores of shape {scores.shape}, expected (40, 7)"
    if dtype == "float64":
        np.testing.assert_allclose(scores, reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())
    else:
        error = np.linalg.norm(scores - reference) / np.linalg.norm(reference)
        assert error <= 1e-4, f"float32 scores {error:.1e} from the reference (relative Frobenius; 1e-4 allowed)"
        import array_api_compat.numpy as xp

        rhos = [spearman(scores[:, j], reference[:, j], xp=xp) for j in range(7)]  # NaN: a constant column
        rho = float("nan") if any(np.isnan(rhos)) else min(rhos)  # min([0.5, nan]) is 0.5, min([nan, 0.5]) nan
        assert rho >= 0.9999, f"a target's Spearman correlation with the reference is {rho:.6f} (0.9999 needed)"


KRONECKER_K = 24  # the factorized tests' proj_dim (more than any canonical model's number of blocks)
LM_LAMBDA = 10.0  # the ridge of the LM score test: float32 kernels (JAX without x64) stay well conditioned


def _lm_scores(case, dtype: str, kronecker: bool = False) -> np.ndarray:
    """Scores of 4 targets against 10 training sequences over 2 checkpoints of the canonical LM (dict
    batches of 4, 4 and 2 sequences with padding and ignored labels), as NumPy: unprojected, or
    ``proj_type="kronecker"`` at ``KRONECKER_K``."""
    x, y = canonical.inputs("lm", 10, seed=5)
    xt, yt = canonical.inputs("lm", 4, seed=6)
    model, _ = case.model("lm", canonical.weights("lm", seed=0, dtype=dtype))
    projection = dict(proj_dim=KRONECKER_K, proj_type="kronecker") if kronecker else dict(proj_dim=None)
    trak = TRAK(model, task="language_modeling", lambda_reg=LM_LAMBDA, seed=3, backend=case.backend, progress=False,
                **projection)
    for c in range(2):
        _, checkpoint = case.model("lm", canonical.weights("lm", seed=c, dtype=dtype))
        trak.featurize(checkpoint, [{**_case_inputs(case, {k: v[i:i + 4] for k, v in x.items()}, dtype),
                                     "labels": case.array(y[i:i + 4])} for i in range(0, 10, 4)])
    scores = trak.score([{**_case_inputs(case, xt, dtype), "labels": case.array(yt)}])
    case.check_array(scores, case.array(np.zeros(1, dtype=dtype)))
    return case.to_numpy(scores)


@functools.cache
def _lm_reference(case_id: str, kronecker: bool = False) -> np.ndarray:
    from .cases import FIRST_PARTY

    reference = FIRST_PARTY[case_id][2]()
    with reference.active():
        return _lm_scores(reference, "float64", kronecker)


def _check_lm_against_another_framework(case, dtype: str, kronecker: bool = False) -> None:
    """The LM's scores against JAX x64's (torch backends) or torch's (the others): float64 within ``rtol 1e-9``,
    float32 to a relative Frobenius error ``<= 1e-4``."""
    from .cases import FIRST_PARTY, unavailable

    if "lm" not in case.kinds:
        pytest.skip(f"{case.id} does not build the canonical 'lm' model")
    if dtype == "float64" and _dtype(case) != "float64":
        pytest.skip(f"{case.id} has no float64 here")
    backend = get_backend(case.backend) if isinstance(case.backend, str) else case.backend
    if kronecker:
        _factorizing_backend(case)
    reference_id = "jax:cpu:x64" if backend.name == "torch" else "torch:cpu"
    reason = unavailable(reference_id)
    if reason:
        pytest.skip(f"the LM scores are compared with {reference_id}'s, and {reason}")
    if kronecker and not get_backend(FIRST_PARTY[reference_id][2]().backend).can_factorize:
        pytest.skip(f"{reference_id} has no factorized projection to compare with")
    scores, reference = _lm_scores(case, dtype, kronecker), _lm_reference(reference_id, kronecker)
    assert scores.shape == reference.shape == (10, 4), f"LM scores of shape {scores.shape}, expected (10, 4)"
    if dtype == "float64":
        np.testing.assert_allclose(scores, reference, rtol=1e-9, atol=1e-9 * np.abs(reference).max())
    else:
        error = np.linalg.norm(scores - reference) / np.linalg.norm(reference)
        assert error <= 1e-4, f"float32 LM scores {error:.1e} from {reference_id}'s (1e-4 allowed)"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conformance_lm_scores(conformance_case, dtype):
    """Scores of the canonical LM (``task="language_modeling"``) equal another framework's in float64:
    JAX's (x64) for a torch backend, torch's for every other backend. float64 within ``rtol 1e-9``;
    float32 to a relative Frobenius error ``<= 1e-4``."""
    _check_lm_against_another_framework(conformance_case, dtype)


def _factorizing_backend(case):
    backend = get_backend(case.backend) if isinstance(case.backend, str) else case.backend
    if not backend.can_factorize:
        pytest.skip(f"{case.id}: backend {backend.name!r} has no factorized projection (can_factorize=False)")
    return backend


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lm"])
def test_conformance_kronecker_features(conformance_case, kind):
    """``proj_type="kronecker"`` features equal the reference gradients (analytic or finite differences) times
    the explicit Kronecker matrix of the canonical layers (``canonical.kronecker_layers``), and the
    backend finds those layers."""
    from ..kronecker import Kronecker, explicit_matrix, make_plan

    case = conformance_case
    if kind not in case.kinds:
        pytest.skip(f"{case.id} does not build the canonical {kind!r} model")
    backend = _factorizing_backend(case)
    dtype = _dtype(case)
    weights, x, y = _gradient_data(kind)
    model, checkpoint = case.model(kind, [w.astype(dtype) for w in weights])
    prepared = backend.prepare(model, checkpoint)
    inputs, labels = _case_inputs(case, x, dtype), case.array(y)
    layers, rest = canonical.kronecker_layers(kind)
    plan = make_plan(layers, rest, KRONECKER_K)
    found = backend.factorized_plan(model, prepared, inputs, labels, _task(kind), k=KRONECKER_K, options=Kronecker())
    shape = lambda p: ([(b.layer.rows, b.layer.cols, b.layer.bias_side, b.k_rows, b.k_cols, b.k, b.start)  # noqa: E731
                        for b in p.blocks], p.n_rest, p.k_rest)
    assert shape(found) == shape(plan), f"factorized plan {shape(found)}, expected {shape(plan)}"
    features, _ = backend.factorized_features(model, prepared, inputs, labels, _task(kind), k=KRONECKER_K, seed=5,
                                              checkpoint=1, options=Kronecker())
    matrix = explicit_matrix(plan, {f"w{i}": np.shape(w) for i, w in enumerate(weights)}, seed=5, checkpoint=1)
    reference = _reference_gradients(kind) @ matrix
    features = case.to_numpy(features)
    assert features.shape == reference.shape, f"factorized features {features.shape}, expected {reference.shape}"
    if dtype == "float64":
        rtol = 1e-6 if kind in ("cnn", "lm") else 1e-9  # finite differences are good to ~1e-8
    else:
        rtol = 2e-4
    np.testing.assert_allclose(features, reference, rtol=rtol, atol=rtol * np.abs(reference).max())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_conformance_kronecker_lm_scores(conformance_case, dtype):
    """``proj_type="kronecker"`` scores of the canonical LM equal another framework's in float64 (JAX x64's for
    torch, torch's for the others): float64 within ``rtol 1e-9``, float32 to a relative error ``<= 1e-4``."""
    _check_lm_against_another_framework(conformance_case, dtype, kronecker=True)


from .suite_inputs import (test_conformance_custom_task, test_conformance_leaves_inputs_alone,  # noqa: E402
                           test_conformance_many_rows, test_conformance_prepare_snapshots,
                           test_conformance_projection_widths)
