"""Attention masks the torch backend builds for Hugging Face models: sliding windows and left padding.

Before: the backend gave every layer one plain causal mask, so sliding-window layers (Mistral, Gemma 2, Qwen2 with
``use_sliding_window``) attended past their window (gradients 21-67% off, silently); and a left-padded batch's pad
queries saw no key at all, which eager attention and SDPA resolve differently (closed form and ``vmap`` 80% apart, NaN
in float64). Each test compares with the model's own forward (its own masks from the 2-D ``attention_mask``) called
one example at a time with plain autograd.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: Hugging Face models "
                                                          "are not exercised")

import trak_core  # noqa: E402
from trak_core import TrakValueError  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402
from trak_torch.attention import attention_bias  # noqa: E402

N, T = 4, 12
COMMON = dict(vocab_size=50, pad_token_id=1, bos_token_id=2, eos_token_id=2, hidden_size=32, num_attention_heads=2,
              num_key_value_heads=1, intermediate_size=64, max_position_embeddings=32)
MODELS = {
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(num_hidden_layers=1, sliding_window=4,
                                                                                  **COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_hidden_layers=1, use_sliding_window=True, sliding_window=4, max_window_layers=0, **COMMON)),
    "gemma2": lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(  # sliding and full layers
        num_hidden_layers=2, head_dim=16, sliding_window=4, **COMMON)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, **COMMON)),
}


def _batch(side):
    torch.manual_seed(0)
    ids = torch.randint(3, 50, (N, T))
    mask = (torch.arange(T)[None] < torch.tensor([12, 9, 7, 12])[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    return {"input_ids": ids * mask + (1 - mask), "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _margins(logits, labels):
    scores, targets = logits[:, :-1], labels[:, 1:]
    counted = targets != -100
    safe = torch.where(counted, targets, 0)
    picked = scores.gather(-1, safe[..., None])[..., 0]
    others = scores.scatter(-1, safe[..., None], float("-inf")).logsumexp(-1)
    return ((picked - others) * counted).sum()


def _reference(model, batch):
    """The model's own forward on each example alone; a label predicted at a padding position is not counted."""
    labels = batch["labels"].clone()
    labels[:, 1:][batch["attention_mask"][:, :-1] == 0] = -100
    params = dict(model.named_parameters())
    rows = []
    for i in range(N):
        logits = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits
        grads = torch.autograd.grad(_margins(logits, labels[i:i + 1]), list(params.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params.values())]))
    return torch.stack(rows)


def _features(model, batch, per_example):
    trak = trak_core.TRAK(model, task="language_modeling", proj_dim=None, progress=False,
                          backend=TorchBackend(per_example=per_example))
    trak.featurize(None, [batch])
    return trak.features([batch])


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_follow_the_models_own_masks(name, side, per_example):
    torch.manual_seed(1)
    model = MODELS[name]().eval()
    if name != "gemma2":  # Gemma 2's own forward is NaN in float64 here
        model = model.double()
    batch = _batch(side)
    reference = _reference(model, batch)
    features = _features(model, batch, per_example)
    assert bool(torch.isfinite(features).all())
    error = float((features - reference).norm() / reference.norm())
    # float64: vmap keeps the model's own SDPA (eager attention's softmax is float32 even in a float64 model: 3e-8
    # to 7e-8 off before); float32 models: rounding
    assert error < (1e-12 if model.dtype == torch.float64 else 2e-6), error


def test_a_window_and_a_query_with_no_key():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    keep = attention_bias(mask, torch.float64, causal=True, window=2)[0, 0] == 0
    expected = np.zeros((6, 6), dtype=bool)
    for i in range(6):
        for j in range(6):
            expected[i, j] = mask[0, j] == 1 and i - 2 < j <= i
        if not expected[i].any():  # left padding: a pad query sees itself, not nothing
            expected[i, i] = True
    assert np.array_equal(keep.numpy(), expected)


def test_attention_kinds_without_a_mask_are_an_error():
    model = MODELS["qwen2"]()
    model.config.layer_types = ["chunked_attention"]
    with pytest.raises(TrakValueError, match=r"attention kinds \['chunked_attention'\].*attention_mask='pass'"):
        _features(model, _batch("right"), "auto")


