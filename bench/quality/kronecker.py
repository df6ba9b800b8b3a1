"""LDS of the factorized projection (``proj_type="kronecker"``) against dense Rademacher at equal k.

    python bench/quality/kronecker.py                       # the torch tasks, k in {512, 2048}, M in {1, 5, 10}
    python bench/quality/kronecker.py --json docs/bench/quality_kronecker.json

Same tasks, checkpoints and ground truth (cached in ``bench/quality/cache``) as ``run.py``, trak-core's
defaults (``lambda_reg="auto"``) for both projections. Only tasks with a torch model have layers to
factorize (the NumPy-backend tasks are left out: their backend has no factorized path).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import trak_core  # noqa: E402
from ground_truth import ground_truth  # noqa: E402
from run import _batches, _lds, _numpy  # noqa: E402
from tasks import TASKS  # noqa: E402
from trak_core._progress import progress  # noqa: E402


def compare(task, masks, outputs, checkpoints, k, ms):
    rows, xt = [], _batches(task, task.xt, task.yt)
    for proj_type in ("rademacher", "kronecker"):
        trak = trak_core.TRAK(task.model, task=task.task, proj_dim=k, proj_type=proj_type, backend=task.backend,
                              seed=0, progress=False)
        for checkpoint in checkpoints:
            trak.featurize(checkpoint, _batches(task, task.x, task.y))
        for m in ms:
            result = _lds(_numpy(trak.score(xt, checkpoints=list(range(m)))), masks, outputs)
            rows.append(dict(task=task.name, k=k, M=m, proj_type=proj_type, lds=result.mean, sem=result.sem))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=[n for n in TASKS if TASKS[n]().backend == "torch"],
                        choices=list(TASKS), help="tasks of bench/quality/tasks.py (an unknown name was a KeyError "
                                                  "after the tasks before it)")
    parser.add_argument("--ks", nargs="*", type=int, default=[512, 2048])
    parser.add_argument("--ms", nargs="*", type=int, default=[1, 5, 10])
    parser.add_argument("--subsets", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = []
    for name in args.tasks:
        task = TASKS[name]()
        masks, outputs = ground_truth(task, args.subsets,
                                      progress=lambda it, desc: progress(it, desc=desc, enabled=True))
        x, y = task.arrays(task.x, task.y)
        checkpoints = [task.train(x, y, c) for c in range(max(args.ms))]
        for k in args.ks:
            rows += compare(task, masks, outputs, checkpoints, k, args.ms)
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'task':<14} {'k':>5} {'M':>3} {'dense':>16} {'kronecker':>16} {'gap':>7}")
    table = {(r["task"], r["k"], r["M"], r["proj_type"]): r for r in rows}
    for (name, k, m, kind), r in table.items():
        if kind == "kronecker":
            d = table[(name, k, m, "rademacher")]
            print(f"{name:<14} {k:>5} {m:>3} {d['lds']:>8.3f} +- {d['sem']:.3f} {r['lds']:>8.3f} +- {r['sem']:.3f} "
                  f"{r['lds'] - d['lds']:>+7.3f}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # a missing folder failed last
        pathlib.Path(args.json).write_text(json.dumps(dict(rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
