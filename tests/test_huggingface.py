"""Hugging Face models through the torch backend (random tiny configs, no downloads), dict batches,
padding and label -100, and one-logit binary classifiers, against one-example-at-a-time autograd."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: Hugging Face models "
                                                          "are not exercised")

import trak_core  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

import array_api_compat.torch as xp  # noqa: E402


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).double()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).double()


def _padded(n, length, vocab, seed):
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(1, vocab, (n, length)))
    mask = torch.ones(n, length, dtype=torch.long)
    for i in range(n):
        mask[i, length - i % 4:] = 0 if i % 4 else 1  # rows with 0 to 3 padding positions at the end
    return ids * mask, mask


def _one_at_a_time(model, batch, labels, output):
    """Gradients of each example's task output from a plain forward and backward on that example alone."""
    model.eval()
    rows = []
    for i in range(labels.shape[0]):
        one = {key: value[i:i + 1] for key, value in batch.items()}
        model.zero_grad()
        output(model(**one).logits, labels[i:i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def test_bert_sequence_classification_dict_batches_with_padding():
    model = tiny_bert()
    ids, mask = _padded(7, 9, 50, seed=1)
    labels = torch.as_tensor([0, 1, 2, 0, 1, 2, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    backend = TorchBackend(chunk_size=3)
    grads, q = backend.gradients(model, backend.prepare(model, None), batch, labels, trak_core.Classification())
    task = trak_core.Classification()
    reference = _one_at_a_time(model, batch, labels, lambda logits, y: task.output(logits, y, xp=xp))
    torch.testing.assert_close(grads, reference, rtol=1e-7, atol=1e-10)
    with torch.no_grad():
        p = torch.softmax(model(**batch).logits, 1)[torch.arange(7), labels]
    torch.testing.assert_close(q, 1 - p, rtol=1e-10, atol=1e-12)
    assert model.config._attn_implementation == "sdpa"  # eager only while differentiating


def test_gpt2_language_modeling_with_padding_and_ignored_positions():
    model = tiny_gpt2()
    ids, mask = _padded(6, 8, 40, seed=2)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, :3] = -100  # a prompt that is not predicted
    batch = {"input_ids": ids, "attention_mask": mask}
    task = trak_core.tasks.LanguageModeling()
    backend = TorchBackend(chunk_size=4)
    grads, q = backend.gradients(model, backend.prepare(model, None), batch, labels, task)

    def output(logits, y):  # the sum of per-token margins, written out: an independent reference
        total = 0
        for t in range(logits.shape[1] - 1):
            target = int(y[0, t + 1])
            if target == -100:
                continue
            row = logits[0, t]
            others = torch.cat([row[:target], row[target + 1:]])
            total = total + row[target] - torch.logsumexp(others, 0)
        return total if torch.is_tensor(total) else logits.sum() * 0

    reference = _one_at_a_time(model, batch, labels, output)
    torch.testing.assert_close(grads, reference, rtol=1e-7, atol=1e-10)
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits, -1)
    for i in range(6):
        counted = [t for t in range(7) if labels[i, t + 1] != -100]
        expected = np.mean([1 - float(probs[i, t, labels[i, t + 1]]) for t in counted])
        assert abs(float(q[i]) - expected) < 1e-12


def test_bert_through_trak_scores_and_fingerprints():
    model = tiny_bert()
    ids, mask = _padded(12, 9, 50, seed=3)
    labels = torch.as_tensor([0, 1, 2] * 4)
    batches = [{"input_ids": ids[i:i + 5], "attention_mask": mask[i:i + 5], "labels": labels[i:i + 5]}
               for i in range(0, 12, 5)]
    trak = trak_core.TRAK(model, proj_dim=64, lambda_reg=0.1, progress=False)
    trak.featurize(model.state_dict(), batches)
    scores = trak.score(batches[:1])
    task = trak_core.Classification()
    batch = {"input_ids": ids, "attention_mask": mask}
    grads = _one_at_a_time(model, batch, labels, lambda logits, y: task.output(logits, y, xp=xp)).numpy()
    phi = grads @ trak_core.projection_matrix(grads.shape[1], 64, seed=0, checkpoint=0, dtype=np.float64)
    with torch.no_grad():
        q = 1 - torch.softmax(model(**batch).logits, 1)[torch.arange(12), labels].numpy()
    expected = phi @ np.linalg.solve(phi.T @ phi + 0.1 * np.eye(64), phi[:5].T) * q[:, None]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())
    with pytest.raises(trak_core.TrakCoreError, match="no 'labels'"):
        trak_core.TRAK(model, proj_dim=8, progress=False).featurize(model.state_dict(), [{"input_ids": ids}])


@pytest.mark.parametrize("shape", ["(n,)", "(n, 1)"])
def test_one_logit_logistic_regression_scores(shape):
    """Scores equal the estimator computed by hand in float64 with the signed-logit margin."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 4)), rng.integers(0, 2, 30)
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 1).double()
    model = torch.nn.Sequential(linear, torch.nn.Flatten(0)) if shape == "(n,)" else linear
    trak = trak_core.TRAK(model, proj_dim=None, lambda_reg=0.05, progress=False)
    trak.featurize(model.state_dict(), [(torch.as_tensor(x), torch.as_tensor(y))])
    scores = trak.score([(torch.as_tensor(x[:6]), torch.as_tensor(y[:6]))]).numpy()
    w, b = linear.weight.detach().numpy()[0], float(linear.bias.detach())
    sign = 2 * y - 1
    features = sign[:, None] * np.c_[x, np.ones(30)]  # d/d(w, b) of (2y - 1)(w.x + b)
    q = 1 - 1 / (1 + np.exp(-sign * (x @ w + b)))
    expected = features @ np.linalg.solve(features.T @ features + 0.05 * np.eye(5), features[:6].T) * q[:, None]
    np.testing.assert_allclose(scores, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype,bounds", [(torch.bfloat16, (5e-4, 2e-2)), (torch.float16, (5e-5, 4e-3))])
def test_half_precision_weights_give_float32_features(dtype, bounds):
    """Gradients in the model's dtype; projection, kernel and scores in float32 or better. Held-out targets at
    k = 512 and the automatic ridge (the test scored its own training rows with a tiny ridge before, where the
    scores hardly depend on the features: 5.8e-6 for bfloat16, which could not tell half precision from float32).
    The lower bound says the gradients really were half precision; docs/estimator.md quotes the figures."""
    reference_model = tiny_gpt2().float().eval()
    ids, mask = _padded(32, 10, 40, seed=5)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8], "labels": labels[i:i + 8]}
               for i in range(0, 32, 8)]
    scores = {}
    for name, model in (("float32", reference_model), ("half", tiny_gpt2().to(dtype).eval())):
        model.load_state_dict({k: v.to(dtype if name == "half" else torch.float32)
                               for k, v in reference_model.state_dict().items()})
        trak = trak_core.TRAK(model, task="language_modeling", proj_dim=512, progress=False)
        trak.featurize(model.state_dict(), batches[:3])
        assert trak.store[0].features.dtype == torch.float32
        scores[name] = trak.score(batches[3:])
        assert scores[name].dtype == torch.float32
    error = torch.linalg.norm(scores["half"] - scores["float32"]) / torch.linalg.norm(scores["float32"])
    assert bounds[0] < float(error) < bounds[1]


@pytest.mark.parametrize("mode", ["auto", "pass"])
def test_a_model_that_reads_the_2d_mask_works(mode):
    """OPT computes positions from the 2-D attention_mask: with trak-core's 4-D mask its forward fails. Under
    "auto" that is found on its first batch (it runs with its own mask: ``trak_torch.mask_check``); with "pass" it
    gets its own from the start. Either way its gradients equal one-at-a-time autograd."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=40, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = transformers.OPTForCausalLM(config).double()
    ids = torch.randint(2, 40, (3, 8), generator=torch.Generator().manual_seed(1))
    batch, labels = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids
    task = trak_core.tasks.LanguageModeling()
    backend = TorchBackend(attention_mask=mode)
    grads, _ = backend.gradients(model, backend.prepare(model, None), batch, labels, task)

    def output(logits, y):
        return task.output(logits, y, xp=xp)

    reference = _one_at_a_time(model, batch, labels, output)
    error = torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)
    assert float(error) < 1e-12  # float64: vmap keeps the model's own SDPA (eager's float32 softmax: 1e-8 before)
