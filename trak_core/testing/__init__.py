"""The conformance suite: proves a backend gives the reference projection, gradients and scores.

Use it from a backend's tests with one import and one fixture::

    # test_conformance.py
    import pytest
    from trak_core.testing import *          # noqa: F401,F403  (collects the test_conformance_* tests)
    from trak_core.testing.cases import BackendCase

    class MyCase(BackendCase):               # how to build the canonical models in my framework
        id, backend, kinds = "myfw:cpu", "myfw", ("softmax", "mlp")
        def model(self, kind, weights): ...  # -> (model, checkpoint) holding `weights` (torch layout)
        def array(self, value): ...          # NumPy -> my array on my device

    @pytest.fixture
    def conformance_case():
        return MyCase()

What is checked, against the NumPy reference backend and closed forms:

- the contract: a ``trak_core.Backend`` whose ``owns`` answers a bool (``False`` for objects it does not
  know) and a name of its own, with a content hash that tells checkpoints apart (when it has one), a
  consistent parameter structure (its ``repr`` too, which an on-disk store hashes) and a model identity equal
  for two models of one architecture; the caller's checkpoint, inputs, labels and gradients left as they were;
- projection matrices bit-identical (Rademacher) or within 4 ulp (Gaussian) of the NumPy ones,
  and a backend's own projection equal to ``trak_core.project`` to float rounding, at widths and row
  counts off any tile size (``k`` of 1, 33, 100, 257);
- a fused ``features`` step (where there is one) equal to the reference gradients times the reference
  projection for each kind, seed and checkpoint, and at ``precision="fast"`` within ``1e-3``;
- per-example gradients of the canonical models (``trak_core.testing.canonical``) within dtype
  tolerance of the analytic reference (softmax, MLP) or of float64 finite differences (CNN, and
  the causal transformer LM on padded dict batches with ignored labels), in the case's dtype and in
  float32; and of a custom task (``trak_core.CustomTask``) with its out-to-loss weights; row by row in a
  batch of 150 rows (past any chunk of 32, 64 or 128), with fused features where there are;
- scores of 1 and 3 checkpoints (of the canonical MLP, or of softmax regression for a backend
  that builds only that): float64 ``rtol 1e-9``; float32 relative Frobenius error
  ``<= 1e-4`` and per-target Spearman ``>= 0.9999``;
- scores of the LM (``task="language_modeling"``, dict batches) against another framework's in
  float64 (JAX's for torch, torch's for the others): float64 ``rtol 1e-9``, float32 relative
  Frobenius error ``<= 1e-4``;
- results in the caller's namespace, dtype and device.

The tests live in ``trak_core.testing.suite`` and are loaded on first access, so importing
this package (or ``trak_core.testing.cases``, ``trak_core.testing.canonical``) needs no pytest.
"""
from __future__ import annotations

from typing import Any

__all__ = ["test_conformance_contract", "test_conformance_projection_matrix", "test_conformance_backend_projection",
           "test_conformance_gradients", "test_conformance_scores", "test_conformance_lm_scores",
           "test_conformance_kronecker_features", "test_conformance_kronecker_lm_scores", "test_conformance_features",
           "test_conformance_custom_task", "test_conformance_projection_widths", "test_conformance_leaves_inputs_alone",
           "test_conformance_prepare_snapshots", "test_conformance_many_rows", "conformance_active"]


def __getattr__(name: str) -> Any:
    """The suite's tests and fixture, imported (with pytest) on first access."""
    if name in __all__:
        import sys

        if "trak_core.testing.suite" not in sys.modules:  # pytest's assertion messages (values) in its asserts
            import pytest

            pytest.register_assert_rewrite("trak_core.testing.suite", "trak_core.testing.suite_inputs")
        from . import suite

        return getattr(suite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