class _Wrapper(torch.nn.Module):
    """A user's module around a Hugging Face model (as a PEFT model made without task_type is too)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_a_wrapped_model_gets_its_causal_and_windowed_masks(name):
    torch.manual_seed(1)
    inner = MODELS[name]().eval()
    if name != "gemma2":
        inner = inner.double()
    batch = _batch("left")
    reference = _reference(inner, batch)
    features = _features(_Wrapper(inner).eval(), batch, "auto")  # was a bidirectional mask, no window: 44% off
    error = float((features - reference).norm() / reference.norm())
    assert error < (1e-7 if inner.dtype == torch.float64 else 2e-6), error


def test_an_alternating_config_without_layer_types_is_an_error():
    model = MODELS["gemma2"]()
    model.config.layer_types = None  # as configs of transformers before layer_types
    with pytest.raises(TrakValueError, match=r"gemma2 config has a sliding window but no layer_types"):
        _features(model, _batch("right"), "auto")


def test_a_decoder_only_classifier_gets_a_causal_mask():
    """Llama's and Mistral's sequence classifiers are causal (their attention modules say is_causal); they got a
    bidirectional mask (logits 21.5% off) or, with a window, a refusal naming the wrong cause."""
    for name, config in (("llama", transformers.LlamaConfig(num_hidden_layers=1, num_labels=3, **COMMON)),
                         ("mistral", transformers.MistralConfig(num_hidden_layers=1, sliding_window=4, num_labels=3,
                                                                **COMMON))):
        torch.manual_seed(2)
        model = getattr(transformers, f"{type(config).__name__[:-6]}ForSequenceClassification")(config).double().eval()
        batch = _batch("right")
        labels = torch.tensor([0, 1, 2, 1])
        params = dict(model.named_parameters())
        rows = []
        for i in range(N):  # the model's own forward, one example at a time: the reference
            logits = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits
            margin = logits[0, labels[i]] - torch.cat([logits[0, :labels[i]], logits[0, labels[i] + 1:]]).logsumexp(0)
            grads = torch.autograd.grad(margin, list(params.values()), allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1)
                                   for g, q in zip(grads, params.values())]))
        reference = torch.stack(rows)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
        trak = trak_core.TRAK(model, proj_dim=None, progress=False, backend=TorchBackend())
        trak.featurize(None, [inputs])
        features = trak.features([inputs])
        assert float((features - reference).norm() / reference.norm()) < 1e-7, name


def test_a_wrapped_encoder_decoder_keeps_its_masks():
    torch.manual_seed(3)
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)
    inner = transformers.T5ForConditionalGeneration(config).double().eval()
    from trak_torch.attention import causal_model

    assert not causal_model(_Wrapper(inner)) and not causal_model(inner)  # its decoder stack says is_decoder


def test_right_padding_labels_still_count_and_own_configs_are_not_read():
    from trak_torch.attention import _layer_masks, uncounted_pad_predictions

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    labels = torch.tensor([[5, 6, 7, 1, 1], [1, 1, 5, 6, 7]])  # pad labels not -100 (counted by the model's loss)
    kept = uncounted_pad_predictions({"attention_mask": mask}, labels, 1)
    assert kept.tolist() == [[5, 6, 7, 1, 1], [1, -100, -100, 6, 7]]  # only what leading pads "predict" is dropped

    class OwnConfig(torch.nn.Module):  # a model's own config with a sliding_window field: not Hugging Face's
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"sliding_window": 128})()

    assert _layer_masks(OwnConfig(), causal=False) is None  # was a refusal ("bidirectional sliding-window")


def test_a_bad_batch_does_not_send_a_float64_model_to_eager_attention_for_good():
    """A float64 model keeps its SDPA under vmap; any error of a bad batch switched its checkpoint to eager attention
    (float32 softmax) for every later batch: 2.2e-8 off. Only a batch that eager attention takes switches it."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(1, 64, (4, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    task = trak_core.tasks.LanguageModeling()
    backend = TorchBackend(per_example="vmap")
    prepared = backend.prepare(model, None)
    with pytest.raises(Exception):
        backend.gradients(model, prepared, {"input_ids": ids, "attention_mask": mask,
                                            "position_ids": torch.zeros(4, 9, dtype=torch.long)}, ids, task)
    after, _ = backend.gradients(model, prepared, {"input_ids": ids, "attention_mask": mask}, ids, task)
    fresh, _ = backend.gradients(model, backend.prepare(model, None), {"input_ids": ids, "attention_mask": mask}, ids,
                                 task)
    assert float((after - fresh).norm() / fresh.norm()) < 1e-13
