"""trak-core next to traker and dattri on the same checkpoints, data and ground truth, in one command.

    python bench/peers.py                          # M in {1, 2, 5, 10}, k = 2048, every installed library
    python bench/peers.py --ms 1 5 --k 512 --libraries trak-core dattri --json out.json --md out.md

Task: ``digits-mlp`` of ``bench/quality/tasks.py`` (MLP 64-64-10, 1,000 training digits, 100
targets) with its 128-model ground truth (``bench/quality/ground_truth.py``, cached). The parent
trains checkpoints with seeds ``0..max(M)-1`` once and saves them; every (library, M) then runs in a
fresh subprocess (``--child``) that loads that file, does one untimed warm-up on one checkpoint,
and times featurizing ``M`` checkpoints plus scoring the targets (wall clock; batch 100 for all;
torch threads left at their default). Memory is ``ru_maxrss`` of the child: the peak, and the peak
right after imports (torch, the library, the task), so the table shows the peak above that
baseline. The child writes its scores; the parent computes LDS (mean and sem over targets).

Libraries and settings:

* ``trak-core``: ``TRAK(proj_dim=k, backend="torch")`` defaults (Rademacher projection,
  ``lambda_reg="auto"``); its projection cache is cleared after the warm-up.
* ``traker`` (0.3.2) defaults on CPU: Gaussian ``BasicProjector``, ``lambda_reg=0``, fp16 store;
  ``traker-fp32`` is the same with ``use_half_precision=False``. NaN scores are set to 0 (noted).
* ``dattri`` (0.3.0) ``TRAKAttributor``: CPU ``BasicProjector`` (Gaussian, its default), target the
  margin ``log p - log(1 - p)`` written as ``logit_y - logsumexp(other logits)`` (equal, but finite
  when ``p`` rounds to 1), ``correct_probability_func`` ``p`` as in dattri's examples, and its default
  ``regularization=0``.

Caveats: one timed run per cell on a shared machine (seconds are indicative to ~10-20%);
``ru_maxrss`` counts the whole process, so small differences are noise; traker also writes its
features to a temporary directory (counted in its time); LDS with one checkpoint is noisy.
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

LIBRARIES = {"trak-core": ("trak_core", "trak-core"), "traker": ("trak", "traker"),
             "traker-fp32": ("trak", "traker"), "dattri": ("dattri", "dattri")}
Data = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x, y, xt, yt


def _loader(x: np.ndarray, y: np.ndarray, batch: int) -> list[tuple[Any, Any]]:
    import torch

    return [(torch.as_tensor(x[i:i + batch], dtype=torch.float32), torch.as_tensor(y[i:i + batch]))
            for i in range(0, len(y), batch)]


def run_trak_core(model: Any, checkpoints: list[dict], data: Data, *, k: int | None, batch: int,
                  lambda_reg: float | str = "auto") -> np.ndarray:
    """trak-core scores ``(n_train, n_targets)``: featurize every checkpoint, then score."""
    import trak_core

    x, y, xt, yt = data
    trak = trak_core.TRAK(model, task="classification", proj_dim=k, backend="torch", seed=0,
                          lambda_reg=lambda_reg, progress=False)
    for state in checkpoints:
        trak.featurize(state, _loader(x, y, batch))
    return trak.score(_loader(xt, yt, batch)).double().numpy()


def run_traker(model: Any, checkpoints: list[dict], data: Data, *, k: int | None, batch: int,
               half: bool = True, lambda_reg: float = 0.0) -> np.ndarray:
    """traker scores on CPU; ``k=None`` swaps in its ``NoOpProjector`` (exact gradients)."""
    import logging

    from trak import TRAKer
    from trak.projectors import NoOpProjector

    x, y, xt, yt = data
    projector = NoOpProjector(device="cpu") if k is None else None
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(y), save_dir=save_dir,
                        device="cpu", proj_dim=k or 0, projector=projector, use_half_precision=half,
                        lambda_reg=lambda_reg, logging_level=logging.ERROR)
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
    """dattri's TRAKAttributor scores; ``k=None`` uses its ``"identity"`` projection (exact)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    def logits(params, inputs):
        return torch.func.functional_call(model, params, (inputs.unsqueeze(0),))[0]

    def margin(params, pair):  # log p - log(1 - p), stably
        out = logits(params, pair[0])
        label = torch.arange(out.shape[0]) == pair[1]
        return torch.where(label, out, 0.0).sum() - torch.logsumexp(torch.where(label, -torch.inf, out), 0)

    def probability(params, pair):
        return torch.where(torch.arange(10) == pair[1], torch.softmax(logits(params, pair[0]), 0), 0.0).sum()

    x, y, xt, yt = data
    loader = lambda a, b: DataLoader(TensorDataset(torch.as_tensor(a, dtype=torch.float32),  # noqa: E731
                                                   torch.as_tensor(b)), batch_size=batch, shuffle=False)
    task = AttributionTask(loss_func=margin, model=model, checkpoints=list(checkpoints))
    projector = dict(device="cpu", proj_seed=0, proj_max_batch_size=32,  # every key: dattri keeps them globally
                     proj_dim=k or sum(p.numel() for p in model.parameters()), proj_type="identity" if k is None else "normal")
    attributor = TRAKAttributor(task=task, correct_probability_func=probability, device="cpu",
                                projector_kwargs=projector, regularization=regularization)
    with torch.no_grad():
        attributor.cache(loader(x, y))
        return attributor.attribute(loader(xt, yt)).double().numpy()


