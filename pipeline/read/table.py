"""The published epoch table: what every reader process reads, and what it read.

Before a backend runs an epoch it publishes the epoch's remaining batches as two
memory-mapped ``.npy`` files in the loader's work directory, so that worker processes
(forked or spawned) need nothing else to produce any batch:

``<name>.npy``     int64 ``[1 + 2 n_batches, max(B, 8)]``: row 0 is the header
                   ``(limit, epoch, first_step, rank, seed, batch_size, n_batches, 0)``;
                   row ``1 + i`` the sample ids of batch ``i`` (-1 = padding); row
                   ``1 + n_batches + i`` its *fill* ids: for each padding row, the real
                   sample read in its place (delivered with id -1, weight 0, so that a
                   model in training mode never sees a fake image), -1 = the synthetic
                   filler (evaluation, or no fill given); -1 on real rows.  ``limit`` is
                   the number of batches workers may deliver; :meth:`EpochTable.cancel`
                   lowers it to end an abandoned epoch early (workers see it through the
                   mapping).
``<name>.io.npy``  ``COUNTERS_DTYPE [n_batches]``: the reader process that produced batch
                   ``i`` writes what it read into row ``i`` before handing the batch on, so
                   the main process accounts every read, delivered or not.

Both are written under a temporary name and renamed: a worker never sees a half-written
table.  A table's name is never reused within a loader, so no process can hold a stale
mapping of an older table under the same name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .ranges import COUNTERS_DTYPE, ReadCounters

__all__ = ["TableHeader", "EpochTable"]

_HEADER_FIELDS = 8


@dataclass(frozen=True)
class TableHeader:
    """Where a published table's batches belong: their epoch, first step, rank and seed."""

    epoch: int
    first_step: int
    rank: int
    seed: int


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


class EpochTable:
    """One published table (see the module docstring), opened by path in any process."""

    def __init__(self, path: str):
        self.path = path
        self.io_path = path[: -len(".npy")] + ".io.npy"
        self._ids: np.ndarray | None = None
        self._io: np.ndarray | None = None

    @classmethod
    def publish(cls, path: str, ids: np.ndarray, header: TableHeader) -> "EpochTable":
        """Write the batches and an empty counters file; return the table.

        ``ids``: int64 ``[n_batches, B]`` (no fill: padding rows get the filler), or
        ``[n_batches, 2, B]``: ``[:, 0]`` the ids, ``[:, 1]`` the fill ids
        (``BatchPlan.rows``; see the module docstring).
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 2:
            ids = np.stack([ids, np.full_like(ids, -1)], axis=1)
        if ids.ndim != 3 or ids.shape[1] != 2:
            raise ValueError(f"table rows must be [n, B] or [n, 2, B], got shape {ids.shape}")
        n, _, b = ids.shape
        arr = np.full((2 * n + 1, max(b, _HEADER_FIELDS)), -1, dtype=np.int64)
        arr[0, :7] = [n, header.epoch, header.first_step, header.rank, header.seed, b, n]
        arr[1:n + 1, :b] = ids[:, 0]
        arr[n + 1:, :b] = ids[:, 1]
        _save_atomic(cls(path).io_path, np.zeros(n, dtype=COUNTERS_DTYPE))
        _save_atomic(path, arr)
        return cls(path)

    def __getstate__(self):  # travels to spawned workers as its path only
        return {"path": self.path, "io_path": self.io_path, "_ids": None, "_io": None}

    def _rows(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.load(self.path, mmap_mode="r")
        return self._ids

    def _counters(self) -> np.ndarray:
        if self._io is None:
            self._io = np.load(self.io_path, mmap_mode="r+")
        return self._io

    @property
    def header(self) -> TableHeader:
        h = self._rows()[0]
        return TableHeader(int(h[1]), int(h[2]), int(h[3]), int(h[4]))

    @property
    def batch_size(self) -> int:
        return int(self._rows()[0, 5])

    @property
    def limit(self) -> int:
        """Batches workers may deliver (the table's length unless cancelled)."""
        return int(self._rows()[0, 0])

    def __len__(self) -> int:
        return int(self._rows()[0, 6])

    def ids(self, i: int) -> np.ndarray:
        """Sample ids of batch ``i`` (int64 ``[B]``, -1 = padding)."""
        return np.asarray(self._rows()[1 + i, : self.batch_size])

    def fill(self, i: int) -> np.ndarray:
        """Fill ids of batch ``i`` (int64 ``[B]``): the sample read for each padding row,
        -1 = the filler (and on real rows)."""
        return np.asarray(self._rows()[1 + len(self) + i, : self.batch_size])

    def cancel(self, limit: int = 0) -> None:
        """Lower the batch limit: workers raise StopIteration for later batches."""
        arr = np.load(self.path, mmap_mode="r+")
        arr[0, 0] = min(int(arr[0, 0]), int(limit))
        arr.flush()
        del arr

    def record(self, i: int, counters: ReadCounters) -> None:
        """Store what producing batch ``i`` read (called by the reader process)."""
        io = self._counters()
        io[i] = counters.to_record()

    def reads(self, lo: int, hi: int | None = None) -> ReadCounters:
        """What batches ``lo..hi-1`` read (rows never produced count zero)."""
        return ReadCounters.from_records(self._counters()[lo:hi])

    def remove(self) -> None:
        """Delete both files (no process reads a finished table again)."""
        self._ids = self._io = None
        for p in (self.path, self.io_path):
            try:
                os.remove(p)
            except OSError:
                pass
