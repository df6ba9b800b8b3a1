"""Text models on CPU: trak-core's torch backend next to traker 0.3.2 on tiny BERTs, and a tiny GPT-2.

    python bench/text_vs_traker.py --threads 1             # everything (about 4 minutes on 2 CPU cores)
    python bench/text_vs_traker.py --quick                 # small sizes (about 20 s): 64 reviews, k = 512
    python bench/text_vs_traker.py --only agreement --json out.json

Parts
-----
Data: short reviews made from templates (positive or negative, a quarter negated), a word-level
vocabulary (pad id 0, ``[CLS]`` first), batches ``{"input_ids", "token_type_ids", "attention_mask",
"labels"}``; tiny ``BertForSequenceClassification`` models from random configs, trained here for a
few epochs from different seeds (the checkpoints, float32 state_dicts). Nothing is downloaded.
Full run: 1,000 training reviews, 40 targets; BERT sizes ``tiny`` (1 layer, hidden 16: 3,346
parameters; three checkpoints), ``mini`` (the Hugging Face quickstart's: 2 layers, hidden 32:
19,842; three) and ``small`` (2 layers, hidden 64: 74,498; one).

(a) ``agreement``: no projection. trak-core: ``TRAK(bert, proj_dim=None)`` on a float64 copy of the
checkpoints (the reference), ``lambda_reg="auto"`` and then one common ``lambda`` (the mean of the
automatic ones, via ``refit``). traker: ``task="text_classification"``, its ``NoOpProjector``,
``use_half_precision=False``, on the float32 checkpoints, ``lambda_reg = lambda / p`` (it divides
gradients by ``sqrt(p)``). traker then divides each checkpoint's ``(X^T X + lambda I)^-1`` by its
mean absolute entry, so its scores are trak-core's times one positive factor per checkpoint. The
factor is both fitted (least squares) and predicted from trak-core's own float64 features
(``p * mean |(Phi^T Phi + lambda I)^-1|``, through the Woodbury identity). Reported per checkpoint
and for the ensemble: the Pearson correlation of the raw scores, the factor, and the relative
error after scaling. traker keeps features in float32 and inverts the kernel in float32
(``torch.linalg.inv`` of a float32 matrix, whatever the model's dtype), so the error it can reach
is of order ``cond(K) * 2**-24``; ``cond(K)`` is reported with it.

(b) ``throughput``: featurize at ``k`` (default 2,048), batch 32, float32, same checkpoints and
batches for both, each warmed up untimed on one small batch; trak-core's projection cache is
cleared before each timed run (generating its matrix is counted). traker: its CPU ``BasicProjector``
(Gaussian, regenerated for every batch) and ``finalize_features`` (the float32 inverse of the
k x k kernel); trak-core: ``featurize`` (the float64 kernel and its Cholesky factor included),
fixed ``lambda_reg``. The best of a few alternating runs (3 for tiny, 2 for mini, 1 for small): on
a shared machine single runs vary by 10-30%.

(c) ``lm``: a tiny ``GPT2LMHeadModel`` (random config), ``task="language_modeling"``, labels the
input ids with -100 at padding, sequences of 32 to 64 tokens padded to 64: featurize throughput in
examples/s and tokens/s (non-padding tokens), at ``k``.

traker drives the model as ``model(input_ids=, token_type_ids=, attention_mask=)`` and needs a
logits tensor back, under ``vmap``. Its model is ``TrakerBert``: the same BERT with eager attention,
given the additive 4-D mask that trak-core's torch backend builds for a dict batch (Hugging Face's
own 2-D mask handling branches on the mask's values, which ``vmap`` cannot follow), returning
``.logits``. So both libraries differentiate the same function.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import tempfile
import time
import warnings

import numpy as np
import torch

from _report import write_json

SUBJECTS = ["the movie", "this film", "the plot", "the acting", "the music", "the ending", "the cast", "the script"]
VERBS = ["was", "is", "felt"]
ADVERBS = ["", "really", "very", "truly"]
POSITIVE = ["great", "wonderful", "brilliant", "fun", "moving", "charming"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "weak", "clumsy"]
VOCAB = {"[PAD]": 0, "[CLS]": 1}
for _word in sorted({w for phrase in SUBJECTS + VERBS + ADVERBS + POSITIVE + NEGATIVE + ["not"]
                     for w in phrase.split()}):
    VOCAB[_word] = len(VOCAB)

BERTS = {"tiny": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
         "mini": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
         "small": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)}
FULL = dict(n_train=1000, n_targets=40, epochs=8, sizes=["tiny", "mini", "small"], k=2048, batch=32,
            checkpoints=dict(tiny=3, mini=3, small=1), repeats=dict(tiny=3, mini=2, small=1),
            lm=dict(n=256, min_length=32, length=64, checkpoints=1))
QUICK = dict(n_train=64, n_targets=8, epochs=10, sizes=["tiny"], k=512, batch=32,
             checkpoints=dict(tiny=1), repeats=dict(tiny=1),
             lm=dict(n=32, min_length=16, length=32, checkpoints=1))
UNIT_ROUNDOFF_32 = 2.0**-24


def reviews(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` distinct template reviews with alternating labels (1 positive, 0 negative)."""
    rng = random.Random(seed)
    texts, labels = [], []
    while len(texts) < n:
        label = len(texts) % 2
        negated = rng.random() < 0.25
        adjective = rng.choice(POSITIVE if label != negated else NEGATIVE)
        adverb = "not" if negated else rng.choice(ADVERBS)
        text = " ".join(w for w in [rng.choice(SUBJECTS), rng.choice(VERBS), adverb, adjective] if w)
        if text not in texts:
            texts.append(text)
            labels.append(label)
    return texts, labels


