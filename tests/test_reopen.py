"""A finished store reopened with TRAK.open scores new targets without the training data; self-influence."""
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("zarr", reason="zarr is not installed: on-disk stores are not exercised")

from trak_core import MLP, TRAK, StoreMismatchError, TrakCoreError  # noqa: E402

N = 300


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(N, 5)), rng.integers(0, 3, N)


def _featurize(path, checkpoints=2, **options):
    x, y = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=path, progress=False, **options)
    for c in range(checkpoints):
        trak.featurize(model.init(seed=c), [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)])
    return trak, model


SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from trak_core import MLP, TRAK
    model = MLP(5, 4, 3)
    trak = TRAK.open(sys.argv[1], model, [model.init(seed=c) for c in range(2)])
    targets = np.random.default_rng(7).normal(size=(9, 5)), np.arange(9) % 3
    np.save(sys.argv[2], trak.score([targets]))
""")


def test_reopened_in_a_new_process_scores_bit_identically(tmp_path):
    trak, _ = _featurize(tmp_path / "store", lambda_reg=0.05)  # a float lambda: read back from the store
    targets = np.random.default_rng(7).normal(size=(9, 5)), np.arange(9) % 3
    expected = trak.score([targets])
    script = tmp_path / "reopen.py"
    script.write_text(SCRIPT)
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(tmp_path / "scores.npy")], check=True,
                   cwd=root, timeout=300)
    assert np.array_equal(np.load(tmp_path / "scores.npy"), expected)


def test_opening_checks_checkpoints_and_lists_saved_scores(tmp_path):
    trak, model = _featurize(tmp_path / "store")
    x, y = _data()
    saved = trak.score([(x[:4], y[:4])], save_as="first-four")
    with pytest.raises(StoreMismatchError, match=r"checkpoint 1 in .* other parameters \(parameters_sha256"):
        TRAK.open(tmp_path / "store", model, [model.init(seed=0), model.init(seed=5)])
    with pytest.raises(TrakCoreError, match="holds 2 complete checkpoints; pass all 2"):
        TRAK.open(tmp_path / "store", model, [model.init(seed=0)])
    with pytest.raises(TrakCoreError, match="no trak-core store"):
        TRAK.open(tmp_path / "nothing", model, [model.init(seed=0)])
    opened = TRAK.open(tmp_path / "store", model, [model.init(seed=0), model.init(seed=1)])
    assert opened.saved_scores() == ["first-four"]
    assert np.array_equal(opened.load_scores("first-four"), saved)
    assert np.array_equal(opened.score([(x[:4], y[:4])], checkpoints=np.arange(2)), saved)
    assert opened.lambdas == trak.lambdas


def test_a_reopened_store_says_how_to_load_it(tmp_path):
    _, model = _featurize(tmp_path / "store")
    x, y = _data()
    fresh = TRAK(model, proj_dim=32, store=tmp_path / "store", progress=False)
    with pytest.raises(TrakCoreError, match=r"holds 2 complete checkpoints: TRAK.open\(path, model, checkpoints\)"):
        fresh.score([(x[:2], y[:2])])
    with pytest.raises(StoreMismatchError):
        fresh.featurize(model.init(seed=9), [(x, y)])
    with pytest.raises(TrakCoreError, match="the last featurize failed \\(StoreMismatchError"):
        fresh.score([(x[:2], y[:2])])


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_self_influence_is_the_diagonal_of_scoring_the_training_set(tmp_path, store):
    trak, model = _featurize(None if store == "memory" else tmp_path / "store", checkpoints=3)
    x, y = _data()
    diagonal = np.diag(trak.score([(x, y)]))  # every training example as a target: the independent reference
    np.testing.assert_allclose(trak.self_influence(), diagonal, rtol=1e-10, atol=1e-12 * np.abs(diagonal).max())
    np.testing.assert_allclose(trak.self_influence(checkpoints=[1]), np.diag(trak.score([(x, y)], checkpoints=[1])),
                               rtol=1e-10, atol=1e-12 * np.abs(diagonal).max())
    if store == "disk":
        opened = TRAK.open(tmp_path / "store", model, [model.init(seed=c) for c in range(3)])
        np.testing.assert_allclose(opened.self_influence(), diagonal, rtol=1e-10, atol=1e-12 * np.abs(diagonal).max())
    with pytest.raises(TrakCoreError, match="self_influence needs checkpoint_weighting='uniform'"):
        TRAK(model, proj_dim=8, checkpoint_weighting="normalized").self_influence()


@pytest.mark.parametrize("written, scored", [("float64", "float32"), ("float32", "float64")])
def test_a_store_is_scored_with_either_kernel_dtype(tmp_path, written, scored):
    """kernel_dtype is not part of the store's configuration: a float64 kernel stored is cast down, a float32 one
    is remade from the features for float64 (and stays stored); the scores match a fresh run with ``scored``."""
    _featurize(tmp_path / "store", kernel_dtype=written, lambda_reg=0.05)
    model = MLP(5, 4, 3)
    reopened = TRAK.open(tmp_path / "store", model, [model.init(seed=c) for c in range(2)], kernel_dtype=scored)
    targets = np.random.default_rng(7).normal(size=(9, 5)), np.arange(9) % 3
    scores = reopened.score([targets])
    assert all(entry.factor.arrays[0].dtype == np.dtype(scored) for entry in reopened.store)
    fresh, _ = _featurize(None, kernel_dtype=scored, lambda_reg=0.05)
    expected = fresh.score([targets])
    if scored == "float64":  # remade from the same features as a fresh float64 run: the same bits
        assert np.array_equal(scores, expected)
    else:  # a float64 kernel cast to float32 vs one made in float32: float32 rounding apart
        np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
    import zarr
    assert zarr.open_group(str(tmp_path / "store"), mode="r")["c0/kernel"].dtype == np.dtype(written)


def test_scoring_or_featurizing_with_another_lambda_leaves_the_stored_one(tmp_path):
    """The store keeps each checkpoint's lambda from when it was featurized: opening with another lambda_reg,
    featurizing again with one, or refitting scores with it but writes nothing, so a plain open afterwards gives
    the original scores bit for bit (before, the last lambda used was written over the stored one)."""
    trak, model = _featurize(tmp_path / "store")
    x, y = _data()
    targets = [(x[:6], y[:6])]
    expected, lambdas = trak.score(targets), trak.lambdas
    other = TRAK.open(tmp_path / "store", model, [model.init(seed=c) for c in range(2)], lambda_reg=1000.0,
                      progress=False)
    assert other.lambdas == [1000.0, 1000.0] and not np.allclose(other.score(targets), expected)
    again = TRAK(model, proj_dim=32, store=tmp_path / "store", lambda_reg=5.0, progress=False)
    for c in range(2):
        again.featurize(model.init(seed=c), [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)])
    assert again.lambdas == [5.0, 5.0]
    again.refit(7.0)
    plain = TRAK.open(tmp_path / "store", model, [model.init(seed=c) for c in range(2)], progress=False)
    assert plain.lambdas == lambdas and np.array_equal(plain.score(targets), expected)


def test_an_opened_store_is_whole_before_its_first_score(tmp_path):
    """Counts, lambdas, refit, features, self-influence and a further checkpoint work on a reopened store before any
    score, and agree with the estimator that wrote it (before: it looked empty, refit was lost, features and
    featurize failed)."""
    trak, model = _featurize(tmp_path / "store")
    x, y = _data()
    targets, batches = [(x[:6], y[:6])], [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)]
    checkpoints = [model.init(seed=c) for c in range(2)]

    def opened():
        return TRAK.open(tmp_path / "store", model, checkpoints, progress=False)

    first = opened()
    assert (first.n_checkpoints, first.n_train, first.lambdas) == (2, N, trak.lambdas)
    assert np.array_equal(first.features(targets, checkpoint=1), trak.features(targets, checkpoint=1))
    assert np.array_equal(opened().self_influence(), trak.self_influence())
    refitted = opened()
    refitted.refit(3.0)
    trak.refit(3.0)
    assert refitted.lambdas == [3.0, 3.0]
    np.testing.assert_allclose(refitted.score(targets), trak.score(targets), rtol=1e-12, atol=0)
    grown = opened()
    grown.featurize(model.init(seed=2), batches)
    reference, _ = _featurize(tmp_path / "three", checkpoints=3)
    assert grown.n_checkpoints == 3
    np.testing.assert_allclose(grown.score(targets), reference.score(targets), rtol=1e-12, atol=0)


def test_self_influence_before_a_torch_score_reads_torch_features(tmp_path):
    """Self-influence first on a reopened torch store loads torch tensors (from the checkpoint's parameters), so
    the score after it works and equals the writer's (before: NumPy features, then a TypeError)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: torch stores are not exercised")
    x, y = _data()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", progress=False)
    trak.featurize(model.state_dict(), [(x, y)])
    opened = TRAK.open(tmp_path / "store", model, [model.state_dict()], progress=False)
    influence = opened.self_influence()
    assert isinstance(influence, torch.Tensor) and torch.equal(influence, trak.self_influence())
    assert torch.equal(opened.score([(x[:5], y[:5])]), trak.score([(x[:5], y[:5])]))


def test_the_log_says_the_lambda_was_stored(tmp_path, caplog):
    import logging

    _, model = _featurize(tmp_path / "store", lambda_reg=0.05)
    x, y = _data()
    with caplog.at_level(logging.INFO, logger="trak_core"):
        TRAK.open(tmp_path / "store", model, [model.init(seed=c) for c in range(2)], progress=False).score([(x[:2],
                                                                                                          y[:2])])
    lines = [r.getMessage() for r in caplog.records if "lambda=" in r.getMessage()]
    assert len(lines) == 2 and all("lambda=0.05 (stored)" in line for line in lines)  # was "(auto)"


def _margin(logits, labels, xp):
    from trak_core import Classification

    return Classification().output(logits, labels, xp=xp)


def _logit_of_label(logits, labels, xp):
    return xp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]


