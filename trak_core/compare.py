"""Cross-framework comparison: ``trak-core compare``.

Builds the same MLP in every installed framework from one set of weights (trained with the
NumPy reference), runs TRAK on the same digits data with the same projection, and prints how
closely each backend's scores agree with the reference and how long each took.
Tolerances (the conformance suite's): float64 relative error <= 1e-9; float32 relative
Frobenius error <= 1e-4 and per-target Spearman >= 0.9999.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from typing import Any, Callable

import numpy as np

from .evaluation import spearman
from .testing import canonical

__all__ = ["main"]


def _weights(x: np.ndarray, y: np.ndarray, hidden: int, checkpoints: int) -> list[list[np.ndarray]]:
    from .demo.numpy_train import train_mlp
    from .models import MLP

    model = MLP(x.shape[1], hidden, 10)
    out = []
    for c in range(checkpoints):
        params = model.params(train_mlp(model, x, y, seed=c, steps=150))
        out.append([np.asarray(params[name]) for name in model.param_shapes])
    return out


def _runners() -> dict[str, Callable]:
    """Backend id -> function(weights, x, y, xt, yt, dtype, k, lam) returning NumPy scores, or a reason."""
    from .trak import TRAK

    def numpy_run(ws, x, y, xt, yt, dtype, k, lam):
        model = canonical.analytic_model("mlp", ws[0])
        trak = TRAK(model, proj_dim=k, lambda_reg=lam, backend="numpy", progress=False)
        for w in ws:
            trak.featurize(canonical.flat(w).astype(dtype), [(x.astype(dtype), y)])
        return np.asarray(trak.score([(xt.astype(dtype), yt)]))

    def torch_run(ws, x, y, xt, yt, dtype, k, lam):
        import torch

        from .testing.cases import TorchCase, torch_model

        case = TorchCase("cpu")
        trak = TRAK(torch_model("mlp", [w.astype(dtype) for w in ws[0]]), proj_dim=k, lambda_reg=lam,
                    backend="torch", progress=False)
        for w in ws:
            batches = [(torch.as_tensor(x[i:i + 250].astype(dtype)), torch.as_tensor(y[i:i + 250]))
                       for i in range(0, len(y), 250)]
            trak.featurize(case.state_dict("mlp", [a.astype(dtype) for a in w]), batches)
        return trak.score([(torch.as_tensor(xt.astype(dtype)), torch.as_tensor(yt))]).numpy()

    def jax_run(ws, x, y, xt, yt, dtype, k, lam):
        import jax

        from .testing.cases import jax_apply

        with jax.enable_x64(dtype == "float64"), warnings.catch_warnings():  # the backend takes the apply function
            warnings.filterwarnings("ignore", "checkpoint .* ill-conditioned", RuntimeWarning)  # the footnote says it
            trak = TRAK(jax_apply("mlp"), proj_dim=k, lambda_reg=lam, backend="jax", progress=False)
            for w in ws:
                batches = [(x[i:i + 250].astype(dtype), y[i:i + 250]) for i in range(0, len(y), 250)]
                trak.featurize([a.astype(dtype) for a in w], batches)
            return np.asarray(trak.score([(xt.astype(dtype), yt)]))

    runners = {"numpy": numpy_run}
    if importlib.util.find_spec("torch"):
        runners["torch"] = torch_run
    if importlib.util.find_spec("jax"):
        runners["jax"] = jax_run
    return runners


def agreement(scores: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Relative Frobenius error and the smallest per-target Spearman correlation."""
    import array_api_compat.numpy as xp

    error = float(np.linalg.norm(scores - reference) / np.linalg.norm(reference))
    rho = min(spearman(scores[:, j], reference[:, j], xp=xp) for j in range(reference.shape[1]))
    return error, rho


def passes(dtype: str, error: float, rho: float) -> bool:
    """The conformance tolerance for ``dtype``."""
    return error <= 1e-9 if dtype == "float64" else (error <= 1e-4 and rho >= 0.9999)


PROG = "trak-core compare"


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    about = "Cross-framework comparison. " + " ".join(__doc__.split("\n\n")[1].split())
    parser = argparse.ArgumentParser(prog=prog, description=about,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-train", type=int, default=1000, help="training examples (digits)")
    parser.add_argument("--n-targets", type=int, default=100, help="test digits to attribute")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    parser.add_argument("--checkpoints", type=int, default=3, help="independently trained models")
    parser.add_argument("--proj-dim", type=int, default=2048, help="projection dimension k")
    parser.add_argument("--lambda-reg", type=float, default=1.0, help="ridge lambda")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> list[dict[str, Any]]:
    """Run the comparison, print the tables, and return one row per (backend, dtype).

    ``prog`` is the program name in the usage and error messages.
    """
    args = _parser(prog).parse_args(argv)

    from .demo.data import load_digits_split

    x, y, xt, yt = load_digits_split(args.n_train, args.n_targets, seed=0)
    weights = _weights(x, y, args.hidden, args.checkpoints)
    rows, results = [], {}
    for dtype in ("float64", "float32"):
        for name, run in _runners().items():
            run(weights[:1], x[:50], y[:50], xt[:5], yt[:5], dtype, 64, args.lambda_reg)  # warm-up (jit, threads)
            start = time.perf_counter()
            results[name, dtype] = run(weights, x, y, xt, yt, dtype, args.proj_dim, args.lambda_reg)
            rows.append(dict(backend=name, dtype=dtype, seconds=time.perf_counter() - start))
    for row in rows:
        reference = results["numpy", row["dtype"]] if row["dtype"] == "float64" else results["numpy", "float64"]
        row["error"], row["spearman"] = agreement(results[row["backend"], row["dtype"]], reference)
        row["pass"] = passes(row["dtype"], row["error"], row["spearman"])
    print(f"digits MLP 64-{args.hidden}-10, {args.n_train} train x {args.n_targets} targets, {args.checkpoints} "
          f"checkpoints, k = {args.proj_dim}, lambda = {args.lambda_reg}; reference: numpy float64")
    print(f"{'backend':<8} {'dtype':<8} {'seconds':>8} {'rel. error':>11} {'min Spearman':>13} {'within tolerance':>17}")
    for row in rows:
        print(f"{row['backend']:<8} {row['dtype']:<8} {row['seconds']:>8.2f} {row['error']:>11.2e} "
              f"{row['spearman']:>13.6f} {'yes' if row['pass'] else 'NO':>17}")
    if any(row["backend"] == "jax" and row["dtype"] == "float32" and not row["pass"] for row in rows):
        print("jax float32 runs without jax_enable_x64, so its kernel and solves are float32 too (no float64 there); "
              "a larger --lambda-reg (or x64) brings it within tolerance")
    names = sorted({row["backend"] for row in rows})
    print("\npairwise relative error of float32 scores")
    print(" " * 8 + "".join(f"{n:>10}" for n in names))
    for a in names:
        print(f"{a:<8}" + "".join(f"{agreement(results[a, 'float32'], results[b, 'float32'])[0]:>10.1e}"
                                  for b in names))
    return rows
