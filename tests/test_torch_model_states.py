"""Models and checkpoints in states where the torch backend's gradients would be silently wrong or its errors
pointed the wrong way: inside ``parametrize.cached()`` or ``torch.autocast``, a forward updating a buffer in place
(one example at a time), meta and lazy models, tied weights in checkpoints, ``AveragedModel`` and older BatchNorm
checkpoints, and a tuple output whose first element is not the logits."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")

import trak_core  # noqa: E402
from trak_core import TrakValueError  # noqa: E402
from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

nn = torch.nn


def _mlp(seed=0, norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 6), nn.BatchNorm1d(6)] if norm else [nn.Linear(5, 6)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(6, 3)).double().eval()


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _features(model, checkpoint=None, **options):
    trak = trak_core.TRAK(model, proj_dim=None, progress=False, backend=TorchBackend(**options))
    trak.featurize(checkpoint, [_batch()])
    return torch.as_tensor(trak.store[0].features[:])


def test_parametrize_cached_is_refused():
    """Inside cached(), a weight_norm'd weight is computed once from the model's own originals: the checkpoint's
    originals got gradient 0 (and a second checkpoint the first one's weight)."""
    model = _mlp()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    outside = _features(model)
    assert float(outside[:, 6:6 + 6 + 30].abs().max()) > 1e-3  # the originals' columns are not 0
    with torch.nn.utils.parametrize.cached():
        with pytest.raises(TrakValueError, match=r"parametrize\.cached\(\).*outside the cached\(\) block"):
            _features(model)


def test_autocast_is_refused():
    """Under autocast, features were stored in bfloat16 and a disk store failed on them."""
    model = _mlp().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TrakValueError, match=r"torch\.autocast\('cpu'\).*model\.to\(torch\.bfloat16\)"):
            trak_core.TRAK(model, proj_dim=8, progress=False).featurize(None, [(torch.randn(4, 5), torch.ones(4))])



def test_an_array_api_compat_that_drops_autograd_is_refused(monkeypatch):
    """array-api-compat 1.11's torch ``sum`` went through ``torch.asarray``, which in torch 2.3 to 2.7 drops
    ``requires_grad``: the margins came out detached and the gradients 2x off, with no error (a minimum-versions
    audit: LDS 0.31 instead of 0.73). Simulated here by a ``sum`` that detaches."""
    import array_api_compat.torch as xp

    from trak_torch import contexts

    model = _mlp()
    right = _features(model)
    plain_sum = xp.sum
    monkeypatch.setattr(xp, "sum", lambda x, *args, **kwargs: plain_sum(x.detach(), *args, **kwargs))
    monkeypatch.setattr(contexts, "_namespace_checked", [])
    with monkeypatch.context() as unchecked:  # what the check prevents: other numbers (105% off), no error
        unchecked.setattr(contexts, "_check_namespace_autograd", lambda: None)
        wrong = _features(model)
    assert float((wrong - right).norm() / right.norm()) > 0.5
    with pytest.raises(trak_core.BackendError, match=r"array-api-compat .* drops autograd.*array-api-compat>=1\.13"):
        _features(model)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_the_autograd_check_runs_under_no_grad(monkeypatch, mode):
    """The check's first run came under the caller's torch.no_grad(): it took that for a broken array-api-compat
    and refused (a review of the check)."""
    from trak_torch import contexts

    model = _mlp()
    right = _features(model)
    monkeypatch.setattr(contexts, "_namespace_checked", [])
    with getattr(torch, mode)():
        features = _features(model)
    torch.testing.assert_close(features, right, rtol=1e-12, atol=1e-14)


