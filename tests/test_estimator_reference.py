"""Projected scores of float32 models on every framework backend against docs/estimator.md in float64.

The reference is written from the docs alone: margin gradients by autograd one example at a time (float64),
the projection matrix of ``trak_core.projection_matrix`` (its documented contract), ``Q = 1 - p_y``,
``K_c = Phi_c^T Phi_c + lambda_c I`` with ``lambda_c = tr(Phi_c^T Phi_c) / min(n, p, k)`` for ``"auto"``, and
``tau = mean_c(Phi_c K_c^{-1} phi_c(z')^T) * mean_c(Q_c)``. ``k = 16 < n`` is solved in k-space, ``k = 64 > n`` in
n-space. Measured: 2.3e-7 to 3.1e-7 relative at the automatic ridge, 3.4e-7 to 1e-6 at ``lambda_reg=10``
(``lambda_max / lambda`` up to 55, where docs/estimator.md bounds the float32 kernel's error by 1e-7 times it).
"""
import numpy as np
import pytest

import trak_core

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the autograd reference is not available")

D, H, C, N, M = 5, 6, 3, 40, 7
TOLERANCE = 5e-6  # relative to the largest score: float32 features and kernels


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, C, size=n)


def _weights(seed):
    """``[(W1, b1), (W2, b2)]`` of a tanh MLP in float32, torch's layout (``W`` is ``(out, in)``)."""
    rng = np.random.default_rng(100 + seed)
    return [(rng.normal(size=(H, D)).astype(np.float32) / 2, rng.normal(size=H).astype(np.float32) / 4),
            (rng.normal(size=(C, H)).astype(np.float32), rng.normal(size=C).astype(np.float32) / 4)]


def _module(weights, dtype):
    module = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).to(dtype)
    with torch.no_grad():
        for layer, (w, b) in zip((module[0], module[2]), weights):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.copy_(torch.tensor(b))
    return module


def _gradients(weights, x, y):
    """Margin gradients ``(n, p)`` and ``Q = 1 - p_y``, one example at a time, in float64."""
    module = _module(weights, torch.float64)
    params = list(module.parameters())
    rows, q = [], []
    for xi, yi in zip(torch.tensor(x, dtype=torch.float64), y.tolist()):
        logits = module(xi[None])[0]
        margin = logits[yi] - torch.logsumexp(torch.cat([logits[:yi], logits[yi + 1:]]), 0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, params)]).numpy())
        q.append(1.0 - torch.softmax(logits, 0)[yi].item())
    return np.array(rows), np.array(q)


def _reference(weights, train, targets, k, lam, checkpoints, *, self_influence=False):
    """docs/estimator.md's ``tau`` (or its diagonal with the training set as targets) in float64, and each
    checkpoint's ``lambda``."""
    solved, weights_q, ridges = [], [], []
    for c in checkpoints:
        g, q = _gradients(weights[c], *train)
        projection = np.asarray(trak_core.projection_matrix(g.shape[1], k, seed=0, checkpoint=c), np.float64)
        phi, phi_t = g @ projection, _gradients(weights[c], *targets)[0] @ projection
        gram = phi.T @ phi
        ridge = np.trace(gram) / min(phi.shape[0], g.shape[1], k) if lam == "auto" else lam
        scores = phi @ np.linalg.solve(gram + ridge * np.eye(k), phi_t.T)
        ridges.append(ridge)
        solved.append(np.diag(scores) if self_influence else scores)
        weights_q.append(q)
    q = np.mean(weights_q, axis=0)
    return np.mean(solved, axis=0) * (q if self_influence else q[:, None]), ridges


def _setup(backend, weights):
    """The model, each checkpoint and a batch maker for ``backend``, all with the same float32 weights."""
    if backend == "numpy":
        names = ["hidden.weight", "hidden.bias", "output.weight", "output.bias"]
        return (trak_core.MLP(D, H, C), [dict(zip(names, [a for pair in w for a in pair])) for w in weights],
                lambda x, y: (x, y))
    if backend == "torch":
        return (_module(weights[0], torch.float32), [_module(w, torch.float32).state_dict() for w in weights],
                lambda x, y: (torch.tensor(x), torch.tensor(y)))
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed: the jax backend is not exercised")
    from trak_jax import JaxModel

    def apply(params, inputs):
        (w1, b1), (w2, b2) = params
        return jnp.tanh(inputs @ w1.T + b1) @ w2.T + b2

    return (JaxModel(apply), [[(jnp.asarray(w), jnp.asarray(b)) for w, b in pairs] for pairs in weights],
            lambda x, y: (jnp.asarray(x), jnp.asarray(y)))


def _batches(make, x, y, size):
    return [make(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _relative(scores, reference):
    scores = np.asarray(scores.detach() if hasattr(scores, "detach") else scores, np.float64)
    return np.abs(scores - reference).max() / np.abs(reference).max()


@pytest.fixture(scope="module")
def problem():
    return _data(N, 0), _data(M, 1), [_weights(seed) for seed in range(3)]


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("k", [16, 64])
@pytest.mark.parametrize("lam", ["auto", 10.0])
def test_scores_equal_the_float64_reference(backend, k, lam, problem):
    train, targets, weights = problem
    model, checkpoints, make = _setup(backend, weights)
    trak = trak_core.TRAK(model, proj_dim=k, lambda_reg=lam, backend=backend, progress=False)
    for checkpoint in checkpoints:
        trak.featurize(checkpoint, _batches(make, *train, 16))
    target_batches = _batches(make, *targets, 3)
    reference, ridges = _reference(weights, train, targets, k, lam, [0, 1, 2])
    assert _relative(trak.score(target_batches), reference) < TOLERANCE
    np.testing.assert_allclose(trak.lambdas, ridges, rtol=1e-6)
    subset = trak.score(target_batches, checkpoints=[2, 0])
    assert _relative(subset, _reference(weights, train, targets, k, lam, [0, 2])[0]) < TOLERANCE
    diagonal = _reference(weights, train, train, k, lam, [0, 1, 2], self_influence=True)[0]
    assert _relative(trak.self_influence(), diagonal) < TOLERANCE


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_stored_and_reopened_scores_equal_the_float64_reference(backend, problem, tmp_path):
    train, targets, weights = problem
    model, checkpoints, make = _setup(backend, weights)
    trak = trak_core.TRAK(model, proj_dim=64, backend=backend, progress=False, store=tmp_path / "store")
    for checkpoint in checkpoints:
        trak.featurize(checkpoint, _batches(make, *train, 16))
    target_batches = _batches(make, *targets, 3)
    reference = _reference(weights, train, targets, 64, "auto", [0, 1, 2])[0]
    scores = trak.score(target_batches, save_as="targets")
    assert _relative(scores, reference) < TOLERANCE
    opened = trak_core.TRAK.open(tmp_path / "store", model, {0: checkpoints[0], 2: checkpoints[2]}, progress=False)
    assert _relative(opened.load_scores("targets"), reference) < TOLERANCE
    subset = _reference(weights, train, targets, 64, "auto", [0, 2])[0]
    assert _relative(opened.score(target_batches), subset) < TOLERANCE
