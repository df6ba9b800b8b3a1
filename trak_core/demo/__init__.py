"""End-to-end demo on scikit-learn's bundled ``digits``: ``python -m trak_core.demo``.

Trains a small ensemble of MLPs (PyTorch on CPU by default, or the NumPy reference backend),
attributes 100 test digits to the training digits with TRAK, measures the linear datamodeling
score (LDS) against models retrained on random halves of the training set, prints a table of
TRAK with one and with all checkpoints against a gradient-dot baseline, and saves a PNG of
proponents and opponents.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time
from typing import Any

import numpy as np

from .._progress import progress
from ..errors import install_hint
from ..evaluation import lds, subset_masks
from ..trak import TRAK
from .data import N_DIGITS, load_digits_split
from .options import SEED_LIMIT, check_ranges, check_sizes, lambda_value

__all__ = ["main"]


PROG = "python -m trak_core.demo"
FIGURE_TARGETS = 12  # test digits in the figure (fewer where --n-targets is smaller)
FIGURE_FORMATS = {"png", "pdf", "svg", "svgz", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp", "pgf"}  # matplotlib's


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    about = "End-to-end demo on scikit-learn's bundled digits. " + " ".join(__doc__.split("\n\n")[1].split())
    parser = argparse.ArgumentParser(prog=prog, description=about,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    default_backend = "torch" if importlib.util.find_spec("torch") else "numpy"
    parser.add_argument("--backend", choices=["torch", "numpy"], default=default_backend,
                        help="framework for training and gradients (torch when installed, else numpy)")
    parser.add_argument("--n-train", type=int, default=1000, help="training examples")
    parser.add_argument("--n-targets", type=int, default=100, help="test digits to attribute")
    parser.add_argument("--checkpoints", type=int, default=5, help="independently trained models")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    parser.add_argument("--proj-dim", type=int, default=2048, help="projection dimension k")
    parser.add_argument("--lambda-reg", type=lambda_value, default="auto",
                        help="ridge lambda: a number >= 0, or 'auto' to choose it from the features")
    parser.add_argument("--subsets", type=int, default=64,
                        help="models retrained on random halves for LDS (at least 3)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the data split, the ensemble's training, the projection "
                             "and the LDS subsets")
    parser.add_argument("--png", default="trak_demo.png", help="where to save the picture ('' for none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every option that would otherwise fail only after training, checked up front (``parser.error``, exit 2)."""
    check_ranges(parser, args, {
        "--n-train": (2, N_DIGITS - 1, f"the LDS retrains on random halves of it; the {N_DIGITS} digits less "
                                       f"one target"),
        "--n-targets": (1, N_DIGITS - 2, "test digits to attribute"),
        "--checkpoints": (1, None, "models in the ensemble"),
        "--hidden": (1, None, "units of the hidden layer"),
        "--proj-dim": (1, None, "the projection dimension k"),
        "--subsets": (3, None, "LDS ranks the outputs of the retrained models, which takes at least 3"),
        "--seed": (0, SEED_LIMIT - 1, "the seeds of numpy, torch and the projection are non-negative"),
    })
    check_sizes(parser, args)
    if args.backend == "torch" and importlib.util.find_spec("torch") is None:
        parser.error(f"argument --backend: PyTorch is not installed; {install_hint('torch', 'torch')}; or pass "
                     "--backend numpy")
    if args.png:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error(f"argument --png: the figure needs matplotlib ({install_hint('demo', 'matplotlib')}); "
                         "pass --png '' for no figure")
        if args.png.endswith(("/", os.sep)) or os.path.isdir(args.png):
            parser.error(f"argument --png: {args.png} is a folder; give a file in it, e.g. "
                         f"{os.path.join(args.png, 'trak_demo.png')}")
        extension = os.path.splitext(args.png)[1].lower().lstrip(".")
        if not extension:
            args.png += ".png"  # what matplotlib would write: the path printed at the end is the file's
        elif extension not in FIGURE_FORMATS:
            parser.error(f"argument --png: matplotlib cannot write .{extension} files; end the name with one of "
                         f"{', '.join('.' + f for f in sorted(FIGURE_FORMATS))}")
        folder = os.path.dirname(os.path.abspath(args.png))
        if not os.path.isdir(folder):
            parser.error(f"argument --png: the folder {folder} does not exist; create it, or pass --png '' for "
                         "no figure")


def _recipe(name: str, n_hidden: int) -> Any:
    if name == "torch":
        from .torch_train import TorchRecipe

        return TorchRecipe(64, n_hidden, 10)
    from .numpy_train import NumpyRecipe

    return NumpyRecipe(64, n_hidden, 10)


