"""Ambient torch settings under which per-example gradients would be silently wrong: refused with the fix.

One job: :meth:`trak_torch.TorchBackend.prepare` and ``gradients`` refuse to run

- inside ``torch.nn.utils.parametrize.cached()``: a parametrized weight is then computed once, from the model's own
  originals, and reused; the originals the backend passes (each checkpoint's) never reach it, so their gradients
  were 0 and a later checkpoint ran with the first one's weight;
- inside ``torch.autocast``: the model's forward and trak-core's own products (the projection, the kernel) would run
  in bfloat16/float16, features were stored in half precision and a disk store could not take them. A model in half
  precision is supported as such (``model.to(torch.bfloat16)``: gradients in its dtype, features in float32);
- with an array-api-compat whose torch reductions drop autograd (1.11 with torch 2.3 to 2.7: ``sum`` went through
  ``torch.asarray``): the tasks' margins came out detached, the gradients 2x off with no error.
"""
from __future__ import annotations

from typing import Any

from trak_core.errors import BackendError, TrakValueError

__all__ = ["check_context"]

_namespace_checked: list[bool] = []  # once per process


def _autocast_on(device_type: str) -> bool:
    import torch

    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def _check_namespace_autograd() -> None:
    """Raise ``BackendError`` if array-api-compat's torch namespace loses autograd through the reductions the
    tasks use (``sum``, ``max``, ``exp``, ``log``): checked once per process, on a 2-element tensor."""
    if _namespace_checked:
        return
    import array_api_compat
    import array_api_compat.torch as xp
    import torch

    with torch.inference_mode(False), torch.enable_grad():  # the caller may be under no_grad() or inference_mode()
        x = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
        kept = all(value.requires_grad for value in (xp.sum(x), xp.max(x), xp.exp(x), xp.log(x),
                                                     xp.sum(x * x, axis=0)))
    if not kept:
        raise BackendError(f"array-api-compat {array_api_compat.__version__} with torch {torch.__version__} drops "
                           "autograd through its reductions (xp.sum of a tensor that requires grad does not), so "
                           "per-example gradients would be wrong: pip install 'array-api-compat>=1.13'")
    _namespace_checked.append(True)


def check_context(device: Any) -> None:
    """Raise ``TrakValueError`` inside ``parametrize.cached()`` or ``torch.autocast`` (for ``device``'s type or
    the CPU), naming what to change; ``BackendError`` for an array-api-compat that drops autograd."""
    from torch.nn.utils import parametrize

    _check_namespace_autograd()

    if getattr(parametrize, "_cache_enabled", 0):
        raise TrakValueError("trak-core runs inside torch.nn.utils.parametrize.cached(): parametrized weights are "
                             "then computed once from the model's own parameters and reused, so each checkpoint's "
                             "parameters would not reach them (their gradients were 0): call featurize and score "
                             "outside the cached() block")
    types = {"cpu", getattr(device, "type", "cpu")}
    on = sorted(kind for kind in types if _autocast_on(kind))
    if on:
        raise TrakValueError(f"trak-core runs inside torch.autocast({on[0]!r}): the model's forward and trak-core's "
                             "own products (projection, kernel) would run in half precision, and features would be "
                             "stored in it: call featurize and score outside autocast (a model in half precision "
                             "is supported as such: model.to(torch.bfloat16), features are kept in float32)")
