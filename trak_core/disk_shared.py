"""An on-disk store written by several jobs at once, one checkpoint each (``TRAK.featurize(..., index=i)``).

One job: what ``trak_core.disk_store.DiskStore`` reads and checks of the checkpoints other jobs write: the complete
ones, their parameters' hashes and training data digests, and the configuration hash each shared checkpoint records
(``configuration_sha256``: jobs that began the store at the same moment with other settings would otherwise each
take their own configuration for the store's, and the last to write it would win).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from typing import Any

from .errors import StoreMismatchError

__all__ = ["checkpoint_indices", "configuration_digest", "check_configuration", "data_reference", "run_record",
           "run_state"]

_CHECKPOINT = re.compile(r"c(\d+)")


def checkpoint_indices(root: Any, *, complete: bool = True) -> list[int]:
    """The indices of the ``c{i}`` groups in ``root`` (read now: other jobs add theirs), only the complete ones by
    default, in order."""
    found = []
    for name in root.group_keys():
        match = _CHECKPOINT.fullmatch(name)
        if match and (not complete or root[name].attrs.get("complete", False)):
            found.append(int(match.group(1)))
    return sorted(found)


def data_reference(group: Any) -> tuple[dict[str, str], int] | None:
    """``(data_checksums, rows)`` of a complete checkpoint's group: what another checkpoint's data must match;
    ``None`` where it recorded no digests (a store written before trak-core kept them)."""
    checksums = dict(group.attrs.get("data_checksums", {}))
    if not checksums or "features" not in group:
        return None
    return checksums, int(group["features"].shape[0])


def configuration_digest(configuration: dict) -> str:
    """SHA-256 of the store's configuration fingerprint (key order aside)."""
    return hashlib.sha256(json.dumps(configuration, sort_keys=True, default=str).encode()).hexdigest()


def check_configuration(path: Any, index: int, recorded: str | None, configuration: dict | None) -> None:
    """Refuse checkpoint ``index`` where the hash it recorded when its job began (``recorded``; ``None``: written
    alone, nothing to check) is not that of the store's configuration read now."""
    if recorded is None or configuration is None or recorded == configuration_digest(configuration):
        return
    raise StoreMismatchError(f"checkpoint {index} in {path} was featurized with another configuration than the "
                             "store's (another job began the store at the same moment with other settings: proj_dim, "
                             "seed, task, backend...); featurize it again with the store's settings into a new store "
                             "path, or delete its group c{index} and featurize it again with the store's settings")


def run_record() -> dict[str, Any]:
    """Who is writing a checkpoint: ``{"host", "pid", "started"}`` (seconds since the epoch), recorded with the first
    thing a run writes to it (a new checkpoint's parameters hash, then each chunk of rows)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def run_state(run: dict | None) -> bool | None:
    """Whether the process of ``run`` (``run_record``) is still running: ``None`` where that cannot be told here
    (no record, or another host)."""
    if not run or run.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(run["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    except (OSError, ValueError, KeyError, TypeError):  # a bad record
        return None
    return True
