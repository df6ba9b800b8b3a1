"""``trak-core store PATH``: what an on-disk store holds, for a person or a script watching jobs fill it.

One job: the command: its options, the report of ``trak_core.store_contents.describe`` (re-exported here) as text
or JSON, and the exit status (1 where ``--verify`` finds damage, 2 where the path holds no store). It reads only. No
framework is imported.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .errors import TrakCoreError
from .store_contents import INDEX_LIMIT, MISSING_LISTED, describe  # noqa: F401  (MISSING_LISTED: as before)

__all__ = ["describe", "main"]

PROG = "trak-core store"
#: how many missing indices the text report lists one by one (more: the count and the ranges)
MISSING_SHOWN = 20


def _plural(count: int, word: str, plural: str | None = None) -> str:
    """``"1 checkpoint"``, ``"2 checkpoints"``, ``"4,096 rows"``."""
    return f"{count:,} {word if count == 1 else plural or word + 's'}"


def _missing_line(report: dict[str, Any]) -> str:
    """The text report's line of missing indices: a list up to ``MISSING_SHOWN``, else the count and ranges."""
    count = report.get("missing_count", len(report["missing"]))
    if count <= MISSING_SHOWN:
        return f"missing (no group yet): {report['missing']}"
    ranges = report.get("missing_ranges") or []
    shown = ", ".join(f"{a:,}" if a == b else f"{a:,} to {b:,}" for a, b in ranges[:10])
    more = f", and {_plural(len(ranges) - 10, 'more range')} (--json lists them)" if len(ranges) > 10 else ""
    return f"missing (no group yet): {_plural(count, 'checkpoint')}, {shown}{more}"


def _run_note(c: dict[str, Any], now: float) -> str:
    """Who last wrote an incomplete checkpoint, since when, and whether that process still runs (same host only)."""
    run = c["run"]
    text = f"written by pid {run.get('pid')} on {run.get('host')}, began {_ago(now - run.get('started', now))}"
    if c["written_at"]:
        text += f", last rows {_ago(now - c['written_at'])}"
    if c["running"] is False:
        text += (": not running (rerun its featurize call, which resumes, unless a rerun is under way: a run records "
                 "itself with its first rows)")
    elif c["running"]:
        text += ": running"
    return text


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago" if seconds < 7200 else \
        f"{seconds / 3600:.1f} h ago"


