"""A custom task's identity in a store: what it computes (code, captured values, arguments), not where it was
defined. An audit reopened stores with another scale captured in a closure, a partial's argument, a callable's
attribute, the other of two lambdas on one line, or a lambda with no source: all were accepted, and the scores
matched neither task (47-183% off). The same function imported from the script that wrote the store was refused.
"""
import functools

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")
torch = pytest.importorskip("torch", reason="torch is not installed: custom tasks need autodiff")

from trak_core import TRAK, CustomTask, StoreMismatchError  # noqa: E402
from trak_core.tasks import task_functions, task_identity  # noqa: E402


def _scaled(scale):
    return lambda logits, labels, xp: scale * (logits[:, 0] - logits[:, 1])


def _dot(weights):
    return lambda logits, labels, xp: logits @ xp.asarray(weights, dtype=logits.dtype)


def _weighted(logits, labels, xp, scale=1.0):
    return scale * (logits[:, 0] - logits[:, 1])


class _Weighted:
    def __init__(self, scale):
        self.scale = scale

    def __call__(self, logits, labels, xp):
        return self.scale * (logits[:, 0] - logits[:, 1])


first_of_a_line, second_of_a_line = (lambda logits, labels, xp: logits[:, 0]), (lambda logits, labels, xp: logits[:, 1])


@pytest.mark.parametrize("pair", [
    (_scaled(1.0), _scaled(3.0)),
    (functools.partial(_weighted, scale=1.0), functools.partial(_weighted, scale=3.0)),
    (_Weighted(1.0), _Weighted(np.float64(3.0))),
    (first_of_a_line, second_of_a_line),
    (_dot(np.array([1.0, -1.0, 0.0])), _dot(np.array([1.0, 0.0, -1.0]))),
], ids=["closure", "partial", "callable", "one-line-lambdas", "captured-array"])
def test_tasks_that_compute_other_numbers_are_told_apart(pair, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    written, other = (CustomTask(f) for f in pair)
    assert task_identity(written) != task_identity(other)
    assert task_identity(written) == task_identity(CustomTask(pair[0]))  # the same one: equal
    trak = TRAK(model, task=written, proj_dim=8, store=tmp_path / "store", progress=False)
    trak.featurize(None, [(x, y)])
    with pytest.raises(StoreMismatchError, match="task_identity"):
        TRAK.open(tmp_path / "store", model, [model.state_dict()], task=other, progress=False)
    again = TRAK.open(tmp_path / "store", model, [model.state_dict()], task=CustomTask(pair[0]), progress=False)
    assert torch.equal(again.score([(x[:3], y[:3])]), trak.score([(x[:3], y[:3])]))


def test_functions_without_source_are_told_apart_by_their_code():
    namespace = {}
    exec("a = lambda logits, labels, xp: logits[:, 0] - logits[:, 1]\n"  # no source file: inspect cannot read it
         "b = lambda logits, labels, xp: -5 * logits[:, 2]\n"
         "c = lambda logits, labels, xp: logits[:, 0] - logits[:, 1]\n", namespace)
    a, b, c = (task_identity(CustomTask(namespace[k])) for k in "abc")
    assert a != b and a == c


def test_the_module_a_function_was_imported_from_is_not_part_of_it():
    """A store written by a script (``__main__.out``) reopens with the same function imported as ``script.out``."""
    def out(logits, labels, xp):
        return logits[:, 0]

    renamed = types_copy(out, module="script")
    assert out.__module__ != renamed.__module__
    assert task_identity(CustomTask(out)) == task_identity(CustomTask(renamed))


def types_copy(function, module):
    import types

    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__module__ = module
    return copy


def test_stores_written_with_the_source_hash_still_reopen(tmp_path):
    """Stores written before task_identity hold task_functions (module, name, source hash): they are compared as
    before, so they reopen with the same task and refuse another."""
    import zarr

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    task = CustomTask(_weighted)
    trak = TRAK(model, task=task, proj_dim=8, store=tmp_path / "store", progress=False)
    trak.featurize(None, [(x, y)])
    root = zarr.open_group(str(tmp_path / "store"), mode="r+")
    config = dict(root.attrs["trak_core"])
    config.pop("task_identity")
    root.attrs["trak_core"] = {**config, "task_functions": task_functions(task)}  # as an older trak-core wrote it
    again = TRAK.open(tmp_path / "store", model, [model.state_dict()], task=CustomTask(_weighted), progress=False)
    assert torch.equal(again.score([(x[:3], y[:3])]), trak.score([(x[:3], y[:3])]))
    with pytest.raises(StoreMismatchError, match="task_functions"):
        TRAK.open(tmp_path / "store", model, [model.state_dict()], task=CustomTask(_scaled(1.0)), progress=False)
