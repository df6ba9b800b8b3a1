"""Featurize throughput of the JAX backend vs the torch backend on the digits MLP, in one run.

    python bench/jax_vs_torch.py [--json out.json]
    python bench/jax_vs_torch.py --repeats 5            # five alternating timed runs of each: the median ratio
    python bench/jax_vs_torch.py --n-train 300 --checkpoints 2 --proj-dim 512   # a small run (~10 s)

Same weights (canonical layout), data, batch size, k and dtype (float32) for both, and the automatic
ridge, at which both keep a float32 kernel (at ``lambda_reg=1``, ``lambda_max / lambda`` is about 3e4: torch
remade its kernel in float64 while JAX without x64 could not, so the two did different work). Each backend
first featurizes one checkpoint untimed (JAX compiles its step, torch warms up); then a fresh
TRAK featurizes the timed checkpoints, and the JAX step's compilation count is reported to show
that nothing recompiles per batch. With ``--repeats N`` the timed runs alternate (torch, JAX, torch, ...) and the
ratio is the median of the N per-run ratios (``jax_over_torch``; above 1, JAX is faster); every run's seconds are
kept (``torch_seconds``, ``jax_seconds``), with the date, the machine and its load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import trak_core
from trak_core.demo.data import load_digits_split
from trak_core.testing.cases import TorchCase, jax_apply, torch_model

from _report import cpu, load_average, now, write_json


def weights(seed: int, hidden: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=0.3, size=s).astype("float32") for s in [(hidden, 64), (hidden,), (10, hidden), (10,)]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128, help="hidden units of the MLP 64-hidden-10")
    parser.add_argument("--n-train", type=int, default=1000, help="training digits featurized per checkpoint")
    parser.add_argument("--batch", type=int, default=100, help="examples per batch")
    parser.add_argument("--checkpoints", type=int, default=3, help="timed checkpoints (one more warms up, untimed)")
    parser.add_argument("--proj-dim", type=int, default=2048, help="projection dimension k")
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternating timed runs of each backend; the ratio is the median of the per-run ratios")
    parser.add_argument("--json", help="write the result here (default: printed only)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("argument --repeats: at least 1")
    import jax
    import torch
    from trak_jax import JaxBackend, JaxModel

    x, y, _, _ = load_digits_split(args.n_train, 0, seed=0)
    x = x.astype("float32")
    ws = [weights(c, args.hidden) for c in range(args.checkpoints + 1)]
    batches_np = [(x[i:i + args.batch], y[i:i + args.batch]) for i in range(0, len(y), args.batch)]
    batches_torch = [(torch.as_tensor(a), torch.as_tensor(b)) for a, b in batches_np]
    case = TorchCase("cpu")
    jax_backend = JaxBackend()

    def run_torch(chosen):
        trak = trak_core.TRAK(torch_model("mlp", ws[0]), proj_dim=args.proj_dim, lambda_reg="auto", backend="torch",
                              progress=False)
        for w in chosen:
            trak.featurize(case.state_dict("mlp", w), batches_torch)

    def run_jax(chosen):
        trak = trak_core.TRAK(JaxModel(apply), proj_dim=args.proj_dim, lambda_reg="auto", backend=jax_backend,
                              progress=False)
        for w in chosen:
            trak.featurize([jax.numpy.asarray(a) for a in w], batches_np)
        jax.block_until_ready(trak.store[len(trak.store) - 1].features)

    apply = jax_apply("mlp")
    result = dict(date=now(), cpu=cpu(), cores=os.cpu_count(), load_before=load_average(),
                  params=sum(a.size for a in ws[0]), n_train=args.n_train, batch=args.batch, proj_dim=args.proj_dim,
                  checkpoints=args.checkpoints, repeats=args.repeats, torch_threads=torch.get_num_threads(),
                  jax=jax.__version__, torch=torch.__version__)
    runs = (("torch", run_torch), ("jax", run_jax))
    for _, run in runs:
        run(ws[:1])  # warm-up: compile / first-touch, untimed
    compiled = jax_backend.compilations
    seconds: dict[str, list[float]] = {"torch": [], "jax": []}
    for _ in range(args.repeats):  # alternating, so a burst of load on the shared machine hits both
        for name, run in runs:
            start = time.perf_counter()
            run(ws[1:])
            seconds[name].append(time.perf_counter() - start)
    examples = args.n_train * args.checkpoints
    for name in ("torch", "jax"):
        result[f"{name}_seconds"] = seconds[name]
        result[f"{name}_examples_per_s"] = examples / statistics.median(seconds[name])
    result["jax_recompilations_after_warmup"] = jax_backend.compilations - compiled
    # per run: JAX examples/s over torch's = torch seconds over JAX seconds (above 1: JAX is faster)
    result["jax_over_torch_runs"] = [t / j for t, j in zip(seconds["torch"], seconds["jax"])]
    result["jax_over_torch"] = statistics.median(result["jax_over_torch_runs"])
    result["load_after"] = load_average()
    print(json.dumps(result, indent=1))
    print(f"JAX / torch featurize throughput: {result['jax_over_torch']:.2f}x (above 1: JAX is faster; "
          f"{'median of ' + str(args.repeats) + ' alternating runs' if args.repeats > 1 else 'one run'}), "
          f"{result['date']}, {result['cpu']} ({result['cores']} cores), load average {result['load_before']} "
          f"before, {result['load_after']} after")
    return write_json(result, args.json)




if __name__ == "__main__":
    main()