def tokenize(texts: list[str], labels: list[int]) -> dict:
    """The dict a Hugging Face tokenizer returns (padded to the longest), plus the labels."""
    ids = [[VOCAB["[CLS]"]] + [VOCAB[w] for w in t.split()] for t in texts]
    length = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in ids])
    return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids),
            "attention_mask": (input_ids != 0).long(), "labels": torch.tensor(labels)}


def rows(batch: dict, start: int, stop: int) -> dict:
    return {key: value[start:stop] for key, value in batch.items()}


def batches(data: dict, size: int) -> list[dict]:
    n = data["labels"].shape[0]
    return [rows(data, i, i + size) for i in range(0, n, size)]


def bert_config(size: str, **extra):
    import transformers

    return transformers.BertConfig(vocab_size=len(VOCAB), max_position_embeddings=16, num_labels=2,
                                   **BERTS[size], **extra)


def make_bert(size: str, *, seed: int = 0, attn: str | None = None):
    import transformers

    torch.manual_seed(seed)
    extra = {"attn_implementation": attn} if attn else {}
    return transformers.BertForSequenceClassification(bert_config(size, **extra))


def fine_tune(size: str, train: dict, seed: int, epochs: int, batch_size: int = 20) -> dict:
    """One checkpoint: AdamW from a seeded random init; the float32 state_dict."""
    model = make_bert(size, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    n = train["labels"].shape[0]
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, batch_size):
            loss = model(**{key: value[order[i:i + batch_size]] for key, value in train.items()}).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


class TrakerBert(torch.nn.Module):
    """``model(input_ids, token_type_ids, attention_mask) -> logits``, as traker's text task calls it.

    The 2-D padding mask becomes the additive ``(n, 1, T, T)`` mask (0 keep, the dtype's minimum at
    padding) that trak-core's torch backend gives a BERT; the BERT runs eager attention."""

    def __init__(self, size: str) -> None:
        super().__init__()
        self.bert = make_bert(size, attn="eager")

    def forward(self, input_ids, token_type_ids, attention_mask):
        dtype = next(self.bert.parameters()).dtype
        length = attention_mask.shape[-1]
        keep = attention_mask[:, None, None, :].bool().expand(-1, 1, length, length)
        bias = torch.where(keep, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))
        return self.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=bias).logits


def traker_state(state: dict) -> dict:
    return {f"bert.{key}": value for key, value in state.items()}


def as_tuple(batch: dict) -> tuple:
    """traker's text_classification batch: (input_ids, token_type_ids, attention_mask, labels)."""
    return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["labels"]


def _traker(size: str, n_train: int, save_dir: str, **options):
    from trak import TRAKer

    return TRAKer(model=TrakerBert(size), task="text_classification", train_set_size=n_train, save_dir=save_dir,
                  device="cpu", use_half_precision=False, logging_level=logging.ERROR, **options)


