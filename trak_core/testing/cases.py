"""How the conformance suite builds the canonical models in each framework (one class per backend).

One job: adapters. A third-party backend author writes one such class for their framework and
returns it from a ``conformance_case`` fixture; see ``trak_core.testing``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
from typing import Any

import numpy as np

from ..errors import TrakValueError
from . import canonical


class BackendCase:
    """What the suite needs from a backend: the protocol third-party authors implement.

    Attributes
    ----------
    id : str
        ``"module:device"``, e.g. ``"torch:cpu"``.
    backend : str or Backend
        What to pass as ``TRAK(backend=...)``.
    kinds : tuple of str
        Canonical models this backend can build (see ``trak_core.testing.canonical``).
    """

    id = "base"
    backend: Any = None
    kinds: tuple[str, ...] = ("softmax", "mlp")

    def model(self, kind: str, weights: list[np.ndarray]) -> tuple[Any, Any]:
        """``(model, checkpoint)`` of canonical model ``kind`` holding ``weights``."""
        raise NotImplementedError

    def array(self, value: np.ndarray) -> Any:
        """``value`` as this backend's array on its device (dtype preserved)."""
        raise NotImplementedError

    def to_numpy(self, value: Any) -> np.ndarray:
        """``value``, an array of this backend, as a NumPy array (to compare with the reference)."""
        return np.asarray(value)

    def active(self) -> Any:
        """A context manager around each test (e.g. to switch a global mode on and off)."""
        return contextlib.nullcontext()

    def check_array(self, value: Any, like: Any) -> None:
        """Assert ``value`` is in the namespace, dtype and on the device of ``like``."""
        import array_api_compat

        assert type(value) is type(like), f"{type(value)} is not {type(like)}"
        assert value.dtype == like.dtype, f"dtype {value.dtype} is not {like.dtype}"
        assert array_api_compat.device(value) == array_api_compat.device(like), \
            f"on device {array_api_compat.device(value)!r}, not {array_api_compat.device(like)!r} (the inputs' device)"


class NumpyCase(BackendCase):
    id, backend = "numpy", "numpy"

    def model(self, kind, weights):
        return canonical.analytic_model(kind, weights), canonical.flat(weights)

    def array(self, value):
        return np.asarray(value)


class StrictCase(BackendCase):
    """array-api-strict on its non-default device ``device1``: the analytic models, any namespace."""

    id, backend = "array_api_strict:device1", "numpy"

    def __init__(self) -> None:
        import array_api_strict as xp

        self.xp, self.device = xp, xp.Device("device1")

    def model(self, kind, weights):
        return canonical.analytic_model(kind, weights), self.array(canonical.flat(weights))

    def array(self, value):
        return self.xp.asarray(np.asarray(value), device=self.device)

    def to_numpy(self, value):
        return np.asarray(value.to_device(self.xp.Device("CPU_DEVICE")))


class TorchCase(BackendCase):
    kinds = ("softmax", "mlp", "cnn", "lm")
    backend = "torch"

    def __init__(self, device: str = "cpu") -> None:
        self.device, self.id = device, f"torch:{device}"

    def model(self, kind, weights):
        return torch_model(kind, weights, self.device), self.state_dict(kind, weights)

    def state_dict(self, kind, weights):
        names = [name for name, _ in torch_model(kind, weights).named_parameters()]
        return {name: self.array(w) for name, w in zip(names, weights)}

    def array(self, value):
        import torch

        return torch.as_tensor(np.asarray(value), device=self.device)

    def to_numpy(self, value):
        return value.detach().cpu().numpy()


class JaxCase(BackendCase):
    """JAX on ``platform``; ``x64=True`` turns ``jax_enable_x64`` on for each test (float64 runs).

    Models are plain ``apply(params, inputs)`` functions (``jax_apply``), which the ``"jax"``
    backend takes as they are (a ``trak_jax.JaxModel`` would only let TRAK infer the backend).
    """

    kinds = ("softmax", "mlp", "cnn", "lm")
    backend = "jax"

    def __init__(self, platform: str = "cpu", x64: bool = False) -> None:
        import jax

        self.device, self.x64 = jax.devices(platform)[0], x64
        self.id = f"jax:{platform}" + (":x64" if x64 else "")

    def active(self) -> Any:
        import jax

        return jax.enable_x64(self.x64)

    def model(self, kind, weights):
        # the plain apply function: with backend="jax" the JAX backend takes it as it is
        return jax_apply(kind), [self.array(w) for w in weights]

    def array(self, value):
        import jax

        return jax.device_put(np.asarray(value), self.device)


