"""Training the demo's MLPs in PyTorch on CPU: full-batch gradient descent, seeded."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..tasks import Classification


def make_mlp(n_features: int, n_hidden: int, n_classes: int, seed: int) -> torch.nn.Module:
    """``Linear -> Tanh -> Linear`` in float32, initialised from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_features, n_hidden), torch.nn.Tanh(),
                               torch.nn.Linear(n_hidden, n_classes))


class TorchRecipe:
    """The demo's model and training in PyTorch (the ``"torch"`` backend)."""

    backend = "torch"

    def __init__(self, n_features: int, n_hidden: int, n_classes: int, steps: int = 300, lr: float = 0.5) -> None:
        self.shape = (n_features, n_hidden, n_classes)
        self.model = make_mlp(*self.shape, seed=0)
        self.steps, self.lr = steps, lr
        torch.set_num_threads(max(1, torch.get_num_threads()))

    def train(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        model = make_mlp(*self.shape, seed=seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, weight_decay=1e-4)
        for _ in range(self.steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return {name: t.detach().clone() for name, t in model.state_dict().items()}

    def logits(self, checkpoint: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.func.functional_call(self.model, checkpoint, (x,))

    def margins(self, checkpoint: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        import array_api_compat.torch as xp

        return Classification().output(self.logits(checkpoint, x), y, xp=xp).numpy()

    def arrays(self, x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

    def to_numpy(self, array: Any) -> np.ndarray:
        return array.detach().cpu().numpy()
