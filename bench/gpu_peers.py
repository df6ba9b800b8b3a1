"""trak-core next to traker 0.3.2 (its fast_jl CUDA kernel) on one GPU: projection and ResNet-18 end to end.

    python bench/gpu_peers.py [--json out.json] [--md out.md] [--budget SECONDS]
    python bench/gpu_peers.py --small --device cpu --json /tmp/x.json      # every size shrunk: runs on a CPU

Projection, float32 random input, TF32 off, 256 x 2,000,000 -> 4,096 and 32 x 11,181,642 -> 2,048: median
synchronized seconds after a warm-up, TFLOP/s (2 n p k / t), relative error ||out - ref|| / ||ref|| on 4 rows
against float64 with the exact matrix, for ``trak_core.project`` (``precision="float32"`` and ``"fast"``), the
torch backend's ``project`` (what ``TRAK.featurize`` calls), traker's ``CudaProjector`` (fast_jl rounds its input
to fp16; error at p = 65,536 against its own matrix, recovered from identity rows) and ``torch.matmul`` with
the matrix in memory where it fits: the baseline of "float32-grade: error <= 2x the fp32 matmul's and <= 1e-5".
End to end: ResNet-18 (torchvision's, 11,181,642 parameters, or the same one defined here), random 3x32x32
images, 2,048 training examples in batches of 256, 256 targets, k = 2,048, one checkpoint, after an untimed run on
one batch (the same shapes, so compiled kernels are warm): featurize and score seconds and peak GPU memory for both
(traker: fp32 store, CudaProjector, ridge = trak-core's automatic lambda times k / p as in bench/peers.py), the
ratios (targets: featurize >= 1.5x, score time <= 1x) and the correlation of the two score matrices (a sanity
check); then trak-core's gradients and projection timed apart. ``--small``: p = 20,000 and 12,000, a width-4
ResNet-18 on 8x8 images, 64 examples; fast_jl is skipped without CUDA (the reason is in the JSON).
trak-core's projection rows say whether its Triton kernel ran; a row without it (``generic split``) is the A/B.
The JSON and Markdown are rewritten after each section, so a run cut short keeps what it finished.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import logging
import math
import pathlib
import sys
import tempfile
import time
import traceback
from functools import partial
from typing import Any, Callable

import array_api_compat.torch as txp
import numpy as np
import torch

import trak_core

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _report import require_cuda, write_json  # noqa: E402
from _gpu_peers_md import markdown  # noqa: E402
from _resnet import batches, resnet18  # noqa: E402
from _triton_paths import triton_note, without_triton  # noqa: E402

FULL = dict(projection=[(256, 2_000_000, 4096), (32, 11_181_642, 2048)], fastjl_error_p=65_536, ref_rows=4,
            width=64, image=32, n_train=2048, batch=256, n_targets=256, k=2048, warmup=256)
SMALL = dict(projection=[(32, 20_000, 512), (8, 12_000, 256)], fastjl_error_p=4096, ref_rows=4,
             width=4, image=8, n_train=64, batch=32, n_targets=16, k=128, warmup=8)
FASTJL, MATMUL = "traker CudaProjector (fast_jl)", "torch.matmul fp32 (matrix in memory)"


def phase(device: Any, fn: Callable[[], Any]) -> tuple[Any, float, int | None]:
    """``fn()``'s value, synchronized seconds and peak ``torch.cuda.max_memory_allocated`` (None on a CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    value = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start, int(torch.cuda.max_memory_allocated(device)) if cuda else None


def timed(fn: Callable[[], Any], device: Any, seconds: float = 3.0, most: int = 5) -> tuple[float, Any, int]:
    """Median seconds of ``fn()`` after a warm-up (1 to ``most`` repeats, those that fit in ``seconds``)."""
    _, warm, _ = phase(device, fn)
    repeats, times, out = max(1, min(most, int(seconds / max(warm, 1e-6)))), [], None
    for _ in range(repeats):
        out = None  # free the previous output first
        out, elapsed, _ = phase(device, fn)
        times.append(elapsed)
    return float(np.median(times)), out, repeats


