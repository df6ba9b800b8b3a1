"""The estimator against DESIGN.md's formula evaluated independently, and projected vs exact."""
import warnings

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import spearmanr

from trak_core import MLP, TRAK, SoftmaxRegression, TrakValueError


def _problem(rng, n=60, m=7, d=5, c=3):
    x, y = rng.normal(size=(n, d)), rng.integers(0, c, n)
    xt, yt = rng.normal(size=(m, d)), rng.integers(0, c, m)
    return x, y, xt, yt


def _margin_gradients(weight, bias, x, y):
    """Per-example gradient of logit_y - logsumexp_{j != y} logit_j, written out by hand."""
    rows, q = [], []
    for xi, yi in zip(x, y):
        z = weight @ xi + bias
        others = np.delete(np.arange(len(z)), yi)
        dz = np.zeros_like(z)
        dz[yi] = 1.0
        dz[others] = -softmax(z[others])
        rows.append(np.concatenate([np.outer(dz, xi).ravel(), dz]))
        q.append(1.0 - softmax(z)[yi])
    return np.array(rows), np.array(q)


def _design_formula(checkpoints, x, y, xt, yt, lam, c=3, d=5):
    """tau = (1/C sum_c G_c (G_c^T G_c + lam I)^-1 g_c(t)^T) * (1/C sum_c Q_c)."""
    total, weight = 0.0, 0.0
    for theta in checkpoints:
        w, b = theta[:c * d].reshape(c, d), theta[c * d:]
        g, q = _margin_gradients(w, b, x, y)
        gt, _ = _margin_gradients(w, b, xt, yt)
        kernel = g.T @ g + lam * np.eye(g.shape[1])
        # lambda = 0: the margin gradients of softmax regression always span fewer than p
        # directions (dz sums to 0), so K is singular and the estimator is the min-norm solution.
        solved = np.linalg.pinv(kernel, hermitian=True) @ gt.T if lam == 0 else np.linalg.solve(kernel, gt.T)
        total = total + g @ solved
        weight = weight + q
    return (total / len(checkpoints)) * (weight / len(checkpoints))[:, None]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n_checkpoints", [1, 3])
@pytest.mark.parametrize("lam", [0.1, 0.0])
def test_unprojected_scores_equal_design_formula(n_checkpoints, lam, rng):
    x, y, xt, yt = _problem(rng)
    model = SoftmaxRegression(5, 3)
    checkpoints = [model.init(seed=s) * 3 for s in range(n_checkpoints)]
    trak = TRAK(model, proj_dim=None, lambda_reg=lam, progress=False)
    for theta in checkpoints:
        trak.featurize(theta, [(x[:25], y[:25]), (x[25:], y[25:])])
    scores = trak.score([(xt[:4], yt[:4]), (xt[4:], yt[4:])])
    assert scores.shape == (60, 7) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, _design_formula(checkpoints, x, y, xt, yt, lam), rtol=1e-8, atol=1e-12)


def test_projected_scores_track_exact_scores(rng):
    # p = 3 * 10 + 3 = 33 parameters, so the gradients have rank <= 33 << k = 2048: the projection
    # preserves the geometry and the scores must rank training examples as the exact ones do.
    x, y, xt, yt = (rng.normal(size=(300, 10)), rng.integers(0, 3, 300), rng.normal(size=(10, 10)),
                    rng.integers(0, 3, 10))
    model = SoftmaxRegression(10, 3)
    exact, projected = (TRAK(model, proj_dim=k, lambda_reg=1e-3, progress=False) for k in (None, 2048))
    for seed in range(2):
        for trak in (exact, projected):
            trak.featurize(model.init(seed=seed), [(x, y)])
    a, b = exact.score([(xt, yt)]), projected.score([(xt, yt)])
    rho = [spearmanr(a[:, j], b[:, j])[0] for j in range(10)]
    assert min(rho) >= 0.9


