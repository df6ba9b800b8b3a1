"""Find backends by name or from the model's type; plug-ins register through entry points.

One job: map names to backend objects. Entry points in the group ``trak_core.backends`` name
an object (or a zero-argument factory) implementing ``Backend``.
Nothing here imports a framework: a framework's presence is checked with ``find_spec``.
"""
from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import entry_points
from typing import Any

from ..errors import TrakTypeError
from .protocol import Backend, MissingFrameworkError, UnknownBackendError, check_backend

__all__ = ["ENTRY_POINT_GROUP", "register_backend", "get_backend", "available_backends", "infer_backend"]

ENTRY_POINT_GROUP = "trak_core.backends"

# First-party backends, known even when their package is absent, so the error can name the extra.
KNOWN = {"numpy": ("trak_core.backends.numpy_backend:backend", "numpy", None),
         "torch": ("trak_torch:backend", "torch", "torch"),
         "jax": ("trak_jax:backend", "jax", "jax"),
         "cupy": ("trak_cupy:backend", "cupy", "cupy")}

_registered: dict[str, Any] = {}  # filled by register_backend (tests, plug-ins at run time)
_loaded: dict[str, Backend] = {}


def register_backend(backend: Backend, *, name: str | None = None) -> None:
    """Register ``backend`` under ``name`` (default ``backend.name``) for this process."""
    check_backend(backend)
    name = name or backend.name
    _registered[name] = backend
    _loaded.pop(name, None)


def _targets() -> dict[str, str | Any]:
    """Every known name mapped to ``module:attr`` or an already-built backend object."""
    found: dict[str, str | Any] = {name: spec for name, (spec, _, _) in KNOWN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    found.update(_registered)
    return found


NEEDS = {"cupy": "CuPy and a CUDA device (an NVIDIA GPU)"}


def _framework_missing(name: str, framework: str | None, extra: str | None) -> MissingFrameworkError:
    install = f'pip install "trak-core[{extra}]"' if extra else f"pip install {framework}"
    needs = NEEDS.get(name, f"the framework {framework!r}")
    return MissingFrameworkError(
        f"backend {name!r} needs {needs}, and {framework!r} is not installed here; install it with: {install}")


def _framework_present(framework: str | None) -> bool:
    return framework is None or importlib.util.find_spec(framework) is not None


def get_backend(name: str) -> Backend:
    """Return the backend registered as ``name``.

    Raises
    ------
    UnknownBackendError
        If no backend has that name (the message lists the installed ones).
    MissingFrameworkError
        If the backend or its framework is not installed (the message gives the pip extra).
    """
    if name in _loaded:
        return _loaded[name]
    targets = _targets()
    if name not in targets:
        raise UnknownBackendError(f"unknown backend {name!r}; installed backends: {available_backends()}; "
                                  f"known backends: {sorted(targets)}")
    target = targets[name]
    _, framework, extra = KNOWN.get(name, (None, getattr(target, "framework", None), getattr(target, "extra", None)))
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        if importlib.util.find_spec(module_name.split(".")[0]) is None:
            raise _framework_missing(name, framework, extra)
        obj = getattr(importlib.import_module(module_name), attr)
        target = check_backend(obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend))
                               else obj)
    if not _framework_present(target.framework):
        raise _framework_missing(name, target.framework, target.extra)
    _loaded[name] = target
    return target


def available_backends() -> list[str]:
    """Names of the backends whose package and framework are installed (nothing is imported)."""
    names = []
    for name, target in _targets().items():
        if isinstance(target, str):
            module = target.partition(":")[0].split(".")[0]
            framework = KNOWN.get(name, (None, None, None))[1]
            ok = importlib.util.find_spec(module) is not None and _framework_present(framework)
        else:
            ok = _framework_present(target.framework)
        if ok:
            names.append(name)
    return sorted(names)


def infer_backend(model: Any) -> Backend:
    """The first installed backend that owns ``model`` (frameworks not yet imported are not tried)."""
    for name in available_backends():
        try:
            backend = get_backend(name)
        except MissingFrameworkError:
            continue
        if backend.owns(model):
            return backend
    raise TrakTypeError(f"no installed backend recognises a model of type {type(model).__module__}."
                        f"{type(model).__name__}; installed backends: {available_backends()}. Pass backend=... "
                        f"explicitly or install the backend for this model's framework")
