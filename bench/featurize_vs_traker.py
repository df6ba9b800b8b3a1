"""Featurize throughput, trak-core's torch backend vs MadryLab's ``traker`` (CPU), in one run.

Same model, checkpoints, data, batch size and projection dimension for both; reports examples
per second for each and the ratio. traker is optional: without it, only trak-core runs.

    python bench/featurize_vs_traker.py                  # digits MLP (9,610 params) and a ~1.1M-param MLP
    python bench/featurize_vs_traker.py --only small     # just the digits MLP
    python bench/featurize_vs_traker.py --json out.json

traker 0.3.2 on CPU is driven with ``device="cpu"`` (a string: a ``torch.device`` takes a GPU-only
path), ``use_half_precision=False`` (its fp16 default is several times slower on CPU) and its
``BasicProjector`` (Gaussian; it regenerates the matrix on every call, so equal batch sizes matter).
Both are warmed up on one small batch first (untimed); trak-core's projection cache is cleared
before each timed run, so generating its matrix is counted. Timed for both: per-example gradients, projection,
out-to-loss weights, and building the kernel (traker: ``finalize_features``; trak-core: inside ``featurize``).
Each row records the date, the versions, torch's thread count and the load average before and after: the ratio
moves with threads and load (digits MLP, one audit: 5.5x with one torch thread, 12.2x with two at load 2-3).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import tempfile
import time

import torch

from _report import load_average, now, write_json

SIZES = {"small": dict(hidden=[128], n_train=1000, checkpoints=2),
         "large": dict(hidden=[1024, 1024], n_train=256, checkpoints=1)}


def make_model(hidden: list[int], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers, width = [], 64
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 10))


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.data[:n] / 16.0, dtype=torch.float32), torch.tensor(data.target[:n])


def run_ours(model, states, x, y, *, k, batch, kind) -> float:
    import trak_core
    from trak_core.projection import default_cache

    default_cache.clear()  # count generating the matrix, as a fresh process would
    trak = trak_core.TRAK(model, proj_dim=k, proj_type=kind, lambda_reg=1e-3, backend="torch", progress=False)
    start = time.perf_counter()
    for state in states:
        trak.featurize(state, [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)])
    return time.perf_counter() - start


def run_traker(model, states, x, y, *, k, batch) -> float:
    from trak import TRAKer

    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(y), save_dir=save_dir,
                        device="cpu", use_half_precision=False, proj_dim=k, projector_seed=0,
                        proj_max_batch_size=batch, logging_level=logging.ERROR)
        start = time.perf_counter()
        for model_id, state in enumerate(states):
            traker.load_checkpoint(state, model_id=model_id)
            for i in range(0, len(y), batch):
                traker.featurize(batch=(x[i:i + batch], y[i:i + batch]), num_samples=len(y[i:i + batch]))
        traker.finalize_features()
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(SIZES))
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    have_traker = importlib.util.find_spec("trak") is not None
    if not have_traker:
        print("traker is not installed (pip install traker): running trak-core only")
    versions = {name: importlib.metadata.version(name) for name in ("torch", "traker")
                if importlib.util.find_spec("trak" if name == "traker" else name)}
    rows = []
    for name, size in SIZES.items():
        if args.only and name != args.only:
            continue
        model = make_model(size["hidden"], seed=0)
        p = sum(t.numel() for t in model.parameters())
        states = [make_model(size["hidden"], seed=c).state_dict() for c in range(size["checkpoints"])]
        x, y = digits(size["n_train"])
        examples = size["n_train"] * size["checkpoints"]
        row = dict(model=name, params=p, n_train=size["n_train"], checkpoints=size["checkpoints"],
                   proj_dim=args.proj_dim, batch=args.batch, threads=torch.get_num_threads(), date=now(),
                   load_before=load_average(), versions=versions)
        kinds = ["rademacher", "gaussian"] if name == "small" else ["rademacher"]
        # warm up both libraries (torch.func tracing, thread pools) on one small batch, untimed
        run_ours(model, states[:1], x[:8], y[:8], k=args.proj_dim, batch=8, kind="rademacher")
        if have_traker:
            run_traker(model, states[:1], x[:8], y[:8], k=args.proj_dim, batch=8)
        for kind in kinds:
            seconds = run_ours(model, states, x, y, k=args.proj_dim, batch=args.batch, kind=kind)
            row[f"trak_core_{kind}_examples_per_s"] = examples / seconds
        if have_traker:
            seconds = run_traker(model, states, x, y, k=args.proj_dim, batch=args.batch)
            row["traker_examples_per_s"] = examples / seconds
            for kind in kinds:
                row[f"ratio_{kind}_vs_traker"] = row[f"trak_core_{kind}_examples_per_s"] / row["traker_examples_per_s"]
        row["load_after"] = load_average()
        rows.append(row)
        print(json.dumps(row))
    print(f"\ntorch {versions.get('torch')}, traker {versions.get('traker', '-')}, {torch.get_num_threads()} torch "
          "threads (the ratio moves with them and with the load: read it within one run)")
    print(f"{'model':<7} {'params':>9} {'trak-core ex/s':>15} {'traker ex/s':>12} {'ratio':>7}  load average")
    for row in rows:
        ours = row["trak_core_rademacher_examples_per_s"]
        theirs = row.get("traker_examples_per_s", float("nan"))
        print(f"{row['model']:<7} {row['params']:>9} {ours:>15.1f} {theirs:>12.1f} {ours / theirs:>7.2f}  "
              f"{row['load_before']} before, {row['load_after']} after")
    return write_json(rows, args.json)


if __name__ == "__main__":
    main()
