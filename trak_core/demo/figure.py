"""The demo's picture: a grid of test digits, each beside its top proponent and top opponent training digits."""
from __future__ import annotations

import numpy as np


def panels(scores: np.ndarray, y_train: np.ndarray, y_targets: np.ndarray, predicted: np.ndarray,
           n_show: int = 12) -> list[dict]:
    """What the figure shows for the first ``n_show`` targets: indices and titles of the three panels."""
    out = []
    for j in range(min(n_show, scores.shape[1])):
        top, bottom = int(np.argmax(scores[:, j])), int(np.argmin(scores[:, j]))
        out.append(dict(target=j, proponent=top, opponent=bottom, titles=(
            f"test #{j}\ntrue {y_targets[j]}, predicted {predicted[j]}",
            f"top proponent\nlabel {y_train[top]}, score {scores[top, j]:.2g}",
            f"top opponent\nlabel {y_train[bottom]}, score {scores[bottom, j]:.2g}")))
    return out


def save_proponents(path: str, scores: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
                    x_targets: np.ndarray, y_targets: np.ndarray, predicted: np.ndarray, n_show: int = 12,
                    per_row: int = 3) -> str:
    """Save a PNG grid: ``per_row`` (test digit, top proponent, top opponent) triples a row; returns ``path``.

    Each test digit is titled with its true and predicted class (the ensemble's argmax), each training
    digit with its label and score.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = panels(scores, y_train, y_targets, predicted, n_show)
    rows = -(-len(shown) // per_row)
    fig, axes = plt.subplots(rows, 3 * per_row, figsize=(2.0 * 3 * per_row, 2.1 * rows))
    axes = np.atleast_2d(axes)
    for ax in axes.ravel():
        ax.axis("off")
    for i, panel in enumerate(shown):
        row, group = divmod(i, per_row)
        images = (x_targets[panel["target"]], x_train[panel["proponent"]], x_train[panel["opponent"]])
        for offset, (image, title) in enumerate(zip(images, panel["titles"])):
            ax = axes[row, 3 * group + offset]
            ax.imshow(np.asarray(image).reshape(8, 8), cmap="gray_r" if offset else "Blues", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
    fig.suptitle("Test digits (blue), with the training digits that most support (proponent) and most oppose "
                 "(opponent) the model's margin for their true label", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
