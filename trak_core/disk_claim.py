"""One run at a time per checkpoint of an on-disk store (``trak_core.disk_store``).

One job: a run's claim on the checkpoint it writes (an ``flock`` of the group's directory), the refusal of a second
run at an index another process is writing (two jobs featurizing the same index at once, a requeued array task,
wrote over each other's metadata and temporary files, and one of them failed), and the take-over of an index a run
killed before its first rows left with its parameters' hash. A store at a URL other than ``file://`` (``s3://``,
``memory://``...) has no directory to lock: its claim is the run record alone (``CheckpointClaim`` without a
directory), which tells a run of another process on this host only.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import threading
import time
from typing import Any

from .disk_listing import lookup
from .disk_shared import live_elsewhere, run_state
from .errors import TrakOSError

try:
    import fcntl
except ImportError:  # Windows: no flock, the run record tells instead
    fcntl = None  # type: ignore[assignment]

__all__ = ["CheckpointClaim", "busy_error", "claim_checkpoint", "recorded_run", "refuse_busy", "take_over"]

log = logging.getLogger("trak_core")

_RUN_RECORDS = ("parameters_sha256", "dtype", "data_checksums", "kronecker_plan")  # what a run records before rows
_HELD: dict[str, "CheckpointClaim"] = {}  # this process's claims by directory: a newer one takes an older one's place
_HELD_LOCK = threading.Lock()


class CheckpointClaim:
    """A run's claim on a checkpoint it may write: an exclusive ``flock`` of the checkpoint's group directory, opened
    read-only (taking it writes nothing), held until ``release`` and dropped by the system when the process ends,
    by SIGKILL too, so a killed job's checkpoint is free for its rerun. Within one process the newest claim on a
    directory wins: an estimator that stopped without releasing its claim (a refused ``TRAK.open`` or ``featurize``
    whose traceback still holds it) does not bar the next call in the same process, which a lock per file
    description would (runs at one index in two threads of a process are not supported).

    Parameters
    ----------
    directory : pathlib.Path or None
        The group's directory (``c{i}``); ``None`` for a store at a URL other than ``file://`` (nothing to lock).
    run : dict or None
        The group's run record (``run_record``), read where the filesystem takes no ``flock`` on a directory (some
        network filesystems; Windows) or there is no directory: the claim is then held unless it names another
        process running on this host.

    Attributes
    ----------
    held : bool
        False where another process holds the claim: it is writing the checkpoint now (``refuse_busy``).
    """

    def __init__(self, directory: pathlib.Path | None, run: dict | None) -> None:
        self.fd: int | None = None
        self.held = True
        self.key: str | None = None
        if directory is None:  # a store at a URL: no lock, the run record tells
            self.held = not live_elsewhere(run)
            return
        self.key = os.path.realpath(directory)
        with _HELD_LOCK:
            earlier = _HELD.pop(self.key, None)
        if earlier is not None:
            earlier.release()
        try:
            self.fd = os.open(directory, os.O_RDONLY)
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with _HELD_LOCK:
                    _HELD[self.key] = self
                return
        except BlockingIOError:  # another process holds it
            self.held = False
            self.release()
            return
        except OSError:  # no flock on this filesystem
            pass
        self.held = False  # nothing locked: release only closes
        self.release()
        self.held = not live_elsewhere(run)  # a process recorded on this host

    def release(self) -> None:
        """Drop the claim; again: nothing. Unlocked before the directory is closed: a child forked while it was held
        (a ``DataLoader``'s workers) shares the lock, which closing this process's descriptor alone would leave
        held, and the next run in this process would be refused as another's."""
        with _HELD_LOCK:
            if _HELD.get(self.key) is self:
                del _HELD[self.key]
        if self.fd is not None:
            try:
                if fcntl is not None and self.held:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # at interpreter exit: the system drops it anyway
            pass


def claim_checkpoint(store: Any, index: int) -> CheckpointClaim | None:
    """The claim on checkpoint ``index`` of an on-disk ``store`` (``trak_core.disk_store.DiskStore``), its group
    created where absent, taken before the checkpoint's writer reads the group (a store at a URL other than
    ``file://``: its run record alone, ``CheckpointClaim``); ``None`` for a complete checkpoint (a run only reads
    it)."""
    from .disk_writer import one_writer

    name = f"c{index}"
    try:  # read once: its writer takes the same group (in a call that reads the store, disk_listing.reading)
        group, absent = lookup(store.root, name), False
    except KeyError:
        group, absent = None, True
    except Exception:  # metadata zarr cannot read: `in` raises as before
        group, absent = None, None
    if absent or (absent is None and name not in store.root):
        store.writable()
    try:
        if not hasattr(group, "require_group"):  # absent, or an array: require_group creates it or says why
            with one_writer(store.path):
                group = store.root.require_group(name)
    except TrakOSError:
        if not store.shared:
            raise
        group = store.root[name]  # another job at this index created it at the same moment
    if group.attrs.get("complete", False):
        return None
    return CheckpointClaim(store.checkpoint_folder(index), group.attrs.get("run"))


def refuse_busy(writer: Any, index: int, where: str) -> None:
    """Refuse checkpoint ``index`` where another process holds its claim (``writer.claim``): it is writing its rows
    now, and a second run would write them again over it (before any write of this run). Complete meanwhile: it
    only reads it."""
    claim = getattr(writer, "claim", None)
    if claim is None or claim.held or writer.complete:
        return
    raise busy_error(index, where, writer.group.attrs.get("run"))


def busy_error(index: int, where: str, run: dict | None) -> TrakOSError:
    """The error for a run at checkpoint ``index`` that another process is writing (its ``run`` record, if any)."""
    ours = bool(run) and run.get("pid") == os.getpid() and run.get("host") == socket.gethostname()
    if run and run_state(run) is not False and not ours:  # ours: a record this process left before (a new run
        # at the index records itself with its first rows)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(run.get("started", 0))))
        holder = f"pid {run.get('pid')} on {run.get('host')}, started {started}"
    else:
        holder = "one that has not recorded its pid in the group yet"
    return TrakOSError(f"checkpoint {index} in {where} is being featurized by another process now ({holder}): two "
                       "runs at one index would write its rows twice at once. Wait for it to finish (then this call "
                       f"finds the checkpoint complete; 'trak-core store {where}' shows its rows), or, if it was "
                       "stopped, rerun this call, which resumes from the rows it stored. Nothing was written")


def take_over(writer: Any, index: int, where: str) -> bool:
    """Whether this run takes checkpoint ``index`` over from a run that recorded other parameters' hash and then
    died before its first rows (SIGKILL: a run refused or interrupted takes its hash back itself,
    ``_identity.parameters_recorded``): no row recorded, not complete, its run record names a process that no
    longer runs on this host (or none: a store written before trak-core kept it), and this run holds the claim.
    Such a group holds nothing of value: its hash and what that run recorded of its data (``dtype``,
    ``data_checksums``, ``kronecker_plan``) are forgotten here (this run records its own) and logged."""
    claim, attrs = getattr(writer, "claim", None), writer.group.attrs
    run = attrs.get("run")
    if claim is None or not claim.held or writer.complete or int(attrs.get("rows_done", 0)) or \
            (run and run_state(run) is not False):
        return False
    who = f"pid {run.get('pid')} on {run.get('host')}, no longer running" if run else "no run recorded"
    log.info("checkpoint %d in %s: taken over from a run of other parameters (parameters_sha256 %s...) that stored "
             "no rows and ended (%s); this checkpoint's parameters replace its hash", index, where,
             str(attrs.get("parameters_sha256"))[:12], who)
    writer.store.writable()
    for key in _RUN_RECORDS:
        if key in attrs:
            del attrs[key]
    writer.parameters_digest, writer.plan_digest, writer._data = None, None, {}
    return True


def recorded_run(folder: Any) -> dict | None:
    """The run record (``disk_shared.run_record``) in the group ``zarr.json`` of checkpoint ``folder`` (a
    ``pathlib.Path`` or ``disk_tree.UrlPath``), where it can be read (an array's metadata may be the damaged one);
    ``None`` otherwise."""
    try:
        run = json.loads((folder / "zarr.json").read_bytes())["attributes"]["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run if isinstance(run, dict) else None