def test_a_custom_task_is_part_of_the_stores_identity(tmp_path):
    """Two custom tasks with the same name but other functions are told apart (before, only the name was stored,
    so a store of one was scored with the other: 33% off); the same task reopens and scores bit for bit."""
    torch = pytest.importorskip("torch", reason="torch is not installed: custom tasks need autodiff")
    from trak_core import CustomTask
    from trak_core.tasks import task_identity

    x, y = _data()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    first, other = CustomTask(_margin), CustomTask(_logit_of_label)
    assert task_identity(first) != task_identity(other) and task_identity(first).startswith("output=")
    trak = TRAK(model, task=first, proj_dim=16, store=tmp_path / "store", progress=False)
    trak.featurize(model.state_dict(), [(x, y)])
    with pytest.raises(StoreMismatchError, match=r"task_identity: stored 'output=.*now 'output="):
        TRAK.open(tmp_path / "store", model, [model.state_dict()], task=other, progress=False)
    with pytest.raises(StoreMismatchError, match="task_identity"):
        TRAK(model, task=other, proj_dim=16, store=tmp_path / "store", progress=False).featurize(model.state_dict(),
                                                                                               [(x, y)])
    again = TRAK.open(tmp_path / "store", model, [model.state_dict()], task=CustomTask(_margin), progress=False)
    assert torch.equal(again.score([(x[:4], y[:4])]), trak.score([(x[:4], y[:4])]))


