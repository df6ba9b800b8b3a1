"""trak-core next to traker and dattri on the same checkpoints, data and ground truth, in one command.

Examples
--------
    python bench/peers.py       # M in {1, 2, 5, 10}, k = 2048: docs/bench/peers.json and docs/bench/peers.md
    python bench/peers.py --ms 1 5 --k 512 --libraries trak-core dattri   # bench/results/peers.{json,md}
    python bench/peers.py --ms 1 5 --k 512 --libraries trak-core dattri --json out.json --md out.md
    python bench/peers.py --task digits-mlp-1m --ms 10 --libraries trak-core traker-fp32 --json out.json --md out.md

Notes
-----
Task ``digits-mlp`` of ``bench/quality/tasks.py`` (MLP 64-64-10, 4,810 parameters, 1,000 training digits, 100
targets); LDS (mean and sem over targets) against its 128 retrained models (``ground_truth.py``, cached). ``--task
digits-mlp-1m``: an MLP 64-1024-1024-10 (1,126,410 parameters) on 200 training digits and 100 targets, for speed
and memory only (no ground truth: LDS is not computed). The parent trains checkpoints with seeds ``0..max(M)-1``
once and saves them; each (variant, M) runs in a fresh ``--child`` process that loads them, runs once on one
checkpoint untimed (warm-up), times featurizing ``M`` checkpoints plus scoring the targets (wall clock, batch 100,
torch threads at their default) and saves the scores for the parent. Memory: the child's ``ru_maxrss`` at the end
(peak) and right after its imports (torch, sklearn and the task's data, the library's modules). Each row's seconds
over trak-core's at the same M (``x_trak_core``; above 1: slower) are taken within the run, whose date and load
average (before and after) the JSON's ``machine`` and the table's caption give.

Variants (``id`` in the JSON): ``trak-core`` at its defaults (``TRAK(proj_dim=k, backend="torch")``:
Rademacher, ``lambda_reg="auto"``); ``trak-core-kernel64`` the same with the float64 reference kernel
(``kernel_dtype="float64"``; the default, ``"auto"``, makes a float32 kernel from float32 features);
``trak-core-kronecker`` the factorized projection (``proj_type="kronecker"``, ``docs/kronecker.md``): another
estimator, for large models. ``traker`` 0.3.2 at its CPU defaults (Gaussian ``BasicProjector``,
``lambda_reg=0``, fp16 store) and ``traker-fp32`` (``use_half_precision=False``); non-finite scores are
set to 0, with a note. ``dattri`` 0.3.0 ``TRAKAttributor`` with its CPU projector (Gaussian) and default
``regularization=0``; target: the margin ``log p - log(1 - p)`` of dattri's examples, written as
``logit_y - logsumexp(other logits)`` (equal, and finite when ``p`` rounds to 1); correct-class
probability ``p`` as in its examples. With ``k > n_train`` a zero ridge leaves the kernel singular, so
``traker-ridge`` and ``dattri-ridge`` repeat their defaults with trak-core's automatic lambda (mean over
the ``M`` checkpoints) in their units: both divide gradients by ``sqrt(n_params)`` and traker does not
scale its projection by ``1/sqrt(k)``, hence ``lambda * k / n_params`` and ``lambda / n_params``.

Warnings
--------
One timed run per cell: on a shared machine read seconds to ~10-20%. ``ru_maxrss`` counts the whole
process (torch's first autograd call alone takes ~100 MB), so a few MB are noise; after ``exec`` Linux
keeps the launcher's peak in ``ru_maxrss``, so the child forks once and measures in the fork. traker
writes its features to a temporary directory, inside its timed run.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "quality"))
sys.path.insert(0, str(HERE))

from _report import cpu, load_average, now, write_json  # noqa: E402

Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x, y, xt, yt


def _loader(x: np.ndarray, y: np.ndarray, batch: int) -> list[tuple[Any, Any]]:
    import torch

    return [(torch.as_tensor(x[i:i + batch], dtype=torch.float32), torch.as_tensor(y[i:i + batch]))
            for i in range(0, len(y), batch)]


def run_trak_core(model: Any, checkpoints: list[dict], data: Data, *, k: int | None, batch: int,
                  lambda_reg: float | str = "auto", kernel_dtype: str = "auto",
                  proj_type: str = "rademacher") -> np.ndarray:
    """trak-core scores ``(n_train, n_targets)``: featurize every checkpoint, then score."""
    import trak_core

    x, y, xt, yt = data
    trak = trak_core.TRAK(model, task="classification", proj_dim=k, backend="torch", seed=0,
                          lambda_reg=lambda_reg, kernel_dtype=kernel_dtype, proj_type=proj_type,
                          progress=False)
    for state in checkpoints:
        trak.featurize(state, _loader(x, y, batch))
    return trak.score(_loader(xt, yt, batch)).double().numpy()


def run_traker(model: Any, checkpoints: list[dict], data: Data, *, k: int | None, batch: int,
               half: bool = True, lambda_reg: float = 0.0, seed: int = 0) -> np.ndarray:
    """traker scores on CPU; ``k=None`` swaps in its ``NoOpProjector`` (exact gradients); ``seed``: its
    ``projector_seed``."""
    import logging

    from trak import TRAKer
    from trak.projectors import NoOpProjector

    x, y, xt, yt = data
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(y), save_dir=save_dir,
                        device="cpu", proj_dim=k or 0, projector=None if k else NoOpProjector(device="cpu"),
                        use_half_precision=half, lambda_reg=lambda_reg, projector_seed=seed,
                        logging_level=logging.ERROR)
        for c, state in enumerate(checkpoints):
            traker.load_checkpoint(state, model_id=c)
            for inputs, labels in _loader(x, y, batch):
                traker.featurize(batch=(inputs, labels), num_samples=len(labels))
        traker.finalize_features()
        for c, state in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="peers", checkpoint=state, model_id=c, num_targets=len(yt))
            for inputs, labels in _loader(xt, yt, batch):
                traker.score(batch=(inputs, labels), num_samples=len(labels))
        return np.asarray(traker.finalize_scores(exp_name="peers"), dtype=np.float64)


def run_dattri(model: Any, checkpoints: list[dict], data: Data, *, k: int | None, batch: int,
               regularization: float = 0.0) -> np.ndarray:
    """dattri's TRAKAttributor scores; ``k=None`` uses its ``"identity"`` projection (exact gradients)."""
    import torch
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    def logits_and_label(params, pair):  # one example (dattri vmaps over the batch); no data-dependent indexing
        out = torch.func.functional_call(model, params, (pair[0].unsqueeze(0),))[0]
        return out, torch.arange(out.shape[0]) == pair[1]

    def margin(params, pair):
        out, label = logits_and_label(params, pair)
        return torch.where(label, out, 0.0).sum() - torch.logsumexp(torch.where(label, -torch.inf, out), 0)

    def probability(params, pair):
        out, label = logits_and_label(params, pair)
        return torch.where(label, torch.softmax(out, 0), 0.0).sum()

    x, y, xt, yt = (torch.as_tensor(a) for a in data)
    task = AttributionTask(loss_func=margin, model=model, checkpoints=list(checkpoints))
    projector = {"device": "cpu", "proj_seed": 0, "proj_max_batch_size": 32,  # all keys: dattri keeps them globally
                 "proj_dim": k or sum(p.numel() for p in model.parameters()),
                 "proj_type": "normal" if k else "identity"}
    attributor = TRAKAttributor(task=task, correct_probability_func=probability, device="cpu",
                                projector_kwargs=projector, regularization=regularization)
    with torch.no_grad():
        attributor.cache(DataLoader(TensorDataset(x.float(), y), batch_size=batch, shuffle=False))
        return attributor.attribute(DataLoader(TensorDataset(xt.float(), yt), batch_size=batch)).double().numpy()


