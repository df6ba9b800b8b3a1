"""trak-core's and traker's projected scores on the same checkpoint: how closely two random projections agree.

    python bench/traker_projected.py                        # digits MLP 64-64-10 (4,810 params), 1,000 train, k = 2,048
    python bench/traker_projected.py --hidden 16 --n-train 300 --seeds 0 1 2 --json out.json

One checkpoint of bench/quality/tasks.py's digits MLP (``--hidden`` units, tanh; full-batch SGD, seed 0) on the first
``--n-train`` of its shuffled digits, 100 targets. Three score matrices, all at one ridge: trak-core's exact scores
(``proj_dim=None``, ``lambda_reg="auto"``: that lambda is used for the other two), trak-core projected
(``proj_dim=k``, Rademacher, ``seed``) and traker 0.3.2 projected (CPU ``BasicProjector``, Gaussian,
``projector_seed=seed``, float32, ridge ``lambda * k / p`` in its units: ``docs/traker.md``). Pearson correlations of
the whole ``(n_train, n_targets)`` matrices (traker's carry one positive factor, which Pearson ignores) and the mean of
the per-target ones, for each ``--seeds`` value; the line under the table gives their range. The two libraries draw
other random matrices, so the projected pair agrees only as two projections do. Prints the machine, the versions and
the load average before and after.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "quality"))
sys.path.insert(0, str(HERE))

from _report import describe, facts, load_average, now, write_json  # noqa: E402


def pearson(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson of the flattened matrices and the mean over targets (columns) of the per-target ones."""
    whole = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    per_target = float(np.mean([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])]))
    return whole, per_target


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP 64-H-10")
    parser.add_argument("--n-train", type=int, default=1000, help="training digits (100 targets after them)")
    parser.add_argument("--k", type=int, default=2048, help="projection dimension of both libraries")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="projection seeds (both libraries)")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)

    import torch
    from sklearn.datasets import load_digits

    import trak_core
    from peers import _loader, run_traker
    from tasks import _split, _torch_task

    date, load_before, start = now(), load_average(), time.perf_counter()
    d = load_digits()
    x, y, xt, yt = _split(d.data / 16.0, d.target.astype(np.int64), args.n_train, 100)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(64, args.hidden), torch.nn.Tanh(),  # noqa: E731
                                       torch.nn.Linear(args.hidden, 10))
    task = _torch_task("digits-mlp", x, y, xt, yt, make, 200, 0.1, "")
    checkpoint = task.train(x, y, 0)
    p = sum(w.numel() for w in task.model.parameters())

    def trak_core_scores(k: int | None, lam: float | str, seed: int) -> tuple[np.ndarray, float]:
        trak = trak_core.TRAK(task.model, task="classification", proj_dim=k, backend="torch", seed=seed,
                              lambda_reg=lam, progress=False)
        trak.featurize(checkpoint, _loader(x, y, 100))
        return trak.score(_loader(xt, yt, 100)).double().numpy(), float(trak.lambdas[0])

    exact, lam = trak_core_scores(None, "auto", 0)
    rows = []
    for seed in args.seeds:
        ours, _ = trak_core_scores(args.k, lam, seed)
        theirs = run_traker(task.model, [checkpoint], (x, y, xt, yt), k=args.k, batch=100, half=False,
                            lambda_reg=lam * args.k / p, seed=seed)
        pairs = {"trak_core_vs_traker": (ours, theirs), "trak_core_vs_exact": (ours, exact),
                 "traker_vs_exact": (theirs, exact)}
        row = {"seed": seed}
        for name, (a, b) in pairs.items():
            row[name], row[name + "_per_target"] = pearson(a, b)
        rows.append(row)
    machine = dict(facts(), load_before=load_before)
    result = dict(date=date, command=" ".join(["python bench/traker_projected.py", *(argv or sys.argv[1:])]),
                  hidden=args.hidden, p=p, n_train=args.n_train, n_targets=100, k=args.k, lambda_reg=lam,
                  seconds=round(time.perf_counter() - start, 1), machine=machine, rows=rows)
    print(f"digits MLP 64-{args.hidden}-10 (p = {p:,}), {args.n_train} train x 100 targets, one checkpoint, "
          f"k = {args.k}, lambda = {lam:.4g} (trak-core's auto, exact features; traker: lambda * k / p); {date}")
    print(describe(machine))
    print("Pearson, whole matrix (mean per target)")
    print(f"{'seed':>4}  {'trak-core vs traker':>20}  {'trak-core vs exact':>20}  {'traker vs exact':>20}")
    for r in rows:
        print(f"{r['seed']:>4}  " + "  ".join(f"{r[n]:>10.4f} ({r[n + '_per_target']:.4f})" for n in
                                              ("trak_core_vs_traker", "trak_core_vs_exact", "traker_vs_exact")))
    if len(rows) > 1:
        print("range: " + "; ".join(f"{n.replace('_', ' ')} {min(r[n] for r in rows):.4f} to "
                                    f"{max(r[n] for r in rows):.4f}" for n in
                                    ("trak_core_vs_traker", "trak_core_vs_exact", "traker_vs_exact")))
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
