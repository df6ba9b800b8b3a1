"""More bad input that was taken without a word, or refused only late or obscurely: LDS masks of counts and complex
scores, a CustomTask whose output is not floating, a projection cache that is not one, a used-up generator of
targets, and booleans as checkpoint indices. Each is now an early error naming the problem and the fix."""
import warnings

import numpy as np
import pytest

import trak_core
from trak_core import MLP, TRAK, TrakTypeError, TrakValueError
from trak_core.evaluation import lds, subset_masks
from trak_core.projection import ProjectionCache


def _lds_inputs(rng):
    scores = rng.normal(size=(20, 4))
    masks = subset_masks(20, 10, seed=1)
    return scores, masks, rng.normal(size=(10, 4))


def test_lds_refuses_masks_with_values_other_than_0_and_1(rng):
    """Masks holding 3 for some examples (counts, not membership) moved the LDS without a word."""
    scores, masks, outputs = _lds_inputs(rng)
    counts = masks.astype(np.int64)
    counts[2, :3] *= 3  # subset 2 saw its first examples three times
    with pytest.raises(TrakValueError, match=r"masks have values other than 0 and 1 for subsets \[2\].*"
                                             r"pass them as booleans or 0/1, e.g. counts > 0"):
        lds(scores, counts, outputs)
    expected = lds(scores, masks, outputs).mean  # 0/1 masks of any dtype, and counts > 0, are the boolean masks
    for same in (counts > 0, masks.astype(np.float32), masks.astype(np.int8)):
        assert lds(scores, same, outputs).mean == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", ["scores", "outputs"])
def test_lds_refuses_complex_scores_and_outputs(name, rng):
    """Complex scores were cast to real with only NumPy's ComplexWarning."""
    scores, masks, outputs = _lds_inputs(rng)
    args = {"scores": scores, "masks": masks, "outputs": outputs}
    args[name] = args[name] + 1j
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unfixed: a ComplexWarning, and a number
        with pytest.raises(TrakTypeError, match=rf"{name} are complex \(complex128\).*{name}\.real"):
            lds(**args)


def _argmax_task():
    return trak_core.CustomTask(lambda logits, labels, xp: xp.argmax(logits, axis=1), name="argmax")


_ARGMAX = (r"CustomTask 'argmax': output must return real floating values, but returned dtype .*int.*"
           r"differentiable floating-point function of the model's outputs")


