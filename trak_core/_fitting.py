"""How ``trak_core.TRAK`` factorizes a checkpoint's kernel: its dtype, its ``lambda`` and their limits.

One job: the kernel half of featurizing (a base class of the featurizer): ``kernel_dtype="auto"`` keeps a float32
kernel where float32 holds it, and makes it again in float64 from the features where it does not (too
ill-conditioned at this ``lambda``, or out of float32's range: features so small that their squares underflow, or
so large that they overflow); where no float64 is at hand it says so, with the fix.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

from . import kernel as kernel_ops
from ._checks import _check_lambda
from ._namespace import device_of, has_float64, namespace
from ._progress import progress
from .errors import TrakValueError
from .notices import warn
from .regularization import choose_lambda
from .store import kernel_from_features

__all__ = ["KernelFitting"]

log = logging.getLogger("trak_core")
_RESCALE = "rescale the model's output (the scores do not depend on its scale at lambda_reg='auto')"


class KernelFitting:
    """The kernel half of featurizing (``lambda_reg``, ``kernel_dtype`` and ``proj_dim`` are TRAK's), and
    ``refit``."""

    @property
    def lambdas(self) -> list[float]:
        """The ridge ``lambda`` used for each featurized checkpoint."""
        self._load_opened(None)
        return [entry.factor.lambda_reg for entry in self.store]

    def refit(self, lambda_reg: float | str) -> None:
        """Refactorize every featurized checkpoint's kernel with another ``lambda_reg`` (no re-featurizing). An
        on-disk store keeps the ``lambda`` each checkpoint was featurized with: ``TRAK.open`` scores with it again.

        Parameters
        ----------
        lambda_reg : "auto" or float
            The new ridge, as in ``TRAK(lambda_reg=...)``; it becomes this estimator's ``lambda_reg``.

        Notes
        -----
        With an on-disk store, a later ``featurize`` of a new checkpoint at another setting than the stored
        checkpoints' is refused (``StoreMismatchError``: a store does not mix ridge settings); ``refit`` back to
        the stored setting first (the error names it), or featurize into a new store.
        """
        self.lambda_reg = _check_lambda(lambda_reg)
        self._load_opened(None)
        self._refitting = self.lambda_reg  # until every checkpoint holds it: interrupted, score() refuses a mix
        for entry in progress(list(self.store), desc=f"refit lambda_reg={self.lambda_reg}", enabled=self.progress):
            kernel_dtype = self._kernel_dtype(self.lambda_reg)
            if kernel_dtype != entry.kernel_dtype:  # "auto" and lambda 0: the kernel made again in float64
                entry.kernel_dtype, entry.kernel_loader = kernel_dtype, None
            entry.factor, made_in = self._factor_of(entry.kernel, kernel_dtype, entry.features, entry.n_params,
                                                    entry.index)
            if made_in != kernel_dtype:  # "auto" and a float32 kernel too ill-conditioned at this lambda
                entry.kernel_dtype, entry.kernel_loader = made_in, None
        self._refitting = None

    def _factor_of(self, kernel: Any, kernel_dtype: str, features: Any, n_params: int, index: int,
                   lambda_reg: float | None = None) -> tuple[kernel_ops.KernelFactor, str]:
        """The factor of ``kernel`` (made for ``kernel_dtype``) and the kernel dtype it ended in: ``"float64"``
        when an ``"auto"`` float32 kernel was too ill-conditioned, or out of float32's range, and was made again
        from ``features``."""
        xp = namespace(kernel)
        narrow = xp.finfo(kernel.dtype).bits <= 32
        if narrow:  # decided before factorizing: a float32 factor made only to be thrown away cost O(k^3), and its
            top = kernel_ops.top_eigenvalue(kernel, xp=xp)  # failed Cholesky warned of a fallback that never served
            lam = self._lambda_of(kernel, features.shape[0], n_params, lambda_reg)
            if (self._out_of_range(kernel_dtype, kernel, top, index, lam)
                    or self._remake_in_float64(kernel_dtype, kernel, lam, index, top)):
                return self._in_float64(features, n_params, index, lambda_reg), "float64"
        else:
            self._warn_subnormal(kernel, features, index, n_params)
        with _zero_kernel(kernel, features, index, self.task):
            factor = self._factorize(kernel, features.shape[0], n_params, index, lambda_reg,
                                     lam=lam if narrow else None)
        if narrow and factor.lambda_reg == 0:  # "auto" at lambda 0 is float64 wherever the namespace has it
            why = ("kernel_dtype='float32' keeps float32: use kernel_dtype='auto' or 'float64'"
                   if has_float64(xp, device_of(kernel)) else
                   f"{xp.__name__} has no float64 here: use lambda_reg='auto' (or, for JAX, set jax_enable_x64)")
            warn(f"checkpoint {index}: lambda_reg=0 needs a float64 kernel (the minimum-norm solution tells "
                 "zero eigenvalues from small ones, which float32 sums cannot: a rank deficiency reported for "
                 f"this float32 kernel may be its rounding) and {why}; scores may be far off the exact ones "
                 "(60-70% in tests)", RuntimeWarning)
        return factor, kernel_dtype

    def _in_float64(self, features: Any, n_params: int, index: int, lambda_reg: float | None) -> Any:
        wide = kernel_from_features(features, kernel_dtype="float64")
        self._warn_subnormal(wide, features, index, n_params)
        with _zero_kernel(wide, features, index, self.task):
            return self._factorize(wide, features.shape[0], n_params, index, lambda_reg, ", in float64")

    @staticmethod
    def _warn_subnormal(kernel: Any, features: Any, index: int, n_params: int) -> None:
        """Warn when every feature is subnormal in the features' dtype (below float32's 1.2e-38): a float64 kernel
        holds their squares, but the features themselves kept only a few significant bits, and nothing made later
        can restore them. ``kernel``: ``Phi^T Phi`` or ``Phi Phi^T``, whose largest diagonal entry is at least the
        largest squared feature and whose trace is the features' sum of squares.

        The error stated is an estimate of the features' relative error, which bounds the scores' at these ridges:
        each rounding in the subnormal range is off by up to the spacing ``s`` of subnormals (``2**-149`` in float32)
        whatever the value's size, so a feature made from ``m`` such roundings is off by about ``s sqrt(m)``, over the
        features' root-mean-square (from the trace). ``m`` is 1 for unprojected features (the gradients) and
        ``n_params`` for projected ones (a projected feature sums ``n_params`` products, each rounded, when the
        gradients are subnormal). Measured (``tests/test_numerical_edges.py``): 2.5x to 12x the scores' relative
        error against a float64 reference; it was the spacing over the *largest* feature, with "or more", 6e-7 where
        2.4e-5 was measured (projected, 300 parameters). Only *some* rows subnormal (examples whose gradients are
        about 0): no warning, as their scores are as tiny as the rows and the others' are float32-exact (measured in
        ``tests/test_subnormal_rows.py``); where ``normalize_features`` scales them up, :mod:`._subnormal_rows`
        warns."""
        xp = namespace(kernel)  # the features' namespace too (a store's lazy features read no rows for their dtype)
        info = xp.finfo(features.dtype)
        largest = float(xp.max(xp.linalg.diagonal(kernel)))
        KernelFitting._check_squares(kernel, features, largest, index)
        if not 0.0 < largest < float(info.smallest_normal) ** 2:
            return
        n, k = features.shape[0], features.shape[1]
        rms = math.sqrt(float(xp.sum(xp.linalg.diagonal(kernel))) / (n * k))
        terms = n_params if k < n_params else 1  # roundings per feature: a projection's products and sums
        spacing = float(info.smallest_normal) * float(info.eps)  # the spacing of subnormals
        error = spacing * math.sqrt(terms) / rms
        warn(f"checkpoint {index}: every feature is subnormal in {features.dtype} (below "
             f"{float(info.smallest_normal):.3g}; the largest is at most {math.sqrt(largest):.2g}), so the "
             f"features keep only a few significant bits and the scores may be off by up to about {error:.0e} "
             f"relative (the spacing of subnormals, {spacing:.2g}, over the features' RMS, {rms:.2g}"
             + (f", times sqrt(n_params) = {math.sqrt(terms):.3g} for the projection's sums" if terms > 1 else "")
             + "); rescale the model's output (the scores do not depend on its scale at lambda_reg='auto'), "
             "or use a float64 model", RuntimeWarning)

    @staticmethod
    def _check_squares(kernel: Any, features: Any, largest: float, index: int) -> None:
        """Float64 features below about 1e-154 have squares that are float64 subnormals, which keep few significant
        bits (scores 4e-5 off at features of 1e-160, silently): a warning where the estimated error passes sqrt(eps)
        (the largest diagonal entry below about 3e-316). ``largest``: the kernel's largest diagonal entry."""
        xp = namespace(kernel)
        if not _squares_can_underflow(kernel, features):
            return
        if largest == 0.0:  # a zero kernel is an error at lambda_reg=0 only: factorize says so (_zero_kernel)
            return
        error = 2.0 ** -1074 / largest  # float64's smallest subnormal over the largest entry the kernel holds
        if error > math.sqrt(float(xp.finfo(kernel.dtype).eps)):
            warn(f"checkpoint {index}: the training features are so small (the kernel's largest entry is "
                 f"{largest:.2g}) that their squares are float64 subnormals, which keep few significant bits: the "
                 f"scores may be off by {error:.0e} relative; {_RESCALE}", RuntimeWarning)

    def _lambda_of(self, kernel: Any, n_train: int, n_params: int, lambda_reg: float | None = None) -> float:
        """The ``lambda`` this checkpoint's ``kernel`` is factorized with: ``lambda_reg`` (a stored value), else
        the estimator's, ``"auto"`` chosen from ``kernel`` (:func:`trak_core.regularization.choose_lambda`)."""
        lam = self.lambda_reg if lambda_reg is None else lambda_reg
        if lam == "auto":
            return choose_lambda(kernel, n_train, n_params=n_params, xp=namespace(kernel), dim=self.proj_dim)
        return float(lam)

    def _out_of_range(self, kernel_dtype: str, kernel: Any, top: float, index: int, lam: float) -> bool:
        """Whether a float32 ``kernel`` (largest eigenvalue ``top``) is out of float32's range, or ``lam`` (the
        ``lambda`` it would be factorized with, ``"auto"`` resolved) is: then ``"auto"`` remakes it in float64
        (``True``); otherwise an error says what to do."""
        xp = namespace(kernel)
        info = xp.finfo(kernel.dtype)
        smallest = float(info.smallest_normal) / float(info.eps)  # below it, sums of squares lose bits to underflow
        if top == 0.0:  # every feature is zero (factorize says so), or every square underflowed
            return kernel_dtype == "auto" and has_float64(xp, device_of(kernel))
        if not math.isfinite(top):
            what = "the features' squares overflow float32 (the kernel holds inf or NaN)"
        elif top < smallest:
            what = (f"the features are so small that their squares underflow float32 (largest kernel eigenvalue "
                    f"{top:.3g})")
        elif lam * 4 >= float(info.max):
            auto = " (chosen by 'auto' from the features)" if self.lambda_reg == "auto" else ""
            what = f"lambda_reg={lam:.3g}{auto} is beyond float32's range"
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

    def _remake_in_float64(self, kernel_dtype: str, kernel: Any, lam: float, index: int, top: float) -> bool:
        """Whether ``kernel_dtype="auto"`` gave a float32 ``kernel`` (largest eigenvalue ``top``) too
        ill-conditioned for float32 at ``lam`` (``lambda_max / lambda > kernel.AUTO_FLOAT32_MAX_RATIO``) in a
        namespace with float64."""
        xp = namespace(kernel)
        if kernel_dtype != "auto" or lam <= 0:
            return False
        ratio = top / lam
        if ratio <= kernel_ops.AUTO_FLOAT32_MAX_RATIO:
            return False
        if not has_float64(xp, device_of(kernel)):
            warn(f"checkpoint {index}: the float32 kernel is ill-conditioned at lambda_reg="
                 f"{lam:.4g} (lambda_max / lambda = {ratio:.3g}) and {xp.__name__} has no "
                 f"float64 here, so scores may be off by about {1e-7 * ratio:.0e} relative; raise lambda_reg "
                 "(or, for JAX, set jax_enable_x64)", RuntimeWarning)
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
                   lambda_reg: float | None = None, note: str = "", *,
                   lam: float | None = None) -> kernel_ops.KernelFactor:
        """``kernel``'s factor; ``lam``: its ``lambda``, where ``_lambda_of`` already resolved it."""
        xp = namespace(kernel)
        lam = self._lambda_of(kernel, n_train, n_params, lambda_reg) if lam is None else lam
        width = self.proj_dim if self.proj_dim is not None else n_params
        # the Gram matrix when n < k (a store written before it was used holds Phi^T Phi: its shape says so)
        space = "n" if kernel_ops.space_for(n_train, width) == "n" and kernel.shape[0] == n_train else "k"
        factor = kernel_ops.factorize(kernel, lam, xp=xp, space=space, label=f"checkpoint {index}")
        how = " (stored)" if lambda_reg is not None else " (auto)" if self.lambda_reg == "auto" else ""
        log.info("checkpoint %d: %d examples, k=%d, lambda=%.4g%s, %s-space kernel rank %d%s", index, n_train, width,
                 lam, how, space, factor.rank, note)
        return factor