def _variants(k: int | None, ridge: float | None, n_params: int) -> dict[str, tuple]:
    """id -> (module, distribution, runner, options, settings); ``ridge`` is in trak-core's units."""
    ridge = ridge or 0.0
    traker_ridge, dattri_ridge = ridge * (k or 1) / n_params, ridge / n_params  # their feature scales
    return {"trak-core": ("trak_core", "trak-core", run_trak_core, {}, "Rademacher, lambda=auto"),
            "traker": ("trak", "traker", run_traker, {}, "Gaussian, lambda=0, fp16"),
            "traker-fp32": ("trak", "traker", run_traker, dict(half=False), "Gaussian, lambda=0, fp32"),
            "traker-ridge": ("trak", "traker", run_traker, dict(lambda_reg=traker_ridge),
                             f"Gaussian, lambda={traker_ridge:.3g} (trak-core's auto), fp16"),
            "dattri": ("dattri", "dattri", run_dattri, {}, "Gaussian, regularization=0"),
            "dattri-ridge": ("dattri", "dattri", run_dattri, dict(regularization=dattri_ridge),
                             f"Gaussian, regularization={dattri_ridge:.3g} (trak-core's auto)")}


VARIANTS = list(_variants(None, None, 1))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(library: str, m: int, k: int, batch: int, checkpoints_path: str, scores_path: str) -> dict:
    """One (library, M) cell in this process: warm up, time featurize + score, save the scores."""
    import torch

    from tasks import TASKS

    importlib.import_module(LIBRARIES[library][0])
    runner, settings, options = _runner(library)
    task = TASKS["digits-mlp"]()
    import_rss = _rss_mb()
    checkpoints = torch.load(checkpoints_path)[:m]
    data = (task.x, task.y, task.xt, task.yt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner(task.model, checkpoints[:1], data, k=k, batch=batch, **options)  # warm-up, untimed
        if library == "trak-core":
            from trak_core.projection import default_cache

            default_cache.clear()  # count generating the matrix, as traker and dattri do on every batch
        start = time.perf_counter()
        scores = runner(task.model, checkpoints, data, k=k, batch=batch, **options)
        seconds = time.perf_counter() - start
    np.save(scores_path, scores)
    return dict(library=library, version=importlib.metadata.version(LIBRARIES[library][1]),
                settings=settings.replace("k", str(k), 1) + f", batch {batch}", M=m, k=k, seconds=seconds,
                peak_rss_mb=_rss_mb(), import_rss_mb=import_rss)


def measure(libraries: list[str], ms: list[int], k: int, batch: int, masks: np.ndarray,
            outputs: np.ndarray) -> list[dict]:
    """Rows of (library, M): train ``max(ms)`` checkpoints, run each cell in a fresh subprocess, score LDS."""
    import torch

    import trak_core
    from tasks import TASKS

    task = TASKS["digits-mlp"]()
    x, y = task.arrays(task.x, task.y)
    rows = []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the parent's imports
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoints.pt")
        torch.save([task.train(x, y, seed) for seed in range(max(ms))], path)
        for library in libraries:
            module, dist = LIBRARIES[library]
            if importlib.util.find_spec(module) is None:
                print(f"{library} not installed: pip install {dist}")
                continue
            for m in ms:
                scores_path = os.path.join(tmp, "scores.npy")
                command = [sys.executable, __file__, "--child", library, "--m", str(m), "--k", str(k),
                           "--batch", str(batch), "--checkpoints", path, "--scores", scores_path]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode:
                    print(f"{library} M={m} failed:\n{done.stderr[-2000:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                scores = np.load(scores_path)
                bad = int(np.sum(~np.isfinite(scores)))
                if bad:
                    row["note"] = f"{bad} non-finite scores set to 0"
                    scores = np.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
                result = trak_core.lds(scores, masks, outputs)
                row.update(lds=float(result.mean), sem=float(result.sem))
                print(f"{library:<12} M={m:<3} {row['seconds']:7.2f} s  peak {row['peak_rss_mb']:6.0f} MB "
                      f"(+{row['peak_rss_mb'] - row['import_rss_mb']:.0f})  LDS {row['lds']:.3f} ± {row['sem']:.3f}"
                      + (f"  [{row['note']}]" if bad else ""), flush=True)
                rows.append(row)
    return rows


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                torch_threads=torch.get_num_threads())


def markdown(rows: list[dict], facts: dict, args: argparse.Namespace) -> str:
    """The table, with a one-line caption naming the command, the machine and the settings."""
    lines = [f"`python bench/peers.py` on {facts['cpu']} ({facts['cores']} cores, torch {facts['torch']}, "
             f"{facts['torch_threads']} threads): digits-mlp, 1,000 train / 100 targets, 128-model ground truth, "
             f"k={args.k}, batch {args.batch}, seconds = featurize + score after a warm-up, memory = peak RSS of a "
             "fresh process (above its post-import RSS).", "",
             "| library | version | settings | M | seconds | peak MB (above import) | LDS |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r['note']})" if "note" in r else ""
        lines.append(f"| {r['library']} | {r['version']} | {r['settings']} | {r['M']} | {r['seconds']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} (+{r['peak_rss_mb'] - r['import_rss_mb']:.0f}) | "
                     f"{r['lds']:.3f} ± {r['sem']:.3f}{note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libraries", nargs="*", default=list(LIBRARIES), choices=list(LIBRARIES))
    parser.add_argument("--ms", nargs="*", type=int, default=[1, 2, 5, 10])
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--json", default=str(HERE.parent / "docs" / "bench" / "peers.json"))
    parser.add_argument("--md", default=str(HERE.parent / "docs" / "bench" / "peers.md"))
    parser.add_argument("--child", choices=list(LIBRARIES), help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.m, args.k, args.batch, args.checkpoints, args.scores)))
        return []
    from ground_truth import ground_truth
    from tasks import TASKS

    masks, outputs = ground_truth(TASKS["digits-mlp"](), 128)
    start = time.perf_counter()
    rows = measure(args.libraries, args.ms, args.k, args.batch, masks, outputs)
    facts = dict(machine(), total_seconds=time.perf_counter() - start)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(machine=facts, rows=rows), indent=1))
    if args.md:
        pathlib.Path(args.md).write_text(markdown(rows, facts, args))
    return rows


if __name__ == "__main__":
    main()
