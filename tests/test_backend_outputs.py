"""What a backend returns is checked against the contract before it reaches the estimator.

A backend's gradients, out-to-loss weights and projected features of the wrong shape or dtype used to
broadcast into wrong scores without an error (an audit's plug-in: weights ``(n, 1)`` gave scores of shape
``(n_train, n_train, n_targets)``; a dropped gradient column or a projection with one column too many gave
scores 20% off). Each broken backend below differs from the reference backend in one way.
"""
import numpy as np
import pytest

from trak_core import TRAK, SoftmaxRegression, TrakTypeError, TrakValueError
from trak_core.backends import numpy_backend


class Reference(numpy_backend.ArrayAPIBackend):
    """The reference backend with its own ``project`` in use (as a plug-in with a fused projection has)."""

    has_fused_projection = True


class WeightsColumn(Reference):
    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        return grads, q[:, None]


class WeightsShort(Reference):
    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        return grads, q[:-1]


class ColumnDropped(Reference):
    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        return grads[:, :-1], q


class CountTooLarge(Reference):
    def n_params(self, prepared):
        return super().n_params(prepared) + 5


class IntegerGradients(Reference):
    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        return np.round(grads * 100).astype(np.int64), q


class WideProjection(Reference):
    def project(self, grads, k, **options):
        return super().project(grads, k + 1, **options)


class NarrowDtypeProjection(Reference):
    def project(self, grads, k, **options):
        return super().project(grads, k, **options).astype(np.float32)


@pytest.fixture
def setup(rng):
    model = SoftmaxRegression(4, 3)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    return model, x, y


def _scores(backend, model, x, y):
    trak = TRAK(model, proj_dim=8, backend=backend, progress=False)
    trak.featurize(model.init(seed=0), [(x[:24], y[:24]), (x[24:], y[24:])])
    return trak.score([(x[:5], y[:5])])


def test_the_reference_with_its_own_projection_matches_the_core_projection(setup):
    model, x, y = setup  # the control: the checks accept a correct backend, and its scores are the core's
    assert np.array_equal(_scores(Reference(), *setup), _scores("numpy", *setup))


@pytest.mark.parametrize("backend, match", [
    (WeightsColumn(), r"batch 0: backend 'numpy' returned out-to-loss weights of shape \(24, 1\) for 24 examples; "
                      r"expected \(24,\)"),
    (WeightsShort(), r"out-to-loss weights of shape \(23,\) for 24 examples"),
    (ColumnDropped(), r"batch 0: backend 'numpy' returned per-example gradients of shape \(24, 14\); expected "
                      r"\(24, 15\): a row per example, a column per parameter \(its n_params\)"),
    (CountTooLarge(), r"of shape \(24, 15\); expected \(24, 20\)"),
    (IntegerGradients(), r"per-example gradients of dtype int64; expected a real floating dtype"),
    (WideProjection(), r"checkpoint 0: backend 'numpy' returned projected features \(project\) of shape \(40, 9\); "
                       r"expected \(40, 8\)"),
    (NarrowDtypeProjection(), r"projected features \(project\) of dtype float32; expected float64"),
])
def test_a_broken_backend_is_named_before_its_output_is_used(setup, backend, match):
    with pytest.raises(TrakValueError, match=match):
        _scores(backend, *setup)


class Float32Gradients(Reference):
    """Gradients cast to float32 whatever the checkpoint's dtype (a plug-in computing in float32)."""

    def gradients(self, model, prepared, inputs, labels, task):
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        return grads.astype(np.float32), q


class MixedParameters(Float32Gradients):
    """A float64 weight and a float32 bias: float32 gradients are in one of the checkpoint's dtypes."""

    def prepare(self, model, checkpoint):
        prepared = super().prepare(model, checkpoint)
        return {**prepared, "bias": prepared["bias"].astype(np.float32)}


def test_gradients_below_the_checkpoints_dtype_are_refused(setup):
    """Only the conformance suite checked the gradients' dtype: float32 gradients of a float64 checkpoint were
    accepted, and gave float32 features and scores."""
    with pytest.raises(TrakTypeError, match=r"^checkpoint 0, batch 0: backend 'numpy' returned per-example gradients "
                                            r"of dtype float32 for a checkpoint whose parameters are float64: expected "
                                            r"float64, .*compute the gradients in the parameters' dtype, or "
                                            r"featurize a checkpoint cast to float32"):
        _scores(Float32Gradients(), *setup)


def test_gradients_in_one_of_the_checkpoints_dtypes_are_accepted(setup):
    model, x, y = setup
    assert _scores(MixedParameters(), *setup).dtype == np.float32  # float32 is the bias's dtype
    trak = TRAK(model, proj_dim=8, backend=Float32Gradients(), progress=False)  # a float32 checkpoint: its dtype
    trak.featurize(model.init(seed=0).astype(np.float32), [(x.astype(np.float32), y)])
    assert trak.score([(x[:5].astype(np.float32), y[:5])]).dtype == np.float32
