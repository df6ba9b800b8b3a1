"""Find backends by name or from the model's type; plug-ins register through entry points.

One job: map names to backend objects. Entry points in the group ``trak_core.backends`` name
an object (or a zero-argument factory) implementing ``Backend``, whose ``name`` equals the
entry point's name.
Nothing here imports a framework: a framework's presence is checked with ``find_spec``. The
first-party backends (``KNOWN``) are listed without importing anything; a third-party plug-in's
module is imported to read its ``framework`` (plug-ins import their framework lazily, as trak-core's do).

A plug-in that fails to load (its module is missing or raises, its object is not a ``Backend``, its
name differs from the entry point's) never breaks the others: listing and inference skip it with a
``BackendPluginWarning``, and ``get_backend`` of its name raises an error naming the entry point,
its target, its distribution and the fix. Inference skips a plug-in whose ``owns`` raises the same way.
"""
from __future__ import annotations

import importlib.util
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Union

from .. import notices
from ..errors import TrakTypeError, install_hint
from .protocol import Backend, BackendError, MissingFrameworkError, UnknownBackendError, check_backend

__all__ = ["ENTRY_POINT_GROUP", "BackendPluginWarning", "register_backend", "get_backend", "available_backends",
           "infer_backend", "check_backend_object"]

ENTRY_POINT_GROUP = "trak_core.backends"

# First-party backends, known even when their package is absent, so the error can name the extra. Inference asks
# them first, in this order, so that a third-party backend's ``owns`` cannot take their models over.
KNOWN = {"numpy": ("trak_core.backends.numpy_backend:backend", "numpy", None),
         "torch": ("trak_torch:backend", "torch", "torch"),
         "jax": ("trak_jax:backend", "jax", "jax"),
         "cupy": ("trak_cupy:backend", "cupy", "cupy")}

NEEDS = {"cupy": "CuPy and a CUDA device (an NVIDIA GPU)"}
PACKAGES = {"cupy": "cupy-cuda12x (or cupy-cuda13x)"}  # a first-party extra's package where it is not the module's name

Target = Union[EntryPoint, Backend]

_registered: dict[str, Any] = {}  # filled by register_backend (tests, plug-ins at run time)
_loaded: dict[str, Backend] = {}
_warned: set[tuple[str, str]] = set()  # (name, entry point target or "registered"): plug-ins already warned about
_warned_lock = threading.Lock()


class BackendPluginWarning(RuntimeWarning):
    """A backend plug-in (entry point of the group ``trak_core.backends``) failed to load and was skipped."""


def register_backend(backend: Backend, *, name: str | None = None) -> None:
    """Register ``backend`` under ``name`` (default ``backend.name``; another name is an error: a store records the
    backend's name, and reopening it looks that name up) for this process.

    Parameters
    ----------
    backend : Backend
        A ``trak_core.Backend`` with a non-empty ``name``; it replaces, for this process, a backend registered or
        declared by an entry point under that name.
    name : str, optional
        Must equal ``backend.name``, the default.

    Raises
    ------
    TrakTypeError
        If ``backend`` is not a ``Backend`` with a name.
    BackendError
        If the name is one of trak-core's own (``numpy``, ``torch``, ``jax``, ``cupy``) or differs from
        ``backend.name``.
    """
    check_backend(backend)
    name = name or backend.name
    if name in KNOWN:
        raise BackendError(f"register_backend: {name!r} is trak-core's own backend, which cannot be replaced (stores "
                           f"written with one would be reopened with the other); give yours another name")
    if name != backend.name:
        raise BackendError(f"register_backend: name={name!r} differs from the backend's name {backend.name!r}; a store "
                           f"records {backend.name!r}, so stores written with it could not be reopened by {name!r}. "
                           "Leave name= out, or set the backend's name")
    _registered[name] = backend
    _loaded.pop(name, None)
    _warned.discard((name, "registered"))  # a new object: its own failures are said


