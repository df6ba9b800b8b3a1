"""Cross-framework comparison: ``trak-core compare``.

Builds the same MLP in every installed framework from one set of weights (trained with the
NumPy reference), runs TRAK on the same digits data with the same projection and ridge, and prints
how closely each backend's scores agree with the NumPy float64 reference and how long each took, on which
machine (CPU, cores, the versions of Python and the frameworks, threads, load average before and after).
Tolerances (the conformance suite's): float64 relative error <= 1e-9; float32 relative
Frobenius error <= 1e-4 and per-target Spearman >= 0.9999 (over the targets whose reference scores are not all
equal: a constant target has no ranks, is left out and counted; a constant or NaN column of a backend where the
reference varies fails). The float32 tolerance presumes a
well-conditioned kernel: a float32 kernel costs scores up to about 1e-7 * lambda_max / lambda relative,
so TRAK makes it again in float64 when lambda_max / lambda > 1000 and the framework has float64
(JAX without jax_enable_x64 has not); the kernel column shows the dtype each run factorized in.

Measured at the defaults (lambda "auto", TRAK's default): lambda_max / lambda = 131 and the float32
rows are 3.8e-6 (torch) to 8.8e-6 (JAX) off the reference, float32 kernels all. At ``--lambda-reg 1``
(compare's default before, and the ratio 13,500) torch and NumPy float32 use float64 kernels (8e-7
off) and JAX, in float32, is 2.4e-4 off: outside the tolerance, and the table says why.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from ._machine import describe, facts, load_average
from .demo.data import N_DIGITS
from .demo.options import check_ranges, check_sizes, lambda_value
from .evaluation import spearman
from .kernel import AUTO_FLOAT32_MAX_RATIO
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
    """Backend id -> function(weights, x, y, xt, yt, dtype, k, lam) returning the NumPy scores and the TRAK."""
    from .trak import TRAK

    def numpy_run(ws, x, y, xt, yt, dtype, k, lam):
        model = canonical.analytic_model("mlp", ws[0])
        trak = TRAK(model, proj_dim=k, lambda_reg=lam, backend="numpy", progress=False)
        for w in ws:
            trak.featurize(canonical.flat(w).astype(dtype), [(x.astype(dtype), y)])
        return np.asarray(trak.score([(xt.astype(dtype), yt)])), trak

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
        return trak.score([(torch.as_tensor(xt.astype(dtype)), torch.as_tensor(yt))]).numpy(), trak

    applies: list = []

    def jax_run(ws, x, y, xt, yt, dtype, k, lam):
        import jax

        from .testing.cases import jax_apply

        if not applies:  # one apply function for every run: the backend's compiled steps are kept per function
            applies.append(jax_apply("mlp"))
        with jax.enable_x64(dtype == "float64"), warnings.catch_warnings():  # the backend takes the apply function
            warnings.filterwarnings("ignore", "checkpoint .* ill-conditioned", RuntimeWarning)  # the footnote says it
            trak = TRAK(applies[0], proj_dim=k, lambda_reg=lam, backend="jax", progress=False)
            for w in ws:
                batches = [(x[i:i + 250].astype(dtype), y[i:i + 250]) for i in range(0, len(y), 250)]
                trak.featurize([a.astype(dtype) for a in w], batches)
            return np.asarray(trak.score([(xt.astype(dtype), yt)])), trak

    runners = {"numpy": numpy_run}
    if importlib.util.find_spec("torch"):
        runners["torch"] = torch_run
    if importlib.util.find_spec("jax"):
        runners["jax"] = jax_run
    return runners


def kernel_dtype(trak: Any) -> str:
    """The dtype the featurized checkpoints' kernels were factorized in (``"float32"``, ``"float64"``)."""
    names = sorted({str(entry.factor.arrays[0].dtype).rsplit(".", 1)[-1] for entry in trak.store})
    return "/".join(names)


def conditioning(trak: Any) -> float:
    """The largest ``lambda_max(Phi^T Phi) / lambda`` over the checkpoints of a NumPy TRAK (inf at lambda 0).

    Parameters
    ----------
    trak : TRAK
        Featurized with the ``"numpy"`` backend (the reference run).

    Returns
    -------
    float
        The ratio ``TRAK(kernel_dtype="auto")`` compares with ``kernel.AUTO_FLOAT32_MAX_RATIO``.
    """
    ratios = []
    for entry in trak.store:
        phi = np.asarray(entry.features, dtype=np.float64)
        small = phi @ phi.T if phi.shape[0] <= phi.shape[1] else phi.T @ phi  # same non-zero eigenvalues
        top = float(np.linalg.eigvalsh(small)[-1])
        ratios.append(top / entry.factor.lambda_reg if entry.factor.lambda_reg > 0 else np.inf)
    return max(ratios)


