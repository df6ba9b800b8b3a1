"""Every exception trak-core raises on purpose, under one base class.

One job: the exception hierarchy. Each class keeps the built-in base that code written against
earlier versions catches (``ValueError``, ``TypeError``, ``ImportError``, ``OSError``), and all of
them derive from ``TrakCoreError``, so ``except trak_core.TrakCoreError`` catches every
error that trak-core itself raises (and nothing that a framework raises).

Errors raised inside a model (its ``forward``, a framework's shape check) keep their own type
and message; trak-core adds a note (Python 3.11+) naming the checkpoint and batch, for example
``trak-core: raised in checkpoint 0, batch 3, in backend 'torch' (...)``. Errors of trak-core
raised by a backend start with the same location.
"""
from __future__ import annotations

__all__ = ["TrakCoreError", "TrakValueError", "TrakTypeError", "TrakOSError", "BackendError", "UnknownBackendError",
           "MissingFrameworkError", "StoreMismatchError", "StoreDamagedError", "install_hint", "half_precision_hint",
           "non_finite_parameters"]


_WHEELS = {  # which build of a framework a bare install gets, and where to pick another
    "torch": ("; a bare torch may be a multi-GB CUDA build: for a CPU-only or a given CUDA version's wheel, install "
              "torch first with the command from https://pytorch.org/get-started/locally/"),
    "jax": ('; that is JAX for CPU: for an NVIDIA GPU, pip install "jax[cuda12]" (or "jax[cuda13]"; see '
            "https://docs.jax.dev/en/latest/installation.html)"),
    "cupy": ('; take the CuPy of your CUDA driver\'s major version (nvidia-smi shows it): ".[cupy-cuda12]" or '
             '".[cupy-cuda13]" in a checkout'),
}


def install_hint(extra: str, packages: str) -> str:
    """How to install what trak-core's extra ``extra`` holds: its ``packages`` from PyPI, or the extra from a
    trak-core checkout (trak-core itself is not on PyPI, so ``pip install "trak-core[extra]"`` finds nothing);
    for ``torch``, ``jax`` and ``cupy``, which build that gets and where to choose a CPU or CUDA one."""
    return f'pip install {packages} (or, in a trak-core checkout, pip install -e ".[{extra}]")' + _WHEELS.get(extra, "")


def non_finite_parameters(names: list) -> "TrakValueError":
    """The error for a checkpoint whose attributed parameters ``names`` hold NaN or inf (training diverged), which
    every backend raises before featurizing: an infinite weight saturates tanh, and the gradients, out-to-loss
    weights and scores of such a checkpoint can all come out finite."""
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return TrakValueError(f"the checkpoint's parameters contain NaN or inf: {list(names)[:5]}{more}; featurize a "
                          "checkpoint saved before training diverged")


def half_precision_hint(dtype: object, info: object) -> str:
    """For non-finite gradients of ``dtype`` (``info``: its ``finfo``), what float16's range means, with the fix;
    ``""`` for any dtype with float32's range (bfloat16 included). Appended to an error's message."""
    largest = float(getattr(info, "max"))
    if getattr(info, "bits") >= 32 or largest >= 1e38:
        return ""
    return (f"; the gradients are {dtype}, whose largest finite value is {largest:.5g}: larger ones overflow to inf "
            "even where the inputs and weights are finite, so featurize the model in float32 (for torch: "
            "model.float()) or bfloat16")


class TrakCoreError(Exception):
    """Base of every error trak-core raises on purpose."""


class TrakValueError(TrakCoreError, ValueError):
    """A value is wrong: a shape, a size, a setting, non-finite numbers, inconsistent data."""


class TrakTypeError(TrakCoreError, TypeError):
    """An argument is of the wrong type (a model, a batch, a backend object)."""


class TrakOSError(TrakCoreError, OSError):
    """A store cannot be read or written (permissions, a full disk, a path that is a file)."""


class BackendError(TrakValueError):
    """A backend cannot be found or cannot run here."""


class UnknownBackendError(BackendError):
    """No backend is registered under the requested name."""


class MissingFrameworkError(BackendError, ImportError):
    """A framework, a backend package or an optional dependency (zarr, Ray) is not installed."""


class StoreMismatchError(TrakValueError):
    """A store holds features of another configuration, checkpoint or training set than this run's."""


class StoreDamagedError(StoreMismatchError):
    """A store's file is damaged: a chunk fails its checksum, or a ``zarr.json`` is truncated, zeroed or deleted.
    A ``StoreMismatchError`` too, the class a damaged checkpoint raised before this one."""
