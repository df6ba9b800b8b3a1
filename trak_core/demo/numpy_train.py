"""Training the demo's MLPs with the reference (NumPy) backend: full-batch gradient descent."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..models import MLP
from ..tasks import Classification


def train_mlp(model: MLP, x: np.ndarray, y: np.ndarray, *, seed: int, steps: int = 300,
              lr: float = 0.5, weight_decay: float = 1e-4) -> np.ndarray:
    """Full-batch gradient descent on the mean cross-entropy; returns the flat parameters."""
    theta = model.init(seed=seed)
    onehot = np.eye(model.n_outputs)[y]
    for _ in range(steps):
        params = model.params(theta)
        logits = model.logits(params, x)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        grad = model.batch_grad(params, x, (probs - onehot) / len(y))
        theta = theta - lr * (grad + weight_decay * theta)
    return theta


class NumpyRecipe:
    """The demo's model and training in NumPy (the ``"numpy"`` backend)."""

    backend = "numpy"

    def __init__(self, n_features: int, n_hidden: int, n_classes: int) -> None:
        self.model = MLP(n_features, n_hidden, n_classes)

    def train(self, x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
        return train_mlp(self.model, x, y, seed=seed)

    def logits(self, checkpoint: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self.model.logits(self.model.params(checkpoint), x)

    def margins(self, checkpoint: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        import array_api_compat.numpy as xp

        return Classification().output(self.logits(checkpoint, x), y, xp=xp)

    def arrays(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return x, y

    def to_numpy(self, array: Any) -> np.ndarray:
        return np.asarray(array)
