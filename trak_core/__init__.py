"""trak-core: training-data attribution with TRAK, written once over the Python Array API.

Importing this package imports no framework (torch, JAX, CuPy); backends import theirs lazily.
"""
from .backends import Backend, available_backends, get_backend, register_backend
from .errors import (BackendError, MissingFrameworkError, StoreDamagedError, StoreMismatchError, TrakCoreError,
                     TrakOSError, TrakTypeError, TrakValueError, UnknownBackendError)
from . import fingerprints
from .executors import RayExecutor
from .store import Store, Writer
from .kernel import KernelFactor
from .kronecker import Kronecker
from .models import MLP, AnalyticModel, SoftmaxRegression
from .projection import ProjectionCache, project, projection_matrix
from .evaluation import LDSResult, lds, subset_masks
from .tasks import Classification, CustomTask, Regression, Task
from .trak import TRAK

__version__ = "0.1.0"

__all__ = ["TRAK", "project", "projection_matrix", "ProjectionCache", "available_backends", "get_backend",
           "register_backend", "Backend", "Store", "Writer", "RayExecutor", "TrakCoreError", "TrakValueError",
           "TrakTypeError", "TrakOSError", "BackendError", "UnknownBackendError", "MissingFrameworkError",
           "StoreMismatchError", "StoreDamagedError", "fingerprints",
           "Task", "Classification", "Regression", "CustomTask", "lds", "subset_masks", "LDSResult", "AnalyticModel", "SoftmaxRegression", "MLP",
           "KernelFactor", "Kronecker", "__version__"]
