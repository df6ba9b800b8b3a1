"""Command-line options shared by ``trak-core demo`` and ``trak-core compare``: types and range checks.

Every numeric option is checked right after parsing, before any data is loaded or any model is
trained, so that a value that cannot work is an argparse error (exit status 2, the usage line, and
a message naming the option, its allowed range and the value given) instead of a traceback after
minutes of training.
"""
from __future__ import annotations

import argparse
import math

from .data import N_DIGITS

__all__ = ["SEED_LIMIT", "check_ranges", "check_sizes", "lambda_value"]

#: the demo's seeds are below this (TRAK's projection seed and torch's generator take values below 2**64,
#: and the demo also uses ``seed + checkpoint`` and ``seed + 1``)
SEED_LIMIT = 2**63


def lambda_value(text: str) -> float | str:
    """The ``--lambda-reg`` type: ``"auto"``, or a finite number ``>= 0``.

    Parameters
    ----------
    text : str
        The option's value on the command line.

    Returns
    -------
    float or str
        ``"auto"`` or the number.

    Raises
    ------
    argparse.ArgumentTypeError
        For anything else (argparse turns it into ``argument --lambda-reg: ...``, exit status 2).
    """
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a finite number >= 0, got {text!r}")
    return value


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 ranges: dict[str, tuple[int, int | None, str]]) -> None:
    """Exit through ``parser.error`` when an integer option is out of its range.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser whose ``error`` prints the usage and exits with status 2.
    args : argparse.Namespace
        The parsed options.
    ranges : dict
        ``{"--flag": (lowest, highest or None, why)}``; ``why`` says what the bound comes from.
    """
    for flag, (low, high, why) in ranges.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"from {low} to {_show(high)}"
            parser.error(f"argument {flag}: must be {allowed} ({why}), got {value}")


def _show(value: int) -> str:
    """``value`` as written in the messages: ``2**63 - 1`` rather than its 19 digits."""
    power = (value + 1).bit_length() - 1
    return f"2**{power} - 1" if value >= 2**32 and value + 1 == 2**power else str(value)


def check_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through ``parser.error`` when ``--n-train`` plus ``--n-targets`` exceed the digits data set.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The parser whose ``error`` prints the usage and exits with status 2.
    args : argparse.Namespace
        The parsed options, with ``n_train`` and ``n_targets``.
    """
    if args.n_train + args.n_targets > N_DIGITS:
        parser.error(f"argument --n-train/--n-targets: --n-train + --n-targets must be at most {N_DIGITS} (the "
                     f"digits data set has {N_DIGITS} images), got {args.n_train} + {args.n_targets} = "
                     f"{args.n_train + args.n_targets}; lower one of them")