def _variants(k: int, ridge: float, n_params: int) -> dict[str, tuple]:
    """id -> (modules its runner imports, distribution, runner, options, settings); ridge in trak-core's units."""
    traker_ridge, dattri_ridge = ridge * k / n_params, ridge / n_params
    ours, traker = ("trak_core", "trak_torch"), ("trak", "trak.projectors")
    dattri = ("dattri.algorithm.trak", "dattri.task", "torch.utils.data")
    return {"trak-core": (ours, "trak-core", run_trak_core, {}, "Rademacher, lambda=auto"),
            "trak-core-kernel64": (ours, "trak-core", run_trak_core, {"kernel_dtype": "float64"},
                                   "Rademacher, lambda=auto, kernel_dtype=float64"),
            "trak-core-kronecker": (ours, "trak-core", run_trak_core, {"proj_type": "kronecker"},
                                    "factorized (proj_type=kronecker), lambda=auto"),
            "traker": (traker, "traker", run_traker, {}, "Gaussian, lambda=0, fp16"),
            "traker-fp32": (traker, "traker", run_traker, {"half": False}, "Gaussian, lambda=0, fp32"),
            "traker-ridge": (traker, "traker", run_traker, {"lambda_reg": traker_ridge},
                             "Gaussian, lambda=trak-core's auto x k/p, fp16"),
            "dattri": (dattri, "dattri", run_dattri, {}, "Gaussian, regularization=0"),
            "dattri-ridge": (dattri, "dattri", run_dattri, {"regularization": dattri_ridge},
                             "Gaussian, regularization=trak-core's auto / p")}


