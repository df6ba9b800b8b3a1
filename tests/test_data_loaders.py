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
    checkpoint, fitted = {f"module.{k}": v for k, v in reversed(state.items())}, model  # any key order
    expected = r"extra prefix 'module\.'.*k\.removeprefix\('module\.'\)"
    if case == "compiled":
        checkpoint, expected = {f"_orig_mod.{k}": v for k, v in state.items()}, r"extra prefix '_orig_mod\.'"
    elif case == "wrapped_model":
        checkpoint, fitted = state, torch.nn.DataParallel(model)
        expected = r"DataParallel wrapper .*pass the model it wraps, model\.module"
    elif case == "training_checkpoint":
        checkpoint, expected = {"state_dict": state, "epoch": 3}, r"under 'state_dict': pass checkpoint\['state_dict'\]"
    elif case == "path":
        checkpoint, expected = "checkpoints/epoch_3.pt", r"got str: load it first, e.g. torch\.load\(path"
    with pytest.raises((TrakValueError, TrakTypeError), match=expected):
        TRAK(fitted, proj_dim=16, progress=False).featurize(checkpoint, [(x, y)])
    fixed = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in checkpoint.items()} \
        if isinstance(checkpoint, dict) and "epoch" not in checkpoint else state
    fixed = fixed if case != "training_checkpoint" else checkpoint["state_dict"]  # the fix each message names
    targets = [(x[:3], y[:3])]
    with_fix, plain = TRAK(model, proj_dim=16, progress=False), TRAK(model, proj_dim=16, progress=False)
    with_fix.featurize(fixed, [(x, y)])
    plain.featurize(state, [(x, y)])
    torch.testing.assert_close(with_fix.score(targets), plain.score(targets), rtol=0, atol=0)


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


class _Batches(torch.utils.data.IterableDataset):
    """A streaming dataset that batches by itself (as webdataset's ``.batched()`` does)."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size

    def __iter__(self):
        return iter([(self.x[i:i + self.size], self.y[i:i + self.size]) for i in range(0, len(self.x), self.size)])


class _Rows(torch.utils.data.IterableDataset):
    """A streaming dataset of single examples (no length)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return zip(self.x, self.y)


