"""Some feature rows tiny among normal ones (subnormal, or with squares beyond float32): measured against float64
NumPy scores of the same formula. Without normalization they cost nothing that matters; ``normalize_features``
scales them up to unit norm, so that their rows must be normalized exactly and their lost bits are warned of."""
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from test_numerical_edges import _linear_margin_gradients  # noqa: E402

N, C = 200, 3
ROWS = [int(r) for r in np.random.default_rng(0).choice(N, N // 10, replace=False)]  # 10% of the training rows
NORMAL = [i for i in range(N) if i not in set(ROWS)]


def _run(width, proj_dim, scale, *, normalize=False, target_scale=1.0):
    """Scores of a linear classifier whose rows ``ROWS`` (and first two targets) have inputs scaled by ``scale``
    (``target_scale``), the float64 NumPy reference (the float32 inputs' exact gradients, projected with the same
    matrix made in float64, normalized where ``normalize``) and the subnormal warnings."""
    torch.manual_seed(0)
    model = torch.nn.Linear(width, C, bias=False)
    x, y = torch.randn(N, width), torch.randint(0, C, (N,))
    x[ROWS] *= scale
    t, ty = torch.randn(6, width), torch.randint(0, C, (6,))
    t[:2] *= target_scale
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trak = trak_core.TRAK(model, proj_dim=proj_dim, normalize_features=normalize, progress=False)
        trak.featurize(None, [(x, y)])
        scores = trak.score([(t, ty)]).double().numpy()
    weight = model.weight.detach().double().numpy()
    (phi, q), (psi, _) = _linear_margin_gradients(weight, x, y), _linear_margin_gradients(weight, t, ty)
    if proj_dim is not None:
        matrix = np.asarray(trak_core.projection_matrix(phi.shape[1], proj_dim, seed=0, checkpoint=0,
                                                        dtype=np.float64))
        phi, psi = phi @ matrix, psi @ matrix
    if normalize:
        phi, psi = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (phi, psi))
    kernel = phi.T @ phi + trak.lambdas[0] * np.eye(phi.shape[1])
    expected = phi @ np.linalg.solve(kernel, psi.T) * q[:, None]
    return scores, expected, [str(w.message) for w in caught if "subnormal" in str(w.message)]


def _relative(scores, expected):
    return float(np.linalg.norm(scores - expected) / np.linalg.norm(expected))


@pytest.mark.parametrize("width, proj_dim", [(4, None), (2000, 32)])
def test_a_tenth_of_subnormal_training_rows_cost_nothing_that_matters(width, proj_dim):
    """10% of the training rows at 1e-40 (float32 subnormal features), unnormalized: the other rows' scores are as
    exact as float32 makes them (1e-7 to 5e-7 measured against float64; 1e-7 to 4.5e-7 without tiny rows); the tiny
    rows' scores keep few digits (1e-3 relative) but are as tiny as the rows (1e-42, 4e-41 of the scores' norm),
    off by 3.5e-45 at most, and sit among the near-zero scores, so no top-10 set changes. No warning: nothing to fix."""
    scores, expected, warned = _run(width, proj_dim, 1e-40)
    assert not warned
    assert _relative(scores[NORMAL], expected[NORMAL]) < 2e-6
    assert np.abs(scores[ROWS] - expected[ROWS]).max() < 1e-43  # 2.5e-45 and 3.5e-45 measured
    assert np.linalg.norm(expected[ROWS]) < 1e-38 * np.linalg.norm(expected)
    for j in range(expected.shape[1]):
        assert set(np.argsort(-scores[:, j])[:10]) == set(np.argsort(-expected[:, j])[:10])


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_normalized_rows_whose_squares_leave_float32_are_normalized(scale):
    """normalize_features summed float32 squares: rows of 1e-25 (squares underflow to 0) were left as they were and
    rows of 1e20 (squares overflow to inf) were zeroed, so 10% of the rows, 29-32% of the reference scores' norm,
    scored 0 and the others were 6-7% off (the kernel and lambda lacked them). Now each row is divided by its
    largest magnitude first: float32-exact (1.2e-7 measured), no warning (the rows are normal floats)."""
    scores, expected, warned = _run(4, None, scale, normalize=True)
    assert not warned
    assert _relative(scores, expected) < 1e-5
    assert _relative(scores[ROWS], expected[ROWS]) < 1e-5


@pytest.mark.parametrize("width, proj_dim, scale", [(4, None, 1e-42), (2000, 32, 1e-43)])
def test_normalized_subnormal_rows_are_warned_of_with_their_error(width, proj_dim, scale):
    """Subnormal rows scaled to unit norm: their scores are as large as any and keep the features' rounding
    (2e-3 and 9e-2 relative measured), silently before. The warning names how many rows, training and target,
    and an error at least the rows' measured one and within 10x of it (4.8x and 4.6x stated)."""
    scores, expected, warned = _run(width, proj_dim, scale, normalize=True, target_scale=scale)
    measured = max(_relative(scores[i], expected[i]) for i in ROWS)
    assert measured > 1e-4  # what the warning is for
    assert len(warned) == 2, warned
    assert re.search(r"20 of 200 training feature rows are subnormal in torch\.float32", warned[0])
    assert re.search(r"2 of 6 target feature rows \(examples x checkpoints\) are subnormal", warned[1])
    stated = float(re.search(r"off by up to about (\S+) relative", warned[0]).group(1))
    assert measured <= stated <= 10 * measured, (measured, stated)
    assert "scale the model's output up" in warned[0]


def test_a_job_featurizing_apart_states_the_projected_error(tmp_path):
    """``featurize(..., index=i)`` of a job that holds no checkpoint (one job per checkpoint): the warning's error of
    projected features took n_params from the estimator's first checkpoint, 0 there, and so left out the factor
    sqrt(n_params) (77x: 4.3e-3 stated where 9e-2 is measured at rows of 1e-43)."""
    width, proj_dim = 2000, 32
    torch.manual_seed(0)
    model = torch.nn.Linear(width, C, bias=False)
    x, y = torch.randn(N, width), torch.randint(0, C, (N,))
    x[ROWS] *= 1e-43
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trak = trak_core.TRAK(model, proj_dim=proj_dim, normalize_features=True, progress=False, store=tmp_path / "s")
        trak.featurize(None, [(x, y)], index=1)
    warned = [str(w.message) for w in caught if "subnormal" in str(w.message)]
    assert len(warned) == 1, warned
    assert f"times sqrt(n_params) = {np.sqrt(width * C):.3g}" in warned[0]  # the model's 2000 x 3 weights


def test_the_first_score_of_an_opened_store_counts_each_target_row_once(tmp_path):
    """``TRAK.open``'s first ``score`` passes the first target row through the model for the features' namespace, then
    scores it with its batch: the warning counted it twice ("3 of 7 target feature rows" for 2 of 6)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, C, bias=False)
    x, y = torch.randn(N, 4), torch.randint(0, C, (N,))
    trak_core.TRAK(model, normalize_features=True, progress=False, store=tmp_path / "s").featurize(None, [(x, y)])
    t, ty = torch.randn(6, 4), torch.randint(0, C, (6,))
    t[:2] *= 1e-42
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trak_core.TRAK.open(tmp_path / "s", model, [None]).score([(t, ty)])
    warned = [str(w.message) for w in caught if "subnormal" in str(w.message)]
    assert len(warned) == 1 and "2 of 6 target feature rows" in warned[0], warned


@pytest.mark.parametrize("width, proj_dim, scale", [(4, None, 1e-40), (2000, 32, 1e-40), (4, None, 1e-42),
                                                    (2000, 32, 1e-42), (4, None, 1e-44)])
def test_targets_with_subnormal_features_are_warned_of(width, proj_dim, scale):
    """Without normalization, a target whose features are subnormal has a column of scores tinier still, which
    float32 keeps a few bits of: 7e-3 and 2e-2 relative at 1e-40, 0.43 and all of it at 1e-42, all of it at 1e-44
    (its top-10 proponents 0 of the reference's), silently before. The training rows' own are harmless (above):
    a target's are its whole column. One warning names the 2 of 6 targets and an error at least their measured one
    and within 15x of it (1.4x to 13x stated); the other targets' scores stay float32-exact."""
    scores, expected, warned = _run(width, proj_dim, 1.0, target_scale=scale)
    measured = max(_relative(scores[:, j], expected[:, j]) for j in range(2))
    assert measured > 1e-3  # what the warning is for
    assert _relative(scores[:, 2:], expected[:, 2:]) < 2e-6
    assert len(warned) == 1, warned
    assert re.search(r"score: 2 of 6 targets have features or scores that are subnormal in torch\.float32", warned[0])
    stated = float(re.search(r"off by up to about (\S+) relative", warned[0]).group(1))
    assert measured <= stated <= min(1.0, 15 * measured), (measured, stated)
    assert "normalize_features=True" in warned[0]


def test_targets_of_normal_features_are_not_warned_of():
    """Targets at 1e-30 (float32 normal features, scores of about 1e-33: normal too) score float32-exactly: no
    warning."""
    scores, expected, warned = _run(4, None, 1.0, target_scale=1e-30)
    assert not warned
    assert _relative(scores, expected) < 2e-6
