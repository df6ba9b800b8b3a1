"""Store access: torch arrays on the NumPy backend, read-only stores, two writers, repeated checkpoints, and
scoring memory that does not grow with the number of checkpoints."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

from trak_core import MLP, TRAK, SoftmaxRegression, TrakOSError, TrakValueError
from trak_core.scores import checkpoint_scores, soft_threshold

N = 300
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)), rng.integers(0, 3, n)


def _batches(x, y, size=64):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


# 1. The NumPy reference backend runs on torch tensors, as its docstring says.

@pytest.mark.parametrize("store", ["memory", "disk"])
@pytest.mark.parametrize("model", [SoftmaxRegression(5, 3), MLP(5, 4, 3)], ids=["softmax", "mlp"])
def test_numpy_backend_scores_torch_tensors_as_numpy_arrays(tmp_path, model, store):
    torch = pytest.importorskip("torch")
    if store == "disk":
        pytest.importorskip("zarr")
    x, y = _data()
    xt, yt = _data(7, seed=3)
    # a flat vector (MLP) or a mapping of named arrays (softmax), as torch tensors
    as_torch = [torch.as_tensor(model.init(seed=c)) if isinstance(model, MLP) else
                {k: torch.as_tensor(v) for k, v in model.params(model.init(seed=c)).items()} for c in range(2)]

    def run(checkpoints, convert, path):
        trak = TRAK(model, proj_dim=16, backend="numpy", progress=False, store=path)
        for checkpoint in checkpoints:
            trak.featurize(checkpoint, [(convert(a), convert(b)) for a, b in _batches(x, y)])
        return trak, trak.score([(convert(xt), convert(yt))])

    _, reference = run([model.init(seed=0), model.init(seed=1)], np.asarray,
                       None if store == "memory" else tmp_path / "numpy")
    trak, scores = run(as_torch, torch.as_tensor, None if store == "memory" else tmp_path / "torch")
    assert isinstance(scores, torch.Tensor) and scores.shape == (N, 7)
    np.testing.assert_allclose(scores.numpy(), reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())
    if store == "disk":  # the NumPy-written store reopened with torch checkpoints scores torch targets
        opened = TRAK.open(tmp_path / "numpy", model, list(as_torch))
        again = opened.score([(torch.as_tensor(xt), torch.as_tensor(yt))])
        np.testing.assert_allclose(again.numpy(), reference, rtol=1e-6, atol=1e-9 * np.abs(reference).max())


# 2. A finished store in a read-only directory is read; writing to it is a clear error.

READ_ONLY_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    from trak_core import MLP, TRAK, TrakOSError
    store, out = sys.argv[1], sys.argv[2]
    try:  # the directory really is read-only for this process
        open(os.path.join(store, "probe"), "w")
        sys.exit("the store is writable: the test would prove nothing")
    except PermissionError:
        pass
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 5)), rng.integers(0, 3, 300)
    model = MLP(5, 4, 3)
    checkpoints = [model.init(seed=c) for c in range(2)]
    opened = TRAK.open(store, model, checkpoints)
    results = {"scores": opened.score([(x[:9], y[:9])]), "self": opened.self_influence(),
               "saved": opened.load_scores("first")}
    again = TRAK(model, proj_dim=32, store=store, progress=False)  # complete checkpoints: checked, not written
    for checkpoint in checkpoints:
        again.featurize(checkpoint, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 300, 64)])
    results["refeaturized"] = again.score([(x[:9], y[:9])])
    errors = []
    for attempt in range(2):  # the same clear error each time
        try:
            opened.score([(x[:9], y[:9])], save_as="second")
        except TrakOSError as exc:
            errors.append(str(exc))
    try:
        again.featurize(model.init(seed=5), [(x, y)])
    except TrakOSError as exc:
        errors.append(str(exc))
    np.savez(out, errors=np.array(errors), **results)
""")


