"""Reporting corrupt samples: one warning per shard, and a threshold that stops the run.

A sample is corrupt when its bytes fail their checksum, fail the reader's cheap look
(read/sniff.py, when there is no checksum), or kill the decoder.  One bad file in a
shard is named in a warning and skipped; a shard replaced by zeros of the same size
(which passes the size check) would otherwise give one warning per sample and a run on a
fraction of its data.  So the report warns once per shard (later samples of that shard
are counted in ``Loader.stats()``) and, past ``max_corrupt_fraction`` of an epoch's
planned samples, stops the run naming the shards and how many samples each lost.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

__all__ = ["CorruptSampleError", "CorruptReport"]


class CorruptSampleError(RuntimeError):
    """A sample's bytes fail their checksum or cannot be decoded (``on_corrupt="raise"``),
    or too many of an epoch's samples do (``max_corrupt_fraction``)."""


class CorruptReport:
    """Warns about and limits the corrupt samples of one dataset (see the module doc).

    ``raise_each``: the first corrupt sample stops the run (``OnCorrupt.RAISE``);
    ``max_fraction``: more corrupt samples than this fraction of an epoch's planned ones
    (at least one) stops it; None = never.
    """

    def __init__(self, ds, raise_each: bool, max_fraction: float | None, checked: bool = True):
        # ``checked``: payload checksums compared (not for indexed shards, which have none)
        self.cause = "checksum mismatch or undecodable" if checked else "undecodable"
        self.files: Sequence[str] = ds.files
        self.file_of = np.asarray(ds.file)
        self.offset, self.length = ds.offset, ds.length
        self.raise_each, self.max_fraction = raise_each, max_fraction
        self._warned_files: set[int] = set()

    def describe(self, i: int) -> str:
        """``corrupt sample I (SHARD @ OFFSET, N bytes)``."""
        return (f"corrupt sample {i} ({self.files[int(self.file_of[i])]} @ {int(self.offset[i])}, "
                f"{int(self.length[i])} bytes)")

    def reason(self, i: int, why: dict[int, str] | None) -> str:
        """Why sample ``i`` is corrupt: ``why``'s word for it (an undecodable field member),
        else the image's checksum or decode."""
        return (why or {}).get(int(i), self.cause)

    def check_raise(self, bad_ids: np.ndarray, why: dict[int, str] | None = None) -> None:
        """With ``raise_each``: raise for the first of ``bad_ids``."""
        if self.raise_each and len(bad_ids):
            i = int(bad_ids[0])
            raise CorruptSampleError(f"{self.describe(i)}: {self.reason(i, why)}")

    def report(self, bad_ids: np.ndarray, epoch: int, corrupt_ids: Sequence[int],
               planned: int, why: dict[int, str] | None = None) -> None:
        """Warn for the first corrupt sample of each shard among ``bad_ids``; raise when the
        epoch's ``corrupt_ids`` (so far) exceed the limit for ``planned`` samples."""
        for i in np.asarray(bad_ids, dtype=np.int64).tolist():
            f = int(self.file_of[i])
            if f not in self._warned_files:
                self._warned_files.add(f)
                warnings.warn(f"{self.describe(i)}: {self.reason(i, why)}; skipped "
                              "(further corrupt samples of this shard are counted in "
                              "Loader.stats(), not warned about)", RuntimeWarning, stacklevel=4)
        limit = self.max_fraction
        if limit is None or len(corrupt_ids) <= max(1, int(limit * planned)):
            return
        files, counts = np.unique(self.file_of[np.asarray(corrupt_ids, dtype=np.int64)],
                                  return_counts=True)
        top = sorted(zip(counts.tolist(), files.tolist()), reverse=True)
        shards = ", ".join(f"{self.files[f]}: {c}" for c, f in top[:10])
        raise CorruptSampleError(
            f"epoch {epoch}: {len(corrupt_ids)} of {planned} planned samples are corrupt, "
            f"more than max_corrupt_fraction={limit} ({shards}{', ...' if len(top) > 10 else ''}); "
            "the data looks damaged (check it with tools/shard.py --verify), or raise the "
            "limit (None: never stop)")