def make_grads(n: int, p: int, *, seed: int, device: Any) -> torch.Tensor:
    """Float32 standard normal ``(n, p)`` on ``device``, a pure function of ``seed``."""
    return torch.randn(n, p, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    return float(torch.linalg.norm(out.double() - ref.double()) / torch.linalg.norm(ref.double()))


def reference(rows: torch.Tensor, k: int, *, seed: int = 0, checkpoint: int = 0, materialize: bool = False,
              block_bytes: int = 2**30) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rows @ P, P)``: the product in float64 with trak-core's exact matrix, and ``P`` (float32) if ``materialize``.

    ``P`` is made on ``rows``' device in blocks of about ``block_bytes``; a float32 block's signs are exact,
    so ``(rows @ signs) / sqrt(k)`` in float64 is the exact product to float64 rounding.
    """
    p, device = rows.shape[1], rows.device
    ref = torch.zeros(rows.shape[0], k, dtype=torch.float64, device=device)
    matrix = torch.empty(p, k, dtype=torch.float32, device=device) if materialize else None
    step = max(1, block_bytes // (4 * k))
    for start in range(0, p, step):
        stop = min(p, start + step)
        block = trak_core.projection_matrix(stop - start, k, seed=seed, checkpoint=checkpoint, offset=start,
                                            xp=txp, device=device)
        if matrix is not None:
            matrix[start:stop] = block
        ref += rows[:, start:stop].double() @ block.double().sign_()
    return ref / math.sqrt(k), matrix


def fits(nbytes: int, device: Any) -> bool:
    """Whether ``nbytes`` more fit in free device memory with 6 GiB to spare (on a CPU: up to 2 GiB)."""
    gc.collect()
    if torch.device(device).type != "cuda":
        return nbytes <= 2 * 2**30
    torch.cuda.empty_cache()
    return nbytes + 6 * 2**30 <= torch.cuda.mem_get_info(device)[0]


def fastjl_reason(device: Any) -> str | None:
    """Why traker's CudaProjector cannot run here (None when it can)."""
    if torch.device(device).type != "cuda":
        return "skipped: fast_jl needs a CUDA device"
    try:
        import fast_jl  # noqa: F401  (bench/gpu_check.sh builds it into /tmp/fjl_build)
        import trak  # noqa: F401
    except ImportError as exc:
        return f"skipped: {exc}"
    return None


def cuda_projector(p: int, k: int, device: Any) -> Any:
    from trak.projectors import CudaProjector, ProjectionType

    return CudaProjector(grad_dim=p, proj_dim=k, seed=0, proj_type=ProjectionType.rademacher,
                         device=torch.device(device), max_batch_size=32)


def fastjl_error(p: int, k: int, n: int, device: Any, chunk: int = 1024) -> float:
    """fast_jl's error on ``(n, p)`` random rows against ``x @ P`` in float64, ``P`` recovered from identity rows."""
    projector, matrix = cuda_projector(p, k, device), torch.empty(p, k, dtype=torch.float64, device=device)
    for start in range(0, p, chunk):  # fast_jl is linear: identity rows give the matrix's rows, exactly (+-1 in fp16)
        eye = torch.nn.functional.one_hot(torch.arange(start, min(p, start + chunk), device=device), p).float()
        matrix[start:start + chunk] = projector.project(eye, model_id=0).double()
    x = make_grads(n, p, seed=1, device=device)
    return relative_error(projector.project(x, model_id=0), x.double() @ matrix)


def projection_methods(p: int, k: int, error_p: int, device: Any) -> dict[str, tuple[Callable | None, str]]:
    """name -> (``fn(grads)``, note); ``fn`` is None when the method cannot run here (the note says why)."""
    from trak_torch import backend

    accepts, methods = "precision" in inspect.signature(trak_core.project).parameters, {}
    for precision in ("float32", "fast"):
        name = f"trak-core project precision={precision}"
        if accepts:
            methods[name] = (lambda g, pr=precision: trak_core.project(g, k, seed=0, checkpoint=0, precision=pr), "")
        elif precision == "float32":
            methods[name] = (lambda g: trak_core.project(g, k, seed=0, checkpoint=0), "no precision= keyword: default")
        else:
            methods[name] = (None, "unsupported: trak_core.project has no precision= keyword")
    methods["trak-core torch backend.project"] = (
        lambda g: backend.project(g, k, seed=0, checkpoint=0, kind="rademacher"), "what TRAK.featurize calls")
    if importlib.util.find_spec("trak_core._triton") is not None:  # the same, without the Triton kernel
        methods["trak-core project precision=float32, generic split"] = (
            lambda g: without_triton(lambda: trak_core.project(g, k, seed=0, checkpoint=0)),
            "TRAK_CORE_TRITON=0: float16 products of P unpacked into memory")
    reason, projector = fastjl_reason(device), None
    if reason is None:
        try:  # traker's constructor launches fast_jl once: a build that imports but cannot run fails here
            projector = cuda_projector(p, k, device)
        except Exception as exc:  # fast_jl's row says why; trak-core's rows of this size still run
            reason = f"failed: {type(exc).__name__}: {str(exc)[:150]}"
    methods[FASTJL] = (projector and (lambda g: projector.project(g, model_id=0)),
                       reason or f"its own matrix: error at p={error_p:,}, the matrix recovered from identity rows")
    return methods


