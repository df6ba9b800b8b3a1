"""The canonical models every backend must agree on, their weights, and NumPy references.

One job: define the models of the conformance suite once, in the torch layout, and compute
their reference gradients without any framework.

Weights are lists of NumPy arrays in the canonical (torch ``named_parameters``) order:

- ``"softmax"``: ``[W (C, d), b (C,)]``, ``logits = x W^T + b``.
- ``"mlp"``: ``[W1 (H, d), b1 (H,), W2 (C, H), b2 (C,)]``, ``logits = tanh(x W1^T + b1) W2^T + b2``.
- ``"cnn"``: ``[K (F, 1, 3, 3), c (F,), W (C, F * 6 * 6), b (C,)]`` on inputs ``(n, 1, 8, 8)``:
  valid 3x3 convolution (cross-correlation, as torch), tanh, flatten (channel, row, column), linear.
"""
from __future__ import annotations

import numpy as np

from ..models import MLP, SoftmaxRegression
from ..errors import TrakValueError

KINDS = ("softmax", "mlp", "cnn")
SIZES = dict(d=8, hidden=6, classes=3, filters=2)


def weights(kind: str, seed: int, dtype: str = "float64") -> list[np.ndarray]:
    """Random canonical weights of model ``kind`` (scaled so margins vary across examples)."""
    rng = np.random.default_rng(seed)
    d, h, c, f = SIZES["d"], SIZES["hidden"], SIZES["classes"], SIZES["filters"]
    shapes = {"softmax": [(c, d), (c,)], "mlp": [(h, d), (h,), (c, h), (c,)],
              "cnn": [(f, 1, 3, 3), (f,), (c, f * 36), (c,)]}[kind]
    return [rng.normal(scale=0.7, size=s).astype(dtype) for s in shapes]


def inputs(kind: str, n: int, seed: int, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Random inputs for ``kind`` and integer labels in ``[0, classes)``."""
    rng = np.random.default_rng(seed)
    shape = (n, 1, 8, 8) if kind == "cnn" else (n, SIZES["d"])
    return rng.normal(size=shape).astype(dtype), rng.integers(0, SIZES["classes"], n)


def flat(ws: list[np.ndarray]) -> np.ndarray:
    """The flat parameter vector in canonical order."""
    return np.concatenate([w.ravel() for w in ws])


def analytic_model(kind: str, weights: list[np.ndarray] | None = None) -> SoftmaxRegression | MLP:
    """The reference backend's model for ``kind`` (softmax and mlp only), sized like ``weights``."""
    d, h, c = SIZES["d"], SIZES["hidden"], SIZES["classes"]
    if weights is not None:
        d, h, c = weights[0].shape[1], weights[0].shape[0], weights[-1].shape[0]
    if kind == "softmax":
        return SoftmaxRegression(d, c)
    if kind == "mlp":
        return MLP(d, h, c)
    raise TrakValueError(f"the analytic reference has no {kind!r} model")


def cnn_logits(ws: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Forward pass of the canonical CNN in NumPy."""
    kernel, bias, weight, out_bias = ws
    n = x.shape[0]
    conv = np.zeros((n, kernel.shape[0], 6, 6))
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nhw,f->nfhw", x[:, 0, i:i + 6, j:j + 6], kernel[:, 0, i, j])
    hidden = np.tanh(conv + bias[None, :, None, None]).reshape(n, -1)
    return hidden @ weight.T + out_bias


def margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logit_y - logsumexp_{j != y} logit_j`` per row."""
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    top = others.max(axis=1)
    return logits[rows, labels] - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def cnn_gradients(ws: list[np.ndarray], x: np.ndarray, y: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Per-example margin gradients of the CNN by central finite differences (float64)."""
    theta = flat(ws)
    shapes = [w.shape for w in ws]

    def unflatten(t: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for s in shapes:
            size = int(np.prod(s))
            out.append(t[start:start + size].reshape(s))
            start += size
        return out

    grads = np.empty((len(y), theta.size))
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = step
        up = margin(cnn_logits(unflatten(theta + e), x), y)
        down = margin(cnn_logits(unflatten(theta - e), x), y)
        grads[:, j] = (up - down) / (2 * step)
    return grads