@contextlib.contextmanager
def _zero_kernel(kernel: Any, features: Any, index: int, task: Any = None) -> Iterator[None]:
    """A zero float64 kernel of float64 features: their squares may have underflowed (features below about
    1e-162), which the error adds, with the fix (float32 features' squares cannot underflow float64); a sequence
    task's labels may all be its ``ignore_index`` (no token predicted), which the error names."""
    try:
        yield
    except kernel_ops.ZeroKernelError as exc:
        ignore = getattr(task, "ignore_index", None)
        if ignore is not None:  # was: "check the model and the data", for data that predicts no token
            exc = kernel_ops.ZeroKernelError(f"{exc}; with task={task.name!r}, a label of {ignore} marks a token that "
                                             f"is not predicted: if every label is {ignore} (prompts or padding only), "
                                             "no token is predicted and every feature is zero")
        if not _squares_can_underflow(kernel, features):
            raise exc from None
        raise TrakValueError(f"{exc}; if the gradients are not zero, every feature is below "
                             "about 1e-162, so that its square underflows float64: " + _RESCALE) from None


def _squares_can_underflow(kernel: Any, features: Any) -> bool:
    """Whether ``features``' squares can underflow ``kernel``: a float64 kernel of float64 features (float32
    features' squares are above 1e-90, and a float32 kernel's range is checked before it is factorized)."""
    xp = namespace(kernel)
    return xp.finfo(kernel.dtype).bits > 32 and xp.finfo(features.dtype).bits > 32
