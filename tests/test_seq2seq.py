"""Sequence-to-sequence language modeling (``task="seq2seq"``): the task's margins and weights against scipy, and
Hugging Face encoder-decoder models (T5, BART; random tiny configs) through the torch backend against
one-example-at-a-time autograd of the model called with ``labels`` (Hugging Face makes the decoder's inputs)."""
import logging

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

import trak_core
from trak_core.errors import TrakValueError
from trak_core.tasks import get_task


def _margins_by_hand(logits, labels, shift):
    """Per-sequence sums of margins and mean ``1 - p`` over counted positions, one position at a time."""
    out, q = [], []
    for row, target in zip(logits, labels):
        margins, weights = [], []
        for t in range(logits.shape[1] - shift):
            y = target[t + shift]
            if y == -100:
                continue
            others = np.delete(row[t], y)
            margins.append(row[t, y] - logsumexp(others))
            weights.append(1 - softmax(row[t])[y])
        out.append(sum(margins))
        q.append(np.mean(weights) if weights else 0.0)
    return np.array(out), np.array(q)


@pytest.mark.parametrize("name,shift", [("seq2seq", 0), ("language_modeling", 1)])
def test_sequence_margins_and_weights_against_scipy(name, shift):
    """seq2seq: the logits at t predict labels[t]; language_modeling: labels[t + 1]. A row of -100 only counts
    nothing (f = 0, Q = 0)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 5, 7))
    labels = rng.integers(0, 7, (4, 5))
    labels[1, 2:] = -100
    labels[3] = -100
    task = get_task(name)
    expected_f, expected_q = _margins_by_hand(logits, labels, shift)
    np.testing.assert_allclose(task.output(logits, labels, xp=np), expected_f, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(task.out_to_loss(logits, labels, xp=np), expected_q, rtol=1e-12, atol=1e-12)
    assert expected_f[3] == 0 and expected_q[3] == 0 and abs(expected_f[0]) > 1e-3


@pytest.mark.parametrize("name", ["seq2seq", "language_modeling"])
def test_labels_of_another_length_than_the_logits_are_refused(name):
    logits, labels = np.zeros((2, 5, 7)), np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(TrakValueError, match=r"labels have shape \(2, 4\) but the logits have 5 positions"):
        get_task(name).output(logits, labels, xp=np)


torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: Hugging Face "
                                                          "encoder-decoder models are not exercised")

from trak_torch import TorchBackend  # noqa: E402
from trak_torch.attention import attention_for_vmap  # noqa: E402


def tiny(name, seed=0):
    torch.manual_seed(seed)
    if name == "t5":
        config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                       decoder_start_token_id=0, pad_token_id=0)
        return transformers.T5ForConditionalGeneration(config).double().eval()
    config = transformers.BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                     decoder_ffn_dim=24, max_position_embeddings=32, pad_token_id=1,
                                     decoder_start_token_id=2)
    return transformers.BartForConditionalGeneration(config).double().eval()


def _batch(seed=1, n=5):
    """Sources with end padding (mask 0) and targets with -100 after their end."""
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(3, 40, (n, 6)))
    mask = torch.ones_like(ids)
    mask[1, 4:], mask[2, 5:] = 0, 0
    labels = torch.as_tensor(rng.integers(3, 40, (n, 5)))
    labels[3, 3:] = -100
    return {"input_ids": ids, "attention_mask": mask}, labels


def _one_at_a_time(model, batch, labels, **extra):
    """Each example's gradient of the summed target margins, the model called alone with ``labels`` (it makes its
    decoder inputs itself), the margin written out token by token."""
    rows = []
    for i in range(labels.shape[0]):
        model.zero_grad()
        logits = model(**{key: value[i:i + 1] for key, value in {**batch, **extra}.items()},
                       labels=labels[i:i + 1]).logits[0]
        total = logits.sum() * 0
        for t, target in enumerate(labels[i].tolist()):
            if target != -100:
                row = logits[t]
                total = total + row[target] - torch.logsumexp(torch.cat([row[:target], row[target + 1:]]), 0)
        total.backward()
        rows.append(torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.reshape(-1)
                               for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_gradients_and_weights(name, per_example, caplog):
    """The decoder's inputs made from the labels, the source padding as a keys-only mask (a (n, 1, T, T) one
    breaks cross-attention: 6 source positions, 5 target ones), the unshifted margins. BART takes the closed form
    (its token table is looked up by the encoder's and the decoder's embedding modules, each adding to its rows);
    T5 takes vmap (its relative attention bias is looked up on (T, T) buckets, no row per example)."""
    model = tiny(name)
    batch, labels = _batch()
    backend = TorchBackend(per_example=per_example)
    with caplog.at_level(logging.INFO, logger="trak_core"):
        grads, q = backend.gradients(model, backend.prepare(model, None), batch, labels, get_task("seq2seq"))
    reference = _one_at_a_time(model, batch, labels)
    assert float(reference.abs().max()) > 1e-3
    torch.testing.assert_close(grads, reference, rtol=1e-9, atol=1e-12)
    assert ("in closed form" in caplog.text) is (name == "bart" and per_example == "auto")
    with torch.no_grad():
        probs = torch.softmax(model(**batch, labels=labels).logits, -1)
    for i in range(labels.shape[0]):
        counted = [t for t in range(5) if labels[i, t] != -100]
        assert abs(float(q[i]) - np.mean([1 - float(probs[i, t, labels[i, t]]) for t in counted])) < 1e-12


@pytest.mark.filterwarnings("error::RuntimeWarning")  # vmap in float64: SDPA, which T5's and BART's paths branch
@pytest.mark.parametrize("per_example", ["auto", "vmap"])  # in, then eager; not the one-example loop
@pytest.mark.parametrize("name", ["t5", "bart"])
def test_decoder_attention_mask(name, per_example):
    """A 2-D decoder_attention_mask (target padding) is handed over: the model makes it causal, under vmap too."""
    model = tiny(name)
    batch, labels = _batch(seed=2)
    decoder_mask = torch.ones_like(labels)
    decoder_mask[0, 3:] = 0
    backend = TorchBackend(per_example=per_example)
    grads, _ = backend.gradients(model, backend.prepare(model, None), {**batch, "decoder_attention_mask": decoder_mask},
                                 labels, get_task("seq2seq"))
    reference = _one_at_a_time(model, batch, labels, decoder_attention_mask=decoder_mask)
    torch.testing.assert_close(grads, reference, rtol=1e-9, atol=1e-12)
    unmasked = _one_at_a_time(model, batch, labels)
    assert float((unmasked[0] - reference[0]).abs().max()) > 1e-6  # the mask matters for the first example


def test_seq2seq_scores_with_collator_style_batches():
    """Dict batches with their targets under "labels" (as Hugging Face's seq2seq collators give them): scores equal
    the estimator computed by hand from the one-at-a-time gradients and the projection matrix."""
    model = tiny("bart", seed=3)
    batch, labels = _batch(seed=4, n=8)
    batches = [{**{key: value[i:i + 4] for key, value in batch.items()}, "labels": labels[i:i + 4]}
               for i in (0, 4)]
    trak = trak_core.TRAK(model, task="seq2seq", proj_dim=32, lambda_reg=0.1, progress=False)
    trak.featurize(model.state_dict(), batches)
    scores = trak.score(batches[:1]).numpy()
    grads = _one_at_a_time(model, batch, labels).numpy()
    phi = grads @ trak_core.projection_matrix(grads.shape[1], 32, seed=0, checkpoint=0, dtype=np.float64)
    with torch.no_grad():
        probs = torch.softmax(model(**batch, labels=labels).logits, -1).numpy()
    counted = labels.numpy() != -100
    p = np.take_along_axis(probs, np.where(counted, labels.numpy(), 0)[..., None], -1)[..., 0]
    q = ((1 - p) * counted).sum(1) / counted.sum(1)
    expected = phi @ np.linalg.solve(phi.T @ phi + 0.1 * np.eye(32), phi[:4].T) * q[:, None]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_factorized_projection_of_encoder_decoder_models(name):
    """proj_type="kronecker": features == dense per-example gradients @ the explicit Kronecker matrix."""
    from test_kronecker_functional import _exact

    from trak_core import Kronecker

    batch, labels = _batch(seed=6)
    plan, _ = _exact(tiny(name), batch, labels, "seq2seq", k=48, options=Kronecker())
    assert len(plan.blocks) >= 8


def test_a_task_that_does_not_fit_the_model_is_refused():
    batch, labels = _batch()
    backend = TorchBackend()
    t5 = tiny("t5")
    with pytest.raises(TrakValueError, match="encoder-decoder model.*use task='seq2seq'"):
        backend.gradients(t5, backend.prepare(t5, None), batch, labels, get_task("language_modeling"))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=8, n_embd=8, n_layer=1,
                                                                n_head=2)).double()
    with pytest.raises(TrakValueError, match="take.*task='language_modeling'"):
        backend.gradients(gpt2, backend.prepare(gpt2, None), {"input_ids": batch["input_ids"]},
                          batch["input_ids"], get_task("seq2seq"))
    with pytest.raises(TrakValueError, match=r"labels must be \(n, target length\)"):
        backend.gradients(t5, backend.prepare(t5, None), batch, labels[:, 0], get_task("seq2seq"))

    class Own(torch.nn.Module):  # a model of the user's own, with a config that is not Hugging Face's: not checked
        config = {"layers": 1}

        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(40, 4), torch.nn.Linear(4, 40)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids))

    own = Own().double()
    grads, _ = backend.gradients(own, backend.prepare(own, None), {"input_ids": batch["input_ids"][:, :5]}, labels,
                                 get_task("seq2seq"))
    assert grads.shape == (5, 40 * 4 + 4 * 40 + 40)


def test_every_sub_config_takes_the_attention_for_vmap():
    """T5's encoder and decoder read their own copies of the config: all are eager inside, SDPA again after."""
    model = tiny("t5")
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    assert len(configs) >= 3 and {c._attn_implementation for c in configs.values()} == {"sdpa"}
    with attention_for_vmap(model):
        assert {c._attn_implementation for c in configs.values()} == {"eager"}
    assert {c._attn_implementation for c in configs.values()} == {"sdpa"}

