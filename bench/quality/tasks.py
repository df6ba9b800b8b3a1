"""The LDS task suite: small problems built from bundled or generated data only.

Each task knows its data split, how to train a model on any subset (seeded), the model output
it attributes (margin for classification, prediction for regression), and how to hand the model
and checkpoints to trak-core. Training is full-batch gradient descent, so runs are repeatable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class Task:
    name: str
    x: np.ndarray
    y: np.ndarray
    xt: np.ndarray
    yt: np.ndarray
    train: Callable[[np.ndarray, np.ndarray, int], Any]  # (x, y, seed) -> checkpoint
    outputs: Callable[[Any, np.ndarray, np.ndarray], np.ndarray]  # (checkpoint, xt, yt) -> (n_targets,)
    model: Any
    backend: str
    task: str
    arrays: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]]
    description: str


def _split(x, y, n_train, n_targets, seed=0):
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return x[:n_train], y[:n_train], x[n_train:n_train + n_targets], y[n_train:n_train + n_targets]


def _torch_task(name, x, y, xt, yt, make, steps, lr, description):
    import torch

    from trak_core.tasks import Classification
    import array_api_compat.torch as txp

    def train(xs, ys, seed):
        torch.manual_seed(seed)
        model = make()
        xs_t, ys_t = torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs_t), ys_t).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    reference = make()

    def outputs(state, xs, ys):
        with torch.no_grad():
            logits = torch.func.functional_call(reference, state, (torch.as_tensor(xs, dtype=torch.float32),))
        return Classification().output(logits, torch.as_tensor(ys), xp=txp).numpy()

    def arrays(xs, ys):
        return torch.as_tensor(xs, dtype=torch.float32), torch.as_tensor(ys)

    return Task(name, x, y, xt, yt, train, outputs, reference, "torch", "classification", arrays, description)


def digits_mlp() -> Task:
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y, xt, yt = _split(d.data / 16.0, d.target.astype(np.int64), 1000, 100)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))  # noqa: E731
    return _torch_task("digits-mlp", x, y, xt, yt, make, 200, 0.1,
                       "MLP 64-64-10 (tanh, 4,810 params) on 1,000 sklearn digits, 100 targets")


def digits_cnn() -> Task:
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y, xt, yt = _split((d.data / 16.0).reshape(-1, 1, 8, 8), d.target.astype(np.int64), 1000, 100, seed=1)
    make = lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Tanh(), torch.nn.Flatten(),  # noqa: E731
                                       torch.nn.Linear(8 * 36, 10))
    return _torch_task("digits-cnn", x, y, xt, yt, make, 150, 0.1,
                       "CNN conv3x3(8)-tanh-linear (2,970 params) on 1,000 8x8 digits, 100 targets")


def breast_cancer_logreg() -> Task:
    from sklearn.datasets import load_breast_cancer

    import array_api_compat.numpy as nxp
    from trak_core import SoftmaxRegression
    from trak_core.tasks import Classification

    d = load_breast_cancer()
    xs = (d.data - d.data.mean(0)) / d.data.std(0)
    x, y, xt, yt = _split(xs, d.target.astype(np.int64), 400, 100)
    model = SoftmaxRegression(30, 2)

    def train(xs_, ys_, seed):
        theta = model.init(seed=seed)
        onehot = np.eye(2)[ys_]
        for _ in range(300):
            params = model.params(theta)
            logits = model.logits(params, xs_)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            theta = theta - 0.5 * (model.batch_grad(params, xs_, (p - onehot) / len(ys_)) + 1e-2 * theta)
        return theta

    def outputs(theta, xs_, ys_):
        return Classification().output(model.logits(model.params(theta), xs_), ys_, xp=nxp)

    return Task("breast-cancer-logreg", x, y, xt, yt, train, outputs, model, "numpy", "classification",
                lambda a, b: (a, b), "logistic regression (62 params) on 400 sklearn breast_cancer, 100 targets")


def synthetic_regression() -> Task:
    from trak_core import MLP

    rng = np.random.default_rng(7)
    xs = rng.normal(size=(300, 5))
    w = rng.normal(size=5)
    ys = np.tanh(xs @ w / 2) * 2 + 0.5 * rng.normal(size=300)  # noisy, so each training point matters
    x, y, xt, yt = xs[:100], ys[:100], xs[200:], ys[200:]
    model = MLP(5, 16, 1)

    def train(xs_, ys_, seed):
        theta = model.init(seed=seed)
        for _ in range(300):
            params = model.params(theta)
            residual = model.logits(params, xs_)[:, 0] - ys_
            theta = theta - 0.1 * (model.batch_grad(params, xs_, residual[:, None] / len(ys_)) + 1e-2 * theta)
        return theta

    def outputs(theta, xs_, ys_):
        return model.logits(model.params(theta), xs_)[:, 0]

    return Task("synthetic-regression", x, y, xt, yt, train, outputs, model, "numpy", "regression",
                lambda a, b: (a, b), "MLP 5-16-1 regression (113 params) on 100 generated noisy points, 100 targets")


def digits_mlp_1m() -> Task:
    """A speed task, not in the LDS suite: its 128 retrained models would take most of an hour on 2 cores."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y, xt, yt = _split(d.data / 16.0, d.target.astype(np.int64), 200, 100)

    def make():
        return torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                   torch.nn.ReLU(), torch.nn.Linear(1024, 10))

    return _torch_task("digits-mlp-1m", x, y, xt, yt, make, 100, 0.05,
                       "MLP 64-1024-1024-10 (ReLU, 1,126,410 params) on 200 sklearn digits, 100 targets")


TASKS = {"digits-mlp": digits_mlp, "digits-cnn": digits_cnn, "breast-cancer-logreg": breast_cancer_logreg,
         "synthetic-regression": synthetic_regression}
SPEED_TASKS = {"digits-mlp-1m": digits_mlp_1m}  # for bench/peers.py --task; no ground truth (LDS)