def test_chunking_and_namespace_do_not_change_scores(xp, rng):
    x, y, xt, yt = _problem(rng, n=80, d=4, c=3)
    model = MLP(4, 5, 3)
    theta = model.init(seed=3)

    def run(batches, targets, to):
        trak = TRAK(model, proj_dim=64, lambda_reg=0.05, progress=False)
        trak.featurize(to(theta), batches)
        return trak.score(targets)

    ref = run([(x, y)], [(xt, yt)], np.asarray)
    arr = lambda a: xp.asarray(a)  # noqa: E731
    out = run([(arr(x[i:i + 13]), arr(y[i:i + 13])) for i in range(0, 80, 13)], [(arr(xt), arr(yt))], arr)
    assert type(out) is type(arr(x)) and out.dtype == xp.float64 and out.shape == (80, 7)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-9, atol=1e-12)


def test_float32_features_give_float32_scores(rng):
    x, y, xt, yt = _problem(rng)
    model = SoftmaxRegression(5, 3)
    theta = model.init(seed=0)
    t32 = TRAK(model, proj_dim=32, lambda_reg=0.1, progress=False)
    t32.featurize(theta.astype(np.float32), [(x.astype(np.float32), y)])
    t64 = TRAK(model, proj_dim=32, lambda_reg=0.1, progress=False)
    t64.featurize(theta, [(x, y)])
    s32, s64 = t32.score([(xt.astype(np.float32), yt)]), t64.score([(xt, yt)])
    assert s32.dtype == np.float32
    assert np.linalg.norm(s32 - s64) / np.linalg.norm(s64) < 1e-4


def test_lambda_zero_singular_kernel_is_min_norm_limit(rng):
    # k = 64 > n = 20, so Phi^T Phi is singular; lambda = 0 must give the lambda -> 0+ limit.
    x, y, xt, yt = _problem(rng, n=20)
    model = MLP(5, 6, 3)
    theta = model.init(seed=5)

    def run(lam):
        trak = TRAK(model, proj_dim=64, lambda_reg=lam, progress=False)
        trak.featurize(theta, [(x, y)])
        return trak.score([(xt, yt)])

    with warnings.catch_warnings():  # n < k: the n x n Gram matrix is factorized, and it has full rank
        warnings.simplefilter("error")
        limit = run(0.0)
    assert np.all(np.isfinite(limit))
    np.testing.assert_allclose(limit, run(1e-9), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [20, 90])
