"""lambda_reg="auto", the quality levers (options), and degenerate inputs."""
import logging

import numpy as np
import pytest

from trak_core import MLP, TRAK, SoftmaxRegression
from trak_core.regularization import AUTO_ALPHA, AUTO_RULE, choose_lambda

import array_api_compat.numpy as npx


def _problem(rng, n=60, d=5, c=3):
    return rng.normal(size=(n, d)), rng.integers(0, c, n), rng.normal(size=(4, d)), rng.integers(0, c, 4)


def test_auto_lambda_is_the_documented_rule_and_reported(rng, caplog):
    x, y, xt, yt = _problem(rng)
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=64, progress=False)
    assert trak.lambda_reg == "auto"
    with caplog.at_level(logging.INFO, logger="trak_core"):
        for c in range(2):
            trak.featurize(model.init(seed=c), [(x, y)])
    for entry, lam in zip(trak.store, trak.lambdas):
        phi = entry.features
        trace = np.trace(phi.T @ phi)
        scale = {"mean": trace / 64, "mean_rank": trace / min(60, model.n_params, 64)}[AUTO_RULE]
        assert lam == pytest.approx(AUTO_ALPHA * scale, rel=1e-12)
    assert "lambda=" in caplog.text and "(auto)" in caplog.text
    manual = TRAK(model, proj_dim=64, lambda_reg=trak.lambdas[0], progress=False)
    manual.featurize(model.init(seed=0), [(x, y)])
    np.testing.assert_allclose(manual.score([(xt, yt)]), trak.score([(xt, yt)], checkpoints=[0]), rtol=1e-10)


def test_refit_changes_lambda_without_refeaturizing(rng):
    x, y, xt, yt = _problem(rng)
    model = SoftmaxRegression(5, 3)
    trak = TRAK(model, proj_dim=32, lambda_reg=0.5, progress=False)
    trak.featurize(model.init(seed=0), [(x, y)])
    trak.refit(2.0)
    fresh = TRAK(model, proj_dim=32, lambda_reg=2.0, progress=False)
    fresh.featurize(model.init(seed=0), [(x, y)])
    assert trak.lambdas == [2.0]
    np.testing.assert_allclose(trak.score([(xt, yt)]), fresh.score([(xt, yt)]), rtol=1e-12)
    with pytest.raises(ValueError, match="'auto' or a number"):
        trak.refit("gcv")


def test_refit_over_several_kernel_chunks_is_bit_identical_and_entries_hold_no_kernel(rng):
    """The kernel is recomputed from the features on refit (not held): same bits as featurizing made."""
    from trak_core.store import KERNEL_CHUNK_ROWS

    n = 2 * KERNEL_CHUNK_ROWS + 808  # three chunks, batches not aligned to them
    x, y = rng.normal(size=(n, 5)), rng.integers(0, 3, n)
    xt, yt = rng.normal(size=(4, 5)), rng.integers(0, 3, 4)
    model = SoftmaxRegression(5, 3)
    batches = [(x[i:i + 1000], y[i:i + 1000]) for i in range(0, n, 1000)]
    trak = TRAK(model, proj_dim=16, lambda_reg=0.5, progress=False)
    trak.featurize(model.init(seed=0), batches)
    entry = trak.store[0]
    held = [v for v in vars(entry).values() if isinstance(v, np.ndarray)]
    assert not any(a.shape == (16, 16) for a in held)  # features and out-to-loss only; the factor is separate
    phi = entry.features
    np.testing.assert_allclose(entry.kernel, phi.T @ phi, rtol=1e-12)  # against a one-shot product
    trak.refit(3.0)
    fresh = TRAK(model, proj_dim=16, lambda_reg=3.0, progress=False)
    fresh.featurize(model.init(seed=0), batches)
    np.testing.assert_array_equal(trak.store[0].factor.arrays[0], fresh.store[0].factor.arrays[0])
    np.testing.assert_array_equal(trak.score([(xt, yt)]), fresh.score([(xt, yt)]))


def test_choose_lambda_rules():
    kernel = np.diag([4.0, 2.0, 0.0, 0.0])
    assert choose_lambda(kernel, 10, n_params=100, xp=npx, alpha=1.0, rule="mean") == pytest.approx(1.5)
    assert choose_lambda(kernel, 2, n_params=100, xp=npx, alpha=1.0, rule="mean_rank") == pytest.approx(3.0)
    assert choose_lambda(kernel, 10, n_params=100, xp=npx, alpha=1.0, rule="top_weighted") == pytest.approx(20 / 6)
    with pytest.raises(ValueError, match="unknown lambda rule"):
        choose_lambda(kernel, 2, n_params=3, xp=npx, rule="magic")


def test_soft_threshold_closed_form(rng):
    x, y, xt, yt = _problem(rng, n=11)
    model = SoftmaxRegression(5, 3)
    plain = TRAK(model, proj_dim=16, lambda_reg=0.1, progress=False)
    shrunk = TRAK(model, proj_dim=16, lambda_reg=0.1, soft_threshold=0.5, progress=False)
    for trak in (plain, shrunk):
        trak.featurize(model.init(seed=0), [(x, y)])
    a, b = plain.score([(xt, yt)]), shrunk.score([(xt, yt)])
    threshold = np.median(np.abs(a), axis=0)  # 11 rows: the 0.5 quantile is the 6th magnitude
    np.testing.assert_allclose(b, np.sign(a) * np.maximum(np.abs(a) - threshold, 0), rtol=1e-12)
    assert np.sum(b == 0) >= 6 * 4 - 4
    with pytest.raises(ValueError, match="quantile"):
        TRAK(model, soft_threshold=1.5)


