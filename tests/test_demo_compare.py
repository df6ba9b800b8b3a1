"""``trak-core compare``'s numbers, checked against TRAK written out here in NumPy float64.

The reference below shares nothing with the package but the projection matrices (checked bit for
bit by the conformance suite) and the digits: the margin gradients are written out by hand, the
kernel is solved with ``numpy.linalg.solve``, and ``lambda="auto"`` is the formula of
``docs/estimator.md``. The comparison runs at 1,000 training digits, where ``lambda_max / lambda`` is
about 136 at ``lambda="auto"`` and 13,800 at ``lambda = 1`` (compare's former default), as at compare's
full size (131 and 13,500).
"""
import numpy as np
import pytest

pytest.importorskip("sklearn", reason="compare uses scikit-learn's bundled digits")

from trak_core import compare  # noqa: E402
from trak_core.demo.data import load_digits_split  # noqa: E402
from trak_core.projection import projection_matrix  # noqa: E402

N_TRAIN, N_TARGETS, HIDDEN, CHECKPOINTS, K = 1000, 10, 64, 2, 1024
ARGS = ["--n-train", str(N_TRAIN), "--n-targets", str(N_TARGETS), "--hidden", str(HIDDEN),
        "--checkpoints", str(CHECKPOINTS), "--proj-dim", str(K)]


def _margin_gradients(ws, x, y):
    """Per-example gradients of the margin ``l_y - logsumexp_{j != y} l_j`` of ``tanh(x W1^T + b1) W2^T + b2``,
    in the canonical order (W1, b1, W2, b2, row-major), and ``Q = 1 - p_y``."""
    w1, b1, w2, b2 = ws
    hidden = np.tanh(x @ w1.T + b1)
    logits = hidden @ w2.T + b2
    others = np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits)
    others = np.exp(others - others.max(axis=1, keepdims=True))
    dlogits = np.eye(logits.shape[1])[y] - others / others.sum(axis=1, keepdims=True)
    dpre = (dlogits @ w2) * (1.0 - hidden**2)
    rows = np.arange(len(y))
    grads = np.concatenate([(dpre[:, :, None] * x[:, None, :]).reshape(len(y), -1), dpre,
                            (dlogits[:, :, None] * hidden[:, None, :]).reshape(len(y), -1), dlogits], axis=1)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return grads, 1.0 - probs[rows, y]


def _reference(lambda_reg):
    """TRAK's scores, per-checkpoint lambdas and largest ``lambda_max / lambda``, from the formulas."""
    x, y, xt, yt = load_digits_split(N_TRAIN, N_TARGETS, seed=0)
    weights = compare._weights(x, y, HIDDEN, CHECKPOINTS)  # the inputs (trained with the NumPy reference)
    products, weights_q, lambdas, ratios = [], [], [], []
    for c, ws in enumerate(weights):
        grads, q = _margin_gradients(ws, x, y)
        target_grads, _ = _margin_gradients(ws, xt, yt)
        p = grads.shape[1]
        projection = np.asarray(projection_matrix(p, K, seed=0, checkpoint=c, dtype=np.float64))
        phi, phi_t = grads @ projection, target_grads @ projection
        lam = np.trace(phi.T @ phi) / min(N_TRAIN, p, K) if lambda_reg == "auto" else lambda_reg
        kernel = phi.T @ phi
        products.append(phi @ np.linalg.solve(kernel + lam * np.eye(K), phi_t.T))
        weights_q.append(q)
        lambdas.append(lam)
        ratios.append(np.linalg.eigvalsh(kernel)[-1] / lam)
    scores = np.mean(products, axis=0) * np.mean(weights_q, axis=0)[:, None]
    return scores, lambdas, max(ratios)


