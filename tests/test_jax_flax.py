"""Flax models on the JAX backend: linen errors raised inside apply get a note naming their fix, and the Flax NNX
block of docs/jax.md gives the reference scores, each checkpoint with its own BatchNorm statistics."""
import re

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
pytest.importorskip("flax", reason="flax is not installed: the Flax recipes and errors are not exercised")
import jax.numpy as jnp  # noqa: E402
import flax.linen as nn  # noqa: E402

import trak_core  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402


def _margin(logits, label):
    """The classification margin of one example: its label's logit less the log-sum-exp of the others."""
    return logits[label] - jax.nn.logsumexp(jnp.where(jnp.arange(logits.shape[0]) == label, -jnp.inf, logits))


def reference_scores(apply, checkpoints, x, y, xt, yt, lambda_reg, select):
    """Float64 scores by the formula: each example's margin gradient by ``jax.grad`` on that example alone, with
    respect to the leaves ``select(path)`` picks; ``mean_c(Phi_c (Phi_c^T Phi_c + lambda I)^-1 Phi_t,c^T)`` times
    ``mean_c(1 - p_y)``. ``apply(checkpoint, inputs)``; float leaves are cast to float64."""
    def rows(checkpoint, xs, ys):
        flat, treedef = jax.tree_util.tree_flatten_with_path(checkpoint)
        leaves = [leaf for _, leaf in flat]
        chosen = [i for i, (path, _) in enumerate(flat) if select(jax.tree_util.keystr(path))]

        def f(picked, one, label):
            full = list(leaves)
            for i, leaf in zip(chosen, picked):
                full[i] = leaf
            return _margin(apply(jax.tree_util.tree_unflatten(treedef, full), one[None])[0], label)

        out = []
        for i in range(len(ys)):
            grads = jax.grad(f)([leaves[j] for j in chosen], jnp.asarray(xs[i]), int(ys[i]))
            out.append(np.concatenate([np.asarray(g, np.float64).ravel() for g in grads]))
        return np.stack(out)

    total, q = 0.0, 0.0
    with jax.enable_x64(True):
        for checkpoint in checkpoints:
            checkpoint = jax.tree_util.tree_map(
                lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, checkpoint)
            x64, xt64 = np.asarray(x, np.float64), np.asarray(xt, np.float64)
            phi, phi_t = rows(checkpoint, x64, y), rows(checkpoint, xt64, yt)
            total = total + phi @ np.linalg.solve(phi.T @ phi + lambda_reg * np.eye(phi.shape[1]), phi_t.T)
            p = np.asarray(jax.nn.softmax(apply(checkpoint, jnp.asarray(x64)), axis=1), np.float64)
            q = q + 1 - p[np.arange(len(y)), y]
    return total / len(checkpoints) * (q / len(checkpoints))[:, None]


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x)


class _Norm(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(3)(nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(x))))


class _Dropout(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
        return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(6)(x)))


def _notes(info):
    return " | ".join(getattr(info.value, "__notes__", []))


@pytest.mark.parametrize("module,wrong,error,hint", [
    (_Dense(), lambda v: v["params"], "ScopeCollectionNotFound",
     r"whole variables dict module.init returns.*not variables\['params'\].*its leaves here: \['Dense_0'\]"),
    (_Norm(), lambda v: v, "ModifyScopeVariableError",
     r"BatchNorm with use_running_average=False.*module.apply\(variables, x, train=False\)"),
    (_Dropout(), lambda v: v, "InvalidRngError",
     r"Dropout with deterministic=False.*module.apply\(variables, x, train=False\)"),
], ids=["params-only", "batchnorm-train", "dropout-train"])
def test_linen_errors_inside_apply_get_a_note_naming_the_fix(module, wrong, error, hint):
    """They got only the generic "raised in checkpoint 0, batch 0" note. The fix the note names gives the reference
    scores (only the parameters differentiated, the batch statistics left out)."""
    if not hasattr(Exception, "add_note"):
        pytest.skip("Python < 3.11: no exception notes")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 5)).astype(np.float32), rng.integers(0, 3, 24)
    variables = module.init(jax.random.PRNGKey(0), x)
    if "batch_stats" in variables:  # running statistics of their own, as after training
        variables = {**variables, "batch_stats": {"BatchNorm_0": {"mean": jnp.asarray(rng.normal(size=6) * 0.3),
                                                                  "var": jnp.asarray(rng.uniform(0.5, 2, 6))}}}
    with pytest.raises(Exception) as info:
        trak_core.TRAK(JaxModel(module.apply), proj_dim=None, lambda_reg=1.0, progress=False).featurize(
            wrong(variables), [(x, y)])
    assert type(info.value).__name__ == error
    notes = _notes(info)
    assert any(note.startswith("trak-core: ") for note in info.value.__notes__)
    assert re.search(hint, notes), notes

    def apply(v, inputs):
        return module.apply(v, inputs, train=False) if not isinstance(module, _Dense) else module.apply(v, inputs)

    def selected(path):
        return path.startswith("['params']")

    trak = trak_core.TRAK(JaxModel(apply), proj_dim=None, lambda_reg=1.0, progress=False,
                          backend=JaxBackend(params=lambda path, leaf: selected(path)))
    trak.featurize(variables, [(x[:20], y[:20])])
    scores = np.asarray(trak.score([(x[20:], y[20:])]))
    expected = reference_scores(apply, [variables], x[:20], y[:20], x[20:], y[20:], 1.0, selected)
    assert np.linalg.norm(scores - expected) / np.linalg.norm(expected) < 1e-4


def test_the_nnx_recipe_of_docs_jax_md_scores_each_checkpoint_with_its_own_batch_statistics():
    """docs/jax.md's Flax NNX block featurizes each checkpoint's ``(params, rest)``. Its earlier recipe closed one
    model's ``rest`` into apply and featurized ``params`` alone: every checkpoint ran with checkpoint 0's BatchNorm
    statistics, and the scores were 19% off here (56% on a digits MLP), silently."""
    pytest.importorskip("flax.nnx", reason="flax has no nnx: the docs' NNX block is not exercised")
    import pathlib

    from flax import nnx

    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "jax.md"
    found = [block for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
             if block.startswith("# Flax NNX")]
    assert len(found) == 1, "expected one block starting '# Flax NNX' in docs/jax.md"
    ns: dict = {"__name__": "docs_jax_nnx"}
    exec(compile(found[0], "docs/jax.md[Flax NNX]", "exec"), ns)  # noqa: S102
    x, y, models = ns["x"], ns["y"], ns["models"]
    states = [nnx.split(model, nnx.Param, ...) for model in models]
    graphdef = states[0][0]

    def apply(state, inputs):
        return nnx.merge(graphdef, *state)(inputs)

    expected = reference_scores(apply, [(params, rest) for _, params, rest in states], x[:50], y[:50], x[50:],
                                y[50:], 1.0, lambda path: path.startswith("[0]"))
    scores = np.asarray(ns["scores"])
    assert np.linalg.norm(scores - expected) / np.linalg.norm(expected) < 1e-4  # float32: measured 2.5e-6
    assert ns["trak"].store[0].n_params == sum(leaf.size for leaf in jax.tree_util.tree_leaves(states[0][1]))
    first_rest = states[0][2]  # the earlier recipe, for contrast: the statistics matter
    earlier = reference_scores(apply, [(params, first_rest) for _, params, _ in states], x[:50], y[:50], x[50:],
                               y[50:], 1.0, lambda path: path.startswith("[0]"))
    assert np.linalg.norm(earlier - expected) / np.linalg.norm(expected) > 0.1
