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
from trak_core.tasks import Classification, LanguageModeling, task_functions, task_identity  # noqa: E402


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
    root.attrs.pop("configuration_sha256", None)  # nor its checksum, which came later
    again = TRAK.open(tmp_path / "store", model, [model.state_dict()], task=CustomTask(_weighted), progress=False)
    assert torch.equal(again.score([(x[:3], y[:3])]), trak.score([(x[:3], y[:3])]))
    with pytest.raises(StoreMismatchError, match="task_functions"):
        TRAK.open(tmp_path / "store", model, [model.state_dict()], task=CustomTask(_scaled(1.0)), progress=False)


class _Masked(LanguageModeling):
    """A user's variant of a built-in task: another ignored label (the audit's case: changed between two runs)."""
    name = "masked_lm"
    ignore_index = -1


class _MaskedOther(LanguageModeling):
    name = "masked_lm"
    ignore_index = -100


class _Scaled:
    """A user Task class whose numbers come from a helper method and a class-level setting."""
    name, logits_ndim, scale = "scaled", 2, 1.0

    def check_labels(self, labels, n_outputs, *, xp):
        pass

    def _margin(self, logits, xp):
        return logits[:, 0] - logits[:, 1]

    def output(self, logits, labels, *, xp):
        return self.scale * self._margin(logits, xp)

    def output_grad(self, logits, labels, *, xp):
        raise NotImplementedError("torch differentiates output")

    def out_to_loss(self, logits, labels, *, xp):
        return xp.ones_like(logits[:, 0])


class _ScaledMore(_Scaled):
    scale = 3.0


class _OtherMargin(_Scaled):
    def _margin(self, logits, xp):
        return logits[:, 0] - logits[:, 2]


def test_task_classes_with_other_settings_or_helpers_are_told_apart(tmp_path):
    """Only a Task class's output and out_to_loss were digested: a subclass of LanguageModeling with another
    ignore_index, or a class whose scale or helper method changed, had the same identity and reopened another's
    store."""
    assert task_identity(_Masked()) != task_identity(_MaskedOther())
    assert task_identity(_Masked()) == task_identity(_Masked())
    identities = {task_identity(task) for task in (_Scaled(), _ScaledMore(), _OtherMargin())}
    assert len(identities) == 3
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    trak = TRAK(model, task=_Scaled(), proj_dim=8, store=tmp_path / "store", progress=False)
    trak.featurize(None, [(x, y)])
    for other in (_ScaledMore(), _OtherMargin()):
        with pytest.raises(StoreMismatchError, match="task_identity"):
            TRAK.open(tmp_path / "store", model, [model.state_dict()], task=other, progress=False)
    again = TRAK.open(tmp_path / "store", model, [model.state_dict()], task=_Scaled(), progress=False)
    assert torch.equal(again.score([(x[:3], y[:3])]), trak.score([(x[:3], y[:3])]))


def test_a_task_class_store_written_before_classes_were_digested_still_reopens(tmp_path):
    """Stores of user Task classes hold the identity of output and out_to_loss alone: compared as before."""
    import zarr

    from trak_core._task_identity import task_identity_before_classes

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    trak = TRAK(model, task=_Scaled(), proj_dim=8, store=tmp_path / "store", progress=False)
    trak.featurize(None, [(x, y)])
    root = zarr.open_group(str(tmp_path / "store"), mode="r+")
    old = task_identity_before_classes(_Scaled())
    assert old != task_identity(_Scaled())
    root.attrs["trak_core"] = {**dict(root.attrs["trak_core"]), "task_identity": old}  # as an older trak-core wrote
    root.attrs.pop("configuration_sha256", None)  # nor its checksum, which came later
    again = TRAK.open(tmp_path / "store", model, [model.state_dict()], task=_Scaled(), progress=False)
    assert torch.equal(again.score([(x[:3], y[:3])]), trak.score([(x[:3], y[:3])]))
    class Negated(_Scaled):  # another output: told apart by the identity as it was then
        def output(self, logits, labels, *, xp):
            return -self._margin(logits, xp)

    with pytest.raises(StoreMismatchError, match="task_identity"):
        TRAK.open(tmp_path / "store", model, [model.state_dict()], task=Negated(), progress=False)