VARIANTS = list(_variants(1, 0.0, 1))


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def _task(name: str) -> Any:
    from tasks import SPEED_TASKS, TASKS

    return {**TASKS, **SPEED_TASKS}[name]()


def dense_product_seconds(rows: int, p: int, k: int) -> float:
    """Seconds of the float32 products ``(rows x p) @ (p x k)`` alone: the projection's flops with its matrix in
    memory and nothing else (no gradients, no making or unpacking of the matrix, no kernel).

    Rows go in trak-core's projection groups (``projection_group_rows``); one group is timed after a warm-up
    and scaled to ``rows``. ``p`` is covered in blocks of up to 8,192 rows of one random matrix reused for every
    block, accumulated in place, so a 1M-parameter model needs 64 MiB of matrix, not 9 GB.
    """
    import torch

    from trak_core._checks import projection_group_rows

    group = min(rows, projection_group_rows(p, 4, k))
    block = min(p, 8192)
    x, matrix = torch.randn(group, p), torch.randn(block, k)
    out = torch.zeros(group, k)

    def one_group() -> None:
        for start in range(0, p, block):
            stop = min(p, start + block)
            out.addmm_(x[:, start:stop], matrix[:stop - start])

    one_group()
    start = time.perf_counter()
    one_group()
    return (time.perf_counter() - start) * rows / group