def check_backend_object(backend: Backend) -> Backend:
    """``backend``, an object passed as ``TRAK(backend=...)`` or ``TRAK.open(backend=...)``, checked as
    ``register_backend`` and the entry points check theirs.

    A store records ``backend.name`` and is reopened with ``get_backend`` of that name, so the object needs a name,
    and one of trak-core's own (``numpy``, ``torch``, ``jax``, ``cupy``) only if it is that backend (an instance of
    its class, or of a subclass: ``TorchBackend(params=...)``).

    Parameters
    ----------
    backend : Backend
        The object to check.

    Returns
    -------
    Backend
        ``backend`` itself.

    Raises
    ------
    TrakTypeError
        If ``backend`` is not a ``Backend`` with a non-empty name.
    BackendError
        If its name is one of trak-core's own and it is not that backend.
    """
    check_backend(backend)
    name = backend.name
    if name not in KNOWN:
        return backend
    spec = KNOWN[name][0]
    own: type | None = None
    if _importable(spec.partition(":")[0]):
        try:  # the first-party package imports no framework
            own = type(EntryPoint(name, spec, ENTRY_POINT_GROUP).load())
        except Exception:  # a broken first-party install: the object cannot be shown to be that backend
            own = None
    if own is None or not isinstance(backend, own):
        raise BackendError(f"backend {type(backend).__module__}.{type(backend).__name__} is named {name!r}, the name "
                           f"of trak-core's own backend ({spec}), but is not that backend; a store records the name "
                           f"and is reopened with trak-core's {name!r}. Give your backend another name (its class "
                           "attribute `name`)")
    return backend


class _Clash:
    """A name that two third-party entry points declare: neither is loaded, and asking for it says why."""

    def __init__(self, first: EntryPoint, second: EntryPoint) -> None:
        self.first, self.second = first, second

    def error(self) -> BackendError:
        return BackendError(f"backend {self.first.name!r} is declared twice: by the {_where(self.first)} and by the "
                            f"{_where(self.second)}; neither is used, as either could be taken for the other (a "
                            "store records only the name). Uninstall one of them, or rename one (its entry point and "
                            "its backend's name)")


