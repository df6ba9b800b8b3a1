"""Ambient torch settings under which per-example gradients would be silently wrong: refused with the fix.

One job: :meth:`trak_torch.TorchBackend.prepare` and ``gradients`` refuse to run

- inside ``torch.nn.utils.parametrize.cached()``: a parametrized weight is then computed once, from the model's own
  originals, and reused; the originals the backend passes (each checkpoint's) never reach it, so their gradients
  were 0 and a later checkpoint ran with the first one's weight;
- inside ``torch.autocast``: the model's forward and trak-core's own products (the projection, the kernel) would run
  in bfloat16/float16, features were stored in half precision and a disk store could not take them. A model in half
  precision is supported as such (``model.to(torch.bfloat16)``: gradients in its dtype, features in float32).
"""
from __future__ import annotations

from typing import Any

from trak_core.errors import TrakValueError

__all__ = ["check_context"]


def _autocast_on(device_type: str) -> bool:
    import torch

    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def check_context(device: Any) -> None:
    """Raise ``TrakValueError`` inside ``parametrize.cached()`` or ``torch.autocast`` (for ``device``'s type or
    the CPU), naming what to change."""
    from torch.nn.utils import parametrize

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