def traker_exact_scores(size: str, states: list[dict], train: list[dict], test: dict, lambda_reg: float
                        ) -> tuple[np.ndarray, list[np.ndarray]]:
    """traker's scores with its NoOpProjector: the ensemble, and each checkpoint's alone."""
    from trak.projectors import NoOpProjector

    n_train = sum(b["labels"].shape[0] for b in train)
    with tempfile.TemporaryDirectory() as save_dir:
        traker = _traker(size, n_train, save_dir, projector=NoOpProjector(device="cpu"), lambda_reg=lambda_reg)
        for c, state in enumerate(states):
            traker.load_checkpoint(traker_state(state), model_id=c)
            for b in train:
                traker.featurize(batch=as_tuple(b), num_samples=b["labels"].shape[0])
        traker.finalize_features()
        n_targets = test["labels"].shape[0]
        for c, state in enumerate(states):
            traker.start_scoring_checkpoint(exp_name="text", checkpoint=traker_state(state), model_id=c,
                                            num_targets=n_targets)
            traker.score(batch=as_tuple(test), num_samples=n_targets)
        ensemble = np.array(traker.finalize_scores(exp_name="text"), dtype=np.float64)
        alone = [np.array(traker.finalize_scores(exp_name="text", model_ids=[c]), dtype=np.float64)
                 for c in range(len(states))]
    return ensemble, alone


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def kernel_facts(features: np.ndarray, lam: float) -> tuple[float, float]:
    """``(cond(K), p * mean |K^-1|)`` of ``K = Phi^T Phi + lam I`` in float64, from the n x n Gram matrix.

    With ``n < p``: the eigenvalues of ``K`` are those of ``Phi Phi^T`` plus ``lam``, and ``lam``; and
    ``K^-1 = (I - Phi^T (Phi Phi^T + lam I)^-1 Phi) / lam`` (Woodbury)."""
    phi = np.asarray(features, dtype=np.float64)
    n, p = phi.shape
    gram = phi @ phi.T
    top = float(np.linalg.eigvalsh(gram)[-1])
    cond = (top + lam) / lam if n < p else (top + lam) / (float(np.linalg.eigvalsh(phi.T @ phi)[0]) + lam)
    inverse = -(phi.T @ np.linalg.solve(gram + lam * np.eye(n), phi))
    inverse[np.diag_indices(p)] += 1.0
    return cond, p * float(np.mean(np.abs(inverse / lam)))


def agreement(size: str, states: list[dict], train: list[dict], test: dict) -> dict:
    """(a): trak-core's exact float64 scores against traker's NoOpProjector scores, up to its per-checkpoint factor."""
    import trak_core

    model = make_bert(size).double()
    states64 = [{key: value.double() for key, value in state.items()} for state in states]
    trak = trak_core.TRAK(model, proj_dim=None, backend="torch", lambda_reg="auto", progress=False)
    start = time.perf_counter()
    for state in states64:
        trak.featurize(state, train)
    lam = float(np.mean(trak.lambdas))
    trak.refit(lam)  # traker has one lambda for every checkpoint
    ours = trak.score([test]).double().numpy()
    ours_alone = [trak.score([test], checkpoints=[c]).double().numpy() for c in range(len(states))]
    ours_seconds = time.perf_counter() - start
    p = trak.store[0].features.shape[1]
    start = time.perf_counter()
    theirs, theirs_alone = traker_exact_scores(size, states, train, test, lam / p)
    traker_seconds = time.perf_counter() - start

    per_checkpoint, predicted, parts = [], [], []
    q = [np.asarray(entry.out_to_loss, dtype=np.float64) for entry in trak.store]
    q_mean = np.mean(q, axis=0)
    for c, (s, t) in enumerate(zip(ours_alone, theirs_alone)):
        cond, factor = kernel_facts(trak.store[c].features.numpy(), lam)
        fitted = float(np.sum(s * t) / np.sum(t * t))
        predicted.append(factor)
        parts.append(s / q[c][:, None] * q_mean[:, None] / len(states))  # checkpoint c's term of the ensemble
        per_checkpoint.append(dict(checkpoint=c, pearson=_pearson(s, t), fitted_scale=fitted, predicted_scale=factor,
                                   rel_error_fitted=_relative_error(fitted * t, s),
                                   rel_error_predicted=_relative_error(factor * t, s), cond_K=cond,
                                   cond_K_times_u32=cond * UNIT_ROUNDOFF_32))
    # the ensemble: traker's = sum_c parts[c] / scale_c; its factors fitted by least squares, or predicted
    design = np.stack([part.ravel() for part in parts], axis=1)
    weights = np.linalg.lstsq(design, theirs.ravel(), rcond=None)[0]
    fitted_ensemble = (design @ weights).reshape(theirs.shape)
    predicted_ensemble = sum(part / factor for part, factor in zip(parts, predicted))
    return dict(part="agreement", model=f"bert-{size}", params=p, n_train=trak.n_train, n_targets=ours.shape[1],
                checkpoints=len(states), lambda_trak_core=lam, lambda_traker=lam / p,
                pearson=_pearson(ours, theirs), fitted_scales=[float(1 / w) for w in weights],
                predicted_scales=predicted, rel_error_fitted=_relative_error(fitted_ensemble, theirs),
                rel_error_predicted=_relative_error(predicted_ensemble, theirs),
                max_cond_K_times_u32=max(r["cond_K_times_u32"] for r in per_checkpoint),
                per_checkpoint=per_checkpoint, trak_core_seconds=ours_seconds, traker_seconds=traker_seconds)