def test_unit_normalized_features_and_normalized_weighting(rng):
    x, y, xt, yt = _problem(rng)
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, lambda_reg=0.1, normalize_features=True, progress=False)
    trak.featurize(model.init(seed=0), [(x, y)])
    np.testing.assert_allclose(np.linalg.norm(trak.store[0].features, axis=1), 1.0, rtol=1e-12)
    uniform = TRAK(model, proj_dim=32, lambda_reg=0.1, progress=False)
    weighted = TRAK(model, proj_dim=32, lambda_reg=0.1, checkpoint_weighting="normalized", progress=False)
    for trak in (uniform, weighted):
        for c in range(2):
            trak.featurize(model.init(seed=c), [(x, y)])
    per = [uniform.score([(xt, yt)], checkpoints=[c])
           / np.mean([e.out_to_loss for e in uniform.store[c:c + 1]], 0)[:, None] for c in range(2)]
    q = np.mean([e.out_to_loss for e in uniform.store], axis=0)
    expected = sum(s / np.linalg.norm(s, axis=0) for s in per) / 2 * q[:, None]
    np.testing.assert_allclose(weighted.score([(xt, yt)]), expected, rtol=1e-10)


def test_single_training_example(rng):
    x, y, xt, yt = _problem(rng, n=1)
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=64, progress=False)
    trak.featurize(model.init(seed=0), [(x, y)])
    scores = trak.score([(xt, yt)])
    assert scores.shape == (1, 4) and np.all(np.isfinite(scores))
    # one example: K = phi phi^T + lambda I, so the score is phi.phi_t / (|phi|^2 + lambda) * Q
    phi = trak.store[0].features[0]
    target = trak.features([(xt, yt)], checkpoint=0)
    expected = (target @ phi) / (phi @ phi + trak.lambdas[0]) * trak.store[0].out_to_loss[0]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-10)


def test_all_zero_gradients_with_auto_lambda_is_a_clear_error(rng):
    from tests_helpers import ZeroGradients

    x, y, _, _ = _problem(rng)
    model = SoftmaxRegression(5, 3)
    trak = TRAK(model, proj_dim=16, backend=ZeroGradients(), progress=False)
    with pytest.raises(ValueError, match="all-zero gradients"):
        trak.featurize(model.init(seed=0), [(x, y)])


def test_projection_wider_than_parameters(rng):
    # k = 256 > p = 18: the projection cannot add information, K has rank <= 18; auto lambda copes
    x, y, xt, yt = _problem(rng)
    model = SoftmaxRegression(5, 3)
    trak = TRAK(model, proj_dim=256, progress=False)
    trak.featurize(model.init(seed=0), [(x, y)])
    exact = TRAK(model, proj_dim=None, lambda_reg=trak.lambdas[0], progress=False)
    exact.featurize(model.init(seed=0), [(x, y)])
    scores = trak.score([(xt, yt)])
    assert np.all(np.isfinite(scores))
    from scipy.stats import spearmanr

    assert min(spearmanr(scores[:, j], exact.score([(xt, yt)])[:, j])[0] for j in range(4)) > 0.9


def test_rank_deficiency_warning_names_the_cause_in_either_space(rng):
    # k = 16 > p = 13 with n = 150 >= k (k-space): the kernel has rank p; with n = 10 < k (n-space), two equal rows
    x = rng.normal(size=(150, 12))
    model = SoftmaxRegression(12, 1)
    trak = TRAK(model, task="regression", proj_dim=16, lambda_reg=0, progress=False)
    with pytest.warns(RuntimeWarning, match=r"rank 13 < k = 16: k exceeds the number of parameters") as record:
        trak.featurize(model.init(seed=0), [(x, x[:, 0])])
    assert "n_train" not in str(record[0].message)  # here n_train = 150 > k is not the cause
    assert int(np.linalg.matrix_rank(trak.store[0].features)) == 13  # independent: the features' own rank
    few = np.r_[x[:9], x[:1]]
    trak = TRAK(model, task="regression", proj_dim=16, lambda_reg=0, progress=False)
    with pytest.warns(RuntimeWarning, match=r"rank 9 < n_train = 10: some training features are linearly dependent"):
        trak.featurize(model.init(seed=0), [(few, few[:, 0])])


def test_an_interrupted_refit_is_refused_by_score_until_it_is_run_again(rng, monkeypatch):
    """Ctrl-C inside ``refit`` (a factorization per checkpoint) left checkpoint 0 at the new lambda and the others at
    the old one, and ``score`` ensembled that mix, unsaid (55% off the scores of either lambda)."""
    x, y, xt, yt = _problem(rng)
    model = MLP(5, 4, 3)
    trak, reference = TRAK(model, proj_dim=16, progress=False), TRAK(model, proj_dim=16, progress=False)
    for estimator in (trak, reference):
        for c in range(3):
            estimator.featurize(model.init(seed=c), [(x, y)])
    reference.refit(0.05)
    real, calls = TRAK._factor_of, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # checkpoint 1 of 3
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TRAK, "_factor_of", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trak.refit(0.05)
    monkeypatch.setattr(TRAK, "_factor_of", real)
    for call in (lambda: trak.score([(xt, yt)]), trak.self_influence):
        with pytest.raises(ValueError, match=r"refit\(0.05\) did not finish.*call refit\(0.05\) again"):
            call()
    assert trak.features([(xt, yt)], checkpoint=0).shape == (4, 16)  # features do not depend on lambda
    trak.refit(0.05)
    assert np.array_equal(trak.score([(xt, yt)]), reference.score([(xt, yt)]))
