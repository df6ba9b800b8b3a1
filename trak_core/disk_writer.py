"""Writing one checkpoint's features into an on-disk store (``disk_store.DiskStore``), and reading them back.

One job: rows in chunks of ``KERNEL_CHUNK_ROWS``, each chunk's SHA-256 and ``rows_done`` written after
the chunk, so a killed run resumes from the first missing or damaged chunk (see ``disk_store`` for the
layout and the safety argument); ``write_rows`` is a parallel worker's share of the same arrays.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ._namespace import device_of, namespace
from ._progress import progress
from .disk_listing import child, group_at
from .disk_shared import run_record
from .errors import StoreMismatchError, TrakOSError, TrakValueError
from . import kernel as kernel_ops
from .fingerprints import to_numpy
from .store import KERNEL_CHUNK_ROWS, Writer, kernel_from_features

if TYPE_CHECKING:
    from .disk_store import DiskStore

__all__ = ["DiskWriter", "DiskFeatures", "write_rows", "open_root", "one_writer"]

log = logging.getLogger("trak_core")


def _load_kernel(group: Any, template: Any, dtype: Any, array: Any = None) -> Any:
    """The kernel stored in a checkpoint's ``group`` (``array``: opened already), in ``template``'s namespace and
    device, as ``dtype``; checked against its ``kernel_sha256`` (stores written before it was recorded: not checked)."""
    xp = namespace(template)
    return xp.astype(xp.asarray(_read_kernel(group, array), device=device_of(template)), dtype)


def _read_kernel(group: Any, array: Any = None) -> np.ndarray:
    """The stored kernel as NumPy (``array``: its array, opened already); a ``TrakValueError`` naming the fix where it
    cannot be read or fails its digest."""
    try:
        matrix = (group["kernel"] if array is None else array)[:]
    except Exception as exc:  # a truncated chunk fails to decode
        raise TrakValueError(f"the kernel of {group.path} cannot be read ({exc}); run featurize for this checkpoint "
                             "again with the same arguments: it is made again from the features") from None
    expected = group.attrs.get("kernel_sha256")
    if expected is not None and _digest(matrix) != expected:
        raise TrakValueError(f"the kernel of {group.path} is damaged (checksum mismatch); run featurize for this "
                             "checkpoint again with the same arguments: it is made again from the features")
    return matrix


def _digest(block: np.ndarray) -> str:
    block = np.ascontiguousarray(block)  # hashed through its buffer: no copy of a contiguous block
    return hashlib.sha256(block.view(np.uint8).reshape(-1) if block.size else b"").hexdigest()


class DiskFeatures:
    """A checkpoint's features on disk, sliced by rows into the caller's namespace and device."""

    def __init__(self, array: Any, checksums: dict, template: Any) -> None:
        self._array, self.checksums, self._template = array, checksums, template
        self.shape = tuple(array.shape)
        self.dtype = template.dtype
        self.ndim = 2

    def __getitem__(self, key: tuple) -> Any:
        rows = key[0] if isinstance(key, tuple) else key
        start, stop, _ = rows.indices(self.shape[0])
        first, last = start // KERNEL_CHUNK_ROWS, max(start, stop - 1) // KERNEL_CHUNK_ROWS
        lo, hi = first * KERNEL_CHUNK_ROWS, min(self.shape[0], (last + 1) * KERNEL_CHUNK_ROWS)
        try:
            block = self._array[lo:hi]
        except Exception as exc:  # a truncated chunk fails to decode
            raise TrakValueError(f"chunks {first}..{last} of {self._array.path} cannot be read ({exc}); run featurize "
                                 "for this checkpoint again with the same arguments to recompute them") from None
        for c in range(first, last + 1):
            part = block[c * KERNEL_CHUNK_ROWS - lo:(c + 1) * KERNEL_CHUNK_ROWS - lo]
            if _digest(part) != self.checksums.get(str(c)):
                raise TrakValueError(f"chunk {c} of {self._array.path} is damaged (checksum mismatch); run featurize "
                                     "for this checkpoint again with the same arguments to recompute it")
        xp = namespace(self._template)
        return xp.asarray(block[start - lo:stop - lo], device=device_of(self._template))


@contextlib.contextmanager
def one_writer(path: Any) -> Any:
    """zarr creates a group or array after checking that none is there: another process writing the same store
    between the two makes it raise ``Contains...Error``, which becomes an error that says so."""
    from zarr.errors import ContainsArrayAndGroupError, ContainsArrayError, ContainsGroupError

    try:
        yield
    except (ContainsArrayError, ContainsGroupError, ContainsArrayAndGroupError) as exc:
        raise TrakOSError(f"the store at {path} changed under this process ({type(exc).__name__}: {exc}): another "
                          "process is writing it (one writer per store: let it finish, or stop it, then rerun this "
                          "call, which resumes from the chunks stored), or the path holds zarr data that is not a "
                          "trak-core store's (then choose another path)") from exc


def _grow(array: Any, n_rows: int) -> None:
    """Give ``array`` at least ``n_rows`` rows. Each array is checked on its own: a kill between two
    resizes leaves one array longer than the other, and the resumed run must still grow the shorter."""
    if array.shape[0] < n_rows:
        array.resize((n_rows, *array.shape[1:]))


def _fit(array: Any, n_rows: int) -> None:
    """Give ``array`` exactly ``n_rows`` rows: rows past ``rows_done`` were never recorded (an array grown by a run
    killed before it recorded the chunk, or allocated for a parallel run on longer data), so they may be cut."""
    if array.shape[0] != n_rows:
        array.resize((n_rows, *array.shape[1:]))


class DiskWriter(Writer):
    """Writes one checkpoint's features chunk by chunk (see the module notes)."""

    def __init__(self, store: "DiskStore", index: int) -> None:
        self.store, self.index = store, index
        self.group = group_at(store.root, f"c{index}")  # read once: its claim took the same group (disk_listing)
        if self.group is None:
            if f"c{index}" not in store.root:  # a new checkpoint: written from here on
                store.writable()
            with one_writer(store.path):
                self.group = store.root.require_group(f"c{index}")
        self.complete = bool(self.group.attrs.get("complete", False))
        self.checksums = dict(self.group.attrs.get("checksums", {}))
        self.weight_checksums = dict(self.group.attrs.get("out_to_loss_checksums", {}))  # absent in older stores
        self.parameters_digest = self.group.attrs.get("parameters_sha256")
        self.plan_digest = self.group.attrs.get("kronecker_plan")  # proj_type="kronecker": the layout's hash
        self._data = dict(self.group.attrs.get("data_checksums", {}))
        self.damaged = False  # a complete checkpoint with a chunk that fails its checksum
        self.rows_done = self._verified_rows()
        self._rows: list[np.ndarray] = []
        self._weights: list[np.ndarray] = []
        self.template: Any = store.template
        self.progress: bool | None = False  # a bar over the kernel's chunks (set by the estimator: its progress=)
        # who writes it (host, pid, start), recorded with what a run writes anyway (a new checkpoint's hash, its rows):
        # trak-core store tells a running job from a dead one; a refused run writes nothing (its checks come first)
        self.run = run_record()
        self.needs_template = self.template is None and self.rows_done > 0

    @property
    def data_checksums(self) -> dict[str, str]:
        return dict(self._data)

    @property
    def stored_dtype(self) -> str | None:
        return self.group.attrs.get("dtype")

    @property
    def rows_total(self) -> int | None:
        """The number of rows of the data this incomplete checkpoint was featurized on, where its stored rows fix
        it: ``rows_done`` when it ends inside a chunk (only the data's last chunk is partial, so that run saw the
        end of its data; the data's digests of every chunk were recorded before it). ``None`` where a resumed run
        may bring more rows."""
        done = int(self.group.attrs.get("rows_done", 0))
        return done if done % KERNEL_CHUNK_ROWS else None

    def set_template(self, features: Any) -> None:
        self.template, self.needs_template = features[:1, ...], False

    def record_parameters(self, digest: str | None) -> None:
        """The checkpoint's content hash, before any row; in a shared store (``featurize(..., index=i)``) also the
        hash of the configuration this job found or wrote and its model record (``trak_core.disk_shared``)."""
        self.parameters_digest = digest
        if digest is not None and self.group.attrs.get("parameters_sha256") != digest:
            self.store.writable()
            self.group.attrs.update({"parameters_sha256": digest, "run": self.run})
        if self.store.shared and "configuration_sha256" not in self.group.attrs:
            from .disk_shared import configuration_digest

            self.store.writable()
            model = {"model": self.store.model_record} if self.store.model_record is not None else {}
            self.group.attrs.update({**model, "configuration_sha256": configuration_digest(self.store.configuration())})

    def record_plan(self, digest: str) -> None:
        """The factorized projection's layout (``KroneckerPlan.digest``), before the checkpoint's first rows."""
        self.store.writable()
        self.plan_digest = self.group.attrs["kronecker_plan"] = digest

    def record_data(self, chunk: int, digest: str) -> None:
        if self._data.get(str(chunk)) != digest:
            self.store.writable()
            self._data[str(chunk)] = digest
            self.group.attrs["data_checksums"] = self._data

    def record_rows(self, checksums: dict[str, dict[str, str]], rows_done: int) -> None:
        """Record the chunks parallel workers wrote (``write_rows``: ``{"features": ..., "out_to_loss": ...}``)."""
        self.store.writable()
        self.checksums.update(checksums["features"])
        self.weight_checksums.update(checksums["out_to_loss"])
        self.group.attrs.update({"checksums": self.checksums, "out_to_loss_checksums": self.weight_checksums,
                                 "rows_done": rows_done, "written_at": time.time(), "run": self.run})
        self.rows_done = rows_done

    def _verified_rows(self) -> int:
        """Rows on disk whose chunks pass their checksums (a damaged chunk and what follows is redone)."""
        done = int(self.group.attrs.get("rows_done", 0))
        features = child(self.group, "features")  # each read once (``in``, then ``[]``, read them twice)
        weight_array = child(self.group, "out_to_loss") if features is not None else None
        if features is None or weight_array is None:
            if done:  # rows were recorded, and an array (its zarr.json) is gone: damaged, redone from the first row (a
                self.damaged = self.damaged or bool(self.group.attrs.get("complete", False))  # complete checkpoint
                self.complete = False  # was kept as complete without features: "data yielded no examples")
            return 0  # else killed between creating the two arrays: nothing was written
        chunks = -(-done // KERNEL_CHUNK_ROWS)
        for c in progress(range(chunks), desc=f"verify checkpoint {self.index}",
                          enabled=self.store.progress if chunks > 1 else False):
            try:
                block = features[c * KERNEL_CHUNK_ROWS:min(done, (c + 1) * KERNEL_CHUNK_ROWS)]
                weights = weight_array[c * KERNEL_CHUNK_ROWS:min(done, (c + 1) * KERNEL_CHUNK_ROWS)]
                ok = _digest(block) == self.checksums.get(str(c)) and bool(np.all(np.isfinite(weights))) and \
                    self.weight_checksums.get(str(c), _digest(weights)) == _digest(weights)
            except Exception:  # a truncated chunk fails to decode
                ok = False
            if not ok:
                self.damaged = self.damaged or bool(self.group.attrs.get("complete", False))
                self.complete = False
                return c * KERNEL_CHUNK_ROWS
        return done

    def _check_dtype(self, dtype: Any) -> None:
        stored = self.group.attrs.get("dtype")
        if stored is not None and stored != str(dtype):
            raise StoreMismatchError(f"checkpoint {self.index} in {self.store.path} holds {stored} features, this run "
                                     f"makes {dtype}; use the same dtype or a new store path")
        self.group.attrs["dtype"] = str(dtype)

    def append(self, features: Any, out_to_loss: Any) -> None:
        if self.template is None:
            self.template = features[:1, ...]
        self._rows.append(to_numpy(features))
        self._weights.append(to_numpy(out_to_loss))
        while sum(r.shape[0] for r in self._rows) >= KERNEL_CHUNK_ROWS:
            self._write(KERNEL_CHUNK_ROWS)

    def _write(self, count: int | None = None) -> None:
        rows, weights = np.concatenate(self._rows), np.concatenate(self._weights)
        self.store.writable()
        self._check_dtype(rows.dtype)
        count = rows.shape[0] if count is None else count
        start = self.rows_done
        if start % KERNEL_CHUNK_ROWS:
            raise RuntimeError("internal: a chunk may only follow whole chunks")
        with one_writer(self.store.path):
            if "features" not in self.group:
                self.group.create_array("features", shape=(0, rows.shape[1]),
                                        chunks=(KERNEL_CHUNK_ROWS, rows.shape[1]), dtype=rows.dtype, fill_value=0)
            if "out_to_loss" not in self.group:  # also after a kill between the two creations
                self.group.create_array("out_to_loss", shape=(0,), chunks=(KERNEL_CHUNK_ROWS,), dtype=weights.dtype,
                                        fill_value=0)
        features, out_to_loss = self.group["features"], self.group["out_to_loss"]
        stop = start + count
        try:
            _grow(features, stop)
            _grow(out_to_loss, stop)
            features[start:stop] = rows[:count]
            out_to_loss[start:stop] = weights[:count]
            self.checksums[str(start // KERNEL_CHUNK_ROWS)] = _digest(rows[:count])
            self.weight_checksums[str(start // KERNEL_CHUNK_ROWS)] = _digest(weights[:count])
            self.group.attrs.update({"checksums": self.checksums, "out_to_loss_checksums": self.weight_checksums,
                                     "rows_done": stop, "written_at": time.time(), "run": self.run})
        except OSError as exc:
            raise TrakOSError(f"writing chunk {start // KERNEL_CHUNK_ROWS} of checkpoint {self.index} to "
                              f"{self.store.path} failed ({exc}); chunks written before are intact, and the same call "
                              "resumes from them once there is room") from exc
        self.rows_done = stop
        self._rows, self._weights = [rows[count:]], [weights[count:]]
        if not self._rows[0].shape[0]:
            self._rows, self._weights = [], []

    def allocate(self, n_rows: int, width: int, dtype: Any, weight_dtype: Any) -> None:
        """Create the arrays for exactly ``n_rows`` rows, so that workers can fill chunks in any order.

        Arrays of an earlier run on other data are grown or cut to ``n_rows``: only its rows before ``rows_done``
        were recorded, and they are kept (``DataCheck`` refused the data before, had those rows been of other
        data or more than ``n_rows``)."""
        if self.rows_done > n_rows or self.rows_total not in (None, n_rows):
            raise StoreMismatchError(f"checkpoint {self.index} in {self.store.path} holds features of "
                                     f"{self.rows_total or self.rows_done} rows, and this run has n_train={n_rows}; "
                                     "featurize on that run's data to resume it, or use a new store path (nothing "
                                     "was overwritten)")
        self.store.writable()
        self._check_dtype(np.dtype(dtype))
        with one_writer(self.store.path):
            if "features" not in self.group:
                self.group.create_array("features", shape=(n_rows, width), chunks=(KERNEL_CHUNK_ROWS, width),
                                        dtype=dtype, fill_value=0)
            else:
                _fit(self.group["features"], n_rows)
            if "out_to_loss" not in self.group:
                self.group.create_array("out_to_loss", shape=(n_rows,), chunks=(KERNEL_CHUNK_ROWS,),
                                        dtype=weight_dtype, fill_value=0)
            else:
                _fit(self.group["out_to_loss"], n_rows)

    def finish(self, kernel_dtype: str = "float64") -> tuple[Any, Any, Any]:
        """``(features, out_to_loss, kernel)``: a stored kernel is reused when it is of ``kernel_dtype``'s dtype or
        wider (cast down), else made from the features (:func:`trak_core.store.kernel_from_features`); a new one is
        stored only when none was."""
        if self._rows:
            self._write()
        if not self.complete and "out_to_loss" in self.group:
            self._cut_to_rows_done()
        features = child(self.group, "features")  # its zarr.json read once
        if features is None or features.shape[0] == 0:
            return None, None, None
        self.store.template = self.template
        lazy = DiskFeatures(features, self.checksums, self.template)
        xp = namespace(self.template)
        weights = xp.asarray(self._read_weights(), device=device_of(self.template))
        work = kernel_ops.work_dtype(xp, device_of(self.template), kernel_dtype, self.template.dtype)
        self.kernel_loader = functools.partial(_load_kernel, self.group, self.template, work)  # picklable
        stored = None
        try:
            stored = child(self.group, "kernel") if self.complete else None  # its zarr.json read once
            bits = stored.dtype.itemsize * 8 if stored is not None else None
        except ValueError:  # its zarr.json cannot be read: damaged, made again below as a damaged chunk makes it
            bits = xp.finfo(work).bits
        if bits is not None:
            if bits >= xp.finfo(work).bits:
                try:
                    return lazy, weights, _load_kernel(self.group, self.template, work, stored)
                except TrakValueError:  # damaged: made again from the checked features, and stored where it can be
                    log.warning("checkpoint %d in %s: the stored kernel is damaged; it is made again from the "
                                "features", self.index, self.store.path)
                    kernel = kernel_from_features(lazy, xp=xp, kernel_dtype=kernel_dtype, show=self.progress)
                    try:
                        self._store_kernel(to_numpy(kernel))
                    except TrakOSError:  # a read-only store: made again at each opening
                        self.kernel_loader = None
                    return lazy, weights, kernel
            self.kernel_loader = None  # a float32 kernel stored, float64 asked: made from the features (kept stored)
            return lazy, weights, kernel_from_features(lazy, xp=xp, kernel_dtype=kernel_dtype, show=self.progress)
        kernel = kernel_from_features(lazy, xp=xp, kernel_dtype=kernel_dtype, show=self.progress)
        self._store_kernel(to_numpy(kernel))
        return lazy, weights, kernel

    def _store_kernel(self, matrix: np.ndarray) -> None:
        """Write the kernel, then its digest (a kernel without its digest is made again: never trusted)."""
        self.store.writable()
        with one_writer(self.store.path):
            with contextlib.suppress(KeyError):  # also where its zarr.json cannot be read
                del self.group["kernel"]
            self.group.create_array("kernel", shape=matrix.shape, dtype=matrix.dtype, fill_value=0)[:] = matrix
        self.group.attrs["kernel_sha256"] = _digest(matrix)

    def _read_weights(self) -> np.ndarray:
        """The out-to-loss weights, each chunk checked against its digest (where the store recorded one)."""
        try:
            weights = self.group["out_to_loss"][:]
        except Exception as exc:  # a truncated chunk fails to decode
            raise TrakValueError(f"{self.group.path}/out_to_loss cannot be read ({exc}); run featurize for this "
                                 "checkpoint again with the same arguments to recompute it") from None
        for c in range(-(-weights.shape[0] // KERNEL_CHUNK_ROWS)):
            expected = self.weight_checksums.get(str(c))
            if expected is not None and _digest(weights[c * KERNEL_CHUNK_ROWS:(c + 1) * KERNEL_CHUNK_ROWS]) != expected:
                raise TrakValueError(f"chunk {c} of {self.group.path}/out_to_loss is damaged (checksum mismatch); run "
                                     "featurize for this checkpoint again with the same arguments to recompute it")
        return weights

    def _cut_to_rows_done(self) -> None:
        """Cut both arrays to the rows recorded: rows past ``rows_done`` (an earlier run's, on longer data) would
        make the features longer than the data, and their last chunk disagree with its checksum."""
        for array in (self.group["features"], self.group["out_to_loss"]):
            if array.shape[0] > self.rows_done:
                self.store.writable()
                _fit(array, self.rows_done)

    def discard(self) -> None:
        """Drop this checkpoint's arrays (its data contradicted checkpoint 0's)."""
        self.store.writable()
        del self.store.root[f"c{self.index}"]


def open_root(path: str, mode: str) -> Any:
    """The zarr group at ``path`` (a directory or an fsspec URL; ``file://`` creates folders as needed)."""
    import zarr

    if path.startswith("file://"):  # a local folder, opened as one: zarr 3.4 refuses storage_options for file://
        # URLs, 3.1 needed auto_mkdir. Not percent-decoded: fsspec kept "a%20b" literal, and older stores are there
        return zarr.open_group(path[len("file://"):], mode=mode)
    return zarr.open_group(path, mode=mode, **({"zarr_format": 3} if mode in ("r", "r+") else {}))  # v3 only: no
    # request for each of zarr v2's files at a URL (reading an existing store); "a" opens v2 data as before


def write_rows(location: str, index: int, start: int, features: Any, out_to_loss: Any) -> dict[str, dict[str, str]]:
    """Write rows ``start ..`` of checkpoint ``index``'s allocated arrays (a parallel worker's shard).

    Returns the checksums of the chunks written (``{"features": ..., "out_to_loss": ...}``), for
    ``DiskWriter.record_rows`` in the driver.
    """
    features, weights = to_numpy(features), to_numpy(out_to_loss)
    stop = start + features.shape[0]
    group = open_root(location, "r+")[f"c{index}"]
    group["features"][start:stop] = features
    group["out_to_loss"][start:stop] = weights
    return {name: {str(c // KERNEL_CHUNK_ROWS): _digest(values[c - start:min(stop, c + KERNEL_CHUNK_ROWS) - start])
                   for c in range(start, stop, KERNEL_CHUNK_ROWS)}
            for name, values in (("features", features), ("out_to_loss", weights))}