def _error(scores, reference):
    return float(np.linalg.norm(scores - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def default_run():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = compare.main(ARGS)
    return rows, out.getvalue()


@pytest.fixture(scope="module")
def ridge_one_run():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = compare.main(ARGS + ["--lambda-reg", "1"])
    return rows, out.getvalue()


def test_the_default_run_is_within_tolerance_of_an_independent_reference(default_run):
    rows, out = default_run
    reference, lambdas, ratio = _reference("auto")
    table = "\n".join(out.splitlines()[:9])
    assert {row["backend"] for row in rows} >= {"numpy"} and len(rows) % 2 == 0
    failing = [f"{row['backend']} {row['dtype']}" for row in rows if not row["pass"]]
    assert not failing, f"{failing} outside tolerance at the defaults:\n{table}"
    for row in rows:
        error = _error(row["scores"], reference)
        if row["dtype"] == "float64":
            assert error <= 1e-9, (row["backend"], error)
            np.testing.assert_allclose(row["lambdas"], lambdas, rtol=1e-12)
        else:
            assert error <= 1e-4, (row["backend"], error)  # measured 6e-6 to 1.6e-5 (lambda_max / lambda = 136)
            np.testing.assert_allclose(row["lambdas"], lambdas, rtol=1e-5)
        assert row["kernel"] == row["dtype"]  # well conditioned: no float32 kernel is made again in float64
        # compare's own error (against its NumPy float64 run) is the independent one, to the reference's rounding
        assert abs(row["error"] - error) <= 1e-9 + 1e-6 * error, (row, error)
    assert ratio < 1000 and rows[0]["ratio"] == pytest.approx(ratio, rel=1e-9)
    assert "lambda = auto (" in out and "reference: numpy float64" in out
    assert f"lambda_max / lambda = {ratio:.3g} " in out


def test_an_ill_conditioned_ridge_is_shown_with_the_kernel_each_run_used(ridge_one_run):
    rows, out = ridge_one_run
    reference, _, ratio = _reference(1.0)
    assert ratio > 1000 and rows[0]["ratio"] == pytest.approx(ratio, rel=1e-9)
    assert "lambda = 1;" in out and f"lambda_max / lambda = {ratio:.3g} " in out
    for row in rows:
        error = _error(row["scores"], reference)
        independent = error <= 1e-9 if row["dtype"] == "float64" else error <= 1e-4
        assert row["pass"] == independent, (row["backend"], row["dtype"], error)  # compare's verdict is the truth
        if (row["backend"], row["dtype"]) == ("jax", "float32"):  # no float64 without x64: the kernel stays float32
            assert row["kernel"] == "float32" and error > 1e-4 and not row["pass"]  # measured 3.9e-4
            assert f"jax float32: its kernel is float32 (this row runs JAX without x64, as float32 users do: no " \
                   f"float64 kernel) at lambda_max / lambda = {ratio:.3g}" in out
            assert "jax_enable_x64." not in out  # the advice that did not work (the row turns x64 off)
        elif row["dtype"] == "float32":  # torch and NumPy make it again in float64 above 1000
            assert row["kernel"] == "float64" and error <= 1e-5 and row["pass"]
    assert ("NO" in out) == any(not row["pass"] for row in rows)


def test_agreement_and_passes_on_known_errors(rng):
    reference = rng.normal(size=(40, 3))
    direction = rng.normal(size=reference.shape)
    direction *= np.linalg.norm(reference) / np.linalg.norm(direction)
    for size in (1e-10, 5e-5, 2e-4):
        error, _ = compare.agreement(reference + size * direction, reference)
        assert error == pytest.approx(size, rel=1e-6)
    swapped = reference.copy()
    column = np.argsort(reference[:, 1])
    swapped[column[[0, 1]], 1] = swapped[column[[1, 0]], 1]  # one adjacent pair of ranks exchanged
    _, rho = compare.agreement(swapped, reference)
    assert rho == pytest.approx(1 - 6 * 2 / (40 * (40**2 - 1)), rel=1e-12)
    assert compare.passes("float64", 1e-9, 1.0) and not compare.passes("float64", 1.1e-9, 1.0)
    assert compare.passes("float32", 1e-4, 0.9999) and not compare.passes("float32", 1.1e-4, 1.0)
    assert not compare.passes("float32", 1e-6, 0.9998)