def agreement(scores: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Relative Frobenius error and the smallest per-target Spearman correlation (``min_spearman``).

    Parameters
    ----------
    scores, reference : numpy.ndarray
        Shape ``(n_train, n_targets)``.

    Returns
    -------
    tuple of float
        ``||scores - reference||_F / ||reference||_F`` and ``min_spearman(scores, reference)[0]``.
    """
    error = float(np.linalg.norm(scores - reference) / np.linalg.norm(reference))
    return error, min_spearman(scores, reference)[0]


def min_spearman(scores: np.ndarray, reference: np.ndarray) -> tuple[float, list[int]]:
    """The smallest per-target Spearman correlation, over the targets whose reference ranks are defined.

    A target whose reference scores are all equal has no ranks to agree with (Spearman is undefined, NaN): it is
    left out, and listed; the relative error still covers it. A target whose reference varies but whose ``scores``
    are constant or NaN is kept, with NaN, so that the smallest is NaN and the rank tolerance fails. The result
    does not depend on the order of the targets.

    Parameters
    ----------
    scores, reference : numpy.ndarray
        Shape ``(n_train, n_targets)``.

    Returns
    -------
    tuple
        The smallest correlation (NaN where a kept target's is NaN, or where every target is left out) and the
        indices of the targets left out.
    """
    import array_api_compat.numpy as xp

    left_out = [j for j in range(reference.shape[1]) if np.all(reference[:, j] == reference[0, j])]
    kept = sorted(set(range(reference.shape[1])) - set(left_out))
    rhos = [spearman(scores[:, j], reference[:, j], xp=xp) for j in kept]
    if not rhos or any(np.isnan(rho) for rho in rhos):
        return float("nan"), left_out
    return min(rhos), left_out


def passes(dtype: str, error: float, rho: float) -> bool:
    """The conformance tolerance for ``dtype``: float64 ``error <= 1e-9``; float32 ``error <= 1e-4`` and
    ``rho >= 0.9999``."""
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
    parser.add_argument("--lambda-reg", type=lambda_value, default="auto",
                        help="ridge lambda: a number >= 0, or 'auto' to choose it per checkpoint from the features "
                             "(TRAK's default)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The sizes, checked before any training (``parser.error``, exit status 2)."""
    check_ranges(parser, args, {
        "--n-train": (2, N_DIGITS - 1, f"Spearman ranks the training examples; the {N_DIGITS} digits less one target"),
        "--n-targets": (1, N_DIGITS - 2, "test digits to attribute"),
        "--hidden": (1, None, "units of the hidden layer"),
        "--checkpoints": (1, None, "independently trained models"),
        "--proj-dim": (1, None, "the projection dimension k"),
    })
    check_sizes(parser, args)


def _left_out_note(left_out: list[int], n_targets: int) -> list[str]:
    """The line that says which targets the Spearman column leaves out (``min_spearman``), if any."""
    if not left_out:
        return []
    shown = f"{left_out[:10]}{' ...' if len(left_out) > 10 else ''}"
    if len(left_out) == n_targets:
        return [f"min Spearman: undefined for all {n_targets} targets (the reference's scores of each are all equal: "
                "no ranks to compare), so no float32 row can meet the rank tolerance"]
    return [f"min Spearman: over {n_targets - len(left_out)} of {n_targets} targets; {len(left_out)} left out, "
            f"{shown}, whose reference scores are all equal (no ranks: undefined); the relative error covers them"]


def _footnotes(rows: list[dict[str, Any]], ratio: float) -> list[str]:
    """Why each row outside the tolerance is."""
    notes = []
    for row in rows:
        if row["pass"]:
            continue
        name = f"{row['backend']} {row['dtype']}"
        if row["dtype"] == "float32" and len(row["spearman_left_out"]) == row["scores"].shape[1]:
            continue  # _left_out_note says why
        if row["dtype"] == "float32" and row["kernel"] == "float32" and ratio > AUTO_FLOAT32_MAX_RATIO:
            jax = row["backend"] == "jax"
            why = "this row runs JAX without x64, as float32 users do: no float64 kernel" if jax else "no float64 here"
            notes.append(f"{name}: its kernel is float32 ({why}) at lambda_max / lambda = {ratio:.3g}, above the "
                         f"{AUTO_FLOAT32_MAX_RATIO:g} up to which TRAK keeps float32 kernels (they cost scores about "
                         "1e-7 * lambda_max / lambda relative); the float32 rows with a float64 kernel made theirs "
                         "again in float64. --lambda-reg auto (the default) or a larger lambda brings it within "
                         "tolerance.")
        else:
            notes.append(f"{name}: outside the tolerance with a {row['kernel']} kernel at lambda_max / lambda = "
                         f"{ratio:.3g}; that is a defect of the backend, please report it.")
    return notes


def main(argv: list[str] | None = None, prog: str = PROG) -> list[dict[str, Any]]:
    """Run the comparison, print the tables, and return one row per (backend, dtype).

    Parameters
    ----------
    argv : list of str, optional
        The options (default: ``sys.argv[1:]``).
    prog : str
        The program name in the usage and error messages.

    Returns
    -------
    list of dict
        Per (backend, dtype): ``backend``, ``dtype``, ``seconds``, ``kernel`` (the dtype its kernels were
        factorized in), ``scores`` (NumPy, ``(n_train, n_targets)``), ``error`` and ``spearman`` (against
        the NumPy float64 scores; ``min_spearman``), ``spearman_left_out`` (the targets it leaves out), ``pass``
        (within tolerance), ``lambdas`` (per checkpoint) and ``ratio``
        (the reference's largest ``lambda_max / lambda``), ``machine`` (the same for every row: CPU, cores,
        versions, threads, the load average before and after; printed under the header line).
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    _check(parser, args)

    from .demo.data import load_digits_split

    load_before = load_average()  # timings on a shared machine are read against its load
    x, y, xt, yt = load_digits_split(args.n_train, args.n_targets, seed=0, who=parser.prog)
    weights = _weights(x, y, args.hidden, args.checkpoints)
    rows, runs, broken = [], {}, {}
    for dtype in ("float64", "float32"):
        for name, run in _runners().items():
            if name in broken:
                continue
            try:  # warm-up at the timed run's shapes and k (JAX compiles per shape: it was timed compiling)
                run(weights[:1], x, y, xt, yt, dtype, args.proj_dim, args.lambda_reg)
            except ImportError as exc:  # installed, but its import fails: the other frameworks still compare
                broken[name] = f"{name}: not compared, importing it failed ({type(exc).__name__}: {exc})"
                continue
            start = time.perf_counter()
            scores, trak = run(weights, x, y, xt, yt, dtype, args.proj_dim, args.lambda_reg)
            runs[name, dtype] = trak
            rows.append(dict(backend=name, dtype=dtype, seconds=time.perf_counter() - start, scores=scores,
                             kernel=kernel_dtype(trak), lambdas=[float(v) for v in trak.lambdas]))
    machine = dict(facts(), load_before=load_before)  # after the runs: torch's thread count once it is imported
    reference = next(row for row in rows if (row["backend"], row["dtype"]) == ("numpy", "float64"))
    ratio = conditioning(runs["numpy", "float64"])
    for row in rows:
        row["error"] = agreement(row["scores"], reference["scores"])[0]
        row["spearman"], row["spearman_left_out"] = min_spearman(row["scores"], reference["scores"])
        row["pass"], row["ratio"] = passes(row["dtype"], row["error"], row["spearman"]), ratio
        row["machine"] = machine
    lambdas = reference["lambdas"]
    chosen = (f"{lambdas[0]:.4g}" if len(lambdas) == 1
              else f"{min(lambdas):.4g} to {max(lambdas):.4g} over the checkpoints")
    shown = f"auto ({chosen})" if args.lambda_reg == "auto" else f"{args.lambda_reg:g}"
    models = f"{args.checkpoints} checkpoint{'s' if args.checkpoints > 1 else ''}"
    targets = f"{args.n_targets} target{'s' if args.n_targets > 1 else ''}"
    print(f"digits MLP 64-{args.hidden}-10, {args.n_train} train x {targets}, {models}, "
          f"k = {args.proj_dim}, lambda = {shown}; reference: numpy float64")
    print(describe(machine))
    print(f"lambda_max / lambda = {ratio:.3g} (TRAK keeps float32 kernels up to {AUTO_FLOAT32_MAX_RATIO:g}, else makes "
          "them in float64 where it can)")
    print(f"{'backend':<8} {'dtype':<8} {'kernel':<8} {'seconds':>8} {'rel. error':>11} {'min Spearman':>13} "
          f"{'within tolerance':>17}")
    for row in rows:
        print(f"{row['backend']:<8} {row['dtype']:<8} {row['kernel']:<8} {row['seconds']:>8.2f} {row['error']:>11.2e} "
              f"{row['spearman']:>13.6f} {'yes' if row['pass'] else 'NO':>17}")
    for note in _left_out_note(reference["spearman_left_out"], args.n_targets) + _footnotes(rows, ratio) + \
            list(broken.values()):
        print(note)
    absent = [name for name in ("torch", "jax") if name not in _runners()]
    if absent:
        print(f"not installed here, so not compared: {', '.join(absent)}")
    names = sorted({row["backend"] for row in rows})
    float32 = {row["backend"]: row["scores"] for row in rows if row["dtype"] == "float32"}
    print("\npairwise relative error of float32 scores")
    print(" " * 8 + "".join(f"{n:>10}" for n in names))
    for a in names:
        print(f"{a:<8}" + "".join(f"{agreement(float32[a], float32[b])[0]:>10.1e}" for b in names))
    return rows