@pytest.mark.parametrize("written", [0.5, 0.0, "auto"])
def test_a_checkpoint_added_to_an_opened_store_follows_its_lambda(tmp_path, written):
    x, y = _data()
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)]
    _, model = _featurize(tmp_path / "store", lambda_reg=written)
    trak = TRAK(model, proj_dim=32, progress=False, lambda_reg=written)  # the reference: three in one sitting
    for c in range(3):
        trak.featurize(model.init(seed=c), batches)
    reopened = TRAK.open(tmp_path / "store", model, [model.init(seed=c) for c in range(2)], progress=False)
    assert reopened.lambda_reg == written  # was "auto" for every store
    reopened.featurize(model.init(seed=2), batches)  # was factorized at the "auto" lambda (40.9 for a 0.5 store)
    assert reopened.lambdas == trak.lambdas
    if written == "auto":  # the automatic lambda is the kernel's mean eigenvalue: each checkpoint its own
        assert len(set(trak.lambdas)) == 3
    else:
        assert trak.lambdas == [written] * 3
    targets = (x[:7], y[:7])
    assert np.array_equal(reopened.score([targets]), trak.score([targets]))


@pytest.mark.parametrize("failure", ["error", "interrupt"])
def test_scoring_after_a_failed_featurize_names_the_missing_checkpoint(failure):
    """Checkpoint 1's featurize failed (NaN inputs, Ctrl-C), and score() returned checkpoint 0's scores alone as the
    ensemble, unsaid. Now it refuses, and scores with the checkpoints named, or after featurizing again."""
    model, (x, y) = MLP(5, 4, 3), _data()
    trak = TRAK(model, proj_dim=32, progress=False)
    trak.featurize(model.init(seed=0), [(x, y)])

    def batches():
        yield x[:20], y[:20]
        if failure == "interrupt":
            raise KeyboardInterrupt
        yield np.full_like(x[20:], np.nan), y[20:]

    with pytest.raises((KeyboardInterrupt, TrakCoreError)):
        trak.featurize(model.init(seed=1), batches())
    for call in (lambda: trak.score([(x[:3], y[:3])]), trak.self_influence):
        with pytest.raises(TrakCoreError, match=r"the last featurize failed .* pass checkpoints=\[0\] to use the 1"):
            call()
    alone = TRAK(model, proj_dim=32, progress=False)
    alone.featurize(model.init(seed=0), [(x, y)])
    assert np.array_equal(trak.score([(x[:3], y[:3])], checkpoints=[0]), alone.score([(x[:3], y[:3])]))
    trak.featurize(model.init(seed=1), [(x, y)])
    both = TRAK(model, proj_dim=32, progress=False)
    for seed in (0, 1):
        both.featurize(model.init(seed=seed), [(x, y)])
    assert np.array_equal(trak.score([(x[:3], y[:3])]), both.score([(x[:3], y[:3])]))