def test_trak_cores_own_code_is_identified_by_name():
    """A subclass of a built-in task inherits trak-core's methods: their identity is their name (as a built-in
    task's is), so a new trak-core's edits (a docstring) refuse no store; a user's override still counts."""
    import types

    from trak_core._task_identity import callable_digest

    edited = types.FunctionType((lambda self, logits, labels, *, xp: 0).__code__, {}, "output")
    edited.__module__, edited.__qualname__ = "trak_core.tasks", "Classification.output"
    assert callable_digest(edited) == callable_digest(Classification.output)
    edited.__module__ = "my_tasks"
    assert callable_digest(edited) != callable_digest(Classification.output)

    class Overridden(Classification):
        name = "overridden"

        def output(self, logits, labels, *, xp):
            return logits[:, 0]

    class Inherited(Classification):
        name = "overridden"

    assert task_identity(Overridden()) != task_identity(Inherited())


IN_TWO_PROCESSES = '''
import functools, sys
sys.path.insert(0, sys.argv[1])
from trak_core.tasks import task_identity
from cached_task import Cached
print(task_identity(Cached()))
'''


def test_a_task_class_with_a_cached_property_has_one_identity_in_every_process(tmp_path):
    """functools.cached_property holds a lock on Python 3.11, whose repr shows its address: the identity differed
    in every process, so such a task's store never reopened (a review of the class digest)."""
    import subprocess
    import sys

    (tmp_path / "cached_task.py").write_text(
        "import functools\n"
        "class Cached:\n"
        "    name, logits_ndim = 'cached', 2\n"
        "    @functools.cached_property\n"
        "    def scale(self):\n"
        "        return 2.0\n"
        "    def output(self, logits, labels, *, xp):\n"
        "        return self.scale * logits[:, 0]\n")
    runs = {subprocess.run([sys.executable, "-c", IN_TWO_PROCESSES, str(tmp_path)], capture_output=True, text=True,
                           check=True, timeout=120).stdout for _ in range(2)}
    assert len(runs) == 1 and "class=" in runs.pop()


class _Slotted(LanguageModeling):
    __slots__ = ("ignore_index",)
    name = "slotted"

    def __init__(self, ignore_index):
        self.ignore_index = ignore_index


def test_a_task_with_slots_is_told_apart_by_their_values():
    assert task_identity(_Slotted(-1)) != task_identity(_Slotted(-100))
    assert task_identity(_Slotted(-1)) == task_identity(_Slotted(-1))


def test_a_custom_task_around_a_built_in_one_reopens_a_store_written_before(tmp_path):
    """A CustomTask whose output calls a built-in task's: its identity digested trak-core's source then and its
    name now; the store it wrote is compared with the old digest and reopens."""
    import zarr

    from trak_core._task_identity import task_identity_before_classes

    base = Classification()

    def output(logits, labels, xp):
        return 2.0 * base.output(logits, labels, xp=xp)

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    trak = TRAK(model, task=CustomTask(output), proj_dim=8, store=tmp_path / "store", progress=False)
    trak.featurize(None, [(x, y)])
    old = task_identity_before_classes(CustomTask(output))
    assert old != task_identity(CustomTask(output))
    root = zarr.open_group(str(tmp_path / "store"), mode="r+")
    root.attrs["trak_core"] = {**dict(root.attrs["trak_core"]), "task_identity": old}  # as an older trak-core wrote
    root.attrs.pop("configuration_sha256", None)  # nor its checksum, which came later
    again = TRAK.open(tmp_path / "store", model, [model.state_dict()], task=CustomTask(output), progress=False)
    assert torch.equal(again.score([(x[:3], y[:3])]), trak.score([(x[:3], y[:3])]))