def _featurize_ours(model, states, train, *, k, task="classification") -> float:
    import trak_core
    from trak_core.projection import default_cache

    default_cache.clear()  # count generating the matrix, as a fresh process would
    trak = trak_core.TRAK(model, task=task, proj_dim=k, lambda_reg=1e-3, backend="torch", progress=False)
    start = time.perf_counter()
    for state in states:
        trak.featurize(state, train)
    return time.perf_counter() - start


def _featurize_traker(size, states, train, *, k, batch) -> float:
    n_train = sum(b["labels"].shape[0] for b in train)
    with tempfile.TemporaryDirectory() as save_dir:
        traker = _traker(size, n_train, save_dir, proj_dim=k, projector_seed=0, proj_max_batch_size=batch)
        start = time.perf_counter()
        for c, state in enumerate(states):
            traker.load_checkpoint(traker_state(state), model_id=c)
            for b in train:
                traker.featurize(batch=as_tuple(b), num_samples=b["labels"].shape[0])
        traker.finalize_features()
        return time.perf_counter() - start


def throughput(size: str, states: list[dict], train: list[dict], *, k: int, batch: int, have_traker: bool,
               repeats: int = 1) -> dict:
    """(b): featurize examples/s of trak-core and traker at ``k``: the best of ``repeats`` timed runs each,
    alternating, after a warm-up."""
    model = make_bert(size)
    n = sum(b["labels"].shape[0] for b in train)
    warm = [rows(train[0], 0, 8)]
    _featurize_ours(model, states[:1], warm, k=k)
    if have_traker:
        _featurize_traker(size, states[:1], warm, k=k, batch=8)
    row = dict(part="throughput", model=f"bert-{size}", params=sum(t.numel() for t in model.parameters()),
               n_train=n, checkpoints=len(states), proj_dim=k, batch=batch, threads=torch.get_num_threads(),
               repeats=repeats)
    ours, theirs = [], []
    for _ in range(repeats):
        ours.append(_featurize_ours(model, states, train, k=k))
        if have_traker:
            theirs.append(_featurize_traker(size, states, train, k=k, batch=batch))
    row["trak_core_seconds"] = ours
    row["trak_core_examples_per_s"] = n * len(states) / min(ours)
    if have_traker:
        row["traker_seconds"] = theirs
        row["traker_examples_per_s"] = n * len(states) / min(theirs)
        row["ratio"] = row["trak_core_examples_per_s"] / row["traker_examples_per_s"]
    return row


