"""Rows whose classification margin is infinite: ``p_y = 1`` exactly, every class but the label's at ``-inf``.

One job: on the error path of a non-finite feature check, tell this cause apart and name its rows and fix. A row
whose logits are ``-inf`` for every class but the label's (a mask that leaves one class) has the margin
``log(p_y / (1 - p_y)) = +inf``, the weight ``Q = 1 - p_y = 0`` and no gradient (the softmax over the other
classes is ``0 / 0``): its features are NaN. Finite logits give finite margin gradients whatever ``Q`` is (``Q``
underflows to 0 from a float32 margin of about 104, and the gradient stays finite), so among rows with non-finite
features those of ``Q == 0`` exactly are this case. Nothing is computed on the happy path.
"""
from __future__ import annotations

from typing import Any

from ._namespace import namespace
from .errors import TrakValueError

__all__ = ["check_certain_rows"]


def _certain(values: Any, out_to_loss: Any, task: Any) -> list[int]:
    """Rows of ``values`` (features or gradients, rows first) that are not finite and whose ``out_to_loss`` is 0
    exactly, under the classification task; ``[]`` for another task or without weights."""
    from .fingerprints import to_numpy
    from .tasks import Classification

    if out_to_loss is None or not isinstance(task, Classification) or values.shape[0] != out_to_loss.shape[0]:
        return []
    xp = namespace(values)
    bad = to_numpy(~xp.all(xp.isfinite(xp.reshape(values, (values.shape[0], -1))), axis=1))
    weights = to_numpy(out_to_loss)
    return [i for i in range(bad.shape[0]) if bad[i] and weights[i] == 0]


def check_certain_rows(values: Any, out_to_loss: Any, task: Any, where: str, first_row: int | None = None) -> None:
    """Raise where non-finite ``values`` come from rows of ``p_y = 1`` exactly (every class but the label's masked
    with ``-inf``): the rows, the cause and the fix; else return, for the caller's general message.

    Parameters
    ----------
    values : array
        Features or per-example gradients, one row per example, known to hold NaN or inf.
    out_to_loss : array or None
        The rows' out-to-loss weights ``1 - p_y``.
    task : Task
        The estimator's task: only the built-in classification is told apart.
    where : str
        The batch or checkpoint, for the message.
    first_row : int, optional
        The training row of ``values``'s first row, where they span batches; ``None``: rows of the batch ``where``
        names.

    Raises
    ------
    TrakValueError
        Where a non-finite row has ``p_y = 1`` exactly.
    """
    rows = _certain(values, out_to_loss, task)
    if not rows:
        return
    named = rows if first_row is None else [first_row + r for r in rows]
    listed = f"{named[:10]}{' ...' if len(named) > 10 else ''}"
    which = f"rows {listed} of the batch" if first_row is None else f"training rows {listed}"
    raise TrakValueError(
        f"{where}: {which} have p_y = 1 exactly (out-to-loss weight 1 - p_y = 0) and NaN gradients: every class but "
        "the label's has logit -inf there (a mask that leaves one class), so the margin log(p_y / (1 - p_y)) is +inf "
        "and its gradient is undefined. Drop those examples (their loss is 0: there is nothing to attribute), or "
        "mask with the dtype's most negative finite number instead of -inf (torch: logits.masked_fill(mask, "
        "torch.finfo(logits.dtype).min); JAX: jnp.where(mask, jnp.finfo(logits.dtype).min, logits)), which keeps "
        "the margin finite and the weight 0")