def _listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_a_read_only_store_is_opened_scored_and_refuses_writes_clearly(tmp_path):
    pytest.importorskip("zarr")
    if os.geteuid() == 0:  # root writes anywhere: run without the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only directory cannot be simulated")
        prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]
    else:
        prefix = []
    store = tmp_path / "store"
    x, y = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=store, progress=False)
    for c in range(2):
        trak.featurize(model.init(seed=c), _batches(x, y))
    expected = {"scores": trak.score([(x[:9], y[:9])], save_as="first"), "self": trak.self_influence()}
    before = _listing(store)
    script, out = tmp_path / "read_only.py", tmp_path / "out.npz"
    script.write_text(READ_ONLY_SCRIPT)
    for p in [store, *store.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        run = subprocess.run([*prefix, sys.executable, str(script), str(store), str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    finally:
        for p in [store, *store.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert run.returncode == 0, run.stderr[-3000:]
    results = np.load(out)
    assert np.array_equal(results["scores"], expected["scores"])
    assert np.array_equal(results["refeaturized"], expected["scores"])
    assert np.array_equal(results["self"], expected["self"])
    assert np.array_equal(results["saved"], expected["scores"])
    errors = list(results["errors"])
    assert len(errors) == 3, errors
    for message in errors:
        assert f"the store directory {store} is not writable" in message and "this call writes to it" in message
    assert errors[0] == errors[1]
    assert _listing(store) == before  # nothing was written


# 3. Scoring holds one checkpoint's block at a time (a running sum), with the same numbers.

def _reference(trak, target, weighting, quantile):
    """The ensemble as the scoring formula states it: every checkpoint's block, then their mean."""
    blocks = []
    for entry in trak.store:
        block = checkpoint_scores(entry.features, entry.factor, target(entry), xp=np)
        if weighting == "normalized":
            norms = np.sqrt(np.sum(block * block, axis=0, keepdims=True))
            block = block / np.where(norms > 0, norms, 1.0)
        blocks.append(block)
    total = blocks[0]
    for block in blocks[1:]:
        total = total + block
    weight = trak.store[0].out_to_loss
    for entry in list(trak.store)[1:]:
        weight = weight + entry.out_to_loss
    scores = (total / len(blocks)) * (weight / len(blocks))[:, None]
    return scores if quantile is None else soft_threshold(scores, quantile, xp=np)


@pytest.mark.parametrize("weighting, quantile", [("uniform", None), ("normalized", None), ("uniform", 0.5)])
def test_scoring_memory_does_not_grow_with_checkpoints(weighting, quantile):
    n, m, checkpoints = 20000, 100, 8
    x, y = _data(n)
    xt, yt = _data(m, seed=4)
    model = SoftmaxRegression(5, 3)
    trak = TRAK(model, proj_dim=8, progress=False, checkpoint_weighting=weighting, soft_threshold=quantile)
    for c in range(checkpoints):
        trak.featurize(model.init(seed=c), _batches(x, y, 4096))
    peaks = {}
    for count in (1, checkpoints):
        tracemalloc.start()
        try:
            scores = trak.score([(xt, yt)], checkpoints=range(count))
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    block = n * m * scores.dtype.itemsize
    # before: every checkpoint's (n, m) block was held until the ensemble, 8 blocks more for 8 checkpoints
    assert peaks[checkpoints] - peaks[1] < 1.5 * block, (peaks, block)
    target = lambda entry: trak.features([(xt, yt)], checkpoint=entry.index)  # noqa: E731
    assert np.array_equal(scores, _reference(trak, target, weighting, quantile))


# 4. A checkpoint listed twice would count twice.

def test_a_checkpoint_listed_twice_is_refused():
    x, y = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=16, progress=False)
    for c in range(2):
        trak.featurize(model.init(seed=c), _batches(x, y))
    for chosen in ([1, 1], [0, 1, np.int64(0)]):
        with pytest.raises(TrakValueError, match="more than once"):
            trak.score([(x[:3], y[:3])], checkpoints=chosen)
        with pytest.raises(TrakValueError, match="more than once"):
            trak.self_influence(checkpoints=chosen)
    assert np.array_equal(trak.score([(x[:3], y[:3])], checkpoints=[1, 0]).shape, (N, 3))


# 5. Two processes writing one store: zarr's check-then-create race is an error that says so.

def test_another_writer_creating_the_arrays_is_a_clear_error_and_a_rerun_resumes(tmp_path, monkeypatch):
    zarr = pytest.importorskip("zarr")
    x, y = _data()
    model = MLP(5, 4, 3)
    reference = TRAK(model, proj_dim=32, progress=False)
    reference.featurize(model.init(seed=0), _batches(x, y))
    path = tmp_path / "store"
    original = zarr.Group.create_array

    def raced(self, name, **options):  # another process creates the array between the check and the create
        other = zarr.open_group(str(path), mode="a")[self.path]
        original(other, name, **options)
        return original(self, name, **options)

    monkeypatch.setattr(zarr.Group, "create_array", raced)
    trak = TRAK(model, proj_dim=32, store=path, progress=False)
    with pytest.raises(TrakOSError, match=r"changed under this process.*another process is writing it \(one writer"):
        trak.featurize(model.init(seed=0), _batches(x, y))
    monkeypatch.setattr(zarr.Group, "create_array", original)
    rerun = TRAK(model, proj_dim=32, store=path, progress=False)
    rerun.featurize(model.init(seed=0), _batches(x, y))
    assert np.array_equal(rerun.score([(x[:5], y[:5])]), reference.score([(x[:5], y[:5])]))
