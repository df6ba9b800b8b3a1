"""Hugging Face text towers that build their own causal mask without saying they are causal (CLIP's family: the
config is neither a decoder nor a ``*ForCausalLM``): trak-core's bidirectional 4-D mask replaced it and computed
another function (CLIP: 140% off; OWL-ViT, OWL-v2, GroupViT, CLIPSeg, X-CLIP: found the same). Known ones get their
2-D mask as it is (``OWN_MASK``); any other model whose outputs the 4-D mask changes is found on its first batches
(``trak_torch.mask_check``). Per-example gradients (float64) against one-example autograd."""
import logging

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: HF models not exercised")

import trak_core  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, eos_token_id=2, pad_token_id=1, bos_token_id=0)
TOWERS = {"clip": ("CLIPTextConfig", "CLIPTextModel"), "owlvit": ("OwlViTTextConfig", "OwlViTTextModel"),
          "owlv2": ("Owlv2TextConfig", "Owlv2TextModel"), "groupvit": ("GroupViTTextConfig", "GroupViTTextModel"),
          "clipseg": ("CLIPSegTextConfig", "CLIPSegTextModel"), "xclip": ("XCLIPTextConfig", "XCLIPTextModel"),
          "bert": ("BertConfig", "BertModel")}


def _tower(name):
    config_class, model_class = (getattr(transformers, n) for n in TOWERS[name])
    torch.manual_seed(0)
    return model_class(config_class(**SMALL)).double().eval()


def _batch(lengths):
    n = len(lengths)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = torch.randint(3, 64, (n, 8), generator=torch.Generator().manual_seed(1)) * mask + (1 - mask)
    ids[torch.arange(n), lengths - 1] = 2
    return {"input_ids": ids, "attention_mask": mask}, torch.arange(n) % 3


def _pooled(output):
    return output.pooler_output[:, :3]


def _reference(model, inputs, labels, logits=_pooled):
    """The classification margin of ``logits(output)``, differentiated one example at a time."""
    import array_api_compat.torch as xp

    task, rows = trak_core.tasks.get_task("classification"), []
    for i in range(labels.shape[0]):
        model.zero_grad()
        one = {key: value[i:i + 1] for key, value in inputs.items()}
        task.output(logits(model(**one)), labels[i:i + 1], xp=xp).sum().backward()
        rows.append(torch.cat([(torch.zeros_like(q) if q.grad is None else q.grad).reshape(-1)
                               for q in model.parameters()]))
    return torch.stack(rows)


def _gradients(model, inputs, labels, per_example="auto"):
    from trak_torch import TorchBackend

    backend = TorchBackend(logits_fn=_pooled, per_example=per_example)
    task = trak_core.tasks.get_task("classification")
    return backend.gradients(model, backend.prepare(model, None), inputs, labels, task)[0]


def _error(grads, reference):
    return float((grads - reference).norm() / reference.norm())


@pytest.mark.parametrize("name", ["owlvit", "owlv2", "groupvit", "clipseg", "xclip"])
def test_clip_like_text_towers_keep_their_causal_mask(name, caplog):
    model = _tower(name)
    inputs, labels = _batch([8, 5, 6, 3])
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        assert _error(_gradients(model, inputs, labels), _reference(model, inputs, labels)) < 1e-12
    assert "4-D attention mask" not in caplog.text  # known: no check needed, no warning


def test_an_unknown_tower_that_builds_its_own_mask_is_found(monkeypatch, caplog):
    """CLIP taken out of OWN_MASK stands for a family trak-core does not know: its first batch shows the 4-D mask
    changes its outputs, and it gets its own mask from then on, for every gradient path."""
    import trak_torch.attention as attention

    monkeypatch.setattr(attention, "OWN_MASK", attention.OWN_MASK - {"clip", "clip_text_model"})
    model = _tower("clip")
    inputs, labels = _batch([8, 5, 6, 3])
    reference = _reference(model, inputs, labels)
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        assert _error(_gradients(model, inputs, labels), reference) < 1e-12
        assert _error(_gradients(model, inputs, labels, per_example="loop"), reference) < 1e-12
    assert "clip_text_model's outputs under trak-core's 4-D attention mask" in caplog.text
    assert model in attention.own_mask_models


def test_a_padded_batch_is_checked_after_an_unpadded_one():
    """A first batch without padding cannot show a difference that only padding makes: the first padded batch is
    checked as well. A model the 4-D mask does not change keeps it (BERT: bidirectional, as trak-core builds)."""
    import trak_torch.attention as attention
    import trak_torch.mask_check as mask_check

    model, states = _tower("bert"), []
    for lengths in ([8, 8, 8], [8, 8], [8, 4, 6], [3, 8]):
        inputs, labels = _batch(lengths)
        assert _error(_gradients(model, inputs, labels), _reference(model, inputs, labels)) < 1e-12
        states.append(mask_check._checked.get(model))
    assert states == ["unpadded", "unpadded", "padded", "padded"]
    assert model not in attention.own_mask_models


def _opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                    num_labels=3, pad_token_id=0, dropout=0.0, attention_dropout=0.0)
    return transformers.OPTForSequenceClassification(config).double().eval()


def _opt_batch(side):
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0], [13, 14, 0, 0, 0]])
    if side == "left":
        ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12], [0, 0, 0, 13, 14]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}, torch.tensor([0, 1, 2])


