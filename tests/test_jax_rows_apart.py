"""An apply function that mixes the batch's rows (batch statistics, dropout in training mode) is refused: the
per-example gradients are taken on one example at a time under ``vmap``, where such a model computes something
else than on the batch (BatchNorm in training mode normalizes a lone example to zero, and its gradients through
the layers below vanish), and the scores were silently wrong. Row-independent models are unaffected."""
import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed: the jax backend is not exercised")
import jax.numpy as jnp  # noqa: E402

import trak_core  # noqa: E402
from trak_core.errors import TrakValueError  # noqa: E402
from trak_jax import JaxBackend, JaxModel  # noqa: E402

MESSAGE = ("checkpoint 0, batch 0: apply(params, inputs) does not treat the batch's rows independently: an example's "
           "model output computed alone (as its per-example gradient is) differs from its row's output in the batch "
           "by ")
FIX = ("of the row's scale (its logits). The model uses batch statistics or random numbers: run it in inference mode "
       "(Flax NNX: model.eval() before nnx.split(model, nnx.Param, ...); linen: JaxModel(lambda variables, x: "
       "module.apply(variables, x, train=False)); Equinox: eqx.nn.inference_mode(model)) (docs/jax.md)")

rng = np.random.default_rng(0)
X, Y = rng.normal(size=(40, 8)).astype(np.float32), rng.integers(0, 3, 40)
PARAMS = [(rng.normal(size=(16, 8)).astype(np.float32) / 3, np.zeros(16, np.float32) + 0.1),
          (rng.normal(size=(3, 16)).astype(np.float32) / 4, np.zeros(3, np.float32))]


def _hidden(params, inputs):
    (w1, b1), _ = params
    return inputs @ w1.T + b1


def batch_norm_apply(params, inputs):
    """A batch norm of the hidden layer over the batch's rows (training-mode BatchNorm)."""
    h = _hidden(params, inputs)
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
    return jnp.tanh(h) @ params[1][0].T + params[1][1]


def independent_apply(params, inputs):
    return jnp.tanh(_hidden(params, inputs)) @ params[1][0].T + params[1][1]


def test_an_apply_that_normalizes_over_the_batch_is_refused_with_the_fix():
    trak = trak_core.TRAK(JaxModel(batch_norm_apply), proj_dim=16)
    with pytest.raises(TrakValueError) as caught:
        trak.featurize(PARAMS, [(X, Y)])
    message = str(caught.value)
    assert message.startswith(MESSAGE) and message.endswith(FIX), message
    assert float(message[len(MESSAGE):].split()[0]) > 0.1  # far above rounding


def test_a_row_independent_apply_gives_the_per_example_grad_scores_in_every_batching():
    """float64 reference: each example's margin gradient by ``jax.grad`` alone, the documented projection and
    ``Phi (Phi^T Phi + lambda I)^-1 Phi_t^T`` times ``1 - p_y``; batches of 40, 13 + 27 and 1 + 39 rows."""
    def margin(params, one, label):
        logits = independent_apply(params, one[None])[0]
        return logits[label] - jax.nn.logsumexp(jnp.where(jnp.arange(3) == label, -jnp.inf, logits))

    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), PARAMS)
        rows = [np.concatenate([np.asarray(g).ravel() for g in jax.tree_util.tree_leaves(
            jax.grad(margin)(p64, jnp.asarray(X[i], jnp.float64), int(Y[i])))]) for i in range(40)]
        logits = np.asarray(independent_apply(p64, jnp.asarray(X, jnp.float64)))
    phi = np.stack(rows) @ np.asarray(trak_core.projection_matrix(len(rows[0]), 16, dtype=np.float64))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    q = 1 - (probs / probs.sum(1, keepdims=True))[np.arange(40), Y]
    expected = phi[:30] @ np.linalg.solve(phi[:30].T @ phi[:30] + np.eye(16), phi[30:].T) * q[:30, None]
    for sizes in ([30], [13, 17], [1, 29]):
        trak = trak_core.TRAK(JaxModel(independent_apply), backend=JaxBackend(), proj_dim=16, lambda_reg=1.0)
        edges = np.cumsum([0] + sizes)
        trak.featurize(PARAMS, [(X[a:b], Y[a:b]) for a, b in zip(edges[:-1], edges[1:])])
        scores = np.asarray(trak.score([(X[30:], Y[30:])]))
        assert np.abs(scores - expected).max() / np.abs(expected).max() < 1e-4  # float32


def test_the_nnx_recipe_in_training_mode_is_refused():
    """docs/jax.md's Flax NNX recipe with the model left in training mode (no ``model.eval()``): nnx.merge inside
    apply makes a new module per trace, so flax raises nothing; its BatchNorm used each vmap call's one example."""
    nnx = pytest.importorskip("flax.nnx", reason="flax has no nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.norm = nnx.Linear(8, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
            self.out = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.norm(self.hidden(x))))

    model = MLP(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    trak = trak_core.TRAK(JaxModel(lambda state, x: nnx.merge(graphdef, *state)(x)), proj_dim=None,
                          backend=JaxBackend(params=lambda path, leaf: path.startswith("[0]")))
    with pytest.raises(TrakValueError, match="does not treat the batch's rows independently"):
        trak.featurize((params, rest), [(X, Y)])
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    trak = trak_core.TRAK(JaxModel(lambda state, x: nnx.merge(graphdef, *state)(x)), proj_dim=None,
                          backend=JaxBackend(params=lambda path, leaf: path.startswith("[0]")))
    trak.featurize((params, rest), [(X, Y)])  # inference mode: accepted


def test_the_factorized_step_refuses_it_too():
    """``proj_type="kronecker"`` has its own step (``trak_jax.kronecker``), which takes each example's gradient alone
    too and featurized the batch-norm apply silently; a row-independent apply is accepted in batches of any size."""
    trak = trak_core.TRAK(JaxModel(batch_norm_apply), proj_type="kronecker", proj_dim=16, progress=False)
    with pytest.raises(TrakValueError) as caught:
        trak.featurize(PARAMS, [(X, Y)])
    message = str(caught.value)
    assert message.startswith(MESSAGE) and message.endswith(FIX), message
    trak = trak_core.TRAK(JaxModel(independent_apply), proj_type="kronecker", proj_dim=16, progress=False)
    trak.featurize(PARAMS, [(X[:13], Y[:13]), (X[13:], Y[13:])])
    assert trak.n_checkpoints == 1


def test_rounding_of_a_model_computing_in_bfloat16_is_not_taken_for_rows_that_mix():
    """float32 params computing in bfloat16 (Flax's usual mixed precision), logits up to about 20: a lone example and
    its row differ by rounding only. Measured against the margin (which cancels) it was 0.022 and refused as batch
    statistics; against the row's logits it is about 2e-3."""
    def apply(params, inputs):
        h = jnp.tanh(inputs.astype(jnp.bfloat16) @ params[0][0].astype(jnp.bfloat16).T)
        return (h @ params[1][0].astype(jnp.bfloat16).T).astype(jnp.float32) * 30

    trak = trak_core.TRAK(JaxModel(apply), proj_dim=16, progress=False)
    trak.featurize(PARAMS, [(X, Y)])
    assert trak.n_checkpoints == 1