def _targets() -> dict[str, Target]:
    """Every known name mapped to its entry point or to an already-built (registered) backend object.

    trak-core's own names stay trak-core's: a third-party entry point of such a name is skipped with a
    ``BackendPluginWarning``; a name two third-party entry points declare is used by neither."""
    found: dict[str, Any] = {name: EntryPoint(name, spec, ENTRY_POINT_GROUP) for name, (spec, _, _) in KNOWN.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in KNOWN:
            if not _first_party(ep.name, ep):
                _warn_once(ep.name, ep, f"skipped a trak-core backend plug-in: the {_where(ep)} takes the name of "
                           f"trak-core's own backend {ep.name!r}, which a plug-in cannot replace; rename it (its entry "
                           "point and its backend's name)")
            continue
        previous = found.get(ep.name)
        if previous is None:
            found[ep.name] = ep
        elif not isinstance(previous, _Clash) and previous.value != ep.value:  # the same one seen twice: no clash
            found[ep.name] = _Clash(previous, ep)
    found.update(_registered)
    return found


def _first_party(name: str, target: Target) -> bool:
    """Whether ``target`` is trak-core's own entry point for ``name`` (its package may be absent)."""
    return isinstance(target, EntryPoint) and name in KNOWN and target.value == KNOWN[name][0]


def _distribution(ep: EntryPoint) -> str | None:
    """``name version`` of the distribution that declares ``ep``, or ``None`` when unknown."""
    dist = getattr(ep, "dist", None)
    try:
        return f"{dist.name} {dist.version}" if dist is not None and dist.name else None
    except Exception:  # malformed metadata: the name is only for the message
        return None


def _where(ep: EntryPoint) -> str:
    """The entry point, its target and its distribution, for messages."""
    dist = _distribution(ep)
    return (f"entry point '{ep.name} = {ep.value}' (group {ENTRY_POINT_GROUP!r}) of the distribution "
            + (repr(dist) if dist else "that declares it (unknown: see pip list)"))


def _fix(ep: EntryPoint) -> str:
    """How to repair a broken plug-in: reinstall or uninstall the package that declares it."""
    if _first_party(ep.name, ep):
        return "reinstall trak-core: pip install --force-reinstall trak-core"
    dist = _distribution(ep)
    if dist is None:
        return "reinstall or uninstall the package that declares this entry point"
    package = dist.split(" ")[0]
    return (f"if you maintain it, fix its target {ep.value!r} or the object it names; otherwise reinstall that package "
            f"(pip install --force-reinstall {package}) or uninstall it (pip uninstall {package})")


def _load_failure(ep: EntryPoint, err: Exception) -> BackendError | TrakTypeError:
    """A trak-core error for an entry point whose loading raised ``err``, naming it and the fix."""
    if isinstance(err, ModuleNotFoundError) and err.name and (ep.module + ".").startswith(err.name + "."):
        problem = f"its module {err.name!r} is not installed ({type(err).__name__}: {err})"
    else:
        problem = f"loading it raised {type(err).__name__}: {err}"
    message = f"backend {ep.name!r} cannot be loaded: {_where(ep)} is broken: {problem}; {_fix(ep)}"
    if isinstance(err, ImportError):
        return MissingFrameworkError(message)
    return TrakTypeError(message) if isinstance(err, TrakTypeError) else BackendError(message)


def _load(name: str, target: Target) -> Backend:
    """The backend object of ``target``, loaded and checked (its framework is not checked here).

    Raises
    ------
    MissingFrameworkError
        If a first-party backend's package is absent, or a plug-in's module cannot be imported.
    TrakTypeError
        If a plug-in names an object that is not a ``Backend``.
    BackendError
        If a plug-in fails to load otherwise, or its ``name`` differs from the entry point's.
    """
    if isinstance(target, _Clash):
        raise target.error()
    if not isinstance(target, EntryPoint):
        return target
    if _first_party(name, target) and not _importable(target.module):
        _, framework, extra = KNOWN[name]
        raise _framework_missing(name, framework, _install(name, target, framework, extra))
    try:
        obj = target.load()
        backend = check_backend(obj() if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Backend))
                                else obj)
        if backend.framework is not None and (not isinstance(backend.framework, str) or not backend.framework):
            raise TrakTypeError(f"its framework is {backend.framework!r}: it must be None or the framework's "
                                "top-level module name")
    except Exception as err:  # any failure of a plug-in's own code is reported as a broken plug-in
        raise _load_failure(target, err) from err
    if backend.name != name:
        raise BackendError(
            f"backend {name!r} cannot be loaded: {_where(target)} gives a backend named {backend.name!r}; a store "
            f"records the backend's name, so stores written with it could not be reopened by {name!r}. Make them "
            f"equal: name the entry point {backend.name!r}, or set name = {name!r} on the Backend class")
    return backend


def _importable(module: str | None) -> bool:
    """Whether ``module`` (its top-level package) is installed, without importing it."""
    return module is None or importlib.util.find_spec(module.split(".")[0]) is not None


def _install(name: str, target: Target, framework: str | None, extra: str | None) -> str:
    """The pip command that installs ``framework``: a trak-core extra only for trak-core's own backends."""
    if not isinstance(target, EntryPoint):  # a backend registered at run time: its extra is not trak-core's
        return f"pip install {framework}"
    if not _first_party(name, target):
        dist = _distribution(target)
        if extra and dist:
            return f'pip install "{dist.split(" ")[0]}[{extra}]"'
        return f"pip install {framework}"
    return install_hint(extra, PACKAGES.get(extra, framework)) if extra else f"pip install {framework}"


def _framework_missing(name: str, framework: str | None, install: str) -> MissingFrameworkError:
    needs = NEEDS.get(name, f"the framework {framework!r}")
    return MissingFrameworkError(
        f"backend {name!r} needs {needs}, and {framework!r} is not installed here; install it with: {install}")


def _installed(name: str, target: Target, *, warn: bool) -> bool:
    """Whether ``name`` can be used here; a plug-in that fails to load is skipped with a warning if ``warn``."""
    if name in _loaded:
        return True
    if _first_party(name, target):  # nothing imported
        return _importable(target.module) and _importable(KNOWN[name][1])
    try:
        backend = _load(name, target)
    except (BackendError, TrakTypeError) as err:
        if warn:
            _warn_once(name, target, f"skipped a trak-core backend plug-in: {err}")
        return False
    if not _importable(backend.framework):
        return False
    _loaded[name] = backend
    return True