def test_a_refused_duplicate_leaves_the_ensemble_whole():
    """A checkpoint refused as a duplicate (or as no checkpoint of this model) was never part of the ensemble: score()
    goes on with every checkpoint (the review of the refusal above: it refused here too)."""
    trak, model = _featurize(None)
    x, y = _data()
    before = trak.score([(x[:3], y[:3])])
    with pytest.raises(TrakCoreError, match="same parameters as checkpoint 1"):
        trak.featurize(model.init(seed=1), [(x, y)])
    assert np.array_equal(trak.score([(x[:3], y[:3])]), before)
    assert np.array_equal(trak.self_influence(), trak.self_influence(checkpoints=[0, 1]))


def test_checkpoints_given_as_one_index_names_the_fix():
    trak, _ = _featurize(None)
    x, y = _data()
    for call in (lambda: trak.score([(x[:3], y[:3])], checkpoints=0), lambda: trak.self_influence(checkpoints=1)):
        with pytest.raises(TrakCoreError, match=r"checkpoints must be a sequence of checkpoint indices, got \d: pass "
                                                r"\[\d\] for one checkpoint"):
            call()
    with pytest.raises(TrakCoreError, match=r"got the string '02': pass a list of integers, e\.g\. checkpoints=\[0, "
                                            r"2\]"):  # was "pass ['02']", which is refused as well
        trak.score([(x[:3], y[:3])], checkpoints="02")


