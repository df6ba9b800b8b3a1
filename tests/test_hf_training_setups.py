"""Hugging Face models as training leaves them, through the torch backend (random tiny configs, no downloads):
half-precision weights with ``proj_type="kronecker"``, gradient checkpointing (its ``requires_grad_`` hook on the
input embeddings, under ``torch.func``), frozen parameters and LoRA adapters (``params=`` selecting the trainable
ones), and problem types no built-in task covers. References: plain autograd one example at a time, the margins
written out token by token, and ``trak_core.kronecker.explicit_matrix``."""
import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: Hugging Face models "
                                                          "are not exercised")

import trak_core  # noqa: E402
from trak_core import Kronecker  # noqa: E402
from trak_core.errors import TrakValueError  # noqa: E402
from trak_core.kronecker import explicit_matrix  # noqa: E402
from trak_core.tasks import get_task  # noqa: E402
from trak_torch import TorchBackend  # noqa: E402

TRAINABLE = lambda name, tensor: tensor.requires_grad  # noqa: E731  (the selector docs/torch.md gives)


def tiny_bert(seed=0, num_labels=2, **config):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels, **config)).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1)).eval()


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, decoder_start_token_id=0,
        pad_token_id=0)).eval()


def _margin(row, y):
    return row[y] - torch.logsumexp(torch.cat([row[:y], row[y + 1:]]), 0)


def classification(logits, y):
    return _margin(logits, int(y))


def language_modeling(logits, y):  # the logits at t predict token t + 1
    return sum(_margin(logits[t], int(y[t + 1])) for t in range(logits.shape[0] - 1) if int(y[t + 1]) != -100)


def seq2seq(logits, y):  # the logits at t predict labels[t]
    return sum(_margin(logits[t], int(y[t])) for t in range(logits.shape[0]) if int(y[t]) != -100)


def one_at_a_time(model, batch, labels, output, *, names=None, with_labels=False):
    """Each example's gradient of ``output(logits, label)`` by a plain forward and backward of the model on that
    example alone, with respect to the parameters ``names`` (default: all), in ``named_parameters`` order."""
    params = dict(model.named_parameters())
    chosen = [params[name] for name in (names or params)]
    rows = []
    for i in range(labels.shape[0]):
        one = {key: value[i:i + 1] for key, value in batch.items()}
        logits = model(**one, **({"labels": labels[i:i + 1]} if with_labels else {})).logits[0]
        grads = torch.autograd.grad(output(logits, labels[i]), chosen, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, chosen)]))
    return torch.stack(rows)


def _tokens(n, length, vocab, seed):
    ids = torch.as_tensor(np.random.default_rng(seed).integers(3, vocab, (n, length)))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# 1. half precision with proj_type="kronecker": the self-check's tolerance follows the model's dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_half_precision_models_featurize_with_kronecker(kind, dtype):
    """The first example's check against its dense gradient allowed float32 rounding (the features' dtype) to a
    bfloat16 or float16 model and refused it ("the weight is probably also used outside its module"). The
    features equal the float32 model's (the same rounded weights) gradients times the factorized projection,
    to the half precision's rounding."""
    task = get_task("language_modeling" if kind == "gpt2" else "classification")
    output = language_modeling if kind == "gpt2" else classification
    for seed in range(3):
        half = (tiny_gpt2 if kind == "gpt2" else tiny_bert)(seed).to(dtype)
        batch = _tokens(6, 8, 50, seed)
        labels = batch["input_ids"] if kind == "gpt2" else torch.as_tensor([0, 1, 1, 0, 1, 0])
        backend, options = TorchBackend(), Kronecker()
        prepared = backend.prepare(half, None)
        plan = backend.factorized_plan(half, prepared, batch, labels, task, k=32, options=options)
        features, _ = backend.factorized_features(half, prepared, batch, labels, task, k=32, seed=3, checkpoint=0,
                                                  options=options)
        grads = one_at_a_time(copy.deepcopy(half).float(), batch, labels, output)
        matrix = explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=3, checkpoint=0)
        reference = grads.double().numpy() @ matrix
        error = np.linalg.norm(features.double().numpy() - reference, axis=1) / np.linalg.norm(reference, axis=1)
        assert error.max() < 4 * torch.finfo(dtype).eps, (seed, error)  # measured: about eps


