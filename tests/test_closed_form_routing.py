"""Rows picked by data (a mixture of experts' routed tokens) are not taken for one row, or one run of tokens, per
example by the closed form (trak_torch.routing); rows taken in order by ``torch.arange`` still are. Reference:
plain autograd through the model's own forward, one example at a time."""
import warnings

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the closed-form path is not exercised")

import array_api_compat.torch as xp  # noqa: E402

from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

nn = torch.nn
D, T = 4, 4


class TopOne(nn.Module):
    """Each token goes to one of two experts by the sign of its first feature (``flat[route]``)."""

    def __init__(self):
        super().__init__()
        self.e0, self.e1, self.head = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        flat = x.reshape(-1, D)
        route = flat[:, 0] > 0
        out = torch.zeros_like(flat)
        out = out.index_put((route.nonzero()[:, 0],), self.e0(flat[route]))
        out = out.index_put(((~route).nonzero()[:, 0],), self.e1(flat[~route]))
        return self.head(torch.tanh(out).reshape(x.shape).mean(1))


class TopTwo(nn.Module):
    """Top-2 routing as Mixtral was written in transformers 4 (``hidden[None, top_x]`` in (slot, token) order, an
    activation, ``index_add_`` back), here with two experts: each gets every token, first those that chose it first."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(D, 2, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        hidden = x.reshape(-1, D)
        weights, chosen = torch.topk(torch.softmax(self.gate(hidden), -1), 2, dim=-1)
        out = torch.zeros_like(hidden)
        mask = torch.nn.functional.one_hot(chosen, 2).permute(2, 1, 0)  # (expert, slot, token)
        for e, expert in enumerate(self.experts):
            slot, top_x = torch.where(mask[e])
            state = torch.nn.functional.silu(hidden[None, top_x].reshape(-1, D))
            out.index_add_(0, top_x, expert(state) * weights[top_x, slot, None])
        return self.head(out.reshape(x.shape).mean(1))


class EndToken(nn.Module):
    """One row per example taken in order (``h[torch.arange(n), last]``, CLIP's end-of-text token)."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = torch.tanh(self.mix(x))
        last = (x[:, :, 0] > 0).long().argmax(1)
        return self.head(h[torch.arange(x.shape[0]), last])


def _one_at_a_time(model, x, y, task):
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(task.output(model(x[i:i + 1]), y[i:i + 1], xp=xp).sum(), list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _signs(rows):
    return torch.tensor(rows, dtype=torch.float64)


def _routed_error(model, x, y):
    """The largest per-example relative error of the backend's gradients (batches of 2 and 3) against plain
    autograd one example at a time."""
    task, backend = get_task("classification"), TorchBackend()
    prepared = backend.prepare(model, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # vmap cannot batch nonzero: one example at a time
        grads = torch.cat([backend.gradients(model, prepared, x[s], y[s], task)[0] for s in (slice(0, 2),
                                                                                              slice(2, 5))])
    reference = _one_at_a_time(model, x, y, task)
    return float((torch.linalg.vector_norm(grads - reference, dim=1)
                  / torch.linalg.vector_norm(reference, dim=1)).max())


def _kept_closed_form(model, seed):
    """Whether six random examples take the closed form, and its relative error against plain autograd."""
    torch.manual_seed(seed)
    x, y = torch.randn(6, T, D, dtype=torch.float64), torch.randint(0, 3, (6,))
    task, backend = get_task("classification"), TorchBackend()
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, x, y, task)
    reference = _one_at_a_time(model, x, y, task)
    error = float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference))
    return prepared._closed_form[id(task)] is not None, error


def _routed(make):
    """A model and five examples whose routed token counts divide by the batch sizes 2 and 3 (``TopOne``: 2 + 2
    tokens to expert 0, then 1 + 2 + 3; ``TopTwo``: every token goes to both experts, to expert 0 first when its
    first feature is the larger, as all do in the first batch: there the (slot, token) order is example-major)."""
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(5, T, D, dtype=torch.float64).abs()
    if make is TopOne:
        x[:, :, 0] *= _signs([[1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, -1], [1, 1, -1, -1], [1, 1, 1, -1]])
    else:
        with torch.no_grad():
            model.gate.weight.copy_(torch.eye(2, 4, dtype=torch.float64))  # expert scores: the first two features
        first = _signs([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]])
        x[:, :, 0], x[:, :, 1] = 3 + first + 0.1 * x[:, :, 0], 4 - first + 0.1 * x[:, :, 1]
        x[:, :, 2:] *= -1
    return model, x, torch.randint(0, 3, (5,))


