"""Shared by the benchmark scripts: write their results as JSON where asked; the machine facts and load average
(`load_average`, `cpu`, `facts`) come from trak_core._machine, which `trak-core compare` uses too."""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from trak_core._machine import cpu, describe, facts, load_average  # noqa: F401  (one copy, in trak_core: compare uses it too)


def write_json(result: Any, path: str | None) -> Any:
    """Write ``result`` to ``path`` (when given; its folder made as needed) as indented JSON; returns ``result``."""
    if path:
        write_text(path, json.dumps(result, indent=2))
    return result


def write_text(path: Any, text: str) -> None:
    """Write ``text`` to ``path``, making its folder first (a missing folder failed after all the measuring)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def require_cuda(parser: Any, device: str) -> None:
    """Refuse, through ``parser``, a CUDA ``device`` that torch does not see (a traceback deep in the run before)."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"argument --device: {device} asked, but torch {torch.__version__} sees no CUDA device "
                         "(--device cpu rehearses the script on a CPU)")


def now() -> str:
    """The date and time a run started, for its report."""
    return time.strftime("%Y-%m-%d %H:%M %Z")
