"""Featurize throughput of the factorized projection (``proj_type="kronecker"``) against the dense one
(``"rademacher"``), at k = 4,096, on CPU: a GPT-2-small-shaped language model, a CIFAR ResNet-18 and a small
vision transformer.

    python bench/kronecker_speed.py --json docs/bench/kronecker_speed.json   # full (about an hour on 2 shared
                                                                             # cores: mostly the two dense runs)
    python bench/kronecker_speed.py --quick                                  # tiny models, k = 256 (seconds)
    python bench/kronecker_speed.py --only resnet18 --threads 2

Models (random init, nothing is downloaded)
-------------------------------------------
``gpt2``: ``transformers.GPT2LMHeadModel(GPT2Config())`` (124,439,808 parameters, the token embedding
tied to the head, ``n_positions`` 1,024), ``task="language_modeling"``, dict batches
``{"input_ids", "attention_mask", "labels"}`` of 128 random tokens (no padding; labels = ids).
``resnet18``: a torchvision-free CIFAR ResNet-18 (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2] of
64..512 channels, batch norm, 10 classes; 11,173,962 parameters) on random (3, 32, 32) images,
``task="classification"``. ``vit``: torchvision's ``VisionTransformer`` layout (``bench/_vit.py``: patch 4 on
32 x 32 images, 65 tokens, 6 blocks of width 192, 3 heads, ``nn.MultiheadAttention``; 2,693,578 parameters),
``task="classification"``; its attention projections are blocks, followed through ``F.linear``.
``--quick``: a 2-layer GPT-2 of width 32 on 16 tokens, a ResNet with one block per stage of 8..64
channels and a ViT of 2 blocks of width 16, k = 256, a few examples.

What is timed
-------------
``TRAK(model, task, proj_dim=k, proj_type=kind, lambda_reg=1e-3).featurize(checkpoint, batches)`` on a
fresh estimator (the checkpoint is the model's own state_dict), after ``default_cache.clear()``: what a
fresh process pays per checkpoint, i.e. the per-example gradients (``"rademacher"``) or the hooked
per-layer sides (``"kronecker"``), the projection, the out-to-loss weights, the float64 kernel and its
Cholesky factor, and for ``"kronecker"`` the layer discovery and the check of the first example against
its dense gradient. For ``"kronecker"`` the steady rate of :meth:`TRAK.features` on the same batches
(no discovery, check or kernel) is reported as well.

Each configuration runs in its own child process (``--child``), so its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the child) is its own. The child also
records its peak RSS right after building the model and one no-grad forward pass on a timed batch:
the model's own resident size, for reference. Warm-up (untimed, in the child, before the timed run):
one featurize of one small batch. For the dense path at full size the warm-up runs on the ``--quick``
model of the same family instead: one dense batch at full size regenerates the whole p x k matrix
(about 5e11 entries for GPT-2, 4.6e10 for ResNet-18, far above the 512 MiB projection cache), which
is the very cost being measured, and nothing of size p is initialised lazily.

The dense path projects gradients in groups of at least 64 rows when the matrix is not cached
(``trak_core._checks.projection_group_rows``), so every group pays for generating the matrix once.
ResNet-18 dense is timed on exactly 64 examples (one group: its best case). GPT-2 dense is timed on 2
examples (one batch of 2, one group): a group of 64 GPT-2 gradients would take 32 GB (0.5 GB a row),
more than this machine has. The factorized path has no such grouping (it projects batch by batch).

A full-size dense child still running after ``--dense-timeout`` seconds (default 3,600; 0: never) is
stopped: its row then holds ``seconds_at_least`` (the time since its timed featurize began), so
``examples_per_s_at_most``, and its peak RSS so far (``VmHWM`` from ``/proc``), and the summary a
``ratio_at_least``. On 2 shared cores (load average 4 to 6) the dense GPT-2 featurize of 2 examples
took 28 minutes. With ``--only`` and an existing ``--json`` file, the other models' rows in it are kept
(each model's pair always comes from one run).

Acceptance targets (issue 15): GPT-2-small at least 10x the dense rate, ResNet-18 at least 3x (the ViT has
none).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from _kronecker_models import SEQUENCE, make_batches, make_model
from _report import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"gpt2": 10.0, "resnet18": 3.0}
MODELS = ("resnet18", "gpt2", "vit")
FULL = dict(k=4096, batch=dict(gpt2=dict(kronecker=4, rademacher=2), resnet18=dict(kronecker=16, rademacher=16),
                               vit=dict(kronecker=16, rademacher=16)),
            examples=dict(gpt2=dict(kronecker=16, rademacher=2), resnet18=dict(kronecker=64, rademacher=64),
                          vit=dict(kronecker=64, rademacher=64)))
QUICK = dict(k=256, batch=dict(gpt2=dict(kronecker=4, rademacher=4), resnet18=dict(kronecker=4, rademacher=4),
                               vit=dict(kronecker=4, rademacher=4)),
             examples=dict(gpt2=dict(kronecker=4, rademacher=4), resnet18=dict(kronecker=8, rademacher=8),
                           vit=dict(kronecker=8, rademacher=8)))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one configuration (child process) ---------------------------------------------------------------

def _trak(model, name: str, kind: str, k: int):
    import trak_core

    task = "language_modeling" if name == "gpt2" else "classification"
    return trak_core.TRAK(model, task=task, proj_dim=k, proj_type=kind, lambda_reg=1e-3, backend="torch",
                          progress=False)


def child(spec: dict) -> dict:
    """Warm up, then time featurize of one (model, kind) configuration; peak RSS at the end."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from trak_core.projection import default_cache

    name, kind, size, k = spec["model"], spec["kind"], spec["size"], spec["k"]
    device = spec.get("device") or "cpu"
    model = make_model(name, size).to(device)
    p = sum(t.numel() for t in model.parameters())
    data = _to(make_batches(name, size, spec["examples"], spec["batch"], model), device)
    with torch.no_grad():  # the model's own footprint: built, and one forward pass on a timed batch
        first = data[0]
        model(**{key: v for key, v in first.items() if key != "labels"}) if name == "gpt2" else model(first[0])
    model_rss = peak_rss_mib()

    warm_size = "quick" if spec["warm_quick"] else size
    warm_model = make_model(name, warm_size).to(device) if spec["warm_quick"] else model
    warm_k = QUICK["k"] if spec["warm_quick"] else k
    start = time.perf_counter()
    _trak(warm_model, name, kind, warm_k).featurize(warm_model.state_dict(),
                                                    _to(make_batches(name, warm_size, 1, 1, warm_model, seed=2), device))
    warm_seconds = time.perf_counter() - start
    del warm_model

    default_cache.clear()  # count generating the matrix, as a fresh process would
    trak = _trak(model, name, kind, k)
    state = model.state_dict()
    if spec.get("status"):  # where the parent finds when timing began, should it stop this child
        with open(spec["status"], "w") as f:
            json.dump(dict(timed_start=time.time(), warm_up_seconds=warm_seconds, model_rss_mib=model_rss), f)
    start = time.perf_counter()
    trak.featurize(state, data)
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = dict(model=name, kind=kind, size=size, device=device, params=p, proj_dim=k, examples=spec["examples"],
               batch=spec["batch"], threads=torch.get_num_threads(), warm_up=("quick-size model" if
                                                                              spec["warm_quick"] else "same model"),
               warm_up_seconds=warm_seconds, seconds=seconds, examples_per_s=spec["examples"] / seconds)
    if kind == "kronecker":
        plan = trak.backend.factorized_plan(model, trak.store[0].prepared, *_split(data[0]), trak.task, k=k,
                                            options=trak.kronecker)
        row.update(layers=len(plan.blocks), rest_params=plan.n_rest, k_rest=plan.k_rest)
        start = time.perf_counter()
        trak.features(data)
        row["steady_seconds"] = time.perf_counter() - start
        row["steady_examples_per_s"] = spec["examples"] / row["steady_seconds"]
    if name == "gpt2":
        row["sequence_length"] = SEQUENCE[size]
        row["tokens_per_s"] = row["examples_per_s"] * SEQUENCE[size]
    row["model_rss_mib"] = model_rss
    row["peak_rss_mib"] = peak_rss_mib()
    return row