def child(variant: str, m: int, k: int, batch: int, ridge: float, checkpoints_path: str, scores_path: str,
          task_name: str = "digits-mlp") -> dict:
    """One (variant, M) cell in this process: warm up, time featurize + score, save the scores."""
    import torch

    task = _task(task_name)
    n_params = sum(p.numel() for p in task.model.parameters())
    modules, dist, runner, options, settings = _variants(k, ridge, n_params)[variant]
    for module in modules:
        importlib.import_module(module)
    import_rss = _maxrss_mb()
    checkpoints = torch.load(checkpoints_path)[:m]
    data = (task.x, task.y, task.xt, task.yt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner(task.model, checkpoints[:1], data, k=k, batch=batch, **options)  # warm-up, untimed
        if dist == "trak-core":
            from trak_core.projection import default_cache

            default_cache.clear()  # count generating the matrix: traker and dattri do it on every batch
        start = time.perf_counter()
        scores = runner(task.model, checkpoints, data, k=k, batch=batch, **options)
        seconds = time.perf_counter() - start
    np.save(scores_path, scores)
    peak = _maxrss_mb()  # before the products below allocate
    ridge = options.get("lambda_reg", options.get("regularization", "auto" if dist == "trak-core" else 0.0))
    row = {"id": variant, "library": dist, "version": importlib.metadata.version(dist), "M": m, "k": k,
           "settings": f"k={k}, {settings}", "lambda": ridge, "seconds": seconds, "peak_rss_mb": peak,
           "import_rss_mb": import_rss}
    if dist == "trak-core" and options.get("proj_type", "rademacher") == "rademacher":
        row["dense_product_seconds"] = dense_product_seconds(m * (len(task.y) + len(task.yt)), n_params, k)
    return row


def measure(variants: list[str], ms: list[int], k: int, batch: int, masks: np.ndarray | None,
            outputs: np.ndarray | None, task_name: str = "digits-mlp") -> list[dict]:
    """Rows of (variant, M): train ``max(ms)`` checkpoints, run each cell in a fresh process, add LDS
    (unless ``masks`` is ``None``)."""
    import torch

    import trak_core

    specs = _variants(k, 0.0, 1)
    missing = {v for v in variants if importlib.util.find_spec(specs[v][0][0].split(".")[0]) is None}
    for dist in sorted({specs[v][1] for v in missing}):
        print(f"{dist} not installed: pip install {dist}")
    if not (variants := [v for v in variants if v not in missing]):
        return []
    task = _task(task_name)
    checkpoints = [task.train(*task.arrays(task.x, task.y), seed) for seed in range(max(ms))]
    lambdas = []
    if any(v.endswith("-ridge") for v in variants):  # trak-core's automatic lambda per checkpoint
        trak = trak_core.TRAK(task.model, proj_dim=k, backend="torch", seed=0, progress=False)
        for state in checkpoints:
            trak.featurize(state, _loader(task.x, task.y, batch))
        lambdas = trak.lambdas
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the parent's imports
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, scores_path = os.path.join(tmp, "checkpoints.pt"), os.path.join(tmp, "scores.npy")
        torch.save(checkpoints, path)
        for variant in variants:
            for m in ms:
                ridge = float(np.mean(lambdas[:m])) if variant.endswith("-ridge") else 0.0
                command = [sys.executable, __file__, "--child", variant, "--m", str(m), "--k", str(k), "--batch",
                           str(batch), "--ridge", repr(ridge), "--checkpoints", path, "--scores", scores_path,
                           "--task", task_name]
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    print(f"{variant} M={m} failed:\n{done.stderr[-2000:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                scores = np.load(scores_path)
                bad = int(np.sum(~np.isfinite(scores)))
                if bad:
                    row["note"] = f"{bad} non-finite scores set to 0"
                    scores = np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
                row.update(task=task_name, lds=None, sem=None)
                if masks is not None:
                    result = trak_core.lds(scores, masks, outputs)
                    row.update(lds=float(result.mean), sem=float(result.sem))
                product = (f"  ({row['seconds'] / row['dense_product_seconds']:.2f}x its dense products alone, "
                           f"{row['dense_product_seconds']:.2f} s)" if "dense_product_seconds" in row else "")
                print(f"{variant:<13} M={m:<3} {row['seconds']:7.2f} s  peak {row['peak_rss_mb']:5.0f} MB "
                      f"(+{row['peak_rss_mb'] - row['import_rss_mb']:.0f})  LDS {_lds(row)}{product}"
                      + (f"  [{row['note']}]" if bad else ""), flush=True)
                rows.append(row)
    return rows


def add_ratios(rows: list[dict]) -> list[dict]:
    """Each row's ``seconds`` over trak-core's (the ``trak-core`` variant) at the same M, measured in this run:
    ``x_trak_core`` (above 1: slower than trak-core); absent where trak-core did not run at that M."""
    ours = {r["M"]: r["seconds"] for r in rows if r.get("id") == "trak-core" and "seconds" in r}
    for r in rows:
        if r.get("M") in ours and "seconds" in r:
            r["x_trak_core"] = r["seconds"] / ours[r["M"]]
    return rows


def _lds(row: dict) -> str:
    return "-" if row.get("lds") is None else f"{row['lds']:.3f} ± {row['sem']:.3f}"


def machine() -> dict:
    """CPU model, cores, Python, torch and its thread count."""
    import torch

    return {"cpu": cpu(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


TASK_CAPTIONS = {"digits-mlp": "digits-mlp (1,000 train, 100 targets, 128 retrained models)",
                 "digits-mlp-1m": "digits-mlp-1m (MLP 64-1024-1024-10, 1,126,410 parameters; 200 train, 100 "
                                  "targets; no LDS)"}


def markdown(rows: list[dict], facts: dict, k: int, batch: int, task_name: str = "digits-mlp",
             command: str | None = None) -> str:
    """The table, under a one-line caption naming the command, the machine and the settings."""
    command = command or "python bench/peers.py" + ("" if task_name == "digits-mlp" else f" --task {task_name}")
    when = f"{facts['date']}, load average {facts['load_before']} before, {facts['load_after']} after; " \
        if "date" in facts else ""
    caption = (f"`{command}` on {facts['cpu']} ({facts['cores']} cores, torch {facts['torch']}, "
               f"{facts['torch_threads']} threads; {when}one run): {TASK_CAPTIONS[task_name]}, k={k}, batch {batch}; "
               "seconds: featurize + score after a warm-up (in brackets for trak-core: its dense projection products "
               "alone, same process); x trak-core: those seconds over trak-core's at the same M in this run; memory: "
               "peak RSS of a fresh process (in brackets: above its RSS after imports).")
    lines = [caption, "",
             "| library | version | settings | M | seconds | x trak-core | peak MB (+ above import) | LDS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r['note']})" if "note" in r else ""
        alone = f" ({r['dense_product_seconds']:.2f})" if "dense_product_seconds" in r else ""
        ratio = f"{r['x_trak_core']:.2f}x" if "x_trak_core" in r else "-"
        lines.append(f"| {r['library']} | {r['version']} | {r['settings']} | {r['M']} | {r['seconds']:.2f}{alone} | "
                     f"{ratio} | {r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['import_rss_mb']:.0f}) | "
                     f"{_lds(r)}{note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libraries", nargs="*", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--ms", nargs="*", type=int, default=[1, 2, 5, 10])
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--task", default="digits-mlp", choices=sorted(TASK_CAPTIONS),
                        help="digits-mlp (default, with LDS) or digits-mlp-1m (1.13M parameters, speed only)")
    parser.add_argument("--json", help="where the JSON goes (default: docs/bench/peers.json for the default run, "
                                       "whose table the docs include; bench/results/peers.json for any other)")
    parser.add_argument("--md", help="where the Markdown table goes (defaults as --json)")
    for hidden in ("--child", "--checkpoints", "--scores"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ridge", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        pid = os.fork()  # after exec, ru_maxrss still holds the launcher's peak; a fork starts from its own
        if pid:
            sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        print(json.dumps(child(args.child, args.m, args.k, args.batch, args.ridge, args.checkpoints, args.scores,
                               args.task)))
        return []
    from ground_truth import ground_truth
    from tasks import TASKS

    default_run = all(getattr(args, name) == parser.get_default(name) for name in ("libraries", "ms", "k", "batch",
                                                                                 "task"))
    folder = HERE.parent / "docs" / "bench" if default_run else HERE / "results"  # the docs show the default run's
    json_path, md_path = args.json or str(folder / "peers.json"), args.md or str(folder / "peers.md")
    masks, outputs = ground_truth(TASKS[args.task](), 128) if args.task in TASKS else (None, None)
    start, date, load_before = time.perf_counter(), now(), load_average()
    rows = measure(args.libraries, args.ms, args.k, args.batch, masks, outputs, args.task)
    if not rows:
        print(f"nothing was measured (libraries {args.libraries} missing or failed): {json_path} and {md_path} "
              "are left as they were", file=sys.stderr)
        sys.exit(1)
    add_ratios(rows)
    facts = dict(machine(), date=date, load_before=load_before, load_after=load_average(),
                 total_seconds=round(time.perf_counter() - start, 1))
    pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    write_json({"machine": facts, "rows": rows}, json_path)
    options = [f"--{name} {' '.join(map(str, value)) if isinstance(value, list) else value}"
               for name, value in (("task", args.task), ("ms", args.ms), ("k", args.k), ("batch", args.batch),
                                   ("libraries", args.libraries)) if value != parser.get_default(name)]
    pathlib.Path(md_path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(md_path).write_text(markdown(rows, facts, args.k, args.batch, args.task,
                                              " ".join(["python bench/peers.py", *options])))
    print(f"wrote {json_path} and {md_path}")
    return rows


if __name__ == "__main__":
    main()