# 2. gradient checkpointing: Hugging Face's requires_grad_ hook under torch.func


def _checkpointing_state(model):
    """The forward hooks of every module and the gradient_checkpointing flags (and whether each is the module's
    own attribute or its class's)."""
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}
    flags = {name: (m.gradient_checkpointing, "gradient_checkpointing" in vars(m)) for name, m in model.named_modules()
             if hasattr(m, "gradient_checkpointing")}
    return hooks, flags


@pytest.mark.parametrize("case", ["gpt2-vmap", "gpt2-kronecker-vmap", "t5"])
def test_gradient_checkpointing_enabled_models_take_vmap(case):
    """gradient_checkpointing_enable() registers make_inputs_require_grads on the input embeddings
    (gradient_checkpointing_disable() leaves it), whose requires_grad_ torch.func refused. The per-example
    gradients equal plain autograd of the same weights one example at a time; hooks and flags are as before."""
    model = (tiny_t5 if case == "t5" else tiny_gpt2)().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5: activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    before = _checkpointing_state(model)
    assert any(getattr(h, "__name__", "") == "make_inputs_require_grads" for hs in before[0].values()
               for h in hs.values())
    assert any(value for value, _ in before[1].values())
    if case == "t5":
        batch, labels = _tokens(4, 6, 40, 1), torch.as_tensor(np.random.default_rng(2).integers(3, 40, (4, 5)))
        labels[1, 3:] = -100
        task, reference = get_task("seq2seq"), one_at_a_time(model, batch, labels, seq2seq, with_labels=True)
    else:
        batch = _tokens(4, 6, 50, 1)
        labels = batch["input_ids"]
        task, reference = get_task("language_modeling"), one_at_a_time(model, batch, labels, language_modeling)
    assert float(reference.abs().max()) > 1e-3
    backend = TorchBackend(per_example="vmap")
    prepared = backend.prepare(model, None)
    if case == "gpt2-kronecker-vmap":
        options = Kronecker()
        plan = backend.factorized_plan(model, prepared, batch, labels, task, k=24, options=options)
        features, _ = backend.factorized_features(model, prepared, batch, labels, task, k=24, seed=1, checkpoint=0,
                                                  options=options)
        matrix = explicit_matrix(plan, {n: tuple(t.shape) for n, t in prepared.params.items()}, seed=1, checkpoint=0)
        np.testing.assert_allclose(features.numpy(), reference.numpy() @ matrix, rtol=1e-6,
                                   atol=1e-9 * float(np.abs(reference.numpy() @ matrix).max()))
    else:
        grads, _ = backend.gradients(model, prepared, batch, labels, task)
        torch.testing.assert_close(grads, reference, rtol=1e-6, atol=1e-9 * float(reference.abs().max()))
    assert _checkpointing_state(model) == before


# 3. frozen parameters and LoRA: attributed by default; params= selects the trainable ones


class LoRALinear(torch.nn.Module):
    """A hand-made LoRA wrapper: the frozen base layer plus ``x A^T B^T`` (what PEFT's LoRA layer computes)."""

    def __init__(self, base, rank=2):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)  # random, not zero: gradients reach A

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


def test_frozen_parameters_are_attributed_by_default_and_the_trainable_selector_leaves_them_out():
    model = tiny_bert(num_labels=3).double().requires_grad_(False)
    for layer in model.bert.encoder.layer:
        attention = layer.attention.self
        attention.query, attention.value = LoRALinear(attention.query), LoRALinear(attention.value)
    model.classifier.requires_grad_(True)
    model.double()
    trainable = [name for name in dict(model.named_parameters()) if "lora_" in name or name.startswith("classifier")]
    batch, labels = _tokens(5, 7, 50, 3), torch.as_tensor([0, 1, 2, 1, 0])
    task = get_task("classification")
    everything = TorchBackend().prepare(model, None)  # requires_grad is not read: every parameter by default
    assert list(everything.params) == list(dict(model.named_parameters()))
    backend = TorchBackend(params=TRAINABLE)
    prepared = backend.prepare(model, None)
    assert list(prepared.params) == trainable and set(prepared.frozen) >= set(everything.params) - set(trainable)
    grads, _ = backend.gradients(model, prepared, batch, labels, task)
    reference = one_at_a_time(model, batch, labels, classification, names=trainable)
    assert float(reference.abs().max()) > 1e-3
    torch.testing.assert_close(grads, reference, rtol=1e-9, atol=1e-12)


