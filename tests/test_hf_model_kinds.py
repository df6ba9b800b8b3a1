"""Hugging Face models beyond text LMs (an audit against one-example autograd): token classification, classifiers
on encoder-decoder models, models that read the 2-D attention mask themselves (DeBERTa-v2, audio encoders), and a
constant keyword in a dict batch. Per-example gradients (``proj_dim=None``) in float64."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: HF models not exercised")

import trak_core  # noqa: E402

V = 40


def _margin(logits, labels):
    chosen = logits.gather(-1, labels[..., None])[..., 0]
    return chosen - torch.logsumexp(logits.scatter(-1, labels[..., None], float("-inf")), -1)


def _reference(model, inputs, labels, output):
    """``output(model output, labels of one example)`` differentiated one example at a time."""
    params = [p for _, p in model.named_parameters()]
    rows = []
    for i in range(labels.shape[0]):
        value = output(model(**{k: v[i:i + 1] for k, v in inputs.items()}), labels[i:i + 1])
        grads = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def _classification(out, labels):
    return _margin(out.logits, labels).sum()


def _features(model, inputs, labels, task="classification"):
    batches = [{**{k: v[:3] for k, v in inputs.items()}, "labels": labels[:3]},
               {**{k: v[3:] for k, v in inputs.items()}, "labels": labels[3:]}]
    trak = trak_core.TRAK(model, task=task, proj_dim=None, lambda_reg=1.0, progress=False)
    trak.featurize(None, batches)
    return trak.store[0].features


def _perturbed(model):
    torch.manual_seed(1)
    model = model.double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _text(n=6, length=8):
    torch.manual_seed(0)
    mask = (torch.arange(length) < torch.tensor([8, 5, 3, 8, 6, 4])[:n, None]).long()
    return {"input_ids": torch.randint(3, V, (n, length)) * mask, "attention_mask": mask}


def _bert_config(**options):
    return dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                max_position_embeddings=64, **options)


def test_token_classification_task_and_the_refused_causal_task():
    """Per-token labels at the logits' own positions: task='token_classification'. task='language_modeling'
    (labels shifted by one) was accepted on BERT and gave gradients 128% off; it is refused, naming the task."""
    model = _perturbed(transformers.BertForTokenClassification(transformers.BertConfig(**_bert_config(num_labels=4))))
    inputs = _text()
    labels = torch.randint(0, 4, (6, 8)).masked_fill(inputs["attention_mask"] == 0, -100)

    def tagged(out, y):
        keep = y != -100
        return (_margin(out.logits, y.clamp_min(0)) * keep).sum()

    torch.testing.assert_close(_features(model, inputs, labels, task="token_classification"),
                               _reference(model, inputs, labels, tagged), rtol=1e-10, atol=1e-12)
    with pytest.raises(trak_core.TrakValueError, match="not a causal model .* task='token_classification'"):
        _features(model, inputs, labels, task="language_modeling")
    with pytest.raises(trak_core.TrakValueError, match="per-token class scores .* task='token_classification'"):
        _features(model, inputs, labels[:, 0], task="classification")


def test_a_classifier_on_an_encoder_decoder_model_makes_its_own_decoder_inputs():
    """BART's classifier makes its decoder inputs from input_ids; trak-core demanded them made from (n,) labels."""
    config = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=64, num_labels=3, pad_token_id=1,
                                     eos_token_id=2, bos_token_id=0, decoder_start_token_id=2)
    model = _perturbed(transformers.BartForSequenceClassification(config))
    inputs = _text()
    inputs["input_ids"][:, -1] = 2  # one end-of-sequence token per row, as the classifier pools it
    inputs["attention_mask"][:] = 1
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    torch.testing.assert_close(_features(model, inputs, labels), _reference(model, inputs, labels, _classification),
                               rtol=1e-10, atol=1e-12)


