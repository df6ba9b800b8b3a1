"""The conformance suite as a plug-in author meets it: it runs on a backend of linear models only, and it fails a
fused ``features`` step that ignores what it is asked for (an audit's broken plug-ins passed the whole suite)."""
import numpy as np
import pytest

from trak_core.backends import numpy_backend
from trak_core.projection import project
from trak_core.testing import suite
from trak_core.testing.cases import NumpyCase, StrictCase


FIXED = {"kind": "rademacher", "seed": 3, "checkpoint": 0, "precision": "float32"}


class Fused(numpy_backend.ArrayAPIBackend):
    """The reference gradients, projected inside ``features`` as a fused step would; ``ignore`` names an argument the
    step leaves at a fixed value (a broken plug-in)."""

    name = "numpy-fused"

    def __init__(self, ignore=None):
        self.ignore = ignore

    def features(self, model, prepared, inputs, labels, task, *, k, seed, checkpoint, kind, precision="float32"):
        grads, q = self.gradients(model, prepared, inputs, labels, task)
        asked = dict(seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)
        if self.ignore is not None:
            asked[self.ignore] = FIXED[self.ignore]
        return project(grads, k, **asked), q


class FusedCase(NumpyCase):
    id = "numpy-fused"

    def __init__(self, ignore=None):
        self.backend = Fused(ignore)


class SoftmaxOnly(NumpyCase):
    id, kinds = "numpy:softmax-only", ("softmax",)

    def model(self, kind, weights):
        if kind != "softmax":
            raise NotImplementedError(f"this backend builds softmax regression only, not {kind!r}")
        return super().model(kind, weights)


def test_a_backend_of_linear_models_only_runs_the_suite():
    case = SoftmaxOnly()  # the contract and score tests built the MLP whatever `kinds` said
    suite.test_conformance_contract(case)
    for dtype in ("float64", "float32"):
        for n_checkpoints in (1, 3):
            suite.test_conformance_scores(case, dtype, n_checkpoints)
    scores, reference = suite._scores(case, "float64", 1)
    assert scores.shape == (40, 7) and reference.shape == (40, 7)  # softmax regression's, not skipped


@pytest.mark.parametrize("kind, precision", [("rademacher", "float32"), ("gaussian", "float32"),
                                             ("rademacher", "fast")])
def test_a_correct_fused_step_passes(kind, precision):
    suite.test_conformance_features(FusedCase(), kind, precision)


@pytest.mark.parametrize("ignore, kind, precision", [("kind", "gaussian", "float32"), ("seed", "rademacher", "float32"),
                                                     ("checkpoint", "rademacher", "float32")])
def test_a_fused_step_that_ignores_an_argument_fails(ignore, kind, precision):
    with pytest.raises(AssertionError):
        suite.test_conformance_features(FusedCase(ignore), kind, precision)


def test_the_fast_grade_is_looser_than_float32_and_is_checked():
    case = FusedCase()
    grads = np.random.default_rng(0).normal(size=(6, 300))  # "fast" rounds inputs to float16: about 2e-4
    fast, exact = project(grads, 40, seed=1, checkpoint=0, precision="fast"), project(grads, 40, seed=1, checkpoint=0)
    error = np.linalg.norm(fast - exact) / np.linalg.norm(exact)
    assert 1e-5 < error < 1e-3
    suite.test_conformance_features(case, "rademacher", "fast")


class Broken(numpy_backend.ArrayAPIBackend):
    """The reference backend with one defect an audit's plug-ins had, each of which passed the whole suite."""

    name = "numpy-broken"

    def __init__(self, defect):
        self.defect = defect

    def owns(self, model):
        return True if self.defect == "owns_everything" else super().owns(model)

    def model_identity(self, model):
        return f"{type(model).__name__}@{id(model):x}" if self.defect == "identity_of_object" else None

    def prepare(self, model, checkpoint):
        if self.defect == "holds_checkpoint":  # views of the caller's array, no copy
            return model.params(checkpoint)
        return super().prepare(model, checkpoint)

    def gradients(self, model, prepared, inputs, labels, task):
        if self.defect == "ignores_task":
            from trak_core.tasks import Classification

            task = Classification()
        if self.defect == "chunks_of_32" and len(labels) > 32:  # a later chunk's rows take their neighbours' labels
            labels = np.concatenate([labels[:32], np.roll(labels[32:], 1)])
        if self.defect == "zeroes_inputs":
            out = super().gradients(model, prepared, inputs, labels, task)
            inputs[...] = 0.0
            return out
        grads, q = super().gradients(model, prepared, inputs, labels, task)
        if self.defect == "float32_sign" and grads.dtype == np.float32:
            grads = -grads
        return grads, q

    def project(self, grads, k, *, seed, checkpoint, kind, **options):
        out = super().project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, **options)
        if self.defect == "drops_tail" and k % 32:
            out[:, k - k % 32:] = 0.0  # the last partial tile of 32 columns
        if self.defect == "scales_grads":
            grads *= 2.0
        return out

    def features(self, model, prepared, inputs, labels, task, *, k, seed, checkpoint, kind, precision="float32"):
        if self.defect != "features_chunks_of_32":
            return None
        grads, q = self.gradients(model, prepared, inputs, labels, task)
        out = project(grads, k, seed=seed, checkpoint=checkpoint, kind=kind, precision=precision)
        out[32:] = out[:len(out) - 32].copy()  # a later chunk's rows: the first chunk's
        return out, q


class BrokenCase(NumpyCase):
    id = "numpy-broken"

    def __init__(self, defect):
        self.backend = Broken(defect)


@pytest.mark.parametrize("defect, test, args", [
    ("ignores_task", "test_conformance_custom_task", ()),
    ("drops_tail", "test_conformance_projection_widths", (37, 100)),
    ("zeroes_inputs", "test_conformance_leaves_inputs_alone", ()),
    ("scales_grads", "test_conformance_leaves_inputs_alone", ()),
    ("float32_sign", "test_conformance_gradients", ("mlp", "float32")),
    ("owns_everything", "test_conformance_contract", ()),
    ("holds_checkpoint", "test_conformance_prepare_snapshots", ()),
    ("chunks_of_32", "test_conformance_many_rows", ()),
    ("features_chunks_of_32", "test_conformance_many_rows", ()),
    ("identity_of_object", "test_conformance_contract", ()),
])
def test_defects_that_passed_the_suite_now_fail_it(defect, test, args):
    """Each defect fails its test (with a message naming what is wrong), and the correct backend passes it."""
    getattr(suite, test)(NumpyCase(), *args)
    with pytest.raises(AssertionError) as info:
        getattr(suite, test)(BrokenCase(defect), *args)
    assert str(info.value).strip(), f"{test} failed {defect!r} with no message"


def test_a_result_on_another_device_says_which():
    """``check_array`` names both devices (its bare assert failed a backend's scores with no message)."""
    pytest.importorskip("array_api_strict")
    case = StrictCase()
    like = case.array(np.zeros(3))
    with pytest.raises(AssertionError, match="CPU_DEVICE.*device1"):
        case.check_array(like.to_device(case.xp.Device("CPU_DEVICE")), like)