def _gradient_dot(trak: TRAK, x: Any, y: Any, xt: Any, yt: Any) -> Any:
    """TracIn-style baseline at the final checkpoints: ``mean_c g_c(z_i) . g_c(z'_j)``, unprojected."""
    total = None
    for entry in trak.store:
        grads, _ = trak.backend.gradients(trak.model, entry.prepared, x, y, trak.task)
        target, _ = trak.backend.gradients(trak.model, entry.prepared, xt, yt, trak.task)
        product = grads @ target.T
        total = product if total is None else total + product
    return total / len(trak.store)


def main(argv: list[str] | None = None, prog: str = PROG) -> dict[str, Any]:
    """Run the demo and return its figures (scores, LDS per method, seconds per step).

    ``prog`` is the program name in the usage and error messages (``trak-core demo`` from the CLI).
    """
    parser = _parser(prog)
    args = parser.parse_args(argv)
    _check(parser, args)
    show = not args.quiet and None
    x_np, y_np, xt_np, yt_np = load_digits_split(args.n_train, args.n_targets, args.seed)
    recipe = _recipe(args.backend, args.hidden)
    x, y = recipe.arrays(x_np, y_np)
    xt, yt = recipe.arrays(xt_np, yt_np)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    checkpoints = [recipe.train(x, y, seed=args.seed + c)
                   for c in progress(range(args.checkpoints), desc="train ensemble", enabled=show)]
    seconds["train ensemble"] = time.perf_counter() - start
    logits = [recipe.to_numpy(recipe.logits(c, xt)) for c in checkpoints]
    accuracy = np.mean([np.mean(np.argmax(value, axis=1) == yt_np) for value in logits])
    predicted = np.argmax(np.mean(logits, axis=0), axis=1)  # the ensemble's class

    trak = TRAK(recipe.model, proj_dim=args.proj_dim, lambda_reg=args.lambda_reg, seed=args.seed,
                backend=recipe.backend, progress=show)
    start = time.perf_counter()
    for checkpoint in checkpoints:
        trak.featurize(checkpoint, [(x[i:i + 250], y[i:i + 250]) for i in range(0, args.n_train, 250)])
    seconds["featurize"] = time.perf_counter() - start
    results: dict[str, Any] = {}
    ensemble = f"TRAK, {args.checkpoints} checkpoints" if args.checkpoints > 1 else "TRAK, 1 checkpoint"
    methods = [("TRAK, 1 checkpoint", [0])] + ([(ensemble, None)] if args.checkpoints > 1 else [])
    for label, chosen in methods:  # one TRAK row when the ensemble is one model
        start = time.perf_counter()
        results[label] = recipe.to_numpy(trak.score([(xt, yt)], checkpoints=chosen))
        seconds[f"score ({label})"] = time.perf_counter() - start
    start = time.perf_counter()
    results["gradient dot"] = recipe.to_numpy(_gradient_dot(trak, x, y, xt, yt))
    seconds["gradient dot"] = time.perf_counter() - start

    masks = subset_masks(args.n_train, args.subsets, fraction=0.5, seed=args.seed + 1)
    outputs = np.empty((args.subsets, args.n_targets))
    start = time.perf_counter()
    for s in progress(range(args.subsets), desc="retrain on random halves", enabled=show):
        index = np.flatnonzero(masks[s])
        checkpoint = recipe.train(x[index], y[index], seed=10_000 + s)
        outputs[s] = recipe.margins(checkpoint, xt, yt)
    seconds["retrain for LDS"] = time.perf_counter() - start
    scores = {label: lds(value, masks, outputs) for label, value in results.items()}

    models = f"{args.checkpoints} checkpoint{'s' if args.checkpoints > 1 else ''}"
    targets = f"{args.n_targets} target{'s' if args.n_targets > 1 else ''}"
    print(f"digits: {args.n_train} train, {targets}; MLP 64-{args.hidden}-10 on {args.backend}, "
          f"{models}, test accuracy {accuracy:.3f}; k = {args.proj_dim}, lambda = {args.lambda_reg}; LDS over "
          f"{args.subsets} models retrained on random halves")
    print(f"{'method':<26} {'LDS (mean +- sem)':>18}")
    for label, value in scores.items():
        print(f"{label:<26} {str(value):>18}")
    print(f"{'step':<32} {'seconds':>8}")
    for step, sec in seconds.items():
        print(f"{step:<32} {sec:>8.2f}")
    if args.png:
        from .figure import save_proponents

        save_proponents(args.png, results[ensemble], x_np, y_np, xt_np, yt_np, predicted, n_show=FIGURE_TARGETS)
        shown = min(FIGURE_TARGETS, args.n_targets)  # the figure's first targets: --n-targets 2 showed 2, said 12
        print(f"saved the figure to {os.path.abspath(args.png)}: {shown} test digit{'s' if shown > 1 else ''} (true "
              "and predicted class), each with its top proponent and opponent")
    return {"scores": results, "lds": scores, "seconds": seconds, "accuracy": accuracy, "predicted": predicted}