@pytest.mark.parametrize("per_example", ["auto", "vmap"])
def test_a_model_that_cannot_take_the_4d_mask_gets_its_own(per_example, caplog):
    """OPT (positions from the 2-D mask), and likewise Bloom, XLM, FlauBERT, OpenAI-GPT, LayoutLM, YOSO in an audit,
    raised with trak-core's 4-D mask under the default attention_mask="auto" although the model runs: now it
    gets its own mask, with a warning, and every path matches one-example autograd."""
    from trak_torch import TorchBackend

    model = _opt()
    inputs, labels = _opt_batch("right")
    backend = TorchBackend(per_example=per_example)
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        grads = backend.gradients(model, backend.prepare(model, None), inputs, labels,
                                  trak_core.tasks.get_task("classification"))[0]
    assert "opt raised with trak-core's 4-D attention mask (IndexError" in caplog.text
    assert _error(grads, _reference(model, inputs, labels, logits=lambda output: output.logits)) < 1e-12


@pytest.mark.parametrize("side", ["right", "left"])
def test_float64_vmap_does_not_take_a_float32_softmax(side):
    """Float64 OPT with its mask as it is: vmap cannot follow its SDPA mask code, and the eager attention that
    vmap ran instead takes its softmax in float32: 1.5e-8 off (right padding), NaN (left). Eager attention is kept
    only where it gives the model's SDPA gradients (T5, BART); here the one-example loop, in SDPA, takes over."""
    from trak_torch import TorchBackend

    model = _opt()
    inputs, labels = _opt_batch(side)
    backend = TorchBackend(per_example="vmap", attention_mask="pass")
    with pytest.warns(RuntimeWarning, match="eager attention is .* off SDPA in float64"):
        grads = backend.gradients(model, backend.prepare(model, None), inputs, labels,
                                  trak_core.tasks.get_task("classification"))[0]
    assert _error(grads, _reference(model, inputs, labels, logits=lambda output: output.logits)) < 1e-12


def test_wav2vec2_bert_gets_its_own_mask_without_a_warning(caplog):
    """Wav2Vec2-BERT (``input_features`` and a mask over frames, relative distances) raised under trak-core's 4-D
    mask: the mask check found it and warned on every model; it is known now (``OWN_MASK``)."""
    config = transformers.Wav2Vec2BertConfig(
        feature_projection_input_dim=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, classifier_proj_size=8, num_labels=3, conv_depthwise_kernel_size=3, mask_time_prob=0.0,
        layerdrop=0.0, position_embeddings_type="relative_key", left_max_position_embeddings=8,
        right_max_position_embeddings=8)
    torch.manual_seed(0)
    model = transformers.Wav2Vec2BertForSequenceClassification(config).double().eval()
    g = torch.Generator().manual_seed(4)
    mask = (torch.arange(12)[None] < torch.tensor([12, 9, 7, 12])[:, None]).long()
    inputs = {"input_features": torch.randn(4, 12, 8, generator=g, dtype=torch.float64) * mask[..., None],
              "attention_mask": mask}
    labels = torch.tensor([0, 1, 2, 1])

    def logits(output):
        return output.logits

    from trak_torch import TorchBackend

    backend = TorchBackend()
    task = trak_core.tasks.get_task("classification")
    with caplog.at_level(logging.WARNING, logger="trak_core"):
        grads = backend.gradients(model, backend.prepare(model, None), inputs, labels, task)[0]
    assert _error(grads, _reference(model, inputs, labels, logits)) < 1e-12
    assert "4-D attention mask" not in caplog.text, caplog.text


class _Pooled(torch.nn.Module):
    """A BERT tower whose pooling reads the batch's 2-D attention_mask itself (a masked mean), or, with ``broken``,
    a model that fails whatever its mask (its own bug, as CodeGen's rotary size)."""

    def __init__(self, broken=False):
        super().__init__()
        self.bert, self.broken = _tower("bert"), broken
        self.config = self.bert.config

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.broken:
            hidden = hidden @ torch.ones(7, 3, dtype=hidden.dtype)  # width 16, not 7
        weights = attention_mask[..., None].to(hidden.dtype)  # (n, T, 1) from a 2-D mask only
        return (hidden * weights).sum(1)[:, :3] / weights.sum(1)


@pytest.mark.parametrize("broken", [False, True])
def test_the_mask_note_is_added_only_where_the_mask_is_the_cause(broken):
    """A model that reads its 2-D mask, given the 4-D one (attention_mask='bidirectional'), gets the note naming
    attention_mask='pass'; a model whose own forward fails with its mask as it is got the same note, pointing the
    wrong way (CodeGen's rotary size): not any more."""
    from trak_torch import TorchBackend

    model = _Pooled(broken).double().eval()
    inputs, labels = _batch([8, 5, 6, 3])
    backend = TorchBackend(attention_mask="bidirectional")
    with pytest.raises(RuntimeError) as failed:
        backend.gradients(model, backend.prepare(model, None), inputs, labels,
                          trak_core.tasks.get_task("classification"))
    noted = any("attention_mask='pass'" in note for note in getattr(failed.value, "__notes__", ()))
    assert noted != broken, getattr(failed.value, "__notes__", None)
