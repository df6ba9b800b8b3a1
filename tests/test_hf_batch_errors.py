"""Dict batches as Hugging Face users make them by mistake: a tokenizer's lists (no ``return_tensors``) get the
conversion as their fix, not the wrapper module of a constant keyword; the same examples padded to another length
(a padding collator at another batch size) are refused with padding named as a cause."""
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the torch backend is not exercised")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: HF models not exercised")

import trak_core  # noqa: E402

LENGTHS = [3, 3, 6, 6]


def _model(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def _collate(rows):
    """Pads each batch to its longest example, as ``transformers.DataCollatorWithPadding`` does."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.stack([torch.nn.functional.pad(row["input_ids"], (0, width - len(row["input_ids"]))) for row in rows])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.stack([r["labels"] for r in rows])}


def _loader(batch_size):
    examples = [{"input_ids": torch.arange(1, n + 1), "labels": torch.tensor(i % 2)} for i, n in enumerate(LENGTHS)]
    return torch.utils.data.DataLoader(examples, batch_size=batch_size, collate_fn=_collate)


@pytest.mark.parametrize("kind", [list, tuple])
def test_token_rows_as_python_lists_name_the_conversion(kind):
    batch = {"input_ids": kind([[1, 5, 6, 0], [1, 7, 8, 9]]), "attention_mask": kind([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "labels": torch.tensor([0, 1])}  # tokenizer(texts, padding=True) without return_tensors
    with pytest.raises(trak_core.TrakTypeError) as info:
        trak_core.TRAK(_model(), proj_dim=8, progress=False).featurize(None, [batch])
    assert str(info.value) == (
        f"checkpoint 0, batch 0: inputs['input_ids'] is a {kind.__name__}, not an array: a dict batch holds arrays of "
        "the model's framework with one row per example; convert it, e.g. torch.as_tensor(batch['input_ids']), or ask "
        "the tokenizer for tensors (tokenizer(texts, padding=True, return_tensors='pt'))")


def test_the_same_examples_padded_otherwise_are_refused_naming_padding():
    trak = trak_core.TRAK(_model(), proj_dim=8, progress=False)
    trak.featurize(_model(0).state_dict(), _loader(2))
    named = (r"or the same examples padded to another length \(a collator pads each batch to its longest example, "
             r"so another batch size pads them otherwise\)\. Featurize every checkpoint on the same data, in the same "
             r"order and dtypes, padded the same way")
    with pytest.raises(trak_core.StoreMismatchError, match=named):
        trak.featurize(_model(1).state_dict(), _loader(4))
    trak.featurize(_model(1).state_dict(), _loader(2))  # padded as the first time: accepted
    assert trak.n_checkpoints == 2


def test_padding_does_not_change_the_scores():
    """Why the refusal only needs the padding named: the scores of the two paddings are the same."""
    scores = []
    for batch_size in (2, 4):
        trak = trak_core.TRAK(_model(), proj_dim=8, lambda_reg=0.1, kernel_dtype="float64", progress=False)
        trak.featurize(_model(0).state_dict(), _loader(batch_size))
        scores.append(trak.score(_loader(4)))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-8)


def test_language_model_labels_that_predict_no_token_are_named():
    """Every label -100 (prompts or padding only): the zero-kernel error blamed the model ("check the model and the
    data"); it now names the labels."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (6, 8))
    trak = trak_core.TRAK(model, task="language_modeling", proj_dim=16, progress=False)
    with pytest.raises(trak_core.TrakValueError, match=r"^checkpoint 0: the kernel Phi\^T Phi is zero: .*; with "
                       r"task='language_modeling', a label of -100 marks a token that is not predicted: if every "
                       r"label is -100 \(prompts or padding only\), no token is predicted"):
        trak.featurize(None, [{"input_ids": ids, "labels": torch.full_like(ids, -100)}])


def test_classification_labels_of_minus_100_name_the_convention():
    with pytest.raises(trak_core.TrakValueError, match=r"labels must lie in \[0, 1\] \(-100, which Hugging Face uses "
                       r"to leave a token out of the loss, leaves nothing out of a classification task: drop those "
                       r"examples"):
        trak_core.TRAK(_model(), proj_dim=8, progress=False).featurize(
            None, [{"input_ids": torch.tensor([[1, 2, 3], [1, 4, 5]]), "labels": torch.tensor([0, -100])}])
    with pytest.raises(trak_core.TrakValueError, match=r"labels must lie in \[0, 1\]$"):  # other labels: as before
        trak_core.TRAK(_model(), proj_dim=8, progress=False).featurize(
            None, [{"input_ids": torch.tensor([[1, 2, 3], [1, 4, 5]]), "labels": torch.tensor([0, 7])}])
