"""The CuPy (and JAX) launch of the Triton kernel (trak_core._triton_aot), with a NumPy stand-in for CuPy.

Run by ``tests/test_triton_projection.py`` in a fresh process with ``TRITON_INTERPRET=1``, next to
``tests/triton_interpreted.py``. The stand-in's ``RawModule`` runs each launch through Triton's interpreter
with the arguments ``launch_cupy`` built (pointers, then the five integers, then null scratch pointers, in
the order of the compiled kernel's PTX entry), so the argument order, grid, block, the first-use check and
the sum over slices are checked without a GPU; the compile itself is checked for sm_90 in
``tests/test_triton_compiles.py`` (the PTX entry there is the one written here). References: the same split
in float64 (``tests/triton_interpreted.py``'s helper).
"""
import os
import pathlib
import sys
import tempfile
import types
import warnings

import numpy as np
import pytest

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_triton_projection.py (TRITON_INTERPRET=1)"
torch = pytest.importorskip("torch", reason="PyTorch is not installed: the interpreter's launch needs torch tensors")
pytest.importorskip("triton", reason="Triton is not installed: the GPU projection kernel is not exercised")

import array_api_compat.numpy as npx  # noqa: E402

from trak_core import _triton, _triton_aot  # noqa: E402
from trak_core._triton_kernel import split_projection  # noqa: E402
from trak_core.errors import BackendError  # noqa: E402
from trak_core.projection import _rademacher_words  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from triton_interpreted import _inputs, _split_in_float64  # noqa: E402

_PARAMS = [".param .u64 .ptr .global .align 1 split_projection_param_{}"] * 5 + [
    ".param .u32 split_projection_param_{}"] * 5 + [".param .u64 .ptr .global .align 1 split_projection_param_{}"] * 2
PTX = ".visible .entry split_projection(\n" + ",\n".join(p.format(i) for i, p in enumerate(_PARAMS)) + "\n)\n{ ret; }"


def _compiled(plan, shared=65_536, ptx=PTX):
    metadata = types.SimpleNamespace(shared=shared, num_warps=plan["warps"], name="split_projection",
                                     hash=f"fake-{plan['block_m']}-{shared}", global_scratch_size=0,
                                     profile_scratch_size=0)
    return types.SimpleNamespace(asm={"ptx": ptx, "cubin": b"\x7fELF"}, metadata=metadata)


