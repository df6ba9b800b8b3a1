"""How the automatic ridge rule was chosen: LDS against lambda for each candidate rule and task.

    python bench/quality/select_lambda.py [--json out.json]

For every task of the suite (M = 10 checkpoints, k in {512, 2048}) the kernel of each checkpoint
is eigendecomposed once, so scores for any lambda cost one small product. Each candidate rule sets
``lambda_c = alpha * scale(K_c)``; for each rule the script reports, over a fine grid of alpha,
the worst shortfall from the best LDS found on any grid (the regret), across all tasks and k.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import trak_core  # noqa: E402
from ground_truth import ground_truth  # noqa: E402
from tasks import TASKS  # noqa: E402

ALPHAS = [10.0 ** (e / 4) for e in range(-16, 17)]  # 1e-4 .. 1e4, four points a decade


def scales(kernel: np.ndarray, n: int, p: int) -> dict[str, float]:
    trace = float(np.trace(kernel))
    k = kernel.shape[0]
    return {"mean": trace / k, "mean_rank": trace / min(n, p, k), "top_weighted": float((kernel**2).sum()) / trace}


def decomposed(task, k: int, m: int):
    """Per checkpoint: eigenvalues, Phi V, V^T phi_t^T, Q, scales."""
    x, y = task.arrays(task.x, task.y)
    trak = trak_core.TRAK(task.model, task=task.task, proj_dim=k, backend=task.backend, progress=False)
    for c in range(m):
        trak.featurize(task.train(x, y, c), [task.arrays(task.x, task.y)])
    xt, yt = task.arrays(task.xt, task.yt)
    parts = []
    for entry in trak.store:
        kernel = np.asarray(entry.kernel.cpu() if hasattr(entry.kernel, "cpu") else entry.kernel, dtype=np.float64)
        phi = np.asarray(entry.features.cpu() if hasattr(entry.features, "cpu") else entry.features, dtype=np.float64)
        target = trak.features([(xt, yt)], checkpoint=entry.index)
        target = np.asarray(target.cpu() if hasattr(target, "cpu") else target, dtype=np.float64)
        q = np.asarray(entry.out_to_loss.cpu() if hasattr(entry.out_to_loss, "cpu") else entry.out_to_loss,
                       dtype=np.float64)
        values, vectors = np.linalg.eigh(kernel)
        parts.append(dict(values=np.maximum(values, 0), left=phi @ vectors, right=vectors.T @ target.T, q=q,
                          scales=scales(kernel, len(task.y), entry.n_params)))
    return parts


def lds_for(parts, masks, outputs, rule: str, alpha: float) -> float:
    total, weight = 0.0, 0.0
    for part in parts:
        lam = alpha * part["scales"][rule]
        total = total + part["left"] @ (part["right"] / (part["values"] + lam)[:, None])
        weight = weight + part["q"]
    return trak_core.lds(total * weight[:, None], masks, outputs).mean


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                        help="tasks of bench/quality/tasks.py (an unknown name was a KeyError after the tasks "
                             "before it)")
    parser.add_argument("--ks", nargs="*", type=int, default=[512, 2048])
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    curves = {}
    for name in args.tasks:
        task = TASKS[name]()
        masks, outputs = ground_truth(task)
        for k in args.ks:
            parts = decomposed(task, k, args.checkpoints)
            for rule in ("mean", "mean_rank", "top_weighted"):
                curves[name, k, rule] = [lds_for(parts, masks, outputs, rule, a) for a in ALPHAS]
            print(f"{name} k={k}: best LDS {max(max(curves[name, k, r]) for r in ('mean',)):.3f}", file=sys.stderr)
    best = {(t, k): max(max(v) for (t2, k2, _), v in curves.items() if (t2, k2) == (t, k)) for t, k, _ in curves}
    report = {}
    for rule in ("mean", "mean_rank", "top_weighted"):
        regret = [max(best[t, k] - curves[t, k, rule][i] for t, k, r in curves if r == rule)
                  for i in range(len(ALPHAS))]
        i = int(np.argmin(regret))
        report[rule] = dict(alpha=ALPHAS[i], worst_regret=regret[i],
                            per_task={f"{t} k={k}": curves[t, k, rule][i] - best[t, k]
                                      for t, k, r in curves if r == rule})
        print(f"rule {rule:<13} best alpha {ALPHAS[i]:.3g}: worst shortfall from the best LDS {regret[i]:.3f}")
        for key, value in report[rule]["per_task"].items():
            print(f"    {key:<28} {value:+.3f}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # a missing folder failed last
        pathlib.Path(args.json).write_text(json.dumps(dict(
            alphas=ALPHAS, curves={f"{t}|{k}|{r}": v for (t, k, r), v in curves.items()},
            best={f"{t}|{k}": v for (t, k), v in best.items()}, report=report), indent=1))
    return report


if __name__ == "__main__":
    main()
