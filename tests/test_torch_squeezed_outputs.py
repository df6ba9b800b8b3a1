"""A head written with ``.squeeze()`` loses its batch axis on a batch of one example: a one-logit head returns a
0-d tensor, a C-class head ``(C,)``. The batch paths (closed form, the factorized pass, the batch's outputs and
out-to-loss weights) raised a bare ``IndexError`` from the task (one logit), or read ``(C,)`` as C examples of
one logit (an error blaming the backend, or a factorized check blaming a weight used outside its layer). Such a
batch is one row, as one example's output is read on the per-example paths; the scores equal a float64 reference
made one example at a time with plain autograd."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import trak_core  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402


class Squeezed(torch.nn.Module):
    def __init__(self, n_outputs):
        super().__init__()
        self.hidden = torch.nn.Linear(6, 5)
        self.out = torch.nn.Linear(5, n_outputs)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x))).squeeze()


def _reference(model, x, y, x_target, y_target, task, k, lam):
    """Float64 scores: per-example gradients by autograd one example at a time, the documented projection."""
    m = Squeezed(model.out.out_features).double()
    m.load_state_dict({key: value.double() for key, value in model.state_dict().items()})
    params = list(m.parameters())

    def grads(xs, ys):
        rows, qs = [], []
        for i in range(len(ys)):
            out = m(xs[i:i + 1].double()).reshape(-1)
            if task == "regression":
                f, q = out[0], float(ys[i]) - float(out[0])
            elif out.numel() == 1:
                f = (2 * float(ys[i]) - 1) * out[0]
                q = float(1 - torch.sigmoid(f.detach()))
            else:
                others = torch.cat([out[:ys[i]], out[ys[i] + 1:]])
                f, q = out[ys[i]] - torch.logsumexp(others, 0), float(1 - torch.softmax(out, 0)[ys[i]])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, params)]))
            qs.append(q)
        return torch.stack(rows).numpy(), np.array(qs)

    g, q = grads(x, y)
    g_target, _ = grads(x_target, y_target)
    proj = np.asarray(trak_core.projection_matrix(g.shape[1], k, dtype=np.float64))
    phi, phi_target = g @ proj, g_target @ proj
    return phi @ np.linalg.solve(phi.T @ phi + lam * np.eye(k), phi_target.T) * q[:, None]


@pytest.mark.parametrize("per_example", ["auto", "vmap", "loop"])
@pytest.mark.parametrize("n_outputs,task", [(1, "classification"), (1, "regression"), (3, "classification")])
def test_squeezed_head_on_a_batch_of_one(n_outputs, task, per_example):
    torch.manual_seed(0)
    model = Squeezed(n_outputs)
    x = torch.randn(7, 6)
    y = torch.randn(7) if task == "regression" else torch.randint(0, max(2, n_outputs), (7,))
    trak = trak_core.TRAK(model, task=task, proj_dim=16, lambda_reg=0.1, progress=False, kernel_dtype="float64",
                          backend=TorchBackend(per_example=per_example))
    trak.featurize(None, [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:6], y[5:6])])  # batches of one after the first
    scores = trak.score([(x[6:], y[6:])]).double().numpy()  # a target batch of one
    expected = _reference(model, x[:6], y[:6], x[6:], y[6:], task, 16, 0.1)
    assert scores.shape == (6, 1)
    assert np.abs(scores - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("per_example", ["auto", "loop"])
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_squeezed_head_factorized(n_outputs, per_example):
    torch.manual_seed(1)
    model = Squeezed(n_outputs)
    x, y = torch.randn(7, 6), torch.randint(0, max(2, n_outputs), (7,))
    kwargs = dict(proj_dim=16, proj_type="kronecker", lambda_reg=0.1, progress=False)
    trak = trak_core.TRAK(model, backend=TorchBackend(per_example=per_example), **kwargs)
    trak.featurize(None, [(x[:1], y[:1]), (x[1:6], y[1:6])])
    together = trak_core.TRAK(model, backend=TorchBackend(per_example=per_example), **kwargs)
    together.featurize(None, [(x[:6], y[:6])])
    scores, expected = trak.score([(x[6:], y[6:])]), together.score([(x[6:], y[6:])])
    assert torch.allclose(scores, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_random_numbers_in_eval_mode_are_not_taken_for_examples_that_interact(caplog):
    """``F.dropout(x, p)`` (training=True by default): the interaction check (two examples together, then alone)
    saw the fresh masks and warned of BatchNorm without running statistics before the error on random numbers."""
    class Dropping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(30, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.nn.functional.dropout(torch.relu(self.a(x)), 0.5))

    torch.manual_seed(0)
    x, y = torch.randn(32, 30), torch.randint(0, 2, (32,))
    with caplog.at_level("WARNING", logger="trak_core"), pytest.raises(RuntimeError) as caught:
        trak_core.TRAK(Dropping(), proj_dim=64, progress=False).featurize(None, [(x, y)])
    assert any("draws random numbers in eval mode" in note for note in getattr(caught.value, "__notes__", []))
    assert not [r for r in caplog.records if "interact" in r.getMessage()], [r.getMessage() for r in caplog.records]