def projection_case(n: int, p: int, k: int, cfg: dict, device: Any) -> dict:
    """One size: every method's time, TFLOP/s and relative error; the fp32 matmul baseline where it fits."""
    grads, rows, error_p = make_grads(n, p, seed=0, device=device), cfg["ref_rows"], min(p, cfg["fastjl_error_p"])
    flops, case, outs = 2.0 * n * p * k, dict(n=n, p=p, k=k, ref_rows=rows, methods=[]), {}
    for name, (fn, note) in projection_methods(p, k, error_p, device).items():
        entry = dict(method=name, note=note, status=note)
        case["methods"].append(entry)
        try:
            if fn is not None:
                seconds, out, repeats = timed(lambda: fn(grads), device)
                entry.update(status="ok", seconds=seconds, tflops=flops / seconds / 1e12, repeats=repeats)
                outs[name] = out[:rows].double()
                del out
                if name == FASTJL:
                    entry["rel_error"] = fastjl_error(error_p, k, min(n, 32), device)
                elif name.startswith("trak-core project precision=") and not name.endswith("generic split"):
                    entry["note"] = (entry["note"] + "; " if entry["note"] else "") + triton_note(
                        grads, name.split("=")[-1])
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:  # e.g. no precision= keyword
            entry["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
    entry = dict(method=MATMUL, note="TF32 off; making the matrix is not timed",
                 status=f"skipped: the {p * k * 4 / 1e9:.1f} GB matrix does not fit in free memory")
    case["methods"].append(entry)
    try:
        ref, matrix = reference(grads[:rows], k, materialize=fits(p * k * 4, device))
        if matrix is not None:
            seconds, out, repeats = timed(lambda: grads @ matrix, device)
            entry.update(status="ok", seconds=seconds, tflops=flops / seconds / 1e12, repeats=repeats,
                         rel_error=relative_error(out[:rows], ref))
            del out, matrix
    except RuntimeError as exc:  # out of memory: the reference alone, block by block
        entry["status"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        matrix = out = None
        fits(0, device)
        ref, _ = reference(grads[:rows], k)
    for method in case["methods"]:
        if method["method"] in outs and method["method"] != FASTJL:
            method["rel_error"] = relative_error(outs[method["method"]], ref)
            if not method["method"].endswith("precision=fast"):
                limit = min(1e-5, 2 * entry.get("rel_error", 1.0))
                method["float32_grade"] = bool(method["rel_error"] <= limit)
    return case


def run_trak_core(model: Any, state: dict, train: list, targets: list, k: int, device: Any) -> tuple[dict, Any]:
    """trak-core's featurize and score, each timed with its peak memory: the figures and the scores."""
    from trak_core.projection import default_cache

    default_cache.clear()  # count making the matrix, as a fresh process would
    trak = trak_core.TRAK(model, proj_dim=k, backend="torch", progress=False)
    (_, featurize_s, featurize_peak), (scores, score_s, score_peak) = (
        phase(device, lambda: trak.featurize(state, train)), phase(device, lambda: trak.score(targets)))
    out = dict(featurize_s=featurize_s, featurize_peak_bytes=featurize_peak, score_s=score_s,
               score_peak_bytes=score_peak, lambda_reg=trak.lambdas[0])
    if "cupy" in sys.modules and str(device).startswith("cuda"):  # CuPy without a GPU raises here
        out["cupy_pool_bytes"] = int(sys.modules["cupy"].get_default_memory_pool().total_bytes())
    return out, scores.double().cpu().numpy()


def trak_core_breakdown(model: Any, state: dict, train: list, k: int, device: Any) -> dict:
    """Where trak-core's featurize time goes: the torch backend's per-example gradients of every batch, then
    the projection of each batch's gradients (the backend's ``project``, as featurize calls it), each phase synchronized and
    summed over batches, with each phase's peak GPU memory (the projection's includes the batch's gradients); the
    rest of featurize (kernel, checks, copies) is its time minus the two. ``per_example`` says which path the
    default backend took (``closed form`` for ResNet-18: convolutions, batch norms, a linear head). On a GPU, also
    the gradients through ``vmap(grad)`` at its default chunk: what the closed form gains and costs."""
    trak = trak_core.TRAK(model, proj_dim=k, backend="torch", progress=False)
    backend, prepared = trak.backend, trak.backend.prepare(model, state)
    gradients_s = projection_s = 0.0
    peaks = dict(gradients=0, projection=0)
    for inputs, labels in train:
        out, seconds, peak = phase(device, partial(backend.gradients, model, prepared, inputs, labels, trak.task))
        gradients_s += seconds
        peaks["gradients"] = max(peaks["gradients"], peak or 0)
        _, seconds, peak = phase(device, partial(backend.project, out[0], k, seed=trak.seed, checkpoint=0,
                                                 kind="rademacher", precision=trak.precision))
        projection_s += seconds
        peaks["projection"] = max(peaks["projection"], peak or 0)
        del out
    closed = prepared.__dict__.get("_closed_form", {}).get(id(trak.task)) is not None
    out = dict(gradients_s=gradients_s, projection_s=projection_s, chunk_rows=backend.chunk_size or
               _chunk_rows(prepared, device), per_example="closed form" if closed else "vmap",
               gradients_peak_bytes=peaks["gradients"] or None, projection_peak_bytes=peaks["projection"] or None)
    if torch.device(device).type == "cuda" and closed:  # the gradients again through vmap(grad), its default chunk
        from trak_torch import TorchBackend

        vmap = TorchBackend(per_example="vmap")
        vmap_prepared, seconds, peak = vmap.prepare(model, state), 0.0, 0
        for inputs, labels in train:
            _, step, step_peak = phase(device, partial(vmap.gradients, model, vmap_prepared, inputs, labels,
                                                       trak.task))
            seconds, peak = seconds + step, max(peak, step_peak or 0)
        out.update(gradients_vmap_s=seconds, gradients_vmap_peak_bytes=peak)
    return out


def _chunk_rows(prepared: Any, device: Any) -> int | None:
    """The torch backend's default examples per ``vmap`` call here (None where it cannot be read)."""
    try:
        from trak_torch.vmapped import _free_bytes, chunk_rows

        return chunk_rows(prepared.n_params, 4, _free_bytes(torch.device(device)))
    except Exception:  # a diagnostic only
        return None


def run_traker(model: Any, state: dict, train: list, targets: list, k: int, device: Any,
               lambda_reg: float) -> tuple[dict, Any]:
    """traker's featurize (``finalize_features`` included) and scoring, as :func:`run_trak_core`."""
    from trak import TRAKer

    def featurize():
        traker.load_checkpoint(state, model_id=0)
        for inputs, labels in train:
            traker.featurize(batch=(inputs, labels), num_samples=len(labels))
        traker.finalize_features()

    def score():
        traker.start_scoring_checkpoint(exp_name="peers", checkpoint=state, model_id=0,
                                        num_targets=sum(len(b[1]) for b in targets))
        for inputs, labels in targets:
            traker.score(batch=(inputs, labels), num_samples=len(labels))
        return np.array(traker.finalize_scores(exp_name="peers"), dtype=np.float64)

    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=sum(len(b[1]) for b in train),
                        save_dir=save_dir, device=torch.device(device).type, proj_dim=k, use_half_precision=False,
                        lambda_reg=lambda_reg, proj_max_batch_size=32, logging_level=logging.ERROR)
        (_, featurize_s, featurize_peak), (scores, score_s, score_peak) = phase(device, featurize), phase(device, score)
    return dict(featurize_s=featurize_s, featurize_peak_bytes=featurize_peak, score_s=score_s,
                score_peak_bytes=score_peak, projector=type(traker.projector).__name__), scores


def correlations(a: np.ndarray, b: np.ndarray) -> dict:
    """Pearson over all entries and the mean over targets (columns) of Spearman's rank correlation."""
    def standard(m):
        ranks = np.argsort(np.argsort(m, axis=0), axis=0).astype(float)
        return (ranks - ranks.mean(0)) / np.maximum(ranks.std(0), 1e-300)

    return dict(pearson=float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                spearman_mean_over_targets=float((standard(a) * standard(b)).mean()))


def end_to_end(cfg: dict, device: Any) -> dict:
    """ResNet-18 featurize and score with trak-core and (when installed) traker: same model, data and k."""
    torch.manual_seed(0)
    if cfg["width"] == 64 and importlib.util.find_spec("torchvision") is not None:
        import torchvision

        model, name = torchvision.models.resnet18(num_classes=10).to(device), "torchvision resnet18"
    else:
        model, name = resnet18(10, cfg["width"]).to(device), f"resnet18 defined here (width {cfg['width']})"
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    n_params, k, n_train = sum(t.numel() for t in model.parameters()), cfg["k"], cfg["n_train"]
    train = batches(n_train, cfg["batch"], cfg, seed=0, device=device)
    targets = batches(cfg["n_targets"], cfg["batch"], cfg, seed=1, device=device)
    warm = batches(cfg["warmup"], cfg["warmup"], cfg, seed=2, device=device)
    result = dict(model=name, params=n_params, n_train=n_train, batch=cfg["batch"], n_targets=cfg["n_targets"],
                  k=k, image=cfg["image"], checkpoints=1)
    run_trak_core(model, state, warm, warm, k, device)  # untimed warm-up
    ours, our_scores = run_trak_core(model, state, train, targets, k, device)
    result["trak_core"] = dict(ours, featurize_examples_per_s=n_train / ours["featurize_s"])
    try:  # a diagnostic for the next person: gradients vs projection, outside the timed run
        result["trak_core"]["breakdown"] = trak_core_breakdown(model, state, train, k, device)
    except Exception as exc:
        result["trak_core"]["breakdown"] = dict(status=f"failed: {type(exc).__name__}: {exc}"[:300])
    if importlib.util.find_spec("trak") is None:
        result["traker"] = dict(status="skipped: traker is not installed")
        return result
    ridge = ours["lambda_reg"] * k / n_params
    run_traker(model, state, warm, warm, k, device, ridge)
    theirs, their_scores = run_traker(model, state, train, targets, k, device, ridge)
    if not np.isfinite(their_scores).all():
        theirs["note"] = f"{int((~np.isfinite(their_scores)).sum())} non-finite scores set to 0"
        their_scores = np.nan_to_num(their_scores, nan=0.0, posinf=0.0, neginf=0.0)
    result["traker"] = dict(theirs, lambda_reg=ridge, featurize_examples_per_s=n_train / theirs["featurize_s"])
    result["ratios"] = dict(featurize_speedup=theirs["featurize_s"] / ours["featurize_s"],
                            score_time_ratio=ours["score_s"] / theirs["score_s"])
    result["correlation"] = correlations(our_scores, their_scores)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="shrink every size (runs on a CPU in seconds)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, help="seconds: start no section once fewer than 20 are left")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args(argv)
    require_cuda(parser, args.device)
    began, cfg, device = time.perf_counter(), SMALL if args.small else FULL, torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    versions = {name: getattr(__import__(name), "__version__", "?") if importlib.util.find_spec(name) else None
                for name in ("torch", "numpy", "array_api_compat", "trak", "cupy", "torchvision")}
    result = dict(mode="small" if args.small else "full", device=str(device), versions=versions, skipped=[],
                  projection=[], device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  settings=dict(tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                                cudnn_tf32=torch.backends.cudnn.allow_tf32, backends=trak_core.available_backends()),
                  fast_jl=fastjl_reason(device) or "available")
    sections = [(f"projection {n} x {p:,} -> {k:,}", lambda n=n, p=p, k=k: result["projection"].append(
        projection_case(n, p, k, cfg, device))) for n, p, k in cfg["projection"]]
    for title, run in sections + [("end to end", lambda: result.update(end_to_end=end_to_end(cfg, device)))]:
        if args.budget is not None and args.budget - (time.perf_counter() - began) < 20:
            result["skipped"].append(f"{title}: time budget spent")
            continue
        try:
            run()
        except Exception as exc:  # one section's failure must not cost the others' results
            result["skipped"].append(f"{title}: failed: {type(exc).__name__}: {exc}"[:500])
            traceback.print_exc()
        fits(0, device)  # release what the section left in torch's cache
        result["elapsed_s"] = time.perf_counter() - began
        write_json(result, args.json)
        if args.md:
            pathlib.Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.md).write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
