"""Byte ranges: grouping planned samples' ranges into requests, and counting what was read.

Merging: ranges of the same file are merged into one request when they are close.
``merge_gap`` is either a byte count (merge when the gap between two ranges is at most
that many bytes) or ``"neighbors"`` (merge two planned samples only when no other sample
of the dataset lies between them, so the slack is only container framing such as tar
headers and padding, never a pruned sample's payload).  Defaults: local files ``0`` (no
merging: a pread is cheap), URLs ``"neighbors"`` (a request costs a round trip).  Every
byte of slack is counted, so the savings reported are what was really transferred.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..formats.storage import is_url

__all__ = ["ReadCounters", "COUNTERS_DTYPE", "merge_ranges", "default_merge_gap",
           "MAX_MERGED_BYTES", "MEMBER_GAP"]

LOCAL_MERGE_GAP = 0
REMOTE_MERGE_GAP = "neighbors"
MAX_MERGED_BYTES = 8 << 20  # never build a single request larger than this
# members of one sample closer than this share a request (a PAX-headed member costs 1.5 KB
# of framing; a few small unrequested members fit too)
MEMBER_GAP = 16 << 10

# one row per batch in a published table's counters file (see read/table.py)
COUNTERS_DTYPE = np.dtype([("samples", "<i8"), ("bytes", "<i8"), ("payload", "<i8"),
                           ("requests", "<i8"), ("read_ns", "<i8")])


def default_merge_gap(files: Sequence[str]) -> int | str:
    """The default merge setting for a list of files: 0 locally, "neighbors" for URLs."""
    return REMOTE_MERGE_GAP if files and is_url(files[0]) else LOCAL_MERGE_GAP


@dataclass
class ReadCounters:
    """What a reader has read: payload samples, bytes transferred, requests, seconds."""

    samples: int = 0
    bytes: int = 0      # bytes requested from storage (payload + merge slack)
    payload: int = 0    # bytes of the samples themselves
    requests: int = 0   # range requests (preads / HTTP range GETs)
    seconds: float = 0.0

    @property
    def slack(self) -> int:
        """Bytes read that belong to no planned sample (merge gaps)."""
        return self.bytes - self.payload

    def add(self, samples: int, payload: int, transferred: int, requests: int, seconds: float) -> None:
        """Count one read call."""
        self.samples += samples; self.payload += payload; self.bytes += transferred
        self.requests += requests; self.seconds += seconds

    def __iadd__(self, other: "ReadCounters") -> "ReadCounters":
        self.add(other.samples, other.payload, other.bytes, other.requests, other.seconds)
        return self

    def __sub__(self, other: "ReadCounters") -> "ReadCounters":
        return ReadCounters(self.samples - other.samples, self.bytes - other.bytes,
                            self.payload - other.payload, self.requests - other.requests,
                            self.seconds - other.seconds)

    def copy(self) -> "ReadCounters":
        return ReadCounters(self.samples, self.bytes, self.payload, self.requests, self.seconds)

    def to_record(self) -> np.void:
        """One ``COUNTERS_DTYPE`` row (seconds as integer nanoseconds)."""
        return np.array((self.samples, self.bytes, self.payload, self.requests,
                         int(self.seconds * 1e9)), dtype=COUNTERS_DTYPE)[()]

    @classmethod
    def from_records(cls, rows: np.ndarray) -> "ReadCounters":
        """The sum of ``COUNTERS_DTYPE`` rows."""
        rows = np.asarray(rows, dtype=COUNTERS_DTYPE).reshape(-1)
        return cls(int(rows["samples"].sum()), int(rows["bytes"].sum()),
                   int(rows["payload"].sum()), int(rows["requests"].sum()),
                   float(rows["read_ns"].sum()) / 1e9)


def merge_ranges(file: np.ndarray, start: np.ndarray, end: np.ndarray,
                 gap: int | str = 0, rank: np.ndarray | None = None,
                 max_bytes: int = MAX_MERGED_BYTES, owner: np.ndarray | None = None,
                 member_gap: int = MEMBER_GAP):
    """Group ranges into requests.

    ``owner`` (optional): the sample each range belongs to; two ranges of one sample also
    merge when at most ``member_gap`` bytes lie between them (see the module docstring).
    Returns ``(order, group, g_file, g_start, g_end)``: ``order`` sorts the inputs by
    (file, start); ``group[k]`` is the request of the k-th sorted range; ``g_*`` are the
    requests.  With ``gap="neighbors"``, ``rank`` (each range's position in the dataset's
    file order) must be given: ranges merge only when their ranks are consecutive.
    """
    file = np.asarray(file, dtype=np.int64)
    start = np.asarray(start, dtype=np.int64)
    end = np.asarray(end, dtype=np.int64)
    n = len(file)
    order = np.lexsort((start, file))
    f, s, e = file[order], start[order], end[order]
    if n == 0:
        z = np.zeros(0, np.int64)
        return order, z, z, z, z
    new = np.ones(n, dtype=bool)
    if n > 1:
        same_file = f[1:] == f[:-1]
        if gap == "neighbors":
            if rank is None:
                raise ValueError('merge_gap="neighbors" needs the samples\' file-order ranks')
            r = np.asarray(rank, dtype=np.int64)[order]
            close = (r[1:] - r[:-1]) == 1
        else:
            close = (s[1:] - e[:-1]) <= int(gap)
        if owner is not None:
            o = np.asarray(owner, dtype=np.int64)[order]
            close |= (o[1:] == o[:-1]) & ((s[1:] - e[:-1]) <= int(member_gap))
        close &= s[1:] >= e[:-1]  # overlapping or duplicated ranges stay separate requests
        new[1:] = ~(same_file & close)
    group = np.cumsum(new) - 1
    if max_bytes and n > 1:
        # split groups that grow beyond max_bytes (rare; keeps a request bounded)
        g_first = np.flatnonzero(new)
        too_big = (np.maximum.reduceat(e, g_first) - s[g_first]) > max_bytes
        if too_big.any():
            for gi in np.flatnonzero(too_big):
                lo = g_first[gi]
                hi = g_first[gi + 1] if gi + 1 < len(g_first) else n
                base = s[lo]
                for k in range(lo + 1, hi):
                    if e[k] - base > max_bytes:
                        new[k] = True
                        base = s[k]
            group = np.cumsum(new) - 1
    g_first = np.flatnonzero(new)
    g_file = f[g_first]
    g_start = s[g_first]
    g_end = np.maximum.reduceat(e, g_first)
    return order, group, g_file, g_start, g_end
