"""TRAK.open with some of a store's checkpoints ({index: checkpoint}): only those are loaded, scores equal the
writing estimator's ensemble of the same checkpoints, and what needs the others says so."""
import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import MLP, TRAK, StoreMismatchError, TrakCoreError, TrakTypeError  # noqa: E402

N = 200


def _data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(N, 5)), rng.integers(0, 3, N)


def _batches():
    x, y = _data()
    return [(x[i:i + 50], y[i:i + 50]) for i in range(0, N, 50)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("subset") / "store"
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=24, store=path, progress=False)
    for c in range(3):
        trak.featurize(model.init(seed=c), _batches())
    return path, model, trak


TARGETS = (np.random.default_rng(8).normal(size=(7, 5)), np.arange(7) % 3)


def test_a_subset_scores_as_the_writing_estimators_ensemble_of_it(written):
    path, model, trak = written
    opened = TRAK.open(path, model, {2: model.init(seed=2), 0: model.init(seed=0)})
    scores = opened.score([TARGETS])
    assert np.array_equal(scores, trak.score([TARGETS], checkpoints=[0, 2]))
    assert not np.allclose(scores, trak.score([TARGETS]), rtol=1e-3)  # checkpoint 1 is not in it
    assert opened.n_checkpoints == 2 and [entry.index for entry in opened.store] == [0, 2]
    assert opened.lambdas == [trak.lambdas[0], trak.lambdas[2]]
    assert np.array_equal(opened.score([TARGETS], checkpoints=[2]), trak.score([TARGETS], checkpoints=[2]))
    assert np.array_equal(opened.self_influence(checkpoints=[2]), trak.self_influence(checkpoints=[2]))
    x, y = _data()
    assert np.array_equal(opened.features([(x[:5], y[:5])], checkpoint=2),
                          trak.features([(x[:5], y[:5])], checkpoint=2))


def test_one_checkpoint_of_three(written):
    path, model, trak = written
    opened = TRAK.open(path, model, {1: model.init(seed=1)})
    assert np.array_equal(opened.score([TARGETS]), trak.score([TARGETS], checkpoints=[1]))


def test_what_needs_the_other_checkpoints_says_so(written):
    path, model, _ = written
    opened = TRAK.open(path, model, {0: model.init(seed=0), 2: model.init(seed=2)})
    with pytest.raises(TrakCoreError, match=r"indices of the checkpoints this estimator opened, \[0, 2\], got \[1\]"):
        opened.score([TARGETS], checkpoints=[1])
    with pytest.raises(TrakCoreError, match=r"opened with checkpoints \[0, 2\] of the 3 .* open the store with every"):
        opened.featurize(model.init(seed=5), _batches())
    assert len(opened.store) == 2  # nothing was added


def test_a_subsets_checkpoints_are_checked_and_keys_must_be_store_indices(written):
    path, model, _ = written
    with pytest.raises(StoreMismatchError, match=r"checkpoint 2 in .* other parameters"):
        TRAK.open(path, model, {2: model.init(seed=1)})
    with pytest.raises(TrakCoreError, match=r"checkpoints 0 to 2, got the key 3"):
        TRAK.open(path, model, {3: model.init(seed=0)})
    with pytest.raises(TrakCoreError, match="empty mapping"):
        TRAK.open(path, model, {})
    with pytest.raises(TrakTypeError, match=r"string keys \(one checkpoint's state_dict\?\)"):
        TRAK.open(path, model, {"weights": model.init(seed=0)})
    with pytest.raises(TrakCoreError, match="holds 3 complete checkpoints; pass all 3.*or a mapping"):
        TRAK.open(path, model, [model.init(seed=0)])


def test_repr_says_what_the_estimator_holds_without_loading_it(written):
    path, model, trak = written
    opened = TRAK.open(path, model, {0: model.init(seed=0), 2: model.init(seed=2)})
    text = repr(opened)
    assert opened._opened and len(opened.store) == 0  # repr loaded nothing
    assert text == (f"TRAK(backend='numpy', task='classification', proj_dim=24, proj_type='rademacher', "
                    f"lambda_reg='auto', checkpoints=2, store={str(path)!r})")
    assert "checkpoints=3" in repr(trak)
