"""The demo's picture: test digits beside their top proponent and top opponent training digits."""
from __future__ import annotations

import numpy as np


def save_proponents(path: str, scores: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
                    x_targets: np.ndarray, y_targets: np.ndarray, n_show: int = 5) -> str:
    """Save a PNG grid (one row per target: target, top proponent, top opponent); returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_show = min(n_show, scores.shape[1])
    fig, axes = plt.subplots(n_show, 3, figsize=(4.8, 1.7 * n_show))
    axes = np.atleast_2d(axes)
    for row in range(n_show):
        top, bottom = int(np.argmax(scores[:, row])), int(np.argmin(scores[:, row]))
        panels = [(x_targets[row], f"target: {y_targets[row]}"),
                  (x_train[top], f"proponent: {y_train[top]}\nscore {scores[top, row]:.3g}"),
                  (x_train[bottom], f"opponent: {y_train[bottom]}\nscore {scores[bottom, row]:.3g}")]
        for ax, (image, title) in zip(axes[row], panels):
            ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
