"""What the training-data and checkpoint fingerprints cost, as a share of featurize time (one run).

    python bench/fingerprint_overhead.py [--json out.json]

For the digits MLP (9,610 parameters, 1,000 examples) and a 1.13M-parameter MLP (256 examples),
batches of 32, k = 2,048, torch backend, in memory: the seconds of ``featurize`` over the
checkpoints, and, on the same batches, the seconds of hashing the data alone
(:class:`trak_core.fingerprints.DataFingerprint`, what ``featurize`` does per batch) and of the
checkpoints' parameters (``Backend.parameters_digest``). The share is hashing / featurize; the
target is at most 2%.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _report import write_json
from featurize_vs_traker import SIZES, digits, make_model


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import trak_core
    from trak_core.fingerprints import DataFingerprint
    from trak_core.store import KERNEL_CHUNK_ROWS

    rows = []
    for name, size in SIZES.items():
        model = make_model(size["hidden"], seed=0)
        states = [make_model(size["hidden"], seed=c).state_dict() for c in range(size["checkpoints"])]
        x, y = digits(size["n_train"])
        batches = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(y), args.batch)]

        def featurize() -> None:
            trak = trak_core.TRAK(model, proj_dim=args.proj_dim, lambda_reg=1e-3, backend="torch", progress=False)
            for state in states:
                trak.featurize(state, batches)

        def hash_data() -> None:
            for _ in states:  # featurize hashes the data once per checkpoint
                fingerprint = DataFingerprint(KERNEL_CHUNK_ROWS)
                for inputs, labels in batches:
                    fingerprint.update(inputs, labels)
                fingerprint.finish()

        backend = trak_core.get_backend("torch")

        def hash_parameters() -> None:
            for state in states:
                backend.parameters_digest(backend.prepare(model, state))

        featurize()  # warm-up: torch.func tracing, projection cache
        row = dict(model=name, params=sum(t.numel() for t in model.parameters()), n_train=len(y),
                   checkpoints=len(states), batch=args.batch, proj_dim=args.proj_dim, threads=torch.get_num_threads(),
                   featurize_s=_best(featurize, repeats=1), data_hash_s=_best(hash_data), parameters_hash_s=_best(hash_parameters))
        row["data_share"] = row["data_hash_s"] / row["featurize_s"]
        row["parameters_share"] = row["parameters_hash_s"] / row["featurize_s"]
        rows.append(row)
        print(json.dumps(row))
    return write_json(rows, args.json)


if __name__ == "__main__":
    main()
