"""Narrow integer labels give the same task values as int64 ones in every namespace: uint8 arange wrapped after 255
(300 classes: labels 0-43 also matched classes 256-299) and JAX's uint8 != -100 was false for token 156. And a
CustomTask's default Q is one weight per example for any output shape."""
import numpy as np
import pytest

from trak_core import CustomTask
from trak_core.tasks import Classification, LanguageModeling


def _namespaces():
    import array_api_compat.numpy as npx

    found = [("numpy", npx, np.asarray)]
    try:
        import array_api_compat.torch as tx
        import torch

        found.append(("torch", tx, lambda a: torch.as_tensor(np.asarray(a))))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        found.append(("jax", jnp, jnp.asarray))
    except ImportError:
        pass
    return found


@pytest.mark.parametrize("name,xp,to", _namespaces(), ids=[n for n, _, _ in _namespaces()])
def test_uint8_class_labels_beyond_256_classes(name, xp, to):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)).astype(np.float32)
    labels = np.array([0, 10, 43, 44, 100, 255])
    others = [np.delete(logits[i], labels[i]) for i in range(6)]
    from scipy.special import logsumexp, softmax

    margin = np.array([logits[i, labels[i]] - logsumexp(others[i]) for i in range(6)])
    q = 1 - softmax(logits.astype(np.float64), axis=1)[np.arange(6), labels]
    task = Classification()
    for dtype in (np.uint8, np.int16, np.int64):
        got = task.output(to(logits), to(labels.astype(dtype)), xp=xp)
        np.testing.assert_allclose(np.asarray(got), margin, rtol=1e-5, err_msg=str(dtype))
        np.testing.assert_allclose(np.asarray(task.out_to_loss(to(logits), to(labels.astype(dtype)), xp=xp)), q,
                                   rtol=1e-5)


@pytest.mark.parametrize("name,xp,to", _namespaces(), ids=[n for n, _, _ in _namespaces()])
def test_uint8_token_156_is_counted(name, xp, to):
    """156 is -100 wrapped to uint8: a byte-level model's token 156 was taken for 'not predicted'."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 256)).astype(np.float32)
    ids = np.array([[1, 156, 200, 7], [3, 4, 5, 6]])
    task = LanguageModeling()
    expected = np.asarray(task.output(to(logits), to(ids.astype(np.int32)), xp=xp))
    np.testing.assert_allclose(np.asarray(task.output(to(logits), to(ids.astype(np.uint8)), xp=xp)), expected,
                               rtol=1e-6)
    task.check_labels(to(ids.astype(np.uint8)), 256, xp=xp)  # in range: no error
    from scipy.special import logsumexp

    by_hand = sum(logits[0, t, ids[0, t + 1]] - logsumexp(np.delete(logits[0, t], ids[0, t + 1])) for t in range(3))
    assert abs(expected[0] - by_hand) < 1e-4  # position 0 predicts token 156, counted


def test_a_custom_tasks_default_weights_are_one_per_example_for_any_output_shape():
    import array_api_compat.numpy as npx

    task = CustomTask(output=lambda logits, labels, xp: xp.sum(logits, axis=(1, 2)), logits_ndim=None)
    q = task.out_to_loss(np.ones((5, 2, 3)), np.zeros(5, dtype=np.int64), xp=npx)
    assert q.shape == (5,) and np.all(q == 1)


def test_a_flax_state_update_gets_the_eval_hint():
    pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    from trak_jax.checks import state_note

    class TraceContextError(Exception):  # flax.errors' name: the hint keys on it, flax need not be installed
        pass

    error = TraceContextError("Cannot mutate BatchStat from a different trace level")
    state_note(error)
    assert "call model.eval() before nnx.split" in error.__notes__[0]
    other = ValueError("x")
    state_note(other)
    assert not getattr(other, "__notes__", [])


def test_a_custom_tasks_weights_of_the_wrong_shape_name_the_task():
    """An out_to_loss returning (n, 1) was reported as 'a backend defect'; it names the task and the fix."""
    import array_api_compat.numpy as npx

    task = CustomTask(output=lambda logits, labels, xp: logits[:, 0], out_to_loss=lambda logits, labels, xp: logits,
                      name="mine")
    with pytest.raises(Exception, match=r"CustomTask 'mine': out_to_loss must return one weight per example, "
                                        r"shape \(5,\) .* take \[:, 0\]"):
        task.out_to_loss(np.ones((5, 1)), np.zeros(5, dtype=np.int64), xp=npx)


def test_check_labels_sees_one_output_for_one_dimensional_outputs():
    """torch passed the batch size as n_outputs for a model returning (n,): JAX passed 1, the last axis's size."""
    torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
    import trak_core

    seen = []
    task = CustomTask(output=lambda logits, labels, xp: logits, logits_ndim=None,
                      check_labels=lambda labels, n_outputs, xp: seen.append(n_outputs))

    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x)[:, 0]

    trak = trak_core.TRAK(Scalar(), task=task, proj_dim=4, progress=False)
    trak.featurize(None, [(torch.randn(8, 3), torch.zeros(8)), (torch.randn(6, 3), torch.zeros(6))])
    assert seen and set(seen) == {1}