def torch_model(kind: str, weights: list[np.ndarray], device: str = "cpu") -> Any:
    """The canonical model ``kind`` as a ``torch.nn.Sequential`` of the weights' sizes and dtype
    (``"lm"``: a ``trak_core.testing.torch_lm.TinyCausalLM`` taking dict batches)."""
    import torch

    if kind == "lm":
        from .torch_lm import TinyCausalLM

        (vocab, width), length, mlp = weights[0].shape, weights[1].shape[0], weights[14].shape[0]
        module = TinyCausalLM(vocab, length, width, canonical.LM_SIZES["heads"], mlp, (len(weights) - 6) // 16)
    elif kind == "softmax":
        module = torch.nn.Sequential(torch.nn.Linear(weights[0].shape[1], weights[0].shape[0]))
    elif kind == "mlp":
        (h, d), c = weights[0].shape, weights[2].shape[0]
        module = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, c))
    else:
        f, c = weights[0].shape[0], weights[2].shape[0]
        module = torch.nn.Sequential(torch.nn.Conv2d(1, f, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                     torch.nn.Linear(weights[2].shape[1], c))
    parameters = list(module.parameters())
    if [tuple(p.shape) for p in parameters] != [tuple(np.shape(w)) for w in weights]:
        raise TrakValueError(f"the weights do not fit the canonical {kind!r} model")
    with torch.no_grad():
        for parameter, value in zip(parameters, weights):
            parameter.data = torch.as_tensor(np.asarray(value)).clone()
    return module.to(device=device)


def jax_apply(kind: str) -> Any:
    """The canonical model ``kind`` as a JAX ``apply(params, x)`` on the canonical weight list."""
    import jax
    import jax.numpy as jnp

    def softmax(params, x):
        weight, bias = params
        return x @ weight.T + bias

    def mlp(params, x):
        w1, b1, w2, b2 = params
        return jnp.tanh(x @ w1.T + b1) @ w2.T + b2

    def cnn(params, x):
        kernel, bias, weight, out_bias = params
        conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW"))
        hidden = jnp.tanh(conv + bias[None, :, None, None])
        return hidden.reshape(x.shape[0], -1) @ weight.T + out_bias

    return {"softmax": softmax, "mlp": mlp, "cnn": cnn, "lm": _jax_lm}[kind]


def _jax_lm(params: list, inputs: dict) -> Any:
    """The canonical ``"lm"`` in JAX: ``{"input_ids", "attention_mask"}`` -> logits ``(n, T, V)``."""
    import jax
    import jax.numpy as jnp

    def norm(x, gain, bias):
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
        return (x - mean) / jnp.sqrt(variance + 1e-5) * gain + bias

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n, length = ids.shape
    heads, width = canonical.LM_SIZES["heads"], params[0].shape[1]
    size = width // heads
    x = params[0][ids] + params[1][:length]
    keep = (mask[:, None, None, :] != 0) & jnp.tril(jnp.ones((length, length), dtype=bool))
    for b in range((len(params) - 6) // 16):
        g1, h1, wq, bq, wk, bk, wv, bv, wo, bo, g2, h2, w1, b1, w2, b2 = params[2 + 16 * b:2 + 16 * (b + 1)]
        a = norm(x, g1, h1)
        q, k, v = ((a @ w.T + c).reshape(n, length, heads, size).transpose(0, 2, 1, 3)
                   for w, c in ((wq, bq), (wk, bk), (wv, bv)))
        scores = jnp.where(keep, q @ k.transpose(0, 1, 3, 2) / math.sqrt(size),
                           jnp.finfo(x.dtype).min)
        attention = jax.nn.softmax(scores, axis=-1) @ v
        x = x + attention.transpose(0, 2, 1, 3).reshape(n, length, width) @ wo.T + bo
        x = x + jax.nn.gelu(norm(x, g2, h2) @ w1.T + b1, approximate=True) @ w2.T + b2
    return norm(x, params[-4], params[-3]) @ params[-2].T + params[-1]


class CupyCase(BackendCase):
    """CuPy arrays through the analytic models, with the CuPy backend (its fused projection for float32)."""

    id, backend = "cupy", "cupy"

    def model(self, kind, weights):
        return canonical.analytic_model(kind, weights), self.array(canonical.flat(weights))

    def array(self, value):
        import cupy

        return cupy.asarray(np.asarray(value))

    def to_numpy(self, value):
        return value.get()


def _cuda_torch() -> bool:
    import torch

    return torch.cuda.is_available()


def _jax_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _cupy_gpu() -> bool:
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


# id -> (module needed, extra availability check, factory)
FIRST_PARTY = {
    "numpy": ("numpy", None, NumpyCase),
    "array_api_strict:device1": ("array_api_strict", None, StrictCase),
    "torch:cpu": ("torch", None, lambda: TorchCase("cpu")),
    "jax:cpu": ("jax", None, lambda: JaxCase("cpu")),
    "jax:cpu:x64": ("jax", None, lambda: JaxCase("cpu", x64=True)),
    "torch:cuda": ("torch", _cuda_torch, lambda: TorchCase("cuda")),
    "jax:gpu": ("jax", _jax_gpu, lambda: JaxCase("gpu")),
    "cupy": ("cupy", _cupy_gpu, CupyCase),
}


def unavailable(case_id: str) -> str | None:
    """Why the first-party case ``case_id`` cannot run here, or ``None`` if it can."""
    module, check, _ = FIRST_PARTY[case_id]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed: {case_id} not exercised"
    if check is not None and not check():
        return f"no GPU for {case_id}: not exercised"
    return None
