"""Closed-form per-example gradients of Hugging Face language models (trak_torch.closed_form), against each
model's own backward pass one example at a time, and the attention implementation each gradient path runs."""
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the closed-form path is not exercised")

from trak_torch import TorchBackend  # noqa: E402


def _padded_lm_batch(seed, low, shape, padded_from):
    """Random token ids in [low, 64) with the second row padded (id 0) from ``padded_from``; labels -100 there."""
    ids = torch.randint(low, 64, shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, padded_from:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}, torch.where(mask.bool(), ids, -100)


def test_hugging_face_llama_rms_norms_in_closed_form():
    """A tiny Llama (its own LlamaRMSNorm class, grouped-query attention, SiLU MLP, padding): every parameter in
    closed form, equal to the model's own backward pass one example at a time in float64."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: Llama not exercised")
    import trak_core

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0, rms_norm_eps=1e-3)
    model = transformers.LlamaForCausalLM(config).double()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)  # not ones: a wrong normalization would show
    batch, labels = _padded_lm_batch(seed=4, low=1, shape=(5, 9), padded_from=6)
    task = trak_core.tasks.LanguageModeling()
    auto = TorchBackend()
    prepared = auto.prepare(model, None)
    grads, _ = auto.gradients(model, prepared, batch, labels, task)
    reference = _own_backward_one_at_a_time(model, batch, labels, task)
    kinds = {kind for _, kind, _, _ in prepared._closed_form[id(task)]}
    assert kinds == {"embedding", "linear", "rmsnorm-hf"}
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-9


def _own_backward_one_at_a_time(model, batch, labels, task):
    """The model's own forward (its 2-D mask handling, SDPA) and backward, one example at a time: a reference that
    shares no code with the backend's gradient paths."""
    import array_api_compat.torch as xp

    model.eval()
    rows = []
    for i in range(labels.shape[0]):
        model.zero_grad()
        task.output(model(**{k: v[i:i + 1] for k, v in batch.items()}).logits, labels[i:i + 1], xp=xp).sum().backward()
        rows.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                               for p in model.parameters()]))
    return torch.stack(rows)


def _causal_lm_config(transformers, name):
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {"mistral": lambda: transformers.MistralConfig(**small, num_key_value_heads=2),
            "qwen2": lambda: transformers.Qwen2Config(**small, num_key_value_heads=2),
            "phi": lambda: transformers.PhiConfig(**small),
            "gpt_neox": lambda: transformers.GPTNeoXConfig(**small),
            "falcon": lambda: transformers.FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                        num_attention_heads=4, bos_token_id=0, eos_token_id=0),
            "bloom": lambda: transformers.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=4,
                                                      bos_token_id=0, eos_token_id=0),
            "gemma": lambda: transformers.GemmaConfig(**small, num_key_value_heads=2, head_dim=4),  # scaled, tied
            "opt": lambda: transformers.OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                                  num_attention_heads=4, max_position_embeddings=32,
                                                  word_embed_proj_dim=16, bos_token_id=0, eos_token_id=0,
                                                  pad_token_id=1)}[name]()


@pytest.mark.parametrize("name", ["mistral", "qwen2", "phi", "gpt_neox", "falcon", "bloom", "gemma", "opt"])
def test_hugging_face_causal_lms_in_closed_form(name):
    """Tiny random causal LMs of several families, with padding: all in closed form, equal to the model's own
    backward pass one example at a time to 1e-9 in float64 (vmap(grad) runs their eager attention, whose softmax
    is float32; Bloom's autograd.Function cannot run under vmap at all; Gemma's scaled embedding, tied to its head,
    and OPT's offset positions are followed through their F.embedding calls)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: not exercised")
    import trak_core

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_causal_lm_config(transformers, name)).double()
    batch, labels = _padded_lm_batch(seed=5, low=2, shape=(4, 10), padded_from=7)
    task = trak_core.tasks.LanguageModeling()
    backend = TorchBackend(attention_mask="pass" if name in ("bloom", "opt") else "auto")  # they read the 2-D mask
    prepared = backend.prepare(model, None)
    grads, _ = backend.gradients(model, prepared, batch, labels, task)
    assert prepared._closed_form[id(task)] is not None
    reference = _own_backward_one_at_a_time(model, batch, labels, task)
    assert float(torch.linalg.vector_norm(reference)) > 1e-3
    assert float(torch.linalg.vector_norm(grads - reference) / torch.linalg.vector_norm(reference)) < 1e-9


def test_closed_form_attention_is_the_models_own_unless_it_cannot_take_the_4d_mask():
    """Eager and SDPA stay as the model has them; another implementation (flash attention, which takes no additive
    4-D mask) is SDPA while the closed form runs, and is restored after; vmap's is always eager."""
    import types

    from trak_torch.attention import attention_for_closed_form, attention_for_vmap

    for before, closed, vmapped in [("sdpa", "sdpa", "eager"), ("eager", "eager", "eager"),
                                    ("flash_attention_2", "sdpa", "eager")]:
        model = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=before))
        with attention_for_closed_form(model):
            assert model.config._attn_implementation == closed
        with attention_for_vmap(model):
            assert model.config._attn_implementation == vmapped
        assert model.config._attn_implementation == before
