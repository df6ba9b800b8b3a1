"""Featurize throughput of the JAX backend vs the torch backend on the digits MLP, in one run.

    python bench/jax_vs_torch.py [--json out.json]

Same weights (canonical layout), data, batch size, k and dtype (float32) for both, and the automatic
ridge, at which both keep a float32 kernel (at ``lambda_reg=1``, ``lambda_max / lambda`` is about 3e4: torch
remade its kernel in float64 while JAX without x64 could not, so the two did different work). Each backend
first featurizes one checkpoint untimed (JAX compiles its step, torch warms up); then a fresh
TRAK featurizes the timed checkpoints, and the JAX step's compilation count is reported to show
that nothing recompiles per batch.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import trak_core
from trak_core.demo.data import load_digits_split
from trak_core.testing.cases import TorchCase, jax_apply, torch_model

from _report import write_json


def weights(seed: int, hidden: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(scale=0.3, size=s).astype("float32") for s in [(hidden, 64), (hidden,), (10, hidden), (10,)]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--proj-dim", type=int, default=2048)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
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
    result = dict(params=sum(a.size for a in ws[0]), n_train=args.n_train, batch=args.batch, proj_dim=args.proj_dim,
                  checkpoints=args.checkpoints, torch_threads=torch.get_num_threads(), jax=jax.__version__,
                  torch=torch.__version__)
    for name, run in (("torch", run_torch), ("jax", run_jax)):
        run(ws[:1])  # warm-up: compile / first-touch, untimed
        compiled = jax_backend.compilations
        start = time.perf_counter()
        run(ws[1:])
        result[f"{name}_examples_per_s"] = args.n_train * args.checkpoints / (time.perf_counter() - start)
        if name == "jax":
            result["jax_recompilations_after_warmup"] = jax_backend.compilations - compiled
    result["jax_over_torch"] = result["jax_examples_per_s"] / result["torch_examples_per_s"]
    print(json.dumps(result, indent=1))
    return write_json(result, args.json)


if __name__ == "__main__":
    main()
