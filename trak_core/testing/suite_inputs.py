"""Conformance tests of what a backend is given: any task, any projection width, and inputs left as they were.

One job: the checks that a backend which hard-codes what the canonical tests happen to use fails: the task
(classification there; a custom task here), the projection's width and row count (one shape there; several
here, across tile edges), and the caller's arrays (a backend that writes into the user's checkpoint, inputs or
gradients passed the others). Collected with the rest through ``from trak_core.testing import *``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from ..backends import get_backend
from ..projection import project
from ..tasks import CustomTask, _one_hot

__all__ = ["test_conformance_custom_task", "test_conformance_projection_widths", "test_conformance_leaves_inputs_alone",
           "test_conformance_prepare_snapshots", "test_conformance_many_rows"]

MANY_ROWS = 150  # rows of the large batch: past tiles and chunks of 32, 64 and 128 rows


def _custom_output(logits: Any, labels: Any, xp: Any) -> Any:
    """``f = logit_y - sum_j logit_j^2 / (4 C)``: reads the labels, not the margin of any built-in task."""
    onehot = _one_hot(labels, logits.shape[1], logits, xp=xp)
    return xp.sum(logits * onehot, axis=1) - xp.sum(logits * logits, axis=1) / (4.0 * logits.shape[1])


def _custom_output_grad(logits: Any, labels: Any, xp: Any) -> Any:
    return _one_hot(labels, logits.shape[1], logits, xp=xp) - logits / (2.0 * logits.shape[1])


def _custom_out_to_loss(logits: Any, labels: Any, xp: Any) -> Any:
    return 1.0 / (1.0 + xp.sum(logits * logits, axis=1))


CUSTOM = CustomTask(_custom_output, _custom_out_to_loss, output_grad=_custom_output_grad, name="conformance-custom")


def _backend(case: Any) -> Any:
    return get_backend(case.backend) if isinstance(case.backend, str) else case.backend


def test_conformance_custom_task(conformance_case):
    """Per-example gradients and out-to-loss weights of a custom task (``trak_core.CustomTask``: another output
    function and another ``Q`` than classification's) equal the analytic reference's: a backend that ignores
    ``task`` passed every other test."""
    from ..backends.numpy_backend import backend as reference_backend
    from . import canonical
    from .suite import _classifier, _dtype, _gradient_data

    case = conformance_case
    dtype, kind = _dtype(case), _classifier(case)
    weights, x, y = _gradient_data(kind)
    analytic = canonical.analytic_model(kind)
    reference, q_reference = reference_backend.gradients(analytic, reference_backend.prepare(
        analytic, canonical.flat(weights)), x, y, CUSTOM)
    model, checkpoint = case.model(kind, [w.astype(dtype) for w in weights])
    backend = _backend(case)
    grads, q = backend.gradients(model, backend.prepare(model, checkpoint), case.array(x.astype(dtype)),
                                 case.array(y), CUSTOM)
    grads, q = case.to_numpy(grads), case.to_numpy(q)
    assert grads.shape == reference.shape, f"gradients of shape {grads.shape}, expected {reference.shape}"
    rtol = 1e-9 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(grads, reference, rtol=rtol, atol=rtol * np.abs(reference).max(),
                               err_msg="gradients of a custom task's output")
    np.testing.assert_allclose(q, q_reference, rtol=rtol, atol=rtol, err_msg="a custom task's out_to_loss")


@pytest.mark.parametrize("rows,k", [(1, 1), (3, 33), (37, 100), (8, 257)])
def test_conformance_projection_widths(conformance_case, rows, k):
    """The backend's ``project`` equals ``trak_core.project`` for widths and row counts off any tile size (one row,
    one column, ``k`` one past a multiple of 32, 128 or 256): a kernel that drops a partial tile passed at
    ``k = 96``."""
    from .suite import _dtype

    case = conformance_case
    dtype = _dtype(case)
    grads = np.random.default_rng(rows * 1000 + k).normal(size=(rows, 300)).astype(dtype)
    reference = project(grads.astype(np.float64), k, seed=4, checkpoint=3, kind="rademacher")
    out = case.to_numpy(_backend(case).project(case.array(grads), k, seed=4, checkpoint=3, kind="rademacher"))
    assert out.shape == reference.shape, f"project gave shape {out.shape} for {rows} rows and k={k}"
    rtol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(out, reference, rtol=rtol, atol=rtol * np.abs(reference).max(),
                               err_msg=f"project of {rows} rows to k={k}")


def _leaves(tree: Any, case: Any) -> list[np.ndarray]:
    """Copies of the array leaves of a checkpoint or batch (mappings, lists and tuples followed), as NumPy."""
    if isinstance(tree, Mapping):
        return [leaf for key in sorted(tree, key=str) for leaf in _leaves(tree[key], case)]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item, case)]
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return [np.array(case.to_numpy(tree), copy=True)]
    return []


def test_conformance_leaves_inputs_alone(conformance_case):
    """``prepare``, ``gradients``, ``project`` and ``features`` leave the caller's checkpoint, inputs, labels and
    gradients as they were (a backend that wrote into them passed the other tests; the user's weights were
    zeroed)."""
    from ..tasks import Classification
    from .suite import _classifier, _dtype, _gradient_data

    case = conformance_case
    dtype, kind = _dtype(case), _classifier(case)
    weights, x, y = _gradient_data(kind)
    model, checkpoint = case.model(kind, [w.astype(dtype) for w in weights])
    inputs, labels = case.array(x.astype(dtype)), case.array(y)
    before = {"checkpoint": _leaves(checkpoint, case), "inputs": _leaves(inputs, case),
              "labels": _leaves(labels, case)}
    backend = _backend(case)
    prepared = backend.prepare(model, checkpoint)
    grads, _ = backend.gradients(model, prepared, inputs, labels, Classification())
    kept = np.array(case.to_numpy(grads), copy=True)
    backend.project(grads, 16, seed=0, checkpoint=0, kind="rademacher")
    backend.features(model, prepared, inputs, labels, Classification(), k=16, seed=0, checkpoint=0,
                     kind="rademacher")
    after = {"checkpoint": _leaves(checkpoint, case), "inputs": _leaves(inputs, case), "labels": _leaves(labels, case)}
    for what in before:
        assert len(before[what]) == len(after[what]) and all(
            np.array_equal(a, b, equal_nan=True) for a, b in zip(before[what], after[what])), \
            f"the caller's {what} changed during prepare/gradients/project/features: a backend must not write into them"
    assert np.array_equal(kept, case.to_numpy(grads), equal_nan=True), \
        "project() changed the gradients it was given: it must not write into its input"


def _overwrite(tree: Any, value: float) -> int:
    """Set every array leaf of ``tree`` that can be written in place to ``value``, as training goes on in the caller's
    arrays (an optimizer stepping the tensors a ``state_dict`` shares with the model); immutable leaves (JAX) are
    left. Returns how many were written."""
    if isinstance(tree, Mapping):
        return sum(_overwrite(tree[key], value) for key in tree)
    if isinstance(tree, (list, tuple)):
        return sum(_overwrite(item, value) for item in tree)
    if not (hasattr(tree, "shape") and hasattr(tree, "dtype")):
        return 0
    target = tree.detach() if hasattr(tree, "detach") else tree  # a torch parameter: its data, with no autograd
    try:
        target[...] = value
    except (TypeError, ValueError, RuntimeError):  # immutable arrays
        return 0
    return 1


def test_conformance_prepare_snapshots(conformance_case):
    """``prepare`` takes a snapshot: gradients with the prepared checkpoint stay the same after the caller's
    checkpoint and the model's own parameters are written in place (training on after ``featurize``; the estimator
    keeps each prepared checkpoint to featurize targets when scoring, so a backend that held the caller's arrays
    scored later targets against the last weights)."""
    from ..tasks import Classification
    from .suite import _classifier, _dtype, _gradient_data

    case = conformance_case
    dtype, kind = _dtype(case), _classifier(case)
    weights, x, y = _gradient_data(kind)
    model, checkpoint = case.model(kind, [w.astype(dtype) for w in weights])
    inputs, labels = case.array(x.astype(dtype)), case.array(y)
    backend = _backend(case)
    prepared = backend.prepare(model, checkpoint)
    before = case.to_numpy(backend.gradients(model, prepared, inputs, labels, Classification())[0]).copy()
    parameters = getattr(model, "parameters", None)
    _overwrite(checkpoint, 0.5)
    if callable(parameters):
        _overwrite(list(parameters()), 0.5)
    after = case.to_numpy(backend.gradients(model, prepared, inputs, labels, Classification())[0])
    assert np.array_equal(before, after, equal_nan=True), \
        "gradients changed after the caller's checkpoint was written in place: prepare must copy it (a snapshot)"


def _check_rows(found: np.ndarray, reference: np.ndarray, rtol: float, what: str) -> None:
    """Assert ``found`` equals ``reference`` row by row (``assert_allclose``'s test, ``atol = rtol * max|reference|``),
    naming the rows that differ."""
    assert found.shape == reference.shape, f"{what}: shape {found.shape}, expected {reference.shape}"
    off = np.abs(found - reference) > rtol * (np.abs(reference) + np.abs(reference).max())
    bad = np.flatnonzero(off.reshape(len(off), -1).any(axis=1))
    assert bad.size == 0, \
        f"{what}: rows {bad[:8].tolist()}{' ...' if bad.size > 8 else ''} ({bad.size} of {len(reference)}) differ " \
        f"from the reference's (rtol {rtol:g}); each row must be its own example's, whatever the batch's size (a " \
        "backend that splits a batch into chunks must keep every chunk's rows with their inputs and labels)"


def test_conformance_many_rows(conformance_case):
    """Gradients, out-to-loss weights and fused features (where the backend has a fused step) of a batch of
    ``MANY_ROWS`` rows, after one of 5, equal the analytic reference's row by row: every other test gives batches of
    16 rows at most, so a backend that splits a batch into chunks (of 32 rows, or of its first batch's rows) and
    mixes up a later chunk's rows passed them all, and scored batches of 64 wrongly."""
    from ..backends.numpy_backend import backend as reference_backend
    from ..tasks import Classification
    from . import canonical
    from .suite import _classifier, _dtype, _gradient_data

    case = conformance_case
    dtype, kind = _dtype(case), _classifier(case)
    weights, _, _ = _gradient_data(kind)
    analytic = canonical.analytic_model(kind)
    analytic_prepared = reference_backend.prepare(analytic, canonical.flat(weights))
    model, checkpoint = case.model(kind, [w.astype(dtype) for w in weights])
    backend = _backend(case)
    prepared = backend.prepare(model, checkpoint)
    rtol = 1e-9 if dtype == "float64" else 2e-4
    for rows in (5, MANY_ROWS):  # the small batch first: a backend may size its chunks by the first batch it sees
        x, y = canonical.inputs(kind, rows, seed=rows)
        reference, q_reference = reference_backend.gradients(analytic, analytic_prepared, x, y, Classification())
        inputs, labels = case.array(x.astype(dtype)), case.array(y)
        grads, q = backend.gradients(model, prepared, inputs, labels, Classification())
        _check_rows(case.to_numpy(grads), reference, rtol, f"gradients of a batch of {rows} rows")
        _check_rows(case.to_numpy(q), q_reference, rtol, f"out-to-loss weights of a batch of {rows} rows")
        out = backend.features(model, prepared, inputs, labels, Classification(), k=40, seed=5, checkpoint=1,
                               kind="rademacher")
        if out is not None:
            _check_rows(case.to_numpy(out[0]), project(reference, 40, seed=5, checkpoint=1), rtol,
                        f"fused features of a batch of {rows} rows")
