"""How ``trak_core.TRAK`` factorizes a checkpoint's kernel: its dtype, its ``lambda`` and their limits.

One job: the kernel half of featurizing (a base class of the featurizer): ``kernel_dtype="auto"`` keeps a float32
kernel where float32 holds it, and makes it again in float64 from the features where it does not (too
ill-conditioned at this ``lambda``, or out of float32's range: features so small that their squares underflow, or
so large that they overflow); where no float64 is at hand it says so, with the fix.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

from . import kernel as kernel_ops
from ._namespace import device_of, has_float64, namespace
from .errors import TrakValueError
from .regularization import choose_lambda
from .store import kernel_from_features

__all__ = ["KernelFitting"]

log = logging.getLogger("trak_core")


class KernelFitting:
    """The kernel half of featurizing (``lambda_reg``, ``kernel_dtype`` and ``proj_dim`` are TRAK's)."""

    def _factor_of(self, kernel: Any, kernel_dtype: str, features: Any, n_params: int, index: int,
                   lambda_reg: float | None = None) -> tuple[kernel_ops.KernelFactor, str]:
        """The factor of ``kernel`` (made for ``kernel_dtype``) and the kernel dtype it ended in: ``"float64"``
        when an ``"auto"`` float32 kernel was too ill-conditioned, or out of float32's range, and was made again
        from ``features``."""
        xp = namespace(kernel)
        narrow = xp.finfo(kernel.dtype).bits <= 32
        top = kernel_ops.top_eigenvalue(kernel, xp=xp) if narrow else None
        if narrow and self._out_of_range(kernel_dtype, kernel, top, index, lambda_reg):
            return self._in_float64(features, n_params, index, lambda_reg), "float64"
        factor = self._factorize(kernel, features.shape[0], n_params, index, lambda_reg)
        if narrow and factor.lambda_reg == 0 and kernel_dtype != "float32":
            warnings.warn(f"checkpoint {index}: lambda_reg=0 needs a float64 kernel (the minimum-norm solution tells "
                          f"zero eigenvalues from small ones, which float32 sums cannot) and {xp.__name__} has no "
                          "float64 here: scores may be far off the exact ones (70% in a test); use lambda_reg='auto' "
                          "(or, for JAX, set jax_enable_x64)", RuntimeWarning, stacklevel=5)
        if not narrow or not self._remake_in_float64(kernel_dtype, kernel, factor, index, top):
            return factor, kernel_dtype
        return self._in_float64(features, n_params, index, lambda_reg), "float64"

    def _in_float64(self, features: Any, n_params: int, index: int, lambda_reg: float | None) -> Any:
        wide = kernel_from_features(features, kernel_dtype="float64")
        return self._factorize(wide, features.shape[0], n_params, index, lambda_reg, ", in float64")

    def _out_of_range(self, kernel_dtype: str, kernel: Any, top: float, index: int, lambda_reg: float | None) -> bool:
        """Whether a float32 ``kernel`` (largest eigenvalue ``top``) is out of float32's range, or this ``lambda``
        is: then ``"auto"`` remakes it in float64 (``True``); otherwise an error says what to do."""
        xp = namespace(kernel)
        info = xp.finfo(kernel.dtype)
        lam = self.lambda_reg if lambda_reg is None else lambda_reg
        smallest = float(info.smallest_normal) / float(info.eps)  # below it, sums of squares lose bits to underflow
        if top == 0.0:  # every feature is zero (factorize says so), or every square underflowed
            return kernel_dtype == "auto" and has_float64(xp, device_of(kernel))
        if not math.isfinite(top):
            what = "the features' squares overflow float32 (the kernel holds inf or NaN)"
        elif top < smallest:
            what = (f"the features are so small that their squares underflow float32 (largest kernel eigenvalue "
                    f"{top:.3g})")
        elif lam != "auto" and float(lam) * 4 >= float(info.max):
            what = f"lambda_reg={float(lam):.3g} is beyond float32's range"
        else:
            return False
        return self._wider_or_raise(kernel_dtype, kernel, index, what)

    def _wider_or_raise(self, kernel_dtype: str, kernel: Any, index: int, what: str) -> bool:
        xp = namespace(kernel)
        if kernel_dtype == "auto" and has_float64(xp, device_of(kernel)):
            log.info("checkpoint %d: %s: the kernel is made again in float64", index, what)
            return True
        fix = ("use kernel_dtype='auto' or 'float64'" if kernel_dtype == "float32" else
               "set jax_enable_x64" if "jax" in xp.__name__ else "use a namespace with float64")
        raise TrakValueError(f"checkpoint {index}: {what}, so the float32 kernel cannot be factorized; {fix}, or "
                             "rescale the model's output (the scores do not depend on its scale at lambda_reg='auto')")

    def _remake_in_float64(self, kernel_dtype: str, kernel: Any, factor: kernel_ops.KernelFactor, index: int,
                           top: float) -> bool:
        """Whether ``kernel_dtype="auto"`` gave a float32 ``kernel`` (largest eigenvalue ``top``) too
        ill-conditioned for float32 at this lambda (``lambda_max / lambda > kernel.AUTO_FLOAT32_MAX_RATIO``) in a
        namespace with float64."""
        xp = namespace(kernel)
        if kernel_dtype != "auto" or factor.lambda_reg <= 0:
            return False
        ratio = top / factor.lambda_reg
        if ratio <= kernel_ops.AUTO_FLOAT32_MAX_RATIO:
            return False
        if not has_float64(xp, device_of(kernel)):
            warnings.warn(f"checkpoint {index}: the float32 kernel is ill-conditioned at lambda_reg="
                          f"{factor.lambda_reg:.4g} (lambda_max / lambda = {ratio:.3g}) and {xp.__name__} has no "
                          f"float64 here, so scores may be off by about {1e-7 * ratio:.0e} relative; raise lambda_reg "
                          "(or, for JAX, set jax_enable_x64)", RuntimeWarning, stacklevel=6)
            return False
        log.info("checkpoint %d: lambda_max / lambda = %.3g > %g: the kernel is made again in float64 (a float32 "
                 "kernel would cost scores about %.0e relative; kernel_dtype='float32' keeps it)", index, ratio,
                 kernel_ops.AUTO_FLOAT32_MAX_RATIO, 1e-7 * ratio)
        return True

    def _kernel_dtype(self, lambda_reg: Any) -> str:
        """``kernel_dtype`` for this ``lambda_reg``: ``"auto"`` is ``"float64"`` when ``lambda_reg == 0`` (the
        minimum-norm solution tells zero eigenvalues from small ones, which float32 sums cannot)."""
        chosen = getattr(self, "kernel_dtype", "auto")
        return "float64" if chosen == "auto" and lambda_reg == 0 else chosen

    def _factorize(self, kernel: Any, n_train: int, n_params: int, index: int,
                   lambda_reg: float | None = None, note: str = "") -> kernel_ops.KernelFactor:
        xp = namespace(kernel)
        lam = self.lambda_reg if lambda_reg is None else lambda_reg
        if lam == "auto":
            lam = choose_lambda(kernel, n_train, n_params=n_params, xp=xp, dim=self.proj_dim)
        width = self.proj_dim if self.proj_dim is not None else n_params
        # the Gram matrix when n < k (a store written before it was used holds Phi^T Phi: its shape says so)
        space = "n" if kernel_ops.space_for(n_train, width) == "n" and kernel.shape[0] == n_train else "k"
        factor = kernel_ops.factorize(kernel, lam, xp=xp, space=space)
        how = " (stored)" if lambda_reg is not None else " (auto)" if self.lambda_reg == "auto" else ""
        log.info("checkpoint %d: %d examples, k=%d, lambda=%.4g%s, %s-space kernel rank %d%s", index, n_train, width,
                 lam, how, space, factor.rank, note)
        return factor
