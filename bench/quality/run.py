"""LDS of trak-core's defaults and alternatives on the task suite, in one command.

    python bench/quality/run.py                      # every task, M in {1, 5, 10}, k in {512, 2048}
    python bench/quality/run.py --tasks digits-mlp --json out.json

Ground truth (128 models retrained on random halves per task) is computed once and cached in
``bench/quality/cache``. Methods: trak-core defaults (``lambda_reg="auto"``), ``lambda = 0``,
the best ``lambda`` of a 9-point log grid chosen with the ground truth (``lambda = 10**e`` times the
automatic rule's spectral scale, e in -4..4), a gradient dot product (projected, TracIn-style), the levers
(soft-thresholding, unit-normalized features, normalized checkpoint weighting), and, when
installed, traker at its defaults (digits-mlp only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(1, str(pathlib.Path(__file__).resolve().parents[1]))  # bench/, for peers.run_traker

import trak_core  # noqa: E402
from ground_truth import ground_truth  # noqa: E402
from tasks import TASKS  # noqa: E402
from trak_core._progress import progress  # noqa: E402
from trak_core.regularization import AUTO_RULE, RULES  # noqa: E402

GRID = [10.0**e for e in range(-4, 5)]


def _batches(task, x, y, size=250):
    return [task.arrays(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]


def _numpy(a):
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def _gradient_dot(trak, task, checkpoints):
    total = 0.0
    for c in checkpoints:
        target = trak.features([task.arrays(task.xt, task.yt)], checkpoint=c)
        total = total + _numpy(trak.store[c].features) @ _numpy(target).T
    return total


def _lds(scores, masks, outputs):
    return trak_core.lds(np.asarray(scores, dtype=np.float64), masks, outputs)


def evaluate(task, masks, outputs, checkpoints, k, ms, rows, timing):
    xt_batches = _batches(task, task.xt, task.yt)
    trak = trak_core.TRAK(task.model, task=task.task, proj_dim=k, backend=task.backend, seed=0, progress=False)
    start = time.perf_counter()
    for checkpoint in checkpoints:
        trak.featurize(checkpoint, _batches(task, task.x, task.y))
    featurize = time.perf_counter() - start
    kernels = [entry.kernel for entry in trak.store]  # entries hold only the factor: read each kernel once
    start = time.perf_counter()
    for entry, kernel in zip(trak.store, kernels):
        trak_core.regularization.choose_lambda(kernel, len(task.y), n_params=entry.n_params,
                                               xp=trak_core._namespace.namespace(kernel))
    timing.append(dict(task=task.name, k=k, checkpoints=len(checkpoints), featurize_s=featurize,
                       choose_lambda_s=time.perf_counter() - start))

    def add(method, m, scores, **extra):
        result = _lds(scores, masks, outputs)
        rows.append(dict(task=task.name, k=k, M=m, method=method, lds=result.mean, sem=result.sem, **extra))

    for m in ms:
        chosen = list(range(m))
        trak.refit("auto")
        add("trak-core defaults", m, _numpy(trak.score(xt_batches, checkpoints=chosen)),
            lambdas=[float(v) for v in trak.lambdas[:m]])
        for name, options in (("soft-threshold 0.5", dict(soft_threshold=0.5)),
                              ("normalized checkpoint weighting", dict(checkpoint_weighting="normalized"))):
            for key, value in options.items():
                setattr(trak, key, value)
            add(f"defaults + {name}", m, _numpy(trak.score(xt_batches, checkpoints=chosen)))
            trak.soft_threshold, trak.checkpoint_weighting = None, "uniform"
        trak.refit(0.0)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            add("lambda = 0", m, _numpy(trak.score(xt_batches, checkpoints=chosen)))
        for rule in (AUTO_RULE,):  # the rule comparison is select_lambda.py's job
            for alpha in GRID:
                for entry, kernel in zip(trak.store, kernels):
                    xp = trak_core._namespace.namespace(kernel)
                    scale = RULES[rule](kernel, len(task.y), entry.n_params, xp=xp, dim=k)
                    entry.factor = trak_core.kernel.factorize(kernel, alpha * scale, xp=xp, space=entry.factor.space)
                add(f"grid {rule}", m, _numpy(trak.score(xt_batches, checkpoints=chosen)), alpha=alpha)
        add("gradient dot", m, _gradient_dot(trak, task, chosen))
    # unit-normalized features need their own featurization
    normalized = trak_core.TRAK(task.model, task=task.task, proj_dim=k, backend=task.backend, seed=0,
                                progress=False, normalize_features=True)
    for checkpoint in checkpoints[:max(ms)]:
        normalized.featurize(checkpoint, _batches(task, task.x, task.y))
    for m in ms:
        add("defaults + unit-normalized features", m,
            _numpy(normalized.score(xt_batches, checkpoints=list(range(m)))))


def traker_rows(task, masks, outputs, checkpoints, k, ms, rows):
    """traker 0.3.2 at its defaults (lambda_reg=0, fp16 store; CPU: Gaussian BasicProjector)."""
    from peers import run_traker  # the one traker driver of the benchmarks

    for m in ms:
        scores = run_traker(task.model, checkpoints[:m], (task.x, task.y, task.xt, task.yt), k=k, batch=50)
        result = _lds(np.nan_to_num(scores), masks, outputs)
        rows.append(dict(task=task.name, k=k, M=m, method="traker defaults", lds=result.mean, sem=result.sem))


def summarize(rows):
    best = {}
    for row in rows:
        if row["method"].startswith("grid"):
            key = (row["task"], row["k"], row["M"], row["method"])
            if key not in best or row["lds"] > best[key]["lds"]:
                best[key] = row
    summary = [r for r in rows if not r["method"].startswith("grid")]
    summary += [dict(b, method=f"best {b['method']} (alpha={b['alpha']:g})") for b in best.values()]
    return sorted(summary, key=lambda r: (r["task"], r["k"], r["M"], r["method"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS),
                        help="tasks of bench/quality/tasks.py (an unknown name was a KeyError after the tasks "
                             "before it)")
    parser.add_argument("--ks", nargs="*", type=int, default=[512, 2048])
    parser.add_argument("--ms", nargs="*", type=int, default=[1, 5, 10])
    parser.add_argument("--subsets", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows, timing = [], []
    for name in args.tasks:
        task = TASKS[name]()
        masks, outputs = ground_truth(task, args.subsets,
                                      progress=lambda it, desc: progress(it, desc=desc, enabled=True))
        x, y = task.arrays(task.x, task.y)
        checkpoints = [task.train(x, y, c) for c in range(max(args.ms))]
        for k in args.ks:
            evaluate(task, masks, outputs, checkpoints, k, args.ms, rows, timing)
            if task.backend == "torch" and task.name == "digits-mlp" and importlib.util.find_spec("trak"):
                traker_rows(task, masks, outputs, checkpoints, k, args.ms, rows)
        print(f"{task.name}: done", file=sys.stderr)
    summary = summarize(rows)
    print(f"{'task':<22} {'k':>5} {'M':>3}  {'method':<46} {'LDS':>14}")
    for r in summary:
        print(f"{r['task']:<22} {r['k']:>5} {r['M']:>3}  {r['method']:<46} {r['lds']:>7.3f} +- {r['sem']:.3f}")
    for t in timing:
        print(f"{t['task']}: k={t['k']} featurize {t['featurize_s']:.2f} s, "
              f"choosing lambda {t['choose_lambda_s']*1000:.1f} ms "
              f"({100 * t['choose_lambda_s'] / t['featurize_s']:.2f}%)")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # a missing folder failed last
        pathlib.Path(args.json).write_text(json.dumps(dict(rows=rows, summary=summary, timing=timing), indent=1))
    return summary, rows, timing


if __name__ == "__main__":
    main()