def test_models_that_read_their_own_mask_get_it_as_it_is():
    """DeBERTa-v2 (relative positions) and Wav2Vec2 (a mask over raw samples: as a 4-D mask it would take
    n L^2 numbers, 2 GB for eight one-second clips) crashed under attention_mask='auto'."""
    model = _perturbed(transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        **_bert_config(num_labels=3, relative_attention=True, position_buckets=8, max_relative_positions=16,
                       pos_att_type=["p2c", "c2p"]))))
    inputs, labels = _text(), torch.tensor([0, 1, 2, 1, 0, 2])
    torch.testing.assert_close(_features(model, inputs, labels), _reference(model, inputs, labels, _classification),
                               rtol=1e-10, atol=1e-12)
    audio = _perturbed(transformers.Wav2Vec2ForSequenceClassification(transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        num_labels=3, classifier_proj_size=8, feat_extract_norm="layer", do_stable_layer_norm=True,
        mask_time_prob=0.0)))
    torch.manual_seed(2)
    mask = (torch.arange(200)[None] < torch.tensor([200, 150, 100, 200, 120, 80])[:, None]).long()
    sound = {"input_values": torch.randn(6, 200, dtype=torch.float64) * mask, "attention_mask": mask}
    torch.testing.assert_close(_features(audio, sound, labels), _reference(audio, sound, labels, _classification),
                               rtol=1e-10, atol=1e-12)


def test_a_constant_keyword_in_a_dict_batch_names_the_wrapper_fix():
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**_bert_config(num_labels=3)))
    batch = {**_text(), "output_attentions": True, "labels": torch.tensor([0, 1, 2, 1, 0, 2])}
    with pytest.raises(trak_core.TrakTypeError, match=r"inputs\['output_attentions'\] is a bool, .* wrapper module"):
        trak_core.TRAK(model, proj_dim=8, progress=False).featurize(None, [batch])


def _lm_reference(model, ids):
    def shifted(out, y):  # the next token's margin at each position, summed
        return _margin(out.logits[:, :-1], y[:, 1:]).sum()

    return _reference(model, {"input_ids": ids}, ids, shifted)


def test_causal_models_that_do_not_say_so_keep_language_modeling():
    """The refusal of 'language_modeling' needs positive evidence of a bidirectional model: a user's subclass of
    BLOOM (whose attention says nothing, under attention_mask='pass') was refused, and a subclass of MPT was not
    seen as causal (a bidirectional mask: 53% off under 'auto'); causality is read through the class's bases."""
    from trak_torch import TorchBackend

    class MyBloom(transformers.BloomForCausalLM):
        pass

    class MyMpt(transformers.MptForCausalLM):
        pass

    torch.manual_seed(0)
    ids = torch.randint(0, V, (4, 6))
    cases = [(MyBloom(transformers.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1, n_head=2)), "pass"),
             (MyMpt(transformers.MptConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2)), "auto")]
    for model, mask in cases:
        model = _perturbed(model)
        trak = trak_core.TRAK(model, task="language_modeling", proj_dim=None, lambda_reg=1.0, progress=False,
                              backend=TorchBackend(attention_mask=mask))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        trak.featurize(None, [batch])
        torch.testing.assert_close(trak.store[0].features, _lm_reference(model, ids), rtol=1e-9, atol=1e-12)


def test_clip_text_towers_build_their_own_causal_mask():
    """CLIP's text tower is causal and builds its causal mask itself; trak-core's 4-D mask (bidirectional: the model
    is not a *ForCausalLM) replaced it, and every gradient path was 140% off one-example autograd. It gets its 2-D
    mask as it is now (OWN_MASK), under attention_mask="auto"."""
    import array_api_compat.torch as xp

    from trak_torch import TorchBackend

    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16, projection_dim=3,
                                         eos_token_id=2, pad_token_id=1, bos_token_id=0)
    model = transformers.CLIPTextModelWithProjection(config).double().eval()
    ids, lengths = torch.randint(3, 64, (4, 8)), torch.tensor([8, 5, 6, 3])
    mask = (torch.arange(8)[None] < lengths[:, None]).long()
    ids = ids * mask + (1 - mask)
    ids[torch.arange(4), lengths - 1] = 2
    labels, task = torch.tensor([0, 1, 2, 1]), trak_core.tasks.get_task("classification")
    rows = []
    for i in range(4):
        model.zero_grad()
        logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).text_embeds
        task.output(logits, labels[i:i + 1], xp=xp).sum().backward()
        rows.append(torch.cat([(torch.zeros_like(q) if q.grad is None else q.grad).reshape(-1)
                               for q in model.parameters()]))
    reference = torch.stack(rows)
    backend = TorchBackend(logits_fn=lambda output: output.text_embeds)
    grads, _ = backend.gradients(model, backend.prepare(model, None), {"input_ids": ids, "attention_mask": mask},
                                 labels, task)
    assert float((grads - reference).norm() / reference.norm()) < 1e-12
