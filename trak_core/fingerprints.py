"""Content hashes that name what a store was made from: a checkpoint's parameters and the training data.

One job: digests that are equal exactly when the bytes are equal (dtype, shape and order included),
whatever the framework or device the arrays live on.

- ``parameters_digest``: a checkpoint, from its named parameter arrays (backends call it in
  ``trak_core.Backend.parameters_digest``).
- ``DataFingerprint``: the training data, fed batch by batch while featurizing; it yields one
  digest per chunk of ``trak_core.store.KERNEL_CHUNK_ROWS`` rows (the store's chunks), so a
  reopened store can tell, before writing a chunk, whether its rows come from the same examples in
  the same order, and where they first differ.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import numpy as np

from ._delegation import to_host

__all__ = ["to_numpy", "parameters_digest", "DataFingerprint", "combine"]


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of an array of any framework or device (torch, CuPy, JAX, array-api-strict).

    torch dtypes NumPy lacks (bfloat16, float8) come as their bytes (``uint8``), which is what a digest needs.

    Parameters
    ----------
    x : array
        An array of any supported framework, on any device.

    Returns
    -------
    numpy.ndarray
        Its values on the host.
    """
    return to_host(x)


def _update(hasher: Any, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    hasher.update(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(array.view(np.uint8).reshape(-1) if array.size else b"")


def parameters_digest(named: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 of named arrays, in the order given: names, dtypes, shapes and bytes.

    Parameters
    ----------
    named : iterable of (str, array)
        A checkpoint's parameter names and arrays, of any framework or device.

    Returns
    -------
    str
        The hex digest.
    """
    hasher = hashlib.sha256()
    for name, value in named:
        hasher.update(name.encode() + b"\0")
        _update(hasher, to_numpy(value))
    return hasher.hexdigest()


def combine(chunk_digests: Iterable[str], n_rows: int) -> str:
    """One digest of a whole training set from its chunk digests and its number of rows.

    Parameters
    ----------
    chunk_digests : iterable of str
        The digests of the chunks, in chunk order (``DataFingerprint``).
    n_rows : int
        The number of training examples.

    Returns
    -------
    str
        The hex SHA-256 digest.
    """
    hasher = hashlib.sha256(str(n_rows).encode())
    for digest in chunk_digests:
        hasher.update(digest.encode())
    return hasher.hexdigest()


class DataFingerprint:
    """Digests of the training data per chunk of ``chunk_rows`` rows (inputs and labels, in order).

    Parameters
    ----------
    chunk_rows : int
        Rows per digest (the store's chunk size).

    Notes
    -----
    ``update`` takes each batch in order and returns the ``(chunk, digest)`` pairs that the
    batch completed; ``finish`` returns the last, partial chunk's. Only the rows are hashed
    (a batch's bytes are copied to the host once and hashed as one block), so the cost is a small
    share of featurizing, which differentiates every row.
    """

    def __init__(self, chunk_rows: int) -> None:
        self.chunk_rows = int(chunk_rows)
        self.rows = 0
        self._start_chunk()

    def _start_chunk(self) -> None:
        self._streams: dict[str, Any] = {}
        self._layouts: set = set()

    def _digest(self) -> str:
        streams = "".join(f"{name}={hasher.hexdigest()};" for name, hasher in sorted(self._streams.items()))
        return hashlib.sha256(f"{streams}{sorted(self._layouts)}".encode()).hexdigest()

    def update(self, inputs: Any, labels: Any) -> list[tuple[int, str]]:
        """Hash one batch's rows; return the chunks it completed as ``(chunk index, digest)``.

        Rows are hashed as contiguous bytes, one stream per array (inputs, or each key of a dict
        batch, and labels), so any split of the data into batches gives the same digests, as long as a
        row's shape does not depend on its batch (token rows padded to their batch's longest example do).

        Parameters
        ----------
        inputs : array or mapping of str to array
            The batch's inputs, rows first.
        labels : array
            The batch's labels, rows first.

        Returns
        -------
        list of (int, str)
            The chunks this batch completed, in order (empty when it completed none).
        """
        named = sorted(inputs.items()) if isinstance(inputs, Mapping) else [("inputs", inputs)]
        arrays = [(f"x:{name}", np.ascontiguousarray(to_numpy(value))) for name, value in named]
        arrays.append(("labels", np.ascontiguousarray(to_numpy(labels))))
        n = arrays[0][1].shape[0]
        done, start = [], 0
        while start < n:
            stop = min(n, start + self.chunk_rows - self.rows % self.chunk_rows)
            for name, array in arrays:
                hasher = self._streams.setdefault(name, hashlib.sha256())
                hasher.update(array[start:stop].view(np.uint8).reshape(-1) if array.size else b"")
                self._layouts.add((name, array.dtype.str, array.shape[1:]))
            self.rows += stop - start
            start = stop
            if self.rows % self.chunk_rows == 0:
                done.append((self.rows // self.chunk_rows - 1, self._digest()))
                self._start_chunk()
        return done

    def finish(self) -> list[tuple[int, str]]:
        """The digest of the last, partial chunk (empty when the rows filled whole chunks).

        Returns
        -------
        list of (int, str)
            ``[(chunk index, digest)]`` or ``[]``.
        """
        if self.rows % self.chunk_rows == 0:
            return []
        return [(self.rows // self.chunk_rows, self._digest())]
