"""Device placement on a CPU-only machine: the GPU paths' tensors stay on the gradients' device.

The GPU check (bench/gpu_check.sh) rarely runs, so two CPU stand-ins look for the bugs that only a GPU shows:

- every tensor trak-core and trak_torch make while featurizing and scoring a torch model (closed form, vmap, the
  loop, kronecker, Gaussian) is made with ``device=`` (or from a tensor, which keeps its device): one made without
  it lands on the CPU and, combined with a CUDA tensor, fails only on a GPU;
- ``trak_core.project`` on fake CUDA tensors (``FakeTensorMode`` reports ``cuda:0`` without a GPU and raises
  when devices mix) takes the GPU-only branches (the half-precision split, device_cache, packed and hashed signs,
  float64's packed product on devices, Gaussian in float64 on the device) and returns features on ``cuda:0``.
"""
import os
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: torch device placement is not exercised")

import trak_core  # noqa: E402
from trak_core import TRAK, ProjectionCache  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = (os.path.join(ROOT, "trak_core") + os.sep, os.path.join(ROOT, "backends") + os.sep)
# (file, function) of factory calls without device= that are meant for the CPU: a check on a 2-element CPU tensor,
# a fallback for a model without parameters, NumPy's dtype of the same name, kronecker factors made by NumPy and
# moved with .to(device=...) at once (a list comprehension: its own frame before Python 3.12)
ALLOWED = {("contexts.py", "_check_namespace_autograd"), ("backend.py", "prepare"), ("_delegation.py", "_numpy_dtype"),
           ("kronecker_plan.py", "factorized_state"), ("kronecker_plan.py", "<listcomp>")}


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.norm = torch.nn.BatchNorm2d(3)
        self.layer_norm = torch.nn.LayerNorm(108)
        self.head = torch.nn.Linear(108, 4)

    def forward(self, x):
        return self.head(self.layer_norm(torch.relu(self.norm(self.conv(x))).flatten(1)))


def _deviceless_factories(run):
    """``(file, line, function, factory)`` of each factory call made by trak-core or trak_torch code without
    ``device=`` (``as_tensor``/``tensor`` of a tensor excepted: it keeps the tensor's device) while ``run()`` runs."""
    import torch.utils._device as device_module
    from torch.overrides import TorchFunctionMode

    factories = device_module._device_constructors()
    found = set()

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            data = args[0] if args else kwargs.get("data")
            of_tensor = getattr(func, "__name__", "") in ("as_tensor", "asarray", "tensor") and \
                isinstance(data, torch.Tensor)
            if func in factories and kwargs.get("device") is None and not of_tensor:
                for frame in reversed(traceback.extract_stack()[:-1]):  # the innermost frame of this repository
                    if frame.filename.startswith(ROOT):
                        if frame.filename.startswith(OURS) and \
                                (os.path.basename(frame.filename), frame.name) not in ALLOWED:
                            found.add((frame.filename[len(ROOT) + 1:], frame.lineno, frame.name, func.__name__))
                        break
            return func(*args, **kwargs)

    with Watch():
        run()
    return sorted(found)


@pytest.mark.parametrize("per_example,proj_type,precision", [
    ("auto", "rademacher", "float32"), ("vmap", "rademacher", "float32"), ("loop", "rademacher", "float32"),
    ("auto", "kronecker", "float32"), ("auto", "rademacher", "fast"), ("auto", "gaussian", "float32")])
def test_torch_paths_make_every_tensor_on_the_models_device(per_example, proj_type, precision):
    torch.manual_seed(0)
    model = _Model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)

    def run():
        trak = TRAK(model, backend=TorchBackend(per_example=per_example), proj_dim=64, proj_type=proj_type,
                    precision=precision, progress=False)
        trak.featurize(None, [(x, y)])
        assert trak.score([(x[:3], y[:3])]).shape == (6, 3)

    assert _deviceless_factories(run) == []


def _fake_cuda():
    """A ``FakeTensorMode`` whose tensors can say ``cuda:0`` here, and Tensor indexing that works on them on a
    CPU-only build (its Python binding enters a CUDA device guard there); skips where fake CUDA is unsupported."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:
            probe = torch.empty(2, 3, device="cuda")
            assert probe.device.type == "cuda"
    except Exception as exc:  # an internal API: its absence is no finding
        pytest.skip(f"FakeTensorMode cannot make fake CUDA tensors here ({type(exc).__name__}: {exc})")
    return mode


def _aten_getitem(tensor, index):
    """``tensor[index]`` for ints, slices, ``None`` and ``...`` through aten ops (no device guard)."""
    aten = torch.ops.aten
    index = index if isinstance(index, tuple) else (index,)
    if any(part is Ellipsis for part in index):
        at = index.index(Ellipsis)
        used = sum(part is not None and part is not Ellipsis for part in index)
        index = index[:at] + (slice(None),) * (tensor.ndim - used) + index[at + 1:]
    out, dim = tensor, 0
    for part in index:
        if part is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif isinstance(part, int):
            out = aten.select.int(out, dim, part)
        elif isinstance(part, slice):
            stop = part.stop if part.stop is not None else 2**62
            out, dim = aten.slice.Tensor(out, dim, part.start or 0, stop, part.step or 1), dim + 1
        else:
            raise NotImplementedError(f"index {part!r} on a fake CUDA tensor")
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_project_on_cuda_tensors_keeps_everything_on_the_device(dtype, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensor

    mode = _fake_cuda()
    if torch.cuda.is_available():
        getitem = torch.Tensor.__getitem__
    else:
        original = torch.Tensor.__getitem__

        def getitem(self, index):
            if isinstance(self, FakeTensor) and self.device.type == "cuda":
                return _aten_getitem(self, index)
            return original(self, index)
    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    monkeypatch.setenv("TRAK_CORE_TRITON", "0")  # the kernel's launch needs a GPU; its inputs are the split's
    for precision, kind in (("float32", "rademacher"), ("fast", "rademacher"), ("float32", "gaussian")):
        for cache_bytes in (2**30, 2**14, 0):  # dense signs, packed bits, hashed per block
            for block_size in (None, 7):
                with mode:
                    grads = torch.randn(5, 300, device="cuda", dtype=getattr(torch, dtype))
                    out = trak_core.project(grads, 64, seed=1, checkpoint=2, kind=kind, precision=precision,
                                            offset=3, cache=ProjectionCache(cache_bytes), block_size=block_size)
                assert out.device.type == "cuda" and tuple(out.shape) == (5, 64)
                assert out.dtype == (torch.float64 if dtype == "float64" else torch.float32)


def test_the_fake_cuda_stand_in_catches_a_cpu_tensor():
    """The stand-in is worth its name: a CPU tensor combined with a fake CUDA one raises, as on a GPU."""
    mode = _fake_cuda()
    with pytest.raises(Exception, match="device"):
        with mode:
            torch.ones(3, device="cuda") * torch.from_numpy(np.ones(3, dtype=np.float32))