def test_custom_task_with_integer_output_is_refused_at_the_first_batch_torch(rng):
    """An argmax output was featurized to all-zero gradients: a ZeroKernelError ("all-zero gradients?") at the
    kernel, after the whole pass."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    trak = TRAK(model, task=_argmax_task(), proj_dim=8, progress=False)
    with pytest.raises(TrakTypeError, match=r"batch 0: " + _ARGMAX):
        trak.featurize(model.state_dict(), [(x[:6], y[:6]), (x[6:], y[6:])])
    assert trak.n_checkpoints == 0


def test_custom_task_with_integer_output_is_refused_at_the_first_batch_jax(rng):
    """JAX raised its own TypeError from inside jax.grad ("grad requires real-valued outputs")."""
    pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    from trak_jax import JaxModel

    model = JaxModel(lambda p, inputs: inputs @ p[0].T + p[1])
    params = [rng.normal(size=(3, 4)).astype(np.float32), np.zeros(3, np.float32)]
    x, y = rng.normal(size=(12, 4)).astype(np.float32), rng.integers(0, 3, 12)
    with pytest.raises(TrakTypeError, match=r"batch 0: " + _ARGMAX):
        TRAK(model, task=_argmax_task(), proj_dim=8, progress=False).featurize(params, [(x, y)])


def test_custom_task_output_dtype_is_checked_on_the_first_call():
    import array_api_compat.numpy as xp

    logits, labels = np.zeros((3, 2), np.float32), np.zeros(3, np.int64)
    with pytest.raises(TrakTypeError, match=_ARGMAX):
        _argmax_task().output(logits, labels, xp=xp)
    margin = trak_core.CustomTask(lambda logits, labels, xp: logits[:, 0] - logits[:, 1], name="margin")
    np.testing.assert_array_equal(margin.output(logits + [[2, 1]], labels, xp=xp), np.ones(3, np.float32))


@pytest.mark.parametrize("cache", [5, {}, "default"])
def test_project_refuses_a_cache_that_is_not_a_projection_cache(cache, rng):
    """``cache=5`` was an AttributeError ('int' object has no attribute 'get') from inside cached_factors."""
    grads = rng.normal(size=(4, 10)).astype(np.float32)
    with pytest.raises(TrakTypeError, match=rf"cache must be a ProjectionCache or None for the default, got "
                                            rf"{type(cache).__name__}: pass e.g. trak_core.ProjectionCache"):
        trak_core.project(grads, 8, cache=cache)
    dense = grads.astype(np.float64) @ trak_core.projection_matrix(10, 8, dtype=np.float64)
    np.testing.assert_allclose(trak_core.project(grads, 8, cache=ProjectionCache(0)), dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_bytes", [-1, 2.5, True, None])
def test_projection_cache_refuses_a_budget_that_is_not_a_non_negative_integer(max_bytes):
    """``ProjectionCache(-1)`` was taken (and cached nothing)."""
    with pytest.raises(TrakValueError, match=r"max_bytes must be a non-negative integer \(bytes; 0 disables "
                                             r"caching\), got"):
        ProjectionCache(max_bytes)
    assert ProjectionCache(0).max_bytes == 0 and ProjectionCache(np.int64(2**20)).max_bytes == 2**20


@pytest.fixture
def featurized(rng):
    model = MLP(8, 6, 3)
    x, y = rng.normal(size=(30, 8)), rng.integers(0, 3, 30)
    trak = TRAK(model, proj_dim=16, progress=False)
    trak.featurize(model.init(seed=0), [(x, y)])
    trak.featurize(model.init(seed=1), [(x, y)])
    return trak, x, y


def test_score_and_features_on_a_used_up_generator_say_why(featurized):
    """score said only "data yielded no targets (no batches, or only empty ones)"; featurize named generators."""
    trak, x, y = featurized
    targets = ((x[i:i + 5], y[i:i + 5]) for i in range(0, 10, 5))
    assert trak.score(targets).shape == (30, 10)
    with pytest.raises(TrakValueError, match=r"score: data yielded no targets .*a generator, map or zip is used up "
                                             r"by one pass.*a list, or a generator made anew for each call"):
        trak.score(targets)
    with pytest.raises(TrakValueError, match=r"features: data yielded no batches .*a generator, map or zip is used "
                                             r"up by one pass.*a list, or a generator made anew for each call"):
        trak.features(targets, checkpoint=0)


def test_score_refuses_booleans_as_checkpoint_indices(featurized):
    """``checkpoints=[True]`` was checkpoint 1 (operator.index(True) is 1), while proj_dim and seed refuse bools."""
    trak, x, y = featurized
    with pytest.raises(TrakValueError, match=r"checkpoints must be a non-empty sequence of indices in \[0, 1\], got "
                                             r"\[True\]; booleans are not indices"):
        trak.score([(x[:4], y[:4])], checkpoints=[True])
    with pytest.raises(TrakValueError, match=r"got \[False, True\]; booleans are not indices"):
        trak.self_influence(checkpoints=[False, True])
    np.testing.assert_array_equal(trak.score([(x[:4], y[:4])], checkpoints=[np.int64(1)]),
                                  trak.score([(x[:4], y[:4])], checkpoints=[1]))


def test_float_binary_labels_are_told_to_become_integers():
    """A one-logit head trained with BCEWithLogitsLoss has float 0/1 labels; the refusal did not say what to do."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(6, 4), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    with pytest.raises(TrakTypeError, match=r"classification labels must be integers, got dtype torch.float32; labels "
                                            r"are class indices .* \(torch: labels.long\(\)\)"):
        TRAK(model, proj_dim=4, progress=False).featurize(None, [(x, y)])
    trak = TRAK(model, proj_dim=4, progress=False)
    trak.featurize(None, [(x, y.long())])  # the fix named works
    assert trak.n_checkpoints == 1


def test_fast_precision_without_a_projection_says_it_does_nothing(rng):
    """``precision="fast"`` with ``proj_dim=None`` gave bit-identical scores to the default, without a word."""
    model = MLP(5, 4, 3)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, 30)
    with pytest.warns(UserWarning, match=r"precision='fast' .* proj_dim=None projects nothing: it has no effect"):
        fast = TRAK(model, proj_dim=None, precision="fast", progress=False)
    plain = TRAK(model, proj_dim=None, progress=False)
    for trak in (fast, plain):
        trak.featurize(model.init(seed=0), [(x, y)])
    assert np.array_equal(fast.score([(x[:4], y[:4])]), plain.score([(x[:4], y[:4])]))  # what "no effect" means
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TRAK(model, proj_dim=8, precision="fast", progress=False)  # with a projection: no warning
