"""Score sets in an on-disk store: ``score(..., save_as=name)`` writes ``scores/<name>``, ``load_scores`` reads it.

One job: the score sets of ``trak_core.disk_store.DiskStore`` (a mixin): names checked before scoring, a set
written a chunk at a time with its checksums written last (the whole set's, ``sha256``, marks it finished; one per
chunk, ``checksums``, lets a part be read: ``disk_score_parts``), never overwritten once finished, and read back
against its checksums.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from .disk_layout import damaged_metadata, member, member_names
from .disk_listing import active, lookup, reading
from .disk_score_parts import check_set, chunk_digests, read_part
from .disk_shared import live_elsewhere, run_record
from .disk_writer import _digest, one_writer, open_root
from .errors import StoreDamagedError, TrakOSError, TrakValueError
from .fingerprints import to_numpy
from .store import KERNEL_CHUNK_ROWS

__all__ = ["ScoreSets", "MAX_SCORE_NAME_BYTES"]

MAX_SCORE_NAME_BYTES = 255  # a save_as name is a directory of the store: the usual file-name limit (ext4, APFS, NTFS)
_saving: dict[str, threading.Lock] = {}  # store location -> the lock of its save_scores, for this process's threads
_saving_guard = threading.Lock()


def _saving_lock(location: str) -> threading.Lock:
    """One ``save_scores`` at a time per store location in this process: two threads saving the same name both
    found it free, then wrote their chunks into one array (a set that failed its checksum, or an error that blamed
    another process)."""
    with _saving_guard:
        return _saving.setdefault(location, threading.Lock())


def _score_again(path: Any, name: str) -> str:
    """What to do about a damaged score set: ``save_as`` never overwrites a finished one (its checksum is written)."""
    return (f"score again with save_as= another name, or delete the directory scores/{name} in {path} and score "
            f"again with save_as={name!r} (a finished set, damaged or not, is never overwritten)")


class ScoreSets:
    """The score sets of a ``DiskStore`` (which gives ``path``, ``tree``, ``location``, ``root``, ``exists``,
    ``writable``, ``_url``, ``_opened`` and ``_sweep_temporaries``)."""

    def save_scores(self, name: str, scores: Any) -> None:
        """Write ``scores`` (n_train, n_targets) as ``scores/<name>``, chunked by rows, with its checksums (one
        thread at a time per location: a name saved meanwhile by another thread is refused, never mixed)."""
        values = to_numpy(scores)
        with _saving_lock(self.location):
            self._save_scores(name, values)

    def _save_scores(self, name: str, values: np.ndarray) -> None:
        state = self.check_score_name(name)
        try:
            with one_writer(self.path):
                group = self.root.require_group("scores")
        except TrakOSError:  # another process (a scoring job saving another name) made it between check and create:
            group = self.root.require_group("scores")  # it is there now, and this set goes beside the other
        run = run_record()  # who saves it: a set a live process writes is not taken for an interrupted one
        with one_writer(self.path):
            if state == "interrupted":  # never finished (no checksum): nothing saved under this name is lost
                del group[name]
            array = group.create_array(name, shape=values.shape, dtype=values.dtype,
                                       chunks=(KERNEL_CHUNK_ROWS, values.shape[1]), fill_value=0,
                                       attributes={"run": run})
        for start in range(0, values.shape[0], KERNEL_CHUNK_ROWS):  # a chunk at a time: zarr encodes what it is given
            array[start:start + KERNEL_CHUNK_ROWS] = values[start:start + KERNEL_CHUNK_ROWS]  # at once, in copies
        now = open_root(str(self.path), "r")["scores"][name].attrs.asdict() if not self._url else {"run": run}
        if now.get("run") != run or "sha256" in now:  # replaced meanwhile (another host's process)
            raise TrakOSError(f"scores {name!r} in {self.path} were replaced by another process while this one saved "
                              "them (two processes saved the same name at once); score again with save_as= another "
                              "name")
        # last, in one metadata write: "sha256" marks the set finished (all earlier versions read only it)
        array.update_attributes({"checksums": chunk_digests(values, KERNEL_CHUNK_ROWS), "sha256": _digest(values)})
        self._sweep_temporaries(f"scores/{name}", root=False)  # the root's zarr.json is featurize's to write

    def check_score_name(self, name: str) -> str | None:
        """Refuse a ``save_as`` name that is malformed or taken, or a store that cannot be written, before scoring;
        returns the name's state (``"interrupted"`` or ``None``)."""
        if not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name or name.strip(".") == "" \
                or name.startswith("__") or name != name.strip():
            raise TrakValueError(f"save_as needs a plain name such as 'run-1' (not empty or only dots, no '/' or '\\', "
                                 f"no leading '__' or surrounding spaces), got {name!r}")
        size = len(name.encode("utf-8", "surrogatepass"))
        if name.lower() == "zarr.json" or size > MAX_SCORE_NAME_BYTES:
            # both reached the file system only after every target was scored (FileExistsError on the group's own
            # metadata file, OSError "File name too long"), and the scores were lost
            why = ("the store's own metadata file (zarr.json)" if size <= MAX_SCORE_NAME_BYTES else
                   f"{size} bytes long in UTF-8, more than a file name holds ({MAX_SCORE_NAME_BYTES})")
            raise TrakValueError(f"save_as needs a plain name such as 'run-1': {name[:40]!r}"
                                 f"{'...' if len(name) > 40 else ''} is {why}; choose another name")
        state = self._scores_state(name)
        if state == "damaged":
            self._refuse_damaged_set(name)
        if state == "finished":
            raise TrakValueError(f"scores {name!r} already exist in {self.path}; choose another name (nothing was "
                                 "overwritten)")
        if state == "interrupted":
            run = self.root["scores"][name].attrs.get("run")
            if live_elsewhere(run):  # this process's own: an interrupted call
                raise TrakValueError(f"scores {name!r} in {self.path} are being saved now by process {run.get('pid')} "
                                     f"on {run.get('host')}; choose another name, or wait for it and skip the name "
                                     "where it is in saved_scores() (a set that process leaves unfinished is replaced "
                                     f"by the next save_as={name!r})")
        self.writable()
        return state

    def _scores_group(self) -> Any:
        """The ``scores`` group (``None`` where no set was saved); a ``StoreDamagedError`` where its ``zarr.json`` is
        damaged (``disk_layout.damaged_metadata``: zarr reads no set then)."""
        what = (None if not self.exists() or self._opened("scores")  # zarr read it whole in this call
                else damaged_metadata(self.tree / "scores"))
        if what is not None:
            raise StoreDamagedError(f"the saved scores in {self.path} cannot be read: their group's metadata {what}. "
                                    "The sets in its folder are left as they are; write that file again with the text "
                                    '{"attributes": {}, "zarr_format": 3, "node_type": "group"} (all it holds) to read '
                                    "them. Scoring without save_as is not affected")
        return member(self.root, "scores") if self.exists() else None

    def _set_damage(self, name: str) -> str | None:
        """What is damaged in the metadata of score set ``name`` (``disk_layout.damaged_metadata``), or ``None``."""
        return damaged_metadata(self.tree / "scores" / name)

    def _refuse_damaged_set(self, name: str) -> None:
        raise StoreDamagedError(f"scores {name!r} in {self.path} are damaged: their metadata {self._set_damage(name)}; "
                                f"{_score_again(self.path, name)}")

    def _scores_state(self, name: str) -> str | None:
        """``"finished"`` (its checksum is written), ``"interrupted"`` (created, never finished), ``"damaged"`` (its
        ``zarr.json`` is) or ``None``."""
        group = self._scores_group()
        if group is None:
            return None
        plain = isinstance(name, str) and "/" not in name and "\\" not in name and name.strip(".") != ""
        # at a URL, in a call that reads, a set zarr opens needs no listing of the sets (a request); a local folder
        # is listed (no request), which also keeps a case-insensitive disk's "RUN1" from opening the set "run1"
        array = member(group, name) if plain and active() is not None and self._url else None
        if not hasattr(array, "shape") and name not in member_names(group):
            return None
        array = member(group, name) if array is None else array
        if not hasattr(array, "shape"):  # none, a group, or a set whose metadata cannot be read
            return "damaged" if self._set_damage(name) else None
        return "finished" if "sha256" in array.attrs else "interrupted"

    def score_names(self) -> list[str]:
        """Names of the score sets saved in this store (finished ones: interrupted and damaged ones are left out),
        sorted (each ``zarr.json`` read once, ``disk_listing.reading``)."""
        with reading():
            return self._score_names()

    def _score_names(self) -> list[str]:
        group = self._scores_group()
        arrays = [member(group, name) for name in member_names(group)] if group is not None else []
        return sorted(array.basename for array in arrays if hasattr(array, "shape") and "sha256" in array.attrs)

    def load_scores(self, name: str, rows: Any = None, targets: Any = None) -> np.ndarray:
        """Read scores saved with ``score(..., save_as=name)``, or their ``rows`` and ``targets``, checked against
        their checksums (each ``zarr.json`` read once, ``disk_listing.reading``).

        The whole set is read a chunk at a time and checked against its ``sha256``. A part (``rows`` or
        ``targets`` given) reads only the chunks that hold its rows, each checked against its own checksum; a set
        saved before per-chunk checksums were recorded is read whole, a chunk at a time, and checked against its
        ``sha256`` before the part is returned (holding one chunk and the part: ``disk_score_parts``).
        ``TRAK.load_scores`` says what ``rows`` and ``targets`` take.
        """
        with reading():
            return self._load_scores(name, rows, targets)

    def _load_scores(self, name: str, rows: Any = None, targets: Any = None) -> np.ndarray:
        array = self._finished_set(name)
        if rows is not None or targets is not None:
            return read_part(array, rows, targets, damaged=self._damaged_set(name))
        values = np.empty(array.shape, dtype=array.dtype)
        try:
            for start in range(0, values.shape[0], KERNEL_CHUNK_ROWS):  # a chunk at a time into the result (zarr
                values[start:start + KERNEL_CHUNK_ROWS] = array[start:start + KERNEL_CHUNK_ROWS]  # decodes a read)
        except Exception as exc:  # a truncated chunk fails to decode
            raise self._damaged_set(name)(f"a chunk cannot be read: {exc}") from None
        if _digest(values) != array.attrs.get("sha256"):
            raise self._damaged_set(name)("checksum mismatch")
        return values

    def check_scores(self, name: str) -> None:
        """Check score set ``name`` as ``load_scores`` would, each chunk against its own checksum too (where it has
        them), holding one chunk at a time (``trak-core store --verify``)."""
        with reading():
            check_set(self._finished_set(name), damaged=self._damaged_set(name))

    def _finished_set(self, name: str) -> Any:
        """The array of finished set ``name``, or the error that says why there is none."""
        state = self._scores_state(name)
        if state == "damaged":
            self._refuse_damaged_set(name)
        if state == "interrupted":
            raise TrakValueError(f"scores {name!r} in {self.path} were never finished (the call that saved them was "
                                 f"interrupted); score again with save_as={name!r}, which replaces them")
        if state is None:
            raise TrakValueError(f"no scores named {name!r} in {self.path}; saved: {self.score_names()}")
        return lookup(lookup(self.root, "scores"), name)

    def _damaged_set(self, name: str) -> Callable[[str], StoreDamagedError]:
        """Makes the error for set ``name`` from what is damaged (``disk_score_parts``'s ``damaged``)."""
        return lambda what: StoreDamagedError(f"scores {name!r} in {self.path} are damaged ({what}); "
                                              f"{_score_again(self.path, name)}")