def test_peft_lora_model_with_the_trainable_selector_and_its_adapter_state_dict():
    """The documented selector attributes exactly PEFT's trainable parameters (the adapters and the classifier
    PEFT keeps trainable); an adapter-only state dict is an error that says how to make a checkpoint of it, and
    doing so works."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model = peft.get_peft_model(tiny_bert(num_labels=3).double(), peft.LoraConfig(
        task_type="SEQ_CLS", r=2, target_modules=["query", "value"], init_lora_weights=False)).eval()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in name for name in trainable) and len(trainable) < len(list(model.parameters()))
    backend = TorchBackend(params=TRAINABLE)
    prepared = backend.prepare(model, None)
    assert list(prepared.params) == trainable
    assert prepared.n_params == model.get_nb_trainable_parameters()[0]
    batch, labels = _tokens(4, 6, 50, 4), torch.as_tensor([2, 0, 1, 2])
    grads, _ = backend.gradients(model, prepared, batch, labels, get_task("classification"))
    torch.testing.assert_close(grads, one_at_a_time(model, batch, labels, classification, names=trainable),
                               rtol=1e-9, atol=1e-12)

    adapters = {k: v.clone() for k, v in peft.get_peft_model_state_dict(model).items()}
    with pytest.raises(TrakValueError, match=r"(?s)full state_dict of the model.*set_peft_model_state_dict") as err:
        backend.prepare(model, adapters)
    assert len(str(err.value)) < 1500  # the first keys, not all of them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.zero_()
    peft.set_peft_model_state_dict(model, adapters)  # what the message says to do
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    again = backend.prepare(model, checkpoint)
    assert all(torch.equal(again.params[n], prepared.params[n]) for n in trainable)


# 4. multi-label classification and multi-output regression: not built in, and the errors say so


def test_multi_label_and_multi_output_regression_errors_point_to_custom_tasks():
    batch = _tokens(4, 6, 50, 5)
    multi_label = tiny_bert(num_labels=3, problem_type="multi_label_classification").double()
    targets = torch.as_tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.float64)
    trak = trak_core.TRAK(multi_label, task="classification", proj_dim=None, progress=False)
    with pytest.raises(TrakValueError, match=r"(?s)shape \(4, 3\).*multi-label classification.*not a built-in "
                                             r"task.*trak_core\.CustomTask"):
        trak.featurize(None, [{**batch, "labels": targets}])
    with pytest.raises(TrakValueError, match=r"reshape them to \(n,\)"):
        get_task("classification").check_labels(np.zeros((4, 1), dtype=int), 3, xp=np)

    multi_output = tiny_bert(num_labels=3, problem_type="regression").double()
    trak = trak_core.TRAK(multi_output, task="regression", proj_dim=None, progress=False)
    with pytest.raises(TrakValueError, match=r"(?s)the model has 3: multi-output regression is not a built-in task"
                                             r".*trak_core\.CustomTask.*logits_fn"):
        trak.featurize(None, [{**batch, "labels": targets}])

    # the two ways out the messages give, against plain autograd
    def both(logits, y, xp):  # the summed signed logits: one number per example
        return xp.sum((2 * y - 1) * logits, axis=1)

    custom = trak_core.CustomTask(both, name="multi_label")
    backend = TorchBackend()
    grads, _ = backend.gradients(multi_label, backend.prepare(multi_label, None), batch, targets, custom)
    reference = one_at_a_time(multi_label, batch, targets, lambda logits, y: ((2 * y - 1) * logits).sum())
    torch.testing.assert_close(grads, reference, rtol=1e-9, atol=1e-12)
    second = TorchBackend(logits_fn=lambda out: out.logits[..., 1])
    grads, _ = second.gradients(multi_output, second.prepare(multi_output, None), batch, targets[:, 1],
                                get_task("regression"))
    reference = one_at_a_time(multi_output, batch, targets[:, 1], lambda logits, y: logits[1])
    torch.testing.assert_close(grads, reference, rtol=1e-9, atol=1e-12)
