"""Arguments of the wrong kind are refused with trak-core's errors, where they were accepted or failed elsewhere:
``CustomTask(logits_ndim="2")`` behaved as ``None`` in the torch and JAX backends (any output shape), ``4`` was
taken; ``hashing.key(1.5)`` raised a bare ``TypeError`` from ``^``; ``RayExecutor(address=123)`` raised a
``ValueError`` for a type."""
import numpy as np
import pytest

import trak_core
from trak_core import CustomTask, TrakTypeError, TrakValueError, hashing


def _margin(logits, labels, xp):
    return logits[:, 0]


@pytest.mark.parametrize("value, error", [("2", TrakTypeError), (2.0, TrakTypeError), (True, TrakTypeError),
                                          (4, TrakValueError), (1, TrakValueError), (np.int64(0), TrakValueError)])
def test_custom_task_logits_ndim_is_2_3_or_none(value, error):
    with pytest.raises(error, match=r"logits_ndim must be 2.* or None"):
        CustomTask(_margin, logits_ndim=value)


def test_custom_task_logits_ndim_of_numpy_integers_is_the_int():
    """A NumPy integer is read as the int: the same task identity as the plain int, a store's configuration."""
    from trak_core._task_identity import task_identity

    for ndim in (2, 3, None):
        given = CustomTask(_margin, logits_ndim=None if ndim is None else np.int64(ndim))
        plain = CustomTask(_margin, logits_ndim=ndim)
        assert given.logits_ndim == ndim and type(given.logits_ndim) is type(plain.logits_ndim)
        assert task_identity(given) == task_identity(plain)


def test_hash_words_must_be_integers():
    with pytest.raises(TrakTypeError, match="hash words must be 32-bit unsigned integers, got 1.5"):
        hashing.key(7, 1.5)
    with pytest.raises(TrakValueError, match="32-bit unsigned"):
        hashing.key(2 ** 32)
    # NumPy unsigned words hash as the same Python ints; the reference: the documented fold h = mix(h ^ w)
    expected = hashing.mix_scalar(hashing.mix_scalar(hashing.GOLDEN ^ 5) ^ 2 ** 32 - 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy words folded in NumPy's fixed width warned of overflow
        assert hashing.key(np.uint32(5), np.uint64(2 ** 32 - 1)) == hashing.key(5, 2 ** 32 - 1) == expected


def test_ray_executor_address_of_another_type_is_a_type_error():
    with pytest.raises(TrakTypeError, match="address must be a Ray cluster address"):
        trak_core.RayExecutor(address=123)
