"""End-to-end demo on scikit-learn's bundled ``digits`` (no download): ``python -m trak_core.demo``.

Trains a small ensemble of MLPs with the reference (NumPy) backend, attributes test digits to
training digits with TRAK, and prints what it found and how long each step took.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from . import MLP, TRAK


def load_digits_split(n_train: int, n_targets: int, seed: int) -> tuple[np.ndarray, ...]:
    """Digits scaled to [0, 1], shuffled with ``seed``, split into train and targets."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit('the demo needs scikit-learn for its bundled digits: pip install "trak-core[demo]"') from None
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = data.data[order] / 16.0, data.target[order].astype(np.int64)
    if n_train + n_targets > len(y):
        raise SystemExit(f"--n-train + --n-targets must be at most {len(y)}")
    return x[:n_train], y[:n_train], x[n_train:n_train + n_targets], y[n_train:n_train + n_targets]


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


def accuracy(model: MLP, theta: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of correctly classified examples."""
    return float(np.mean(np.argmax(model.logits(model.params(theta), x), axis=1) == y))


def batched(x: np.ndarray, y: np.ndarray, size: int) -> list[tuple[Any, Any]]:
    """``(inputs, labels)`` batches of ``size`` rows."""
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the figures it printed (for tests)."""
    parser = argparse.ArgumentParser(prog="python -m trak_core.demo", description=__doc__)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-targets", type=int, default=100)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--lambda-reg", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x, y, xt, yt = load_digits_split(args.n_train, args.n_targets, args.seed)
    model = MLP(x.shape[1], args.hidden, 10)
    timings = {}
    start = time.perf_counter()
    checkpoints = [train_mlp(model, x, y, seed=args.seed + c) for c in range(args.checkpoints)]
    timings["train"] = time.perf_counter() - start
    acc = np.mean([accuracy(model, theta, xt, yt) for theta in checkpoints])

    trak = TRAK(model, proj_dim=args.proj_dim, lambda_reg=args.lambda_reg, seed=args.seed)
    start = time.perf_counter()
    for theta in checkpoints:
        trak.featurize(theta, batched(x, y, 250))
    timings["featurize"] = time.perf_counter() - start
    start = time.perf_counter()
    scores = trak.score(batched(xt, yt, 100))
    timings["score"] = time.perf_counter() - start

    top = np.argmax(scores, axis=0)
    bottom = np.argmin(scores, axis=0)
    same_label_top = float(np.mean(y[top] == yt))
    same_label_bottom = float(np.mean(y[bottom] == yt))
    print(f"digits: {args.n_train} train, {args.n_targets} targets; MLP 64-{args.hidden}-10 "
          f"({model.n_params} parameters), {args.checkpoints} checkpoints, test accuracy {acc:.3f}")
    print(f"scores: {scores.shape[0]} x {scores.shape[1]}, k = {args.proj_dim}, lambda = {args.lambda_reg}")
    print(f"top proponent has the target's label:  {same_label_top:.2f}")
    print(f"top opponent has the target's label:   {same_label_bottom:.2f}")
    print("seconds: " + ", ".join(f"{step} {sec:.2f}" for step, sec in timings.items()))
    for j in range(min(5, args.n_targets)):
        print(f"  target {j} (label {yt[j]}): top proponents {np.argsort(-scores[:, j])[:3].tolist()} "
              f"labels {y[np.argsort(-scores[:, j])[:3]].tolist()}")
    return {"scores": scores, "same_label_top": same_label_top, "same_label_bottom": same_label_bottom,
            "accuracy": acc, "timings": timings}


if __name__ == "__main__":
    main()
