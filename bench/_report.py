"""Shared by the benchmark scripts: write their results as JSON where asked."""
from __future__ import annotations

import json
from typing import Any


def write_json(result: Any, path: str | None) -> Any:
    """Write ``result`` to ``path`` (when given) as indented JSON; returns ``result``."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result