JAX_MODEL = textwrap.dedent("""
    import jax.numpy as jnp
    import numpy as np


    def apply(params, x):  # a layer norm: its means round differently at another batch size
        w1, b1, gain, shift, w2, b2 = params
        a = x @ w1.T + b1
        mean = a.mean(-1, keepdims=True)
        a = (a - mean) / jnp.sqrt(((a - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * gain + shift
        return jnp.tanh(a) @ w2.T + b2


    def weights(seed):
        r = np.random.default_rng(seed)
        return [jnp.asarray(a.astype(np.float32)) for a in (r.normal(size=(16, 5)) * .5, r.normal(size=16) * .1,
                1 + .1 * r.normal(size=16), .1 * r.normal(size=16), r.normal(size=(3, 16)) * .3, r.normal(size=3) * .1)]


    def data(n, seed):
        r = np.random.default_rng(seed)
        return r.normal(size=(n, 5)).astype(np.float32), r.integers(0, 3, n).astype(np.int32)
""")

JAX_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from jax_model import apply, data, weights
    from trak_core import TRAK
    from trak_jax import JaxModel
    trak = TRAK.open(sys.argv[1], JaxModel(apply), [weights(c) for c in range(2)])
    np.save(sys.argv[2], np.asarray(trak.score([data(6, 7)])))
""")


def test_a_jax_store_reopened_in_a_new_process_scores_bit_identically(tmp_path, monkeypatch):
    """JAX compiles its step at the first batch's size: the reopened process's first batch is the targets', and XLA
    rounded float32 otherwise (scores 1.7e-7 apart). The store keeps the training data's first batch's rows, and
    ``TRAK.open`` gives them to the backend."""
    pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    (tmp_path / "jax_model.py").write_text(JAX_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    from jax_model import apply, data, weights
    from trak_jax import JaxModel

    x, y = data(2000, 0)
    trak = TRAK(JaxModel(apply), proj_dim=32, seed=5, store=tmp_path / "store", progress=False)
    for c in range(2):
        trak.featurize(weights(c), [(x[i:i + 500], y[i:i + 500]) for i in range(0, 2000, 500)])
    expected = np.asarray(trak.score([data(6, 7)]))
    script = tmp_path / "reopen.py"
    script.write_text(JAX_SCRIPT)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script), str(tmp_path / "store"), str(tmp_path / "scores.npy")], check=True,
                   cwd=root, timeout=300, env=env)
    assert np.array_equal(np.load(tmp_path / "scores.npy"), expected)


def test_a_store_of_a_backend_without_a_parameters_digest_reopens(tmp_path):
    """A backend keeping the protocol's default parameters_digest (None: no such checks), as trak_cupy's
    PrecomputedGradients does, stores no digest; TRAK.open refused its complete store as "incomplete or has no
    parameters_sha256", which featurizing again could never mend."""
    from trak_core.backends.numpy_backend import ArrayAPIBackend
    from trak_core.backends.protocol import Backend

    class Digestless(ArrayAPIBackend):
        name = "digestless"
        parameters_digest = Backend.parameters_digest

    x, y = _data()
    model, path, targets = MLP(5, 4, 3), tmp_path / "store", [(x[:7], y[:7])]
    trak = TRAK(model, proj_dim=32, store=path, backend=Digestless(), progress=False)
    for c in range(2):
        trak.featurize(model.init(seed=c), [(x, y)])
    reopened = TRAK.open(path, model, [model.init(seed=c) for c in range(2)], backend=Digestless())
    assert np.array_equal(reopened.score(targets), trak.score(targets))
    reference = TRAK(model, proj_dim=32, progress=False)  # the numpy backend, in memory: the same numbers
    for c in range(2):
        reference.featurize(model.init(seed=c), [(x, y)])
    np.testing.assert_allclose(reopened.score(targets), reference.score(targets), rtol=1e-12, atol=1e-12)