class Drifting(nn.Module):
    """Scales its output by a buffer it updates in place on every call, in eval mode too."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        self.scale.mul_(1.1)
        return self.lin(x) * self.scale.clone()


def test_a_forward_updating_a_buffer_in_place_is_refused_one_example_at_a_time_too():
    """vmap refused such a forward; one example at a time, each example saw another scale (6.8% between two
    batchings of the same data)."""
    model = Drifting().double().eval()
    with pytest.raises(TrakValueError, match=r"changed \['scale'\] in place"):
        _features(model, per_example="loop")
    assert float(model.scale) == 1.0  # the model's own buffer is untouched (each checkpoint is a copy)


def test_meta_and_lazy_models_are_named():
    with torch.device("meta"):
        meta = nn.Linear(5, 3)
    with pytest.raises(TrakValueError, match=r"meta device.*to_empty"):
        TorchBackend().prepare(meta, {"weight": torch.ones(3, 5), "bias": torch.ones(3)})
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(TrakValueError, match=r"not materialized yet \(lazy modules\): run one forward"):
        TorchBackend().prepare(lazy, None)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))).mean(1))


def test_tied_weights_in_checkpoints():
    """A checkpoint whose tied alias holds another value than its owner was featurized with the owner's (70% off
    what load_state_dict gives): refused. One without the alias key (as safetensors saves tied weights) was refused
    as missing a key: it is read through the owner, the same features as the whole state_dict."""
    torch.manual_seed(0)
    model = Tied().double().eval()
    ids, labels = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))

    def features(checkpoint):
        trak = trak_core.TRAK(model, proj_dim=None, progress=False)
        trak.featurize(checkpoint, [(ids, labels)])
        return torch.as_tensor(trak.store[0].features[:])

    state = {key: value.clone() for key, value in model.state_dict().items()}
    whole = features(state)
    without_alias = features({key: value for key, value in state.items() if key != "head.weight"})
    torch.testing.assert_close(without_alias, whole, rtol=0, atol=0)
    assert float(whole.abs().max()) > 1e-3
    state["head.weight"] = state["head.weight"] + 0.5
    with pytest.raises(TrakValueError, match=r"state_dict\['head\.weight'\] differs from state_dict\['emb\.weight'\]"):
        features(state)


def test_averaged_model_and_older_batch_norm_checkpoints():
    """AveragedModel's state_dict ('module.' keys and 'n_averaged') got the PEFT hint; now the prefix is named.
    A checkpoint without BatchNorm's num_batches_tracked (older torch) was refused; load_state_dict takes it."""
    from torch.optim.swa_utils import AveragedModel

    model = _mlp(norm=True)
    with torch.no_grad():
        model[1].running_mean.normal_()
    with pytest.raises(TrakValueError, match=r"extra prefix 'module\.'.*k\.startswith\('module\.'\)"):
        _features(model, AveragedModel(model).state_dict())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    older = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    torch.testing.assert_close(_features(model, older), _features(model, state), rtol=0, atol=0)


class FeaturesFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return h, self.head(h)


def test_a_tuple_of_several_batch_shaped_outputs_is_said():
    """(features, logits) took the features as logits with nothing said (214% off, the head's gradients 0);
    the documented rule stands, with a warning naming logits_fn; with it, the head's gradients are right."""
    model = FeaturesFirst().double().eval()
    with pytest.warns(UserWarning, match=r"tuple of several batch-shaped tensors.*logits_fn"):
        _features(model)
    got = _features(model, logits_fn=lambda output: output[1])
    x, y = _batch()
    task = get_task("classification")
    import array_api_compat.torch as xp

    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        task.output(model(x[i:i + 1])[1], y[i:i + 1], xp=xp).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-10, atol=1e-12)


def test_a_compiled_model_takes_the_closed_form_through_its_eager_module():
    """torch.compile's wrapper hid its layers from the closed form's hooks: right through vmap, slower. Its eager
    module runs now (the checkpoint's keys keep their '_orig_mod.' prefix); the compiled graph is never built."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    eager = eager.double().eval()
    compiled = torch.compile(eager)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    task = get_task("classification")
    backend = TorchBackend()
    prepared = backend.prepare(compiled, compiled.state_dict())
    assert list(prepared.params)[0] == "_orig_mod.0.weight"
    grads, _ = backend.gradients(compiled, prepared, x, y, task)
    reference = TorchBackend(per_example="vmap")
    expected, _ = reference.gradients(eager, reference.prepare(eager, None), x, y, task)
    assert float((grads - expected).abs().max() / expected.abs().max()) < 1e-12
    assert prepared._closed_form[id(task)] is not None
