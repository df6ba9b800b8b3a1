"""Counterfactual ground truth for LDS: models retrained on random halves, cached on disk."""
from __future__ import annotations

import hashlib
import pathlib
import sys

import numpy as np

from trak_core import subset_masks

CACHE = pathlib.Path(__file__).resolve().parent / "cache"


def _key(task, n_subsets: int, seed: int) -> str:
    """The cache file's name: the task's name, inputs, labels and training recipe (the code of ``train`` and
    ``outputs`` and the values they capture: steps, learning rate, the model's constructor). The key held only the
    inputs, so a task with other labels or another recipe read the old outputs (off by up to 57 in an audit)."""
    from trak_core._task_identity import callable_digest

    digest = hashlib.sha256()
    for array in (task.x, task.y, task.xt, task.yt):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(f"{callable_digest(task.train)} {callable_digest(task.outputs)}".encode())
    return f"{task.name}-S{n_subsets}-seed{seed}-{digest.hexdigest()[:10]}"


def ground_truth(task, n_subsets: int = 128, seed: int = 0, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """``(masks (S, n_train), outputs (S, n_targets))``; computed once, then read from ``cache/``."""
    path = CACHE / f"{_key(task, n_subsets, seed)}.npz"
    if path.exists():
        data = np.load(path)
        return data["masks"], data["outputs"]
    masks = subset_masks(len(task.y), n_subsets, fraction=0.5, seed=seed)
    outputs = np.empty((n_subsets, len(task.yt)))
    if progress is None:  # bench/peers.py's first run was a silent minute before anything was measured
        print(f"{task.name}: retraining {n_subsets} models on random halves for the LDS ground truth (once: cached in "
              f"{path})", file=sys.stderr, flush=True)
    steps = range(n_subsets) if progress is None else progress(range(n_subsets), desc=f"{task.name}: retrain")
    for s in steps:
        index = np.flatnonzero(masks[s])
        x, y = task.arrays(task.x[index], task.y[index])
        xt, yt = task.arrays(task.xt, task.yt)
        outputs[s] = task.outputs(task.train(x, y, 100_000 + s), xt, yt)
    CACHE.mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, masks=masks, outputs=outputs)
    tmp.replace(path)
    return masks, outputs
