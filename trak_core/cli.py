"""The ``trak-core`` command: ``trak-core demo`` and ``trak-core compare``."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Dispatch to the demo or the cross-framework comparison."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"demo": "trak_core.demo", "compare": "trak_core.compare"}
    if not argv or argv[0] not in commands:
        print("usage: trak-core {demo,compare} [options]   (trak-core COMMAND --help for the options)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
