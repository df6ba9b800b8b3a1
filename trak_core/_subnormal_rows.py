"""Feature rows that are subnormal where ``normalize_features`` scales them to unit norm: a warning per call.

One job: the check of ``TRAK(normalize_features=True)``'s rows. Without normalization a few subnormal rows among
normal ones cost nothing that matters: their scores are proportional to their features, so they are as tiny as the
rows (1e-40 of the others'), off by a few times the spacing of float32 subnormals (2.5e-45 measured), and the other
rows' scores and the kernel are exact to float32 precision (``docs/choosing.md``). Normalization scales such a row
up to unit norm, and with it the rounding its features kept: its scores become as large as any, but off by the
spacing of subnormals over the row's size (1e-3 relative at rows of 1e-40, all of it at 1e-43). ``normalize_rows``
notes those rows (training rows in ``featurize``, targets in ``score``) and ``reporting`` warns once per call with
their count and that error. JAX without x64 flushes subnormals to zero on CPU: such rows arrive as zeros, stay zero
(no direction to scale) and score 0, with nothing to tell them from gradients that are zero.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Iterator, TypeVar

from .notices import warn

__all__ = ["note_params", "note_rows", "reporting", "unnoted", "noting", "merge"]

F = TypeVar("F", bound=Callable[..., Any])

_noted: contextvars.ContextVar[dict | None] = contextvars.ContextVar("trak_core_subnormal_rows", default=None)


def note_rows(features: Any, largest: Any, scaled_norms: Any, *, xp: Any) -> None:
    """Note, for the call's warning, the rows of ``features`` (before normalization) that are subnormal: ``largest``,
    each row's largest magnitude, ``(n, 1)``; ``scaled_norms``, the norms of the rows divided by it. Outside a
    ``reporting`` call, nothing."""
    noted = _noted.get()
    if noted is None:
        return
    info = xp.finfo(features.dtype)
    subnormal = (largest > 0) & (largest < float(info.smallest_normal))
    count = int(xp.sum(xp.astype(subnormal, xp.int32)))
    noted["rows"] += features.shape[0]
    if not count:
        return
    ones = xp.ones_like(largest)
    norms = xp.where(subnormal, largest * scaled_norms, float(info.max) * ones)  # the rows' norms, exact (< 1.2e-38)
    noted["subnormal"] += count
    noted["smallest"] = min(noted["smallest"], float(xp.min(norms)) / math.sqrt(features.shape[1]))  # its RMS
    noted["dtype"], noted["normal"] = features.dtype, float(info.smallest_normal)
    noted["spacing"] = float(info.smallest_normal) * float(info.eps)  # the spacing of subnormals


def note_params(n_params: int) -> None:
    """Note the parameters of the checkpoint being featurized (``Featurizer._open_checkpoint``), for the warning's
    error: a job featurizing apart (``featurize(..., index=i)``) holds no checkpoint to read them from. Outside a
    ``reporting`` call, nothing."""
    noted = _noted.get()
    if noted is not None:
        noted["n_params"] = max(noted.get("n_params", 0), int(n_params))


@contextlib.contextmanager
def unnoted() -> Iterator[None]:
    """Rows normalized in the block are not noted: the one row passed through the model for the features' namespace
    (a template: the first target row of ``TRAK.open``'s first ``score``, scored again with its batch; the first
    training row of a resumed checkpoint or of a Ray run, which is not written from there)."""
    token = _noted.set(None)
    try:
        yield
    finally:
        _noted.reset(token)


def _empty() -> dict:
    return dict(rows=0, subnormal=0, smallest=math.inf, dtype=None, normal=0.0, spacing=0.0)


@contextlib.contextmanager
def noting(active: bool) -> Iterator[dict | None]:
    """A Ray worker's shard (``executors._Worker.featurize``; ``active``: its estimator normalizes): the rows it
    normalizes are noted in the dict yielded, which the worker returns for the driver's call to ``merge``."""
    if not active:
        yield None
        return
    token = _noted.set(_empty())
    try:
        yield _noted.get()
    finally:
        _noted.reset(token)


def merge(other: dict | None) -> None:
    """Add what a worker's shard noted (``noting``) to the call's notes; outside a ``reporting`` call, nothing."""
    noted = _noted.get()
    if noted is None or not other:
        return
    noted["rows"] += other["rows"]
    if other["subnormal"]:
        noted["subnormal"] += other["subnormal"]
        noted["smallest"] = min(noted["smallest"], other["smallest"])
        noted.update({key: other[key] for key in ("dtype", "normal", "spacing")})


def reporting(role: str) -> Callable[[F], F]:
    """Decorate ``TRAK.featurize`` (``role="training"``) or ``TRAK.score`` (``"target"``): after the call, warn
    once if any row it normalized was subnormal.

    Parameters
    ----------
    role : str
        What the rows are, for the message.

    Returns
    -------
    callable
        The decorator.
    """
    def decorate(method: F) -> F:
        @functools.wraps(method)
        def reported(trak: Any, *args: Any, **kwargs: Any) -> Any:
            if _noted.get() is not None or not getattr(trak, "normalize_features", False):
                return method(trak, *args, **kwargs)
            token = _noted.set(_empty())
            try:
                result = method(trak, *args, **kwargs)
                noted = _noted.get()
            finally:
                _noted.reset(token)
            if noted["subnormal"]:
                _warn(trak, role, noted)
            return result

        return reported  # type: ignore[return-value]

    return decorate


def _warn(trak: Any, role: str, noted: dict) -> None:
    """The warning: the rows' count and the error of their scores, estimated as the features' relative error (the
    spacing of subnormals ``s`` times sqrt(the roundings per feature), over the smallest such row's RMS), as
    ``KernelFitting._warn_subnormal`` estimates it for all rows, times 2: the rows' scores were measured up to 1.1x
    ``s sqrt(m) / RMS`` (the stated error was 1.8x to 11x the measured one; ``tests/test_subnormal_rows.py``)."""
    n_params = noted.get("n_params") or (trak.store[0].n_params if len(trak.store) else 0)  # apart: none held
    width = trak.proj_dim if trak.proj_dim is not None else n_params
    terms = n_params if width < n_params else 1  # a projected feature sums n_params rounded products
    error = 2 * noted["spacing"] * math.sqrt(terms) / noted["smallest"]  # 2x: scores measured up to 1.1x s sqrt(m)/rms
    rows = "feature rows (examples x checkpoints)" if role == "target" else "feature rows"
    warn(f"normalize_features: {noted['subnormal']} of {noted['rows']} {role} {rows} are subnormal in "
         f"{noted['dtype']} (below {noted['normal']:.3g}; the smallest RMS is {noted['smallest']:.2g}): "
         "they kept only a few significant bits, which scaling them to unit norm does not restore, so their scores, "
         f"now as large as the others', may be off by up to about {error:.1e} relative (twice the spacing "
         f"of subnormals, {noted['spacing']:.2g}, over that RMS"
         + (f", times sqrt(n_params) = {math.sqrt(terms):.3g}" if terms > 1 else "")
         + "); scale the model's output up (normalized features do not depend on its scale), or use a float64 model",
         RuntimeWarning)
