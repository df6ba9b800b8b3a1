"""Backends: the protocol a framework backend implements, and the registry that finds them.

Only the Array API reference backend (``"numpy"``) lives inside ``trak_core``; framework
backends are separate packages registered under the entry-point group ``trak_core.backends``.
"""
from .protocol import Backend, BackendError, MissingFrameworkError, UnknownBackendError, check_backend
from .registry import (ENTRY_POINT_GROUP, BackendPluginWarning, available_backends, get_backend, infer_backend,
                       register_backend)

__all__ = ["Backend", "check_backend", "BackendError", "MissingFrameworkError", "UnknownBackendError", "ENTRY_POINT_GROUP",
           "BackendPluginWarning", "available_backends", "get_backend", "infer_backend", "register_backend"]