def test_reopening_a_jax_store_leaves_the_shared_backend_s_step_size_alone(tmp_path, monkeypatch):
    """TRAK.open fixes the step's size at the store's first batch's rows: it set it on the one JAX backend of the
    process (``get_backend("jax")``), so every later TRAK there compiled at that size (20 rows for 500-row batches:
    other roundings, the test above failed after a test that reopened a 20-row store)."""
    pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
    (tmp_path / "jax_model.py").write_text(JAX_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    import trak_jax
    from jax_model import apply, data, weights
    from trak_jax import JaxModel

    monkeypatch.setattr(trak_jax.backend, "batch_size", None)
    monkeypatch.setattr(trak_jax.backend, "step_rows", None)
    x, y = data(20, 0)
    TRAK(JaxModel(apply), proj_dim=8, store=tmp_path / "store", progress=False).featurize(weights(0), [(x, y)])
    reopened = TRAK.open(tmp_path / "store", JaxModel(apply), [weights(0)])
    assert reopened.backend.step_rows == 20 and reopened.backend.batch_size is None  # 20's buckets, not one size
    assert reopened.backend is not trak_jax.backend
    assert trak_jax.backend.step_rows is None and TRAK(JaxModel(apply), progress=False).backend.step_rows is None


def test_opening_a_store_with_an_interrupted_checkpoint_names_it(tmp_path):
    """The second checkpoint stopped after a chunk of rows: opening with two checkpoints names it and how to finish
    it (it used to say only that the store holds 1); the complete one opens and scores as before."""
    from trak_core.store import KERNEL_CHUNK_ROWS

    rng = np.random.default_rng(0)
    n = KERNEL_CHUNK_ROWS + 64  # one whole chunk is recorded, the next one's batch is not
    x, y = rng.normal(size=(n, 5)), rng.integers(0, 3, n)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, n, 64)]
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", progress=False)
    trak.featurize(model.init(seed=0), batches)
    expected = trak.score([(x[:4], y[:4])])

    def interrupted():
        yield from batches
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trak.featurize(model.init(seed=1), interrupted())
    checkpoints = [model.init(seed=c) for c in range(2)]
    with pytest.raises(TrakCoreError, match=r"holds 1 complete checkpoints; .*checkpoint 1 was interrupted with its "
                                            rf"first {KERNEL_CHUNK_ROWS} training rows written: run the same"):
        TRAK.open(tmp_path / "store", model, checkpoints)
    with pytest.raises(TrakCoreError, match="holds 1 complete checkpoints; pass all 1") as refused:
        TRAK.open(tmp_path / "store", model, [])
    assert "interrupted" not in str(refused.value)  # too few checkpoints: the interrupted one is not the problem
    opened = TRAK.open(tmp_path / "store", model, checkpoints[:1])
    assert np.array_equal(opened.score([(x[:4], y[:4])]), expected)


def test_opening_a_store_whose_first_checkpoint_was_interrupted_names_it(tmp_path):
    x, y = _data()
    model = MLP(5, 4, 3)
    trak = TRAK(model, proj_dim=32, store=tmp_path / "store", progress=False)

    def interrupted():
        yield x[:64], y[:64]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trak.featurize(model.init(seed=0), interrupted())
    with pytest.raises(TrakCoreError, match=r"holds no complete checkpoint: featurize first \(checkpoint 0 was "
                                            r"interrupted before its first chunk of rows was written"):
        TRAK.open(tmp_path / "store", model, [model.init(seed=0)])
