"""``kernel_dtype="float32"`` with ``lambda_reg=0``: the float32 minimum-norm solution is far off the float64
reference, and a warning must say so (it was said only where the namespace lacks float64)."""
import copy
import warnings

import numpy as np
import pytest

import trak_core

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
pytest.importorskip("sklearn", reason="scikit-learn is not installed: no digits")

N, M, K = 300, 10, 512  # n_train < k: the n-space (Gram) minimum-norm solution


def _problem():
    """A 64-32-10 tanh MLP trained briefly on digits, its float64 per-example margin gradients and out-to-loss
    weights (by a loop of autograd on a float64 copy)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:N + M] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[:N + M])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:N]), y[:N]).backward()
        optimizer.step()
    wide = copy.deepcopy(model).double()
    params = list(wide.parameters())
    grads, q = [], []
    for i in range(N + M):
        logits = wide(x[i:i + 1].double())[0]
        others = torch.cat([logits[:y[i]], logits[y[i] + 1:]])
        margin = logits[y[i]] - torch.logsumexp(others, 0)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, params)]).numpy())
        q.append(1 - float(torch.softmax(logits.detach(), 0)[y[i]]))
    return model, x, y, np.stack(grads), np.array(q)


def _reference(grads, q):
    """Minimum-norm TRAK scores in float64 through the SVD of the projected training gradients."""
    phi = grads @ trak_core.projection_matrix(grads.shape[1], K, dtype=np.float64)
    u, s, vt = np.linalg.svd(phi[:N], full_matrices=False)
    return (u / s) @ (vt @ phi[N:].T) * q[:N, None]


def _scores(model, x, y, kernel_dtype):
    trak = trak_core.TRAK(model, proj_dim=K, lambda_reg=0, kernel_dtype=kernel_dtype, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trak.featurize(model.state_dict(), [(x[:N], y[:N])])
        scores = trak.score([(x[N:], y[N:])]).numpy().astype(np.float64)
    return scores, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_float32_kernel_at_lambda_zero_warns_that_it_needs_float64():
    model, x, y, grads, q = _problem()
    expected = _reference(grads, q)
    error = {}
    for kernel_dtype in ("auto", "float32"):
        scores, messages = _scores(model, x, y, kernel_dtype)
        error[kernel_dtype] = np.linalg.norm(scores - expected) / np.linalg.norm(expected)
        warned = any("lambda_reg=0 needs a float64 kernel" in m and "kernel_dtype='auto' or 'float64'" in m
                     for m in messages)
        assert warned == (kernel_dtype == "float32"), messages
    assert error["auto"] < 1e-4  # the float64 kernel "auto" makes at lambda 0
    assert error["float32"] > 1e-2  # what the warning is about: the float32 minimum-norm solution