def _warn_once(name: str, target: Any, message: str) -> None:
    """Say ``message`` as a ``BackendPluginWarning`` the first time this plug-in (``name`` and its entry point's
    target, the clashing ones', or ``"registered"``) is skipped in this process; listing and inference skip it again
    at every call, and a warning per call repeated itself under ``simplefilter("always")``."""
    if isinstance(target, _Clash):
        key = (name, f"{target.first.value} | {target.second.value}")
    else:
        key = (name, target.value if isinstance(target, EntryPoint) else "registered")
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    notices.warn(message, BackendPluginWarning)


def get_backend(name: str) -> Backend:
    """Return the backend registered as ``name``.

    Parameters
    ----------
    name : str
        A backend's ``name``: one of trak-core's own (``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``), an
        entry point's of the group ``trak_core.backends``, or one given to ``register_backend``.

    Returns
    -------
    Backend
        The backend object, loaded at the first call (the same object at the next ones).

    Raises
    ------
    UnknownBackendError
        If no backend has that name (the message lists the installed ones).
    MissingFrameworkError
        If the backend or its framework is not installed (the message gives the pip command), or a
        plug-in's module cannot be imported (the message names the entry point and its distribution).
    TrakTypeError
        If a plug-in's entry point names an object that is not a ``Backend``.
    BackendError
        If a plug-in fails to load otherwise, or its ``name`` differs from its entry point's.
    """
    if name in _loaded:
        return _loaded[name]
    targets = _targets()
    if name not in targets:
        raise UnknownBackendError(f"unknown backend {name!r}; installed backends: {_available(targets, warn=False)}; "
                                  f"known backends: {sorted(targets)}")
    target = targets[name]
    backend = _load(name, target)
    if not _importable(backend.framework):
        raise _framework_missing(name, backend.framework, _install(name, target, backend.framework, backend.extra))
    _loaded[name] = backend
    return backend


def _available(targets: dict[str, Target], *, warn: bool) -> list[str]:
    return sorted(name for name, target in targets.items() if _installed(name, target, warn=warn))


def available_backends() -> list[str]:
    """Names of the backends whose package and framework are installed and that load.

    No framework is imported; first-party backends are not imported either. A third-party plug-in's
    module is imported to read its ``framework``; one that fails to load is left out with a
    ``BackendPluginWarning``.

    Returns
    -------
    list of str
        The names, sorted; each one ``get_backend`` and ``TRAK(backend=...)`` accept.
    """
    return _available(_targets(), warn=True)


def infer_backend(model: Any) -> Backend:
    """The first installed backend that owns ``model`` (frameworks not yet imported are not tried).

    The first-party backends are asked first (numpy, torch, jax, cupy), then the others by name; a
    plug-in that fails to load is skipped with a ``BackendPluginWarning``.
    """
    targets = _targets()
    order = [name for name in KNOWN if name in targets] + sorted(name for name in targets if name not in KNOWN)
    for name in order:
        if not _installed(name, targets[name], warn=True):
            continue
        try:
            backend = get_backend(name)
        except (BackendError, TrakTypeError) as err:  # a first-party package that is installed but fails to load
            _warn_once(name, targets[name], f"skipped a trak-core backend: {err}")
            continue
        try:
            owned = backend.owns(model)
        except Exception as err:  # a plug-in's owns that raises must not break inference for every model
            target = targets[name]
            if _first_party(name, target):
                raise
            where = _where(target) if isinstance(target, EntryPoint) else "registered with register_backend"
            _warn_once(name, target, f"skipped trak-core backend {name!r} ({where}): its owns(model) raised "
                       f"{type(err).__name__}: {err}; owns must return False for models it does not know. "
                       "Pass backend=... to choose a backend explicitly")
            continue
        if owned:
            return backend
    raise TrakTypeError(f"no installed backend recognises a model of type {type(model).__module__}."
                        f"{type(model).__name__}; installed backends: {_available(targets, warn=False)}. Pass "
                        f"backend=... explicitly or install the backend for this model's framework")
