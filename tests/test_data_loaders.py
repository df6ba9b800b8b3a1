"""Data as torch users hand it over: loaders and datasets (a row order that changes between passes, or examples left
out, is refused before any work; plain loaders give the scores of the same batches given as a list), and batches of
another dtype than the model in any batch."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: torch DataLoader handling is not exercised")
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from trak_core import TRAK, TrakTypeError, TrakValueError  # noqa: E402


@pytest.fixture
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, x, y, TensorDataset(x, y)


def test_a_shuffling_loader_is_refused_for_training_data_and_targets(setup):
    model, x, y, dataset = setup
    trak = TRAK(model, proj_dim=16, progress=False)
    with pytest.raises(TrakValueError, match=r"shuffling sampler \(RandomSampler\).*shuffle=False"):
        trak.featurize(model.state_dict(), DataLoader(dataset, batch_size=8, shuffle=True))
    assert trak.n_checkpoints == 0
    trak.featurize(model.state_dict(), DataLoader(dataset, batch_size=8))
    with pytest.raises(TrakValueError, match="shuffling sampler"):
        trak.score(DataLoader(dataset, batch_size=8, shuffle=True))


def test_drop_last_is_refused_only_where_it_drops_examples(setup):
    model, x, y, dataset = setup
    trak = TRAK(model, proj_dim=16, progress=False)
    with pytest.raises(TrakValueError, match=r"drop_last=True.*left out"):
        trak.featurize(model.state_dict(), DataLoader(dataset, batch_size=10, drop_last=True))  # 48 = 4 x 10 + 8
    trak.featurize(model.state_dict(), DataLoader(dataset, batch_size=16, drop_last=True))  # 48 = 3 x 16: none dropped
    reference = TRAK(model, proj_dim=16, progress=False)
    reference.featurize(model.state_dict(), [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)])
    targets = [(x[:6], y[:6])]
    torch.testing.assert_close(trak.score(targets), reference.score(targets), rtol=0, atol=0)
    assert tuple(trak.score(targets).shape) == (48, 6)


@pytest.mark.parametrize("single", ["dataset", "zip"])
def test_single_examples_are_refused_with_the_hint_to_batch_them(setup, single):
    model, x, y, dataset = setup
    data = dataset if single == "dataset" else zip(x, y)
    hint = r"single examples.*DataLoader\(dataset, batch_size=\.\.\., shuffle=False\)"
    with pytest.raises(TrakTypeError, match=hint):
        TRAK(model, proj_dim=16, progress=False).featurize(model.state_dict(), data)


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_a_batch_of_another_dtype_than_the_model_names_the_conversion_in_any_batch(setup, per_example):
    # the first batch of a checkpoint is checked separately from the later ones (the closed form's fast path)
    from trak_torch import TorchBackend

    model, x, y, _ = setup
    trak = TRAK(model, proj_dim=16, backend=TorchBackend(per_example=per_example), progress=False)
    with pytest.raises(TrakTypeError, match=r"batch 1: inputs are float64 but the model's parameters are float32.*"
                                            r"inputs\.float\(\), or the model with model\.double\(\)"):
        trak.featurize(model.state_dict(), [(x[:24], y[:24]), (x[24:].double(), y[24:])])
    trak.featurize(model.state_dict(), [(x[:24], y[:24]), (x[24:], y[24:])])
    with pytest.raises(TrakTypeError, match=r"targets batch 0, checkpoint 0: inputs are float16.*inputs\.float\(\)"):
        trak.score([(x[:4].half(), y[:4])])
    assert tuple(trak.score([(x[:4], y[:4])]).shape) == (48, 4)


@pytest.mark.parametrize("case", ["ddp", "compiled", "wrapped_model", "training_checkpoint", "path"])
def test_a_checkpoint_saved_from_a_wrapper_names_the_fix(setup, case):
    model, x, y, _ = setup
    state = model.state_dict()
    checkpoint, fitted = {f"module.{k}": v for k, v in state.items()}, model
    expected = r"extra prefix 'module\.'.*k\.removeprefix\('module\.'\)"
    if case == "compiled":
        checkpoint, expected = {f"_orig_mod.{k}": v for k, v in state.items()}, r"extra prefix '_orig_mod\.'"
    elif case == "wrapped_model":
        checkpoint, fitted = state, torch.nn.DataParallel(model)
        expected = r"model's keys have the extra prefix 'module\.'.*model\.module"
    elif case == "training_checkpoint":
        checkpoint, expected = {"state_dict": state, "epoch": 3}, r"under 'state_dict': pass checkpoint\['state_dict'\]"
    elif case == "path":
        checkpoint, expected = "checkpoints/epoch_3.pt", r"got str: load it first, e.g. torch\.load\(path"
    with pytest.raises((TrakValueError, TrakTypeError), match=expected):
        TRAK(fitted, proj_dim=16, progress=False).featurize(checkpoint, [(x, y)])
    fixed = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in checkpoint.items()} \
        if isinstance(checkpoint, dict) and "epoch" not in checkpoint else state
    assert list(fixed) == list(state) and all(torch.equal(fixed[k], state[k]) for k in state)  # the named fix works


@pytest.mark.parametrize("output,problem", [
    (lambda z, y, xp: (z - y[:, None]) ** 2, r"returned shape \(1, 1\); take \[:, 0\]"),
    (lambda z, y, xp: xp.sum(z[:, 0] - y), r"returned shape \(\); do not sum")])
def test_a_custom_task_output_of_another_shape_than_one_value_per_example_is_refused(setup, output, problem):
    # (n, 1) happened to give the (n,) numbers, and a batch sum failed with torch's bare IndexError
    from trak_core import CustomTask

    model, x, _, _ = setup
    model = torch.nn.Sequential(model[0], model[1], torch.nn.Linear(8, 1))
    y = torch.randn(48)
    with pytest.raises(TrakValueError, match=r"output must return one value per example, shape \(1,\) .*" + problem):
        TRAK(model, task=CustomTask(output=output), proj_dim=16, progress=False).featurize(model.state_dict(), [(x, y)])
    good = TRAK(model, task=CustomTask(output=lambda z, y, xp: (z[:, 0] - y) ** 2 / 2), proj_dim=16, progress=False)
    good.featurize(model.state_dict(), [(x, y)])  # the shape the message asks for is accepted
    assert tuple(good.score([(x[:3], y[:3])]).shape) == (48, 3)