def _to(batches: list, device: str) -> list:
    """The batches on ``device`` (dicts and pairs of tensors)."""
    if device == "cpu":
        return batches
    return [{key: value.to(device) for key, value in b.items()} if isinstance(b, dict) else
            tuple(value.to(device) for value in b) for b in batches]


def _split(batch):
    if isinstance(batch, dict):
        return {key: v for key, v in batch.items() if key != "labels"}, batch["labels"]
    return batch


# --- parent -------------------------------------------------------------------------------------------

def _vmhwm_mib(pid: int) -> float | None:
    """Peak resident set size of a running process so far (``VmHWM``), MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_child(spec: dict, timeout: float | None = None) -> dict:
    """Run one configuration in a fresh interpreter; its last stdout line is its JSON row.

    With ``timeout`` (seconds), a child still running then is stopped: its row holds a lower bound on the
    timed seconds (since timing began) and so an upper bound on examples/s, and its peak RSS so far.
    """
    import tempfile

    before, date = load(), time.strftime("%Y-%m-%d %H:%M %Z")
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, status=os.path.join(tmp, "status.json"))
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "kronecker_speed.py"), "--child", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout or None)
        except subprocess.TimeoutExpired:
            peak, stopped = _vmhwm_mib(proc.pid), time.time()
            proc.kill()
            out, err = proc.communicate()
            status = {}
            if os.path.exists(spec["status"]):
                with open(spec["status"]) as f:
                    status = json.load(f)
            if "timed_start" not in status:
                return dict(model=spec["model"], kind=spec["kind"], error=f"stopped after {timeout} s, before timing "
                            f"began:\n{err[-2000:]}", date=date, load_before=before, load_after=load())
            timed = stopped - status["timed_start"]
            return dict(model=spec["model"], kind=spec["kind"], size=spec["size"], proj_dim=spec["k"],
                        examples=spec["examples"], batch=spec["batch"], timed_out=True, timeout_s=timeout,
                        warm_up_seconds=status["warm_up_seconds"], seconds_at_least=timed,
                        examples_per_s_at_most=spec["examples"] / timed, model_rss_mib=status["model_rss_mib"],
                        peak_rss_mib_so_far=peak, date=date, load_before=before, load_after=load())
    if proc.returncode != 0:
        return dict(model=spec["model"], kind=spec["kind"], error=(err or out)[-4000:],
                    date=date, load_before=before, load_after=load())
    row = json.loads(out.strip().splitlines()[-1])
    row.update(date=date, load_before=before, load_after=load())
    return row


def summarize(rows: list[dict], *, quick: bool) -> list[dict]:
    """Per model with both kinds: the two rates and their ratio (bounds when the dense child was stopped)."""
    out = []
    for name in MODELS:
        found = {row["kind"]: row for row in rows if row["model"] == name and "error" not in row}
        if not {"kronecker", "rademacher"} <= set(found):
            continue
        ours, dense = found["kronecker"], found["rademacher"]
        summary = dict(model=name, load=[ours["load_before"], dense["load_after"]],
                       kronecker_examples_per_s=ours["examples_per_s"])
        if dense.get("timed_out"):  # dense stopped: its rate is an upper bound, the ratio a lower bound
            ratio = ours["examples_per_s"] / dense["examples_per_s_at_most"]
            summary.update(rademacher_examples_per_s_at_most=dense["examples_per_s_at_most"], ratio_at_least=ratio)
        else:
            ratio = ours["examples_per_s"] / dense["examples_per_s"]
            summary.update(rademacher_examples_per_s=dense["examples_per_s"], ratio=ratio)
        if not quick and name in TARGETS:
            summary.update(target=TARGETS[name], target_met=ratio >= TARGETS[name])
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2, ResNet and ViT, k = 256 (seconds)")
    parser.add_argument("--only", choices=list(MODELS), action="append", help="these models only")
    parser.add_argument("--kinds", default="kronecker,rademacher",
                        help="comma-separated proj_types to run: kronecker, rademacher (default: both)")
    parser.add_argument("--threads", type=int, help="torch threads in the children (default: torch's)")
    parser.add_argument("--dense-timeout", type=float, default=3600.0,
                        help="stop a full-size dense child after this many seconds and report bounds (0: never)")
    parser.add_argument("--device", default="cpu", help="torch device of the models and batches, e.g. cuda")
    parser.add_argument("--examples", type=int, help="examples per timed run (default: the mode's, per model and kind)")
    parser.add_argument("--json", help="write the results here (with --only, other models' results in it are kept)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return {}
    import importlib.metadata

    size = "quick" if args.quick else "full"
    settings = QUICK if args.quick else FULL
    models = [name for name in MODELS if not args.only or name in args.only]
    kinds = [kind for kind in args.kinds.split(",") if kind]
    if not kinds or set(kinds) - {"kronecker", "rademacher"}:
        parser.error(f"argument --kinds: {args.kinds!r}; choose from kronecker, rademacher (comma-separated)")
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers")}
    result = dict(mode=size, date=time.strftime("%Y-%m-%d %H:%M %Z"), cores=os.cpu_count(), load_before=load(),
                  versions=versions, command=" ".join(["python", "bench/kronecker_speed.py"]
                                                     + (argv if argv is not None else sys.argv[1:])),
                  targets=TARGETS, rows=[], summary=[])
    if args.json and args.only and os.path.exists(args.json):  # keep the other models' rows, from their own run
        with open(args.json) as f:
            kept = json.load(f)
        if kept.get("mode") == size:
            result["rows"] = [row for row in kept.get("rows", []) if row.get("model") not in models]
    print(f"load average before: {result['load_before']} ({os.cpu_count()} cores)", flush=True)
    for name in models:
        for kind in kinds:
            spec = dict(model=name, kind=kind, size=size, k=settings["k"], batch=settings["batch"][name][kind],
                        examples=args.examples or settings["examples"][name][kind], threads=args.threads,
                        device=args.device,
                        warm_quick=(kind == "rademacher" and not args.quick))
            timeout = args.dense_timeout if kind == "rademacher" and not args.quick else None
            row = run_child(spec, timeout=timeout)
            result["rows"] = [r for r in result["rows"] if (r["model"], r["kind"]) != (name, kind)] + [row]
            print(json.dumps(row), flush=True)
            write_json(result, args.json)  # as it goes: a long run's finished rows survive an interruption
        result["summary"] = summarize(result["rows"], quick=args.quick)
        write_json(result, args.json)
    result["load_after"] = load()
    print(f"\n{'model':<9} {'kind':<11} {'params':>11} {'n':>4} {'ex/s':>10} {'model RSS':>10} {'peak RSS':>10}")
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['model']:<9} {row['kind']:<11} FAILED: {row['error'].strip().splitlines()[-1]}")
        elif row.get("timed_out"):
            print(f"{row['model']:<9} {row['kind']:<11} {'':>11} {row['examples']:>4} "
                  f"{'<' + format(row['examples_per_s_at_most'], '.4g'):>10} {row['model_rss_mib']:>8.0f} M "
                  f"{row['peak_rss_mib_so_far']:>8.0f} M  (stopped after {row['seconds_at_least']:.0f} s of timing)")
        else:
            print(f"{row['model']:<9} {row['kind']:<11} {row['params']:>11,} {row['examples']:>4} "
                  f"{row['examples_per_s']:>10.4g} {row['model_rss_mib']:>8.0f} M {row['peak_rss_mib']:>8.0f} M")
    for s in result["summary"]:
        met = "" if "target" not in s else f"  (target >= {s['target']:g}x: {'met' if s['target_met'] else 'NOT met'})"
        ratio = f"{s['ratio']:.1f}x" if "ratio" in s else f"at least {s['ratio_at_least']:.1f}x"
        print(f"{s['model']}: kronecker / dense = {ratio}{met}")
    print(f"load average before {result['load_before']}, after {result['load_after']}")
    return write_json(result, args.json)


def failed_rows(result: dict) -> list[str]:
    """``model kind`` of each row whose child failed (the exit status says so: scripts and the GPU check read it)."""
    return [f"{row['model']} {row['kind']}" for row in result.get("rows", []) if "error" in row]


if __name__ == "__main__":
    failed = failed_rows(main() or {})
    if failed:
        print(f"kronecker_speed: failed rows: {', '.join(failed)} (exit status 1)", file=sys.stderr)
        sys.exit(1)