@pytest.mark.parametrize("make", [TopOne, TopTwo])
def test_routed_tokens_are_not_taken_for_tokens_per_example(make):
    """Batches whose routed counts divide by the batch size: the closed form took them for even runs of tokens
    per example and was 24-28% off (``TopOne``) on every example of the second batch."""
    model, x, y = _routed(make)
    assert _routed_error(model, x, y) < 1e-12


def test_rows_taken_in_order_by_arange_keep_the_closed_form():
    torch.manual_seed(1)
    kept, error = _kept_closed_form(EndToken().double().eval(), seed=1)
    assert kept and error < 1e-12


class GatherTopOne(TopOne):
    """``TopOne`` with the routed rows taken by ``torch.gather`` (was not watched: 28% off)."""

    def forward(self, x):
        flat = x.reshape(-1, D)
        route = flat[:, 0] > 0
        i0, i1 = route.nonzero()[:, 0], (~route).nonzero()[:, 0]
        out = torch.zeros_like(flat)
        out = out.index_put((i0,), self.e0(torch.gather(flat, 0, i0[:, None].expand(-1, D))))
        out = out.index_put((i1,), self.e1(torch.gather(flat, 0, i1[:, None].expand(-1, D))))
        return self.head(torch.tanh(out).reshape(x.shape).mean(1))


def test_rows_gathered_by_the_router_are_watched_too():
    model, x, y = _routed(TopOne)
    gathered = GatherTopOne().double().eval()
    gathered.load_state_dict(model.state_dict())
    assert _routed_error(gathered, x, y) < 1e-12


class EndOfSequence(nn.Module):
    """BART's classification pooling: ``hidden[eos_mask].view(n, -1, d)[:, -1, :]`` (one row per example again),
    and a position table computed in the forward, looked up by ``(n, T)`` positions (rotary-style ``cos[pos]``)."""

    def __init__(self):
        super().__init__()
        self.mix, self.head = nn.Linear(D, D), nn.Linear(D, 3)
        self.register_buffer("freq", torch.linspace(0.1, 1.0, D))

    def forward(self, x):
        table = torch.sin(torch.arange(32, dtype=self.freq.dtype)[:, None] * self.freq)
        positions = torch.arange(x.shape[1]).expand(x.shape[0], x.shape[1])
        h = torch.tanh(self.mix(x + table[positions]))
        eos = torch.zeros(x.shape[:2], dtype=torch.bool)
        eos[:, -1] = True
        return self.head(h[eos, :].view(x.shape[0], -1, D)[:, -1, :])


def test_picks_regrouped_per_example_and_position_tables_keep_the_closed_form():
    """Both went to vmap (and BART's classifier then to the one-example loop: 5x slower) after the routing watch."""
    torch.manual_seed(2)
    kept, error = _kept_closed_form(EndOfSequence().double().eval(), seed=2)
    assert kept and error < 1e-12


class Sorted(TopOne):
    """Tokens sorted by expert, then each expert's run: ``sorted[start:end]`` (DeepSeek's ``moe_infer``),
    ``sorted.split(counts)``, or a ``(experts, capacity)`` dispatch index ``flat[dispatch]``; all were missed after
    the routing watch followed tensors (28% and 56% off), as slices and splits have other row counts."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        flat = x.reshape(-1, D)
        route = (flat[:, 0] <= 0).long()
        order = torch.argsort(route, stable=True)
        counts = torch.bincount(route, minlength=2).tolist()
        if self.how == "dispatch":
            capacity, lists, start = max(counts), [], 0
            for count in counts:
                rows = order[start:start + count]
                start += count
                lists.append(torch.cat([rows, rows[-1:].expand(capacity - count)]))
            dispatch = torch.stack(lists)  # (2, capacity): shaped like a (2, T) position lookup
            picked = flat[dispatch]
            h = torch.stack([self.e0(picked[0]), self.e1(picked[1])])
            out = torch.zeros_like(flat).index_put((dispatch.reshape(-1),), h.reshape(-1, D))
            return self.head(torch.tanh(out).reshape(x.shape).mean(1))
        tokens = flat[order]
        runs = tokens.split(counts) if self.how == "split" else (tokens[:counts[0]], tokens[counts[0]:])
        out = torch.zeros_like(flat).index_put((order,), torch.cat([self.e0(runs[0]), self.e1(runs[1])]))
        return self.head(torch.tanh(out).reshape(x.shape).mean(1))


@pytest.mark.parametrize("how", ["slices", "split", "dispatch"])
def test_runs_of_sorted_tokens_and_dispatch_indices_are_watched(how):
    model, x, y = _routed(TopOne)
    routed = Sorted(how).double().eval()
    routed.load_state_dict(model.state_dict())
    assert _routed_error(routed, x, y) < 1e-12