def lm_data(n: int, min_length: int, length: int, vocab: int, seed: int) -> dict:
    """Random token sequences of ``min_length..length`` tokens padded to ``length`` (pad id 0, labels -100 there)."""
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(1, vocab, (n, length)))
    lengths = torch.as_tensor(rng.integers(min_length, length + 1, n))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def lm_throughput(n: int, min_length: int, length: int, checkpoints: int, *, k: int, batch: int) -> dict:
    """(c): trak-core featurize throughput on a tiny GPT-2 with task="language_modeling"."""
    import transformers

    config = transformers.GPT2Config(vocab_size=512, n_positions=length, n_embd=64, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    states = []
    for c in range(checkpoints):
        torch.manual_seed(c)
        states.append(transformers.GPT2LMHeadModel(config).state_dict())
    data = lm_data(n, min_length, length, 512, seed=0)
    train = batches(data, batch)
    _featurize_ours(model, states[:1], [rows(data, 0, 4)], k=k, task="language_modeling")
    seconds = _featurize_ours(model, states, train, k=k, task="language_modeling")
    tokens = int(data["attention_mask"].sum()) * checkpoints
    predicted = int((data["labels"][:, 1:] != -100).sum()) * checkpoints
    return dict(part="lm", model="gpt2-tiny", params=sum(t.numel() for t in model.parameters()), n_train=n,
                sequence_length=length, min_length=min_length, checkpoints=checkpoints, proj_dim=k, batch=batch,
                threads=torch.get_num_threads(), seconds=seconds, examples_per_s=n * checkpoints / seconds,
                tokens_per_s=tokens / seconds, predicted_tokens_per_s=predicted / seconds)


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (one checkpoint, 64 reviews, k=512)")
    parser.add_argument("--only", choices=["agreement", "throughput", "lm"], action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--proj-dim", type=int, help="k of parts (b) and (c) (default 2048; 512 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(QUICK if args.quick else FULL)
    k = args.proj_dim or settings["k"]
    parts = args.only or ["agreement", "throughput", "lm"]
    have_traker = importlib.util.find_spec("trak") is not None
    if not have_traker:
        print("traker is not installed (pip install traker): parts (a) and (b) run trak-core only")
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "traker")
                if importlib.util.find_spec("trak" if name == "traker" else name)}
    result = dict(mode="quick" if args.quick else "full", date=time.strftime("%Y-%m-%d %H:%M %Z"),
                  load_before=load(), threads=torch.get_num_threads(), cores=os.cpu_count(), versions=versions,
                  rows=[])
    if "agreement" in parts or "throughput" in parts:
        texts, labels = reviews(settings["n_train"] + settings["n_targets"], seed=0)
        n = settings["n_train"]
        train_data, test = tokenize(texts[:n], labels[:n]), tokenize(texts[n:], labels[n:])
        train = batches(train_data, settings["batch"])
        sizes = settings["sizes"] if "throughput" in parts else settings["sizes"][:1]
        checkpoints = {size: [fine_tune(size, train_data, seed, settings["epochs"])
                              for seed in range(settings["checkpoints"][size])] for size in sizes}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if "agreement" in parts and have_traker:
                size = settings["sizes"][0]
                row = agreement(size, checkpoints[size], train, test)
                result["rows"].append(row)
                print(json.dumps({key: value for key, value in row.items() if key != "per_checkpoint"}), flush=True)
            if "throughput" in parts:
                for size in sizes:
                    row = throughput(size, checkpoints[size], train, k=k, batch=settings["batch"],
                                     have_traker=have_traker, repeats=settings["repeats"][size])
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
    if "lm" in parts:
        row = lm_throughput(**settings["lm"], k=k, batch=settings["batch"])
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["load_after"] = load()
    print(f"\n{result['date']}: load average before {result['load_before']}, after {result['load_after']}; "
          f"{result['threads']} torch threads, {result['cores']} cores")
    for row in result["rows"]:
        if row["part"] == "agreement":
            print(f"(a) {row['model']} ({row['params']:,} params, {row['n_train']} train, {row['n_targets']} targets, "
                  f"{row['checkpoints']} checkpoints), no projection, lambda {row['lambda_trak_core']:.4g} "
                  f"(traker {row['lambda_traker']:.3g}):")
            print(f"    {'':<12} {'pearson':>14} {'fitted scale':>13} {'predicted':>10} {'rel err':>9} "
                  f"{'(predicted)':>11} {'cond(K) u32':>12}")
            for c in row["per_checkpoint"]:
                print(f"    checkpoint {c['checkpoint']} {c['pearson']:>14.12f} {c['fitted_scale']:>13.7g} "
                      f"{c['predicted_scale']:>10.7g} {c['rel_error_fitted']:>9.2e} {c['rel_error_predicted']:>11.2e} "
                      f"{c['cond_K_times_u32']:>12.2e}")
            print(f"    {'ensemble':<12} {row['pearson']:>14.12f} {'':>13} {'':>10} {row['rel_error_fitted']:>9.2e} "
                  f"{row['rel_error_predicted']:>11.2e}")
        elif row["part"] == "throughput":
            theirs = row.get("traker_examples_per_s", float("nan"))
            print(f"(b) {row['model']} ({row['params']:,} params) k={row['proj_dim']} batch {row['batch']}, "
                  f"{row['n_train']} x {row['checkpoints']} examples, best of {row['repeats']}: "
                  f"trak-core {row['trak_core_examples_per_s']:.1f} examples/s, traker {theirs:.1f}, "
                  f"ratio {row.get('ratio', float('nan')):.2f}")
        else:
            print(f"(c) {row['model']} ({row['params']:,} params) T={row['min_length']}..{row['sequence_length']} "
                  f"k={row['proj_dim']}: {row['examples_per_s']:.1f} examples/s, {row['tokens_per_s']:.0f} tokens/s "
                  f"({row['predicted_tokens_per_s']:.0f} predicted tokens/s)")
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
