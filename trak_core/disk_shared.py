"""An on-disk store written by several jobs at once, one checkpoint each (``TRAK.featurize(..., index=i)``).

One job: what ``trak_core.disk_store.DiskStore`` reads and checks of the checkpoints other jobs write: the complete
ones, their parameters' hashes and training data digests, and the configuration hash each shared checkpoint records
(``configuration_sha256``, and the model record, ``model``: jobs that began the store at the same moment with other
settings or another model would otherwise each take theirs for the store's, and the last to write it would win); and
the checksums written with the store's configuration and with each checkpoint's ridge, so that a hand edit of either
is refused rather than scored; and who is writing a checkpoint (``run_record``, ``run_state``). One run at a time per
checkpoint is ``trak_core.disk_claim``'s.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any

from .disk_layout import CHECKPOINT_GROUP, member, member_names
from .errors import StoreMismatchError

__all__ = ["checkpoint_indices", "configuration_digest", "check_configuration", "checked_configuration",
           "checked_lambda", "data_reference", "live_elsewhere", "run_record", "run_state"]


def checkpoint_indices(root: Any, *, complete: bool = True) -> list[int]:
    """The indices of the ``c{i}`` groups in ``root`` (read now: other jobs add theirs) whose metadata zarr reads,
    only the complete ones by default, in order."""
    found = []
    for name in member_names(root):  # a group whose zarr.json is damaged is left out (disk_layout.damaged_checkpoints)
        match = CHECKPOINT_GROUP.fullmatch(name)
        group = member(root, name) if match else None
        if group is not None and (not complete or group.attrs.get("complete", False)):
            found.append(int(match.group(1)))
    return sorted(found)


def data_reference(group: Any) -> tuple[dict[str, str], int] | None:
    """``(data_checksums, rows)`` of a complete checkpoint's group: what another checkpoint's data must match;
    ``None`` where it recorded no digests (a store written before trak-core kept them)."""
    checksums = dict(group.attrs.get("data_checksums", {}))
    features = member(group, "features") if checksums else None  # None: absent or unreadable (``has_member``)
    if features is None:
        return None
    return checksums, int(features.shape[0])


def configuration_digest(configuration: dict) -> str:
    """SHA-256 of the store's configuration fingerprint (key order aside)."""
    return hashlib.sha256(json.dumps(configuration, sort_keys=True, default=str).encode()).hexdigest()


def check_configuration(path: Any, index: int, attrs: Any, root: Any) -> None:
    """Refuse checkpoint ``index`` (its group's attributes ``attrs``) where the configuration hash it recorded when
    its job began (``configuration_sha256``; none: written alone, nothing to check) is not that of the store's root
    attributes ``root`` read now (``None``: nothing to check), or the model record it recorded (``model``) is not the
    root's: jobs that began the store at the same moment with other settings or another model."""
    configuration = None if root is None else root.get("trak_core")
    recorded, model, stored_model = attrs.get("configuration_sha256"), attrs.get("model"), (root or {}).get("model")
    if model is not None and stored_model is not None and model != stored_model:
        raise StoreMismatchError(f"checkpoint {index} in {path} was featurized with another model than the store's "
                                 f"(model: the store's {stored_model!r}, checkpoint {index}'s {model!r}; another job "
                                 "began the store at the same moment with another model): its scores would mix two "
                                 "architectures. Featurize it again with the store's model into a new store path, or "
                                 f"delete its group c{index} and featurize it again with the store's model")
    if recorded is None or configuration is None or recorded == configuration_digest(configuration):
        return
    raise StoreMismatchError(f"checkpoint {index} in {path} was featurized with another configuration than the "
                             "store's (another job began the store at the same moment with other settings: proj_dim, "
                             "seed, task, backend...); featurize it again with the store's settings into a new store "
                             f"path, or delete its group c{index} and featurize it again with the store's settings")


def checked_configuration(root: Any, path: Any) -> dict | None:
    """The configuration fingerprint in a store's root attributes ``root`` (``None``: none written yet), checked
    against the hash written with it (``configuration_sha256``; a store written before trak-core kept it: unchecked).
    """
    configuration = root.get("trak_core")
    if configuration is not None:
        _check_written(configuration, root.get("configuration_sha256"), "the stored configuration",
                       f"{path}/zarr.json", "restore that file from a copy of the store, or featurize again into a "
                       "new store path")
    return None if configuration is None else dict(configuration)


def checked_lambda(attrs: Any, path: Any, index: int) -> dict[str, Any]:
    """``{"lambda_reg", "lambda_setting"}`` of checkpoint ``index`` (its group's attributes ``attrs``), checked
    against the hash written with them (``lambda_sha256``; a store written before trak-core kept it: unchecked)."""
    values = {"lambda_reg": attrs.get("lambda_reg"), "lambda_setting": attrs.get("lambda_setting")}
    _check_written(values, attrs.get("lambda_sha256"), f"the stored ridge of checkpoint {index} (lambda_reg, "
                   "lambda_setting)", f"{path}/c{index}/zarr.json", "restore that file from a copy of the store, pass "
                   "lambda_reg= to TRAK.open (every checkpoint is refit with it), or delete the group "
                   f"c{index} and featurize that checkpoint again")
    return values


def _check_written(values: dict, recorded: str | None, what: str, file: str, fix: str) -> None:
    """A ``StoreMismatchError`` where ``values`` do not hash to ``recorded`` (``None``: not recorded, unchecked)."""
    if recorded is not None and recorded != configuration_digest(values):
        raise StoreMismatchError(f"{what} does not match the checksum written with it; it was edited or damaged: "
                                 f"{file} (which field changed cannot be told, and nothing was written). To use the "
                                 f"store, {fix}")


def run_record() -> dict[str, Any]:
    """Who is writing a checkpoint: ``{"host", "pid", "started"}`` (seconds since the epoch), recorded with the first
    thing a run writes to it (a new checkpoint's parameters hash, then each chunk of rows)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def live_elsewhere(run: dict | None) -> bool:
    """Whether ``run`` (``run_record``) names another process that still runs on this host."""
    return bool(run_state(run)) and int(run.get("pid", -1)) != os.getpid()


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
