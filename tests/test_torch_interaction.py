"""A model whose examples interact in eval mode (``BatchNorm(track_running_stats=False)`` normalizes with the batch's
statistics): per-example gradients take each example alone, but the out-to-loss weights came from the batch's
forward, so they and the scores depended on the batch size (1.4% and 1% off the one-example definition, unsaid).
Now the first batch shows the interaction, a warning says so, and the outputs are taken one example at a time."""
import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402


def _model(running):
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=running), nn.ReLU(),
                         nn.Flatten(), nn.Linear(144, 4)).double().eval()


def _reference(model, x, y, lam=0.5):
    """One example at a time: its margin's gradient and ``Q = 1 - p_y``; scores by the documented formula."""
    grads, q = [], []
    for i in range(x.shape[0]):
        model.zero_grad()
        logits = model(x[i:i + 1])[0]
        others = torch.cat([logits[:y[i]], logits[y[i] + 1:]])
        (logits[y[i]] - torch.logsumexp(others, 0)).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
        q.append(1 - float(torch.softmax(logits, 0)[y[i]].detach()))
    return np.array(grads), np.array(q)


def test_interacting_examples_give_the_same_scores_at_every_batch_size(caplog):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (8,), generator=g)
    xt, yt = torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (3,), generator=g)
    model = _model(running=False)
    phi, q = _reference(model, x, y)
    target, _ = _reference(model, xt, yt)
    expected = phi @ np.linalg.solve(phi.T @ phi + 0.5 * np.eye(phi.shape[1]), target.T) * q[:, None]
    for size in (8, 4, 2, 1):
        with caplog.at_level(logging.WARNING, logger="trak_core"):
            trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=0.5, progress=False)
            trak.featurize(None, [(x[i:i + size], y[i:i + size]) for i in range(0, 8, size)])
            scores = trak.score([(xt, yt)]).numpy()
        np.testing.assert_allclose(trak.store[0].out_to_loss.numpy(), q, rtol=1e-10)
        np.testing.assert_allclose(scores, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
        assert "examples interact in eval mode" in caplog.text, size  # at size 1: on the targets' batch of 3
        caplog.clear()


def test_running_statistics_do_not_interact(caplog):
    """BatchNorm with running statistics (every trained CNN in eval mode) takes the batch at once, unflagged."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    model = _model(running=True)
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=0.5, progress=False)
        trak.featurize(None, [(x, y)])
    assert "interact" not in caplog.text
    np.testing.assert_allclose(trak.store[0].out_to_loss.numpy(), _reference(model, x, y)[1], rtol=1e-10)