def render(report: dict[str, Any]) -> str:
    """The report of ``describe`` as text."""
    config = report["configuration"]
    keys = ("proj_type", "proj_dim", "seed", "task", "backend", "precision", "n_params", "normalize_features",
            "model")
    lines = [f"trak-core store at {report['path']}",
             "configuration: " + ", ".join(f"{key}={config[key]}" for key in keys if key in config)]
    if report["first_batch_rows"] is not None:
        lines.append(f"training data: first batch of {_plural(report['first_batch_rows'], 'row')}")
    lines += ["", f"{'checkpoint':<11}{'state':<13}{'rows':>9}  {'lambda':<10}{'setting':<9}{'parameters':<14}note"]
    for c in report["checkpoints"]:
        lam = "-" if c["lambda_reg"] is None else f"{c['lambda_reg']:.3g}"
        note = [f"DAMAGED: {c['damaged']}"] if c.get("damaged") else []
        note += ["another configuration than the store's"] if c["configuration"] == "other" else []
        note += ["its lambda_reg does not match the checksum written with it (--verify says more)"] \
            if c.get("ridge_edited") and not c.get("damaged") else []
        note += [f"other training data than checkpoint {c['data_reference']}'s (delete its group c{c['index']} and "
                 "featurize it again on the same data)"] if c.get("data") == "other" else []
        note += [_run_note(c, report["now"])] if c["state"] != "complete" and c["run"] else []
        lines.append(f"{c['index']:<11}{c['state']:<13}{c['rows']:>9,}  {lam:<10}{str(c['lambda_setting'] or '-'):<9}"
                     f"{(c['parameters_sha256'] or '-')[:12]:<14}{'; '.join(note)}".rstrip())
    if not report["checkpoints"]:
        lines.append("(no checkpoint yet)")
    if report["missing"]:
        lines.append(_missing_line(report))
    beyond = report.get("beyond_expect")
    if beyond:
        stored = "checkpoints {} are stored at indices" if len(beyond) > 1 else "checkpoint {} is stored at an index"
        lines.append(f"beyond --expect: {stored.format(beyond)} the array of {_plural(report['expect'], 'job')} does "
                     "not have (another array's jobs, or --expect too small)")
    complete = report.get("opens", report["complete"])
    damaged = any(c["state"] == "damaged" for c in report["checkpoints"])  # TRAK.open refuses a list then
    if complete == [0] == report["complete"] and not damaged:
        lines.append("TRAK.open(path, model, checkpoints) takes a list of its 1 checkpoint (index 0), or a mapping "
                     "{0: checkpoint}")
    elif complete and complete == report["complete"] == list(range(len(complete))) and not damaged:
        lines.append(f"TRAK.open(path, model, checkpoints) takes a list of the {len(complete)} checkpoints 0 to "
                     f"{len(complete) - 1}, or a mapping {{index: checkpoint}} of some")
    elif complete:
        ones = "ones" if len(complete) > 1 else "one"
        together = (" that it can score together" if len(complete) > 1 else " that it can score") \
            if complete != report["complete"] else ""
        lines.append(f"TRAK.open(path, model, checkpoints) takes a mapping {{index: checkpoint}} of the complete "
                     f"{ones}{together}, {complete}")
    lines += ["", "saved scores: " + (", ".join(
        f"{s['name']} ({' x '.join(map(str, s['shape']))}, {s['dtype']}"
        f"{', ' + s['state'] if s['state'] != 'finished' else ''}{', DAMAGED' if s.get('damaged') else ''})"
        if s["shape"] is not None else f"{s['name']} (DAMAGED: {s.get('damaged') or 'its zarr.json cannot be read'})"
        for s in report["scores"]) or (f"DAMAGED: {report['scores_damaged']}" if report.get("scores_damaged")
                                       else "none"))]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = PROG) -> dict[str, Any]:
    """Print what the store holds (``--json``: as JSON); exit status 1 where ``--verify`` finds damage, 2 where the
    path holds no store, or one of another format.

    Parameters
    ----------
    argv : list of str, optional
        The options (default: ``sys.argv[1:]``).
    prog : str
        The program name in the usage and error messages.

    Returns
    -------
    dict
        The report of ``describe``.
    """
    parser = argparse.ArgumentParser(prog=prog, description="What an on-disk trak-core store holds: its "
                                     "configuration, checkpoints (complete, in progress, missing) and saved scores. "
                                     "Reads only.")
    parser.add_argument("path", help="the store's directory or URL (TRAK(..., store=path))")
    parser.add_argument("--verify", action="store_true", help="check every stored chunk, kernel and score set "
                        "against its checksum (reads the whole store); exit status 1 where one fails")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--expect", type=int, metavar="N", help="the number of checkpoints the store is to hold (a "
                        "job array's size): every index below N without a checkpoint yet is listed as missing")
    parser.epilog = ("Exit status: 0; 1 where --verify finds damage; 2 where PATH holds no store yet (before the "
                     "first job wrote its configuration), a store of another format (another trak-core version) or "
                     "the options are wrong. Rows are counted in chunks of "
                     "4,096.")
    args = parser.parse_args(argv)
    if not args.path.strip():
        parser.error(f"PATH is empty ({args.path!r}): pass the store's directory or URL, the path given to "
                     "TRAK(..., store=path)")
    if args.expect is not None and not 0 <= args.expect <= INDEX_LIMIT:
        parser.error(f"--expect must be from 0 to 2**64 (the number of checkpoints; their indices are below 2**64), "
                     f"got {args.expect}")
    try:
        report = describe(args.path, verify=args.verify, expect=args.expect)
    except TrakCoreError as exc:
        parser.exit(2, f"{prog}: {exc}\n")
    print(json.dumps(report, indent=1, default=str) if args.json else render(report))
    if report["damaged"]:
        print(f"{prog}: damaged parts found (exit status 1)", file=sys.stderr)
        raise SystemExit(1)
    return report
