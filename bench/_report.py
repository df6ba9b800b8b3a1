"""Shared by the benchmark scripts: write their results as JSON where asked."""
from __future__ import annotations

import json
import pathlib
from typing import Any


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
