"""The demo's data: scikit-learn's bundled ``digits`` (8x8 images, no download)."""
from __future__ import annotations

import numpy as np

from ..errors import install_hint

#: images in scikit-learn's ``load_digits`` (the commands check their sizes against it before loading)
N_DIGITS = 1797


def load_digits_split(n_train: int, n_targets: int, seed: int, *, who: str = "the demo") -> tuple[np.ndarray, ...]:
    """Digits scaled to [0, 1], shuffled with ``seed``, split into training set and targets; ``who`` (the command,
    ``trak-core compare``) is named where scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(f"{who} needs scikit-learn for its bundled digits: "
                         + install_hint("demo", "scikit-learn")) from None
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = data.data[order] / 16.0, data.target[order].astype(np.int64)
    if n_train + n_targets > len(y):
        raise SystemExit(f"--n-train + --n-targets must be at most {len(y)}")
    return x[:n_train], y[:n_train], x[n_train:n_train + n_targets], y[n_train:n_train + n_targets]
