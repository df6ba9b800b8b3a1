"""What the pytest-benchmark suite shares: backend targets, sizes, and device synchronization.

One job: give every ``bench_*.py`` case the same view of a ``backend:device`` id (its arrays,
its canonical MLP, and how to wait for its device), and the size grids of ``--quick`` and full runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from trak_core.testing.cases import FIRST_PARTY, unavailable

# Backend ids the harness times (array-api-strict and the x64 variant are correctness cases only).
BENCH_IDS = ("numpy", "torch:cpu", "jax:cpu", "torch:cuda", "jax:gpu", "cupy")

# Input width and classes of the canonical MLP (64 features, like sklearn digits; 10 classes).
IN_FEATURES, CLASSES = 64, 10

SIZES: dict[str, dict[str, list]] = {
    # CI: one small size per case, under 2 minutes in all on 2 CPU cores.
    "quick": {
        "projection": [(4096, 512)],           # (p, k), 64 gradient rows
        "gradients": [32],                      # MLP hidden width (p = 75 h + 10), 256 rows
        "featurize": [(32, 512)],               # (hidden, k), 512 examples
        "kernel": [512],                        # k
        "scoring": [(4096, 512)],               # (n_train, k), 64 targets
    },
    # Growth with p, k and n_train, up to what a 2-core, 24 GiB machine does in ~20 minutes.
    "full": {
        "projection": [(p, k) for p in (2**12, 2**15, 2**18) for k in (512, 2048, 8192)] + [(2**20, 2048)],
        "gradients": [32, 128, 512, 2048],
        "featurize": [(h, 2048) for h in (32, 128, 512, 2048)] + [(128, k) for k in (512, 8192)],
        "kernel": [512, 2048, 8192],
        "scoring": [(n, k) for n in (10_000, 100_000) for k in (512, 2048)],
    },
}
PROJECTION_ROWS, GRADIENT_ROWS, FEATURIZE_ROWS, FEATURIZE_BATCH, SCORING_TARGETS = 64, 256, 1024, 128, 64
BASELINE_MAX_BYTES = 2 * 2**30  # the materialized-matrix baseline is skipped above this


def mlp_params(hidden: int) -> int:
    """Parameter count of the canonical MLP ``64 -> hidden -> 10``."""
    return (IN_FEATURES + 1) * hidden + (hidden + 1) * CLASSES


def mlp_weights(hidden: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(hidden, IN_FEATURES), (hidden,), (CLASSES, hidden), (CLASSES,)]
    return [rng.normal(scale=1 / np.sqrt(s[-1]), size=s).astype(np.float32) for s in shapes]


@dataclass
class Target:
    """One ``backend:device`` id ready to time."""

    id: str
    case: Any

    @property
    def backend(self) -> Any:
        import trak_core

        return trak_core.get_backend(self.case.backend)

    def array(self, value: np.ndarray) -> Any:
        return self.case.array(np.asarray(value))

    def mlp(self, hidden: int, seed: int = 0) -> tuple[Any, Any]:
        """``(model, checkpoint)`` of the canonical MLP in this backend's framework."""
        return self.case.model("mlp", mlp_weights(hidden, seed))

    def sync(self, value: Any) -> Any:
        """Wait until ``value`` (any pytree of arrays) is computed on the device."""
        if self.id.startswith("jax"):
            import jax

            jax.block_until_ready(value)
        elif self.id == "torch:cuda":
            import torch

            torch.cuda.synchronize()
        elif self.id == "cupy":
            import cupy

            cupy.cuda.Device().synchronize()
        return value

    def timed(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` followed by a device synchronization, so timings cover the whole computation."""
        return lambda: self.sync(fn())


def target(case_id: str) -> Target:
    """The :class:`Target` for ``case_id``; raises ``LookupError`` naming why it cannot run here."""
    reason = unavailable(case_id)
    if reason is not None:
        raise LookupError(reason)
    return Target(case_id, FIRST_PARTY[case_id][2]())