def _fake_cupy(plan, n_passes, launches, corrupt=False, loads=None):
    """A ``cupy`` module over NumPy whose kernels run ``split_projection`` in Triton's interpreter."""
    class Kernel:
        max_dynamic_shared_size_bytes = 0

        def __call__(self, grid, block, args, shared_mem=0):
            launches.append(dict(grid=grid, block=block, shared_mem=shared_mem,
                                 opt_in=self.max_dynamic_shared_size_bytes, kinds=[type(a).__name__ for a in args]))
            pointers, integers, scratch = args[:5], [int(v) for v in args[5:10]], args[10:]
            assert all(isinstance(v, np.int32) for v in args[5:10]) and all(int(v) == 0 for v in scratch)
            with warnings.catch_warnings():  # JAX's arrays arrive read-only; the kernel writes only the output
                warnings.simplefilter("ignore", UserWarning)
                tensors = [torch.from_numpy(a) for a in pointers]  # the same memory and strides: the output in place
            split_projection[grid](*tensors, *integers, BLOCK_M=plan["block_m"], BLOCK_N=plan["block_n"],
                                   BLOCK_K=plan["block_k"], ITERS=plan["iters"], TWO_PASSES=n_passes == 2,
                                   num_warps=block[0] // 32)
            if corrupt:
                tensors[4].neg_()

    class Device:
        compute_capability, id, attributes = "90", 0, {"MultiProcessorCount": 4}

        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    cupy = types.ModuleType("cupy")
    for name in ("float16", "float32", "float64", "int32", "ascontiguousarray", "empty", "arange", "linalg",
                 "from_dlpack"):
        setattr(cupy, name, getattr(np, name))
    def raw_module(path):
        assert pathlib.Path(path).read_bytes() == b"\x7fELF"  # the cubin, written where CuPy reads it
        (loads if loads is not None else []).append({"path": pathlib.Path(path)})
        return types.SimpleNamespace(get_function=lambda name: Kernel())

    cupy.RawModule = raw_module
    cupy.cuda = types.SimpleNamespace(Device=Device, get_current_stream=lambda: types.SimpleNamespace(
        synchronize=lambda: None))
    return cupy


@pytest.fixture
def fresh(monkeypatch):
    for name, value in (("_checked", set()), ("_loaded", {}), ("_compiled", {})):
        monkeypatch.setattr(_triton_aot, name, value)


def _problem(n, p, k, n_passes):
    full = _inputs(n, p + 5, k, seed=8).numpy()
    view = full[:, 2:2 + p]  # a column slice: read in place through the row stride
    expected, signs, scales, l1 = _split_in_float64(torch.from_numpy(np.ascontiguousarray(view)), k, n_passes,
                                                    seed=4, checkpoint=2)
    words = np.asarray(_rademacher_words(0, p, k, 4, xp=npx, device=None))
    return view, words, signs.numpy(), scales.numpy(), expected, l1


@pytest.mark.parametrize("n_passes", [1, 2])
def test_cupy_launch_runs_the_compiled_kernel_with_its_arguments(fresh, monkeypatch, n_passes):
    n, p, k = 40, 1000, 200
    view, words, signs, scales, expected, l1 = _problem(n, p, k, n_passes)
    plan = _triton.launch_plan(n, p, k, 4)
    assert plan["splits"] > 1 and plan["iters"] * plan["block_k"] < p  # the check's slice is a part of p
    launches, facts, loads = [], [], []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(plan, n_passes, launches, loads=loads))
    monkeypatch.setattr(_triton_aot, "compile_kernel",
                        lambda *args, **kwargs: facts.append(kwargs["aligned_pointers"]) or _compiled(plan))
    partial = _triton_aot.launch_cupy(view, words, signs, scales, k, n_passes, plan)
    base = view.base.__array_interface__["data"][0]
    assert base % 16 == 0 and view.__array_interface__["data"][0] == base + 8  # the view starts 2 floats in
    assert facts == [("words_ptr", "signs_ptr", "scales_ptr", "out_ptr")]  # so its pointer is not declared aligned
    assert partial.shape == (plan["splits"], n, k) and partial.dtype == np.float32
    assert np.all(np.abs(partial.sum(axis=0) - expected) <= p * 2.0**-24 * l1)
    tiles = (-(-n // plan["block_m"]), -(-k // plan["block_n"]))
    assert [launch["grid"] for launch in launches] == [(*tiles, 1), (*tiles, plan["splits"])]  # first-use check
    assert all(launch["block"] == (32 * plan["warps"],) and launch["shared_mem"] == launch["opt_in"] == 65_536
               for launch in launches)
    assert launches[0]["kinds"][:5] == ["ndarray"] * 5 and launches[0]["kinds"][10:] == ["uint64"] * 2
    _triton_aot.launch_cupy(view, words, signs, scales, k, n_passes, plan)
    assert len(launches) == 3  # checked once per process, dtype and passes
    folder = _triton_aot._cubin_folder()  # one per process, removed at its exit (tests/test_triton_projection.py)
    assert loads[0]["path"].parent == folder and folder.parent == pathlib.Path(tempfile.gettempdir())


def test_a_kernel_that_computes_wrong_numbers_is_caught_on_first_use(fresh, monkeypatch):
    n, p, k = 8, 300, 64
    view, words, signs, scales, _, _ = _problem(n, p, k, 2)
    plan = _triton.launch_plan(n, p, k, 4)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(plan, 2, [], corrupt=True))
    monkeypatch.setattr(_triton_aot, "compile_kernel", lambda *args, **kwargs: _compiled(plan))
    with pytest.raises(BackendError, match="off a float64 product"):
        _triton_aot.launch_cupy(view, words, signs, scales, k, 2, plan)


def test_a_kernel_with_other_parameters_is_not_launched(fresh, monkeypatch):
    n, p, k = 8, 300, 64
    view, words, signs, scales, _, _ = _problem(n, p, k, 2)
    plan = _triton.launch_plan(n, p, k, 4)
    launches = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(plan, 2, launches))
    other = PTX.replace(".param .u32 split_projection_param_5", ".param .u64 split_projection_param_5")
    monkeypatch.setattr(_triton_aot, "compile_kernel", lambda *args, **kwargs: _compiled(plan, ptx=other))
    with pytest.raises(BackendError, match="parameters"):
        _triton_aot.launch_cupy(view, words, signs, scales, k, 2, plan)
    assert launches == []


def test_jax_arrays_go_through_the_cupy_launch(fresh, monkeypatch):
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed: its launch through CuPy is not exercised")
    n, p, k = 24, 700, 160
    view, words, signs, scales, expected, l1 = _problem(n, p, k, 2)
    plan = _triton.launch_plan(n, p, k, 4)
    launches = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(plan, 2, launches))
    monkeypatch.setattr(_triton_aot, "compile_kernel", lambda *args, **kwargs: _compiled(plan))
    out = _triton_aot.launch_jax(*(jnp.asarray(np.ascontiguousarray(a)) for a in (view, words, signs, scales)), k, 2,
                                 plan)
    assert type(out).__module__.startswith("jax") and out.shape == (n, k)
    assert np.all(np.abs(np.asarray(out, dtype=np.float64) - expected) <= p * 2.0**-24 * l1)
    assert len(launches) == 2