class _OrderedWithShuffleMethod(torch.utils.data.Sampler):
    """An ordered sampler that happens to have a ``shuffle`` method (not the flag DistributedSampler has)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n

    def shuffle(self):
        raise AssertionError("never called")


def test_ordered_loaders_and_batching_datasets_are_accepted_shuffling_batch_samplers_refused(setup):
    from torch.utils.data import BatchSampler, RandomSampler

    model, x, y, dataset = setup
    reference = TRAK(model, proj_dim=16, progress=False)
    reference.featurize(model.state_dict(), [(x[i:i + 8], y[i:i + 8]) for i in range(0, 48, 8)])
    targets = [(x[:3], y[:3])]
    for data in (_Batches(x, y, 8), DataLoader(_Batches(x, y, 8), batch_size=None),
                 DataLoader(dataset, batch_size=8, sampler=_OrderedWithShuffleMethod(48)),
                 DataLoader(_Batches(x, y, 1), batch_size=None)):
        trak = TRAK(model, proj_dim=16, progress=False)
        trak.featurize(model.state_dict(), data)  # batches of 1 round differently from batches of 8: float32 level
        torch.testing.assert_close(trak.score(targets), reference.score(targets), rtol=1e-4, atol=1e-7)
    shuffled = DataLoader(dataset, batch_sampler=BatchSampler(RandomSampler(dataset), batch_size=8, drop_last=False))
    with pytest.raises(TrakValueError, match=r"shuffling sampler \(RandomSampler\)"):
        TRAK(model, proj_dim=16, progress=False).featurize(model.state_dict(), shuffled)
    with pytest.raises(TrakValueError, match=r"drop_last=True.*how many is unknown"):  # an iterable dataset: it may
        TRAK(model, proj_dim=16, progress=False).featurize(  # drop any number (it dropped 22 of 150 unsaid)
            model.state_dict(), DataLoader(_Rows(x, y), batch_size=8, drop_last=True))


def test_samplers_inside_samplers_and_subsets_are_read_for_order_and_drops(setup):
    """A BatchSampler given as a loader's sampler (batch_size=None, torch's pattern for batched loading) shuffled or
    dropped rows unseen; drop_last was judged by the dataset's length, not the sampler's (a false refusal, and 22
    rows dropped unsaid)."""
    from torch.utils.data import BatchSampler, RandomSampler, SequentialSampler

    model, x, y, dataset = setup
    big = TensorDataset(torch.cat([x, x[:2]]), torch.cat([y, y[:2]]))  # 50 rows, of which the sampler reads 48
    trak = TRAK(model, proj_dim=16, progress=False)
    trak.featurize(model.state_dict(), DataLoader(big, batch_size=16, sampler=range(48), drop_last=True))  # none
    reference = TRAK(model, proj_dim=16, progress=False)
    reference.featurize(model.state_dict(), [(x, y)])
    targets = [(x[:4], y[:4])]
    torch.testing.assert_close(trak.score(targets), reference.score(targets), rtol=1e-5, atol=1e-7)
    with pytest.raises(TrakValueError, match=r"drop_last=True \(BatchSampler\): the 13 examples"):  # 45 = 2 x 16 + 13
        TRAK(model, proj_dim=16, progress=False).featurize(
            model.state_dict(), DataLoader(dataset, batch_size=16, sampler=range(45), drop_last=True))
    for sampler, said in ((BatchSampler(RandomSampler(dataset), 16, False), r"shuffling sampler \(RandomSampler\)"),
                          (BatchSampler(SequentialSampler(range(45)), 16, True), r"the 13 examples")):
        with pytest.raises(TrakValueError, match=said):
            TRAK(model, proj_dim=16, progress=False).featurize(
                model.state_dict(), DataLoader(dataset, sampler=sampler, batch_size=None))


def test_a_later_error_that_is_not_about_dtypes_is_not_reported_as_one(setup):
    # a model that casts its own inputs takes float64 batches; an out-of-memory error in batch 1 stays what it is
    model, x, y, _ = setup

    class Casting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.calls = model, 0

        def forward(self, inputs):
            if inputs.shape[0] == 24 and float(inputs.sum()) == float(x[24:].double().sum()):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.net(inputs.float())

    casting = Casting()
    trak = TRAK(casting, proj_dim=16, progress=False)
    with pytest.raises(RuntimeError, match="^CUDA out of memory") as info:
        trak.featurize(casting.state_dict(), [(x[:24].double(), y[:24]), (x[24:].double(), y[24:])])
    assert not isinstance(info.value, TrakTypeError)


def test_a_custom_task_with_squeezed_logits_runs(setup):
    # logits_ndim=None: a model ending in squeeze() gives 0-d logits for one example; the shape check must not index
    from trak_core import CustomTask

    model, x, _, _ = setup
    class Squeezed(torch.nn.Sequential):
        def forward(self, inputs):
            return super().forward(inputs).squeeze()  # (n,) for a batch, 0-d for one example

    model = Squeezed(model[0], model[1], torch.nn.Linear(8, 1))
    y = torch.randn(48)
    task = CustomTask(output=lambda z, y, xp: z - y, logits_ndim=None)
    trak = TRAK(model, task=task, proj_dim=16, progress=False)
    trak.featurize(model.state_dict(), [(x, y)])
    column = torch.nn.Sequential(model[0], model[1], model[2])  # the same weights, logits (n, 1)
    regression = TRAK(column, task=CustomTask(output=lambda z, y, xp: z[:, 0] - y), proj_dim=16, progress=False)
    regression.featurize(column.state_dict(), [(x, y)])
    torch.testing.assert_close(trak.score([(x[:3], y[:3])]), regression.score([(x[:3], y[:3])]), rtol=1e-5, atol=1e-6)


def test_batches_of_three_and_a_bare_dict_pair_and_numpy_labels_name_the_fix(setup):
    """A dataset yielding (x, y, index) got "must be a pair ... got list"; a bare ({"x": X}, Y) pair was taken for
    a list of batches; numpy labels for a torch model got no conversion hint."""
    model, x, y, _ = setup
    trak = TRAK(model, proj_dim=16, progress=False)
    with pytest.raises(TrakTypeError, match=r"got list of 3 elements; drop the others, e.g. \(\(x, y\) for x, y, \*_"):
        trak.featurize(model.state_dict(), DataLoader(TensorDataset(x, y, torch.arange(48)), batch_size=16))
    with pytest.raises(TrakTypeError, match=r"single \(inputs, labels\) pair: wrap it in a list"):
        trak.featurize(model.state_dict(), ({"input": x}, y))
    with pytest.raises(TrakTypeError, match=r"needs labels as torch tensors, got ndarray; convert .*torch.as_tensor"):
        trak.featurize(model.state_dict(), [(x, y.numpy())])