def test_gram_space_and_kernel_space_give_the_formula(rng, n):
    """n = 20 < k = 64 factorizes the n x n Gram matrix, n = 90 >= k the k x k kernel: both equal the formula
    Phi (Phi^T Phi + lambda I)^{-1} phi_t^T * Q with a k x k solve, and self-influence is its diagonal."""
    from trak_core.kernel import space_for

    x, y, xt, yt = _problem(rng, n=n)
    model = MLP(5, 6, 3)
    trak = TRAK(model, proj_dim=64, lambda_reg=0.1, progress=False)
    trak.featurize(model.init(seed=5), [(x, y)])
    assert trak.store[0].factor.space == space_for(n, 64) == ("n" if n < 64 else "k")
    phi, q = trak.store[0].features, trak.store[0].out_to_loss
    phit = trak.features([(xt, yt)], checkpoint=0)
    kernel = phi.T @ phi + 0.1 * np.eye(64)
    np.testing.assert_allclose(trak.score([(xt, yt)]), phi @ np.linalg.solve(kernel, phit.T) * q[:, None],
                               rtol=1e-9, atol=1e-12)
    own = phi @ np.linalg.solve(kernel, phi.T) * q[:, None]
    np.testing.assert_allclose(trak.self_influence(), np.diag(own), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("n", [20, 90])
def test_float32_kernel_gives_the_formula_to_float32_accuracy(rng, n):
    """kernel_dtype="float32" (n-space at n = 20, k-space at n = 90): the kernel and its factor are float32,
    and the scores equal the float64 formula on the same features to about 1e-7 * cond(K)."""
    x, y, xt, yt = _problem(rng, n=n)
    model = MLP(5, 6, 3)
    theta = model.init(seed=5)
    trak = TRAK(model, proj_dim=64, lambda_reg=0.1, kernel_dtype="float32", progress=False)
    trak.featurize(theta, [(x, y)])
    entry = trak.store[0]
    assert entry.kernel.dtype == entry.factor.arrays[0].dtype == np.float32
    phi, q = entry.features, entry.out_to_loss
    assert phi.dtype == np.float64  # the features keep their dtype: only the kernel and its solves are float32
    phit = trak.features([(xt, yt)], checkpoint=0)
    kernel = phi.T @ phi + 0.1 * np.eye(64)
    formula = phi @ np.linalg.solve(kernel, phit.T) * q[:, None]
    scores = trak.score([(xt, yt)])
    bound = 50 * np.finfo(np.float32).eps * np.linalg.cond(kernel)
    error = np.linalg.norm(scores - formula) / np.linalg.norm(formula)
    assert 1e-10 < error < bound  # float32 solves (not float64 ones), within float32 rounding times cond(K)
    own = phi @ np.linalg.solve(kernel, phi.T) * q[:, None]
    assert np.linalg.norm(trak.self_influence() - np.diag(own)) / np.linalg.norm(np.diag(own)) < bound


def test_unknown_kernel_dtype_is_refused():
    with pytest.raises(ValueError, match=r"unknown kernel_dtype 'float16'; choose one of \('auto', 'float64', 'float32'\)"):
        TRAK(MLP(5, 6, 3), kernel_dtype="float16")


def test_auto_kernel_dtype_follows_the_features_and_lambda(rng):
    """The default, kernel_dtype="auto": a float32 kernel for float32 features, float64 for float64 features and
    for lambda_reg = 0 (refit to 0 and back remakes the kernel); each factor solves its own kernel's system."""
    x, y, xt, yt = _problem(rng, n=20)
    model = MLP(5, 6, 3)
    theta = model.init(seed=5)

    def factor_dtypes(trak):
        return {entry.factor.arrays[0].dtype for entry in trak.store}

    t32 = TRAK(model, proj_dim=64, lambda_reg=0.1, progress=False)
    t32.featurize(theta.astype(np.float32), [(x.astype(np.float32), y)])
    t64 = TRAK(model, proj_dim=64, lambda_reg=0.1, progress=False)
    t64.featurize(theta, [(x, y)])
    assert factor_dtypes(t32) == {np.dtype(np.float32)} and factor_dtypes(t64) == {np.dtype(np.float64)}
    zero = TRAK(model, proj_dim=64, lambda_reg=0.0, progress=False)
    zero.featurize(theta.astype(np.float32), [(x.astype(np.float32), y)])
    assert factor_dtypes(zero) == {np.dtype(np.float64)}
    phi = t32.store[0].features.astype(np.float64)
    gram = phi @ phi.T
    t32.refit(0.0)
    assert factor_dtypes(t32) == {np.dtype(np.float64)}
    np.testing.assert_allclose(t32.store[0].kernel, gram, rtol=1e-12, atol=1e-12 * np.abs(gram).max())
    t32.refit(0.1)
    assert factor_dtypes(t32) == {np.dtype(np.float32)} and t32.store[0].kernel.dtype == np.float32
    np.testing.assert_allclose(t32.store[0].kernel, gram, rtol=1e-5, atol=1e-6 * np.abs(gram).max())


def test_auto_kernel_dtype_remakes_an_ill_conditioned_float32_kernel_in_float64(rng):
    """kernel_dtype="auto" keeps a float32 kernel only while lambda_max / lambda <= AUTO_FLOAT32_MAX_RATIO; above
    it the kernel is made again in float64, and the scores are those of kernel_dtype="float64" bit for bit.
    refit crosses the line both ways."""
    from trak_core import kernel as kernel_ops

    x, y, xt, yt = _problem(rng, n=40)
    model = MLP(5, 6, 3)
    theta, data = model.init(seed=5).astype(np.float32), [(x.astype(np.float32), y)]
    probe = TRAK(model, proj_dim=64, lambda_reg=1.0, progress=False)
    probe.featurize(theta, data)
    top = np.linalg.eigvalsh(probe.store[0].kernel.astype(np.float64))[-1]
    ill, well = top / (5 * kernel_ops.AUTO_FLOAT32_MAX_RATIO), top / (0.2 * kernel_ops.AUTO_FLOAT32_MAX_RATIO)

    def run(lam, kernel_dtype="auto"):
        trak = TRAK(model, proj_dim=64, lambda_reg=lam, progress=False, kernel_dtype=kernel_dtype)
        trak.featurize(theta, data)
        return trak, np.asarray(trak.score([(xt.astype(np.float32), yt)]))

    auto_ill, scores_ill = run(ill)
    reference_ill = run(ill, "float64")[1]
    assert auto_ill.store[0].factor.arrays[0].dtype == np.float64 and auto_ill.store[0].kernel_dtype == "float64"
    assert np.array_equal(scores_ill, reference_ill)
    float32_ill = run(ill, "float32")[1]  # what "auto" avoided: a float32 kernel's error at this conditioning
    assert np.linalg.norm(float32_ill - reference_ill) > 10 * np.linalg.norm(scores_ill - reference_ill)
    auto_well, _ = run(well)
    assert auto_well.store[0].factor.arrays[0].dtype == np.float32
    auto_well.refit(ill)
    assert auto_well.store[0].factor.arrays[0].dtype == np.float64
    assert np.array_equal(np.asarray(auto_well.score([(xt.astype(np.float32), yt)])), scores_ill)
    auto_well.refit(well)
    assert auto_well.store[0].factor.arrays[0].dtype == np.float32


def test_top_eigenvalue_matches_lapack(rng):
    from trak_core import kernel as kernel_ops
    import array_api_compat.numpy as xp

    phi = rng.standard_normal((300, 40)) * np.geomspace(10, 0.01, 40)
    kernel = phi.T @ phi
    exact = np.linalg.eigvalsh(kernel)[-1]
    for dtype in (np.float64, np.float32):
        estimate = kernel_ops.top_eigenvalue(kernel.astype(dtype), xp=xp)
        assert exact * (1 - 1e-4) <= estimate <= exact * (1 + 1e-5)
    assert kernel_ops.top_eigenvalue(np.zeros((5, 5)), xp=xp) == 0.0


def test_top_eigenvalue_reads_the_device_three_times(rng, monkeypatch):
    """The power iteration read its Rayleigh quotient and norm back to the host at each of its 30 steps (60 syncs
    with a GPU, 22 ms a checkpoint on JAX's CPU): three reads now (the scale, the last quotient, the final one), the
    estimate the same, against LAPACK."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: a device namespace is not exercised")
    import array_api_compat.torch as xp

    from trak_core import kernel as kernel_ops

    phi = rng.standard_normal((300, 40)) * np.geomspace(10, 0.01, 40)
    kernel = phi.T @ phi
    reads, original = [], torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append(1) or original(self))
    estimate = kernel_ops.top_eigenvalue(torch.tensor(kernel), xp=xp)
    assert len(reads) == 3
    exact = np.linalg.eigvalsh(kernel)[-1]
    assert exact * (1 - 1e-4) <= estimate <= exact * (1 + 1e-5)


def test_an_ill_conditioned_float32_kernel_without_float64_is_reported(rng):
    """JAX without x64 cannot remake the kernel in float64: a RuntimeWarning names the ratio and the remedies,
    and a well-conditioned kernel gives none."""
    jnp = pytest.importorskip("jax.numpy", reason="jax is not installed: a namespace without float64 is not exercised")
    from trak_core import kernel as kernel_ops

    x, y, _, _ = _problem(rng, n=40)
    model = MLP(5, 6, 3)
    theta = jnp.asarray(model.init(seed=5), dtype=jnp.float32)
    data = [(jnp.asarray(x, dtype=jnp.float32), jnp.asarray(y))]
    probe = TRAK(model, proj_dim=64, lambda_reg=1.0, progress=False)
    probe.featurize(theta, data)
    top = float(np.linalg.eigvalsh(np.asarray(probe.store[0].kernel, dtype=np.float64))[-1])
    with pytest.warns(RuntimeWarning, match=r"ill-conditioned.*lambda_max / lambda = .*jax_enable_x64"):
        TRAK(model, proj_dim=64, lambda_reg=top / (5 * kernel_ops.AUTO_FLOAT32_MAX_RATIO), progress=False
             ).featurize(theta, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        well = TRAK(model, proj_dim=64, lambda_reg=top / (0.2 * kernel_ops.AUTO_FLOAT32_MAX_RATIO), progress=False)
        well.featurize(theta, data)
    assert well.store[0].factor.arrays[0].dtype == jnp.float32


def test_scoring_in_batches_holds_the_result_at_most_twice(monkeypatch):
    # tracemalloc counts NumPy's buffers: the column blocks, their concatenation and nothing more (no cast copy);
    # groups of 100 targets here (by default a group holds up to 256 MiB of (n_train, targets) float64 block)
    import tracemalloc

    import trak_core._target_groups as groups

    monkeypatch.setattr(groups, "SCORE_GROUP_BYTES", 8 * 2000 * 100)
    rng = np.random.default_rng(0)
    model = SoftmaxRegression(4, 3)
    trak = TRAK(model, proj_dim=8, progress=False)
    trak.featurize(model.init(seed=0), [(rng.normal(size=(2000, 4)), rng.integers(0, 3, 2000))])
    xt, yt = rng.normal(size=(2000, 4)), rng.integers(0, 3, 2000)
    batches = [(xt[i:i + 100], yt[i:i + 100]) for i in range(0, 2000, 100)]
    tracemalloc.start()
    scores = trak.score(batches)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert scores.shape == (2000, 2000) and scores.dtype == np.float64
    assert np.allclose(scores[:, :100], trak.score(batches[:1]), rtol=1e-12, atol=0)  # the same numbers per batch
    assert peak < 2.3 * scores.nbytes, peak / scores.nbytes


def test_small_target_batches_share_one_pass_over_the_features(monkeypatch):
    """Each target batch was one pass over every checkpoint's features (from disk: read, decompressed and checked
    again per batch: 4.5x slower at batch 50 than 500 for n = 200,000); batches are scored in groups now, with the
    same numbers."""
    import trak_core.trak as trak_module

    rng = np.random.default_rng(1)
    model = SoftmaxRegression(4, 3)
    trak = TRAK(model, proj_dim=8, progress=False)
    x, y = rng.normal(size=(500, 4)), rng.integers(0, 3, 500)
    for c in range(2):
        trak.featurize(model.init(seed=c), [(x, y)])
    xt, yt = rng.normal(size=(300, 4)), rng.integers(0, 3, 300)
    batches = [(xt[i:i + 30], yt[i:i + 30]) for i in range(0, 300, 30)]
    passes = []
    original = trak_module.checkpoint_scores
    monkeypatch.setattr(trak_module, "checkpoint_scores", lambda *a, **k: passes.append(1) or original(*a, **k))
    scores = trak.score(batches)
    assert len(passes) == 2  # one per checkpoint, not 20
    one_by_one = np.concatenate([trak.score([batch]) for batch in batches], axis=1)
    np.testing.assert_allclose(scores, one_by_one, rtol=1e-12, atol=1e-12 * np.abs(one_by_one).max())


def test_a_loader_that_refills_one_buffer_gives_each_batch_its_own_targets():
    """Grouped batches were featurized only once the group was full: a loader reusing one buffer made every batch
    of the group its last one (100% off); each batch is featurized as it is pulled now."""
    rng = np.random.default_rng(2)
    model = SoftmaxRegression(4, 3)
    trak = TRAK(model, proj_dim=8, progress=False)
    trak.featurize(model.init(seed=0), [(rng.normal(size=(200, 4)), rng.integers(0, 3, 200))])
    xt, yt = rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    buffer_x, buffer_y = np.empty((10, 4)), np.empty(10, dtype=np.int64)

    def refilled():
        for i in range(0, 40, 10):
            buffer_x[:], buffer_y[:] = xt[i:i + 10], yt[i:i + 10]
            yield buffer_x, buffer_y

    scores = trak.score(refilled())
    np.testing.assert_allclose(scores, trak.score([(xt, yt)]), rtol=1e-10, atol=1e-12)


def test_the_kernel_and_self_influence_show_progress(monkeypatch):
    """Making the kernel at the end of featurize (half a minute at n = 200,000, k = 2,048) and self_influence ran
    without a bar; they show one over their row chunks when progress is on, and none when it is off."""
    import trak_core._progress as bars

    shown = []
    original = bars.progress

    def recording(iterable, *, desc, enabled, total=None):
        if enabled:
            shown.append((desc, total if total is not None else bars.length_of(iterable)))
        return original(iterable, desc=desc, enabled=False, total=total)

    monkeypatch.setattr(bars, "progress", recording)
    rng = np.random.default_rng(3)
    model = SoftmaxRegression(4, 3)
    x, y = rng.normal(size=(5000, 4)), rng.integers(0, 3, 5000)
    for enabled in (False, True):
        shown.clear()
        trak = TRAK(model, proj_dim=8, progress=enabled)
        trak.featurize(model.init(seed=0), [(x, y)])
        trak.self_influence()
        assert (("kernel", 2) in shown and ("self-influence, checkpoint 0", 1) in shown) == enabled, shown


def test_in_memory_features_are_not_held_twice_while_joined():
    """MemoryWriter.finish concatenated a checkpoint's batches while holding them: twice the features at the peak
    (852 MB for 391 MB of torch features in an audit; 558 MB now). Each part is dropped once copied; measured as
    peak RSS in a fresh process (the joined array's pages are touched part by part)."""
    import subprocess
    import sys

    script = """
import resource, numpy as np
from trak_core.store import MemoryWriter
writer, rng = MemoryWriter(), np.random.default_rng(4)
for _ in range(40):
    writer.append(rng.normal(size=(500, 1024)), np.ones(500))
held = 40 * 500 * 1024 * 8
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
joined, _, _ = writer.finish()  # with the kernel: 8 MB, and one 4,096-row chunk's float64 copy at a time
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start) / held, joined.shape)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    growth, shape = out.stdout.split(maxsplit=1)
    assert float(growth) < 0.5 and shape.strip() == "(20000, 1024)", out.stdout  # it was 1.0: a second copy


def test_score_errors_name_the_batch_after_leading_empty_ones():
    """After empty leading batches, a later error named batch 1 for batch 3 (the count restarted)."""
    rng = np.random.default_rng(5)
    model = SoftmaxRegression(4, 3)
    trak = TRAK(model, proj_dim=8, progress=False)
    trak.featurize(model.init(seed=0), [(rng.normal(size=(50, 4)), rng.integers(0, 3, 50))])
    empty, good = (np.zeros((0, 4)), np.zeros(0, dtype=int)), (rng.normal(size=(5, 4)), rng.integers(0, 3, 5))
    with pytest.raises(TrakValueError, match=r"targets batch 3, checkpoint 0: labels out of range"):
        trak.score([empty, empty, good, (rng.normal(size=(5, 4)), np.array([0, 1, 7, 0, 1]))])
    with pytest.raises(TrakValueError, match=r"targets batch 2: inputs have 5 rows but labels have 4"):
        trak.score([empty, empty, (rng.normal(size=(5, 4)), rng.integers(0, 3, 4))])
