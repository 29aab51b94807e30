"""Read the byte ranges of planned samples only, and count what was read.

Local files are read with ``os.pread`` on descriptors opened with
``posix_fadvise(POSIX_FADV_RANDOM)``: without it the kernel's readahead window pulls the
pruned samples between two planned ones off the disk too, so skipping them in the plan
would save nothing at the device (docs/architecture.md, "Reading").  ``http(s)://``
URLs go through read/remote.py and ``s3://`` through read/s3.py (fsspec's loop and
session / botocore client, but every answer checked: 206 with the range asked for, a
request timeout, retries with backoff, errors naming the URL and range); other URLs
(``gs://``, ...) through fsspec's ``cat_ranges``; one request per merged range
(read/ranges.py says which ranges merge).
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from ..formats.storage import filesystem, fs_options, is_http, is_s3, is_url, local_path
from .errors import ShardError, ShardMissing
from .ranges import ReadCounters, default_merge_gap, merge_ranges
from .remote import HttpRanges, RetryPolicy
from .s3 import S3Ranges

__all__ = ["RangeReader", "ShardError", "logical_block_size"]

class RangeReader:
    """Reads ``(file, offset, length)`` ranges from local files or URLs, counting all I/O.

    Safe to create before ``fork``: descriptors and fsspec clients are opened lazily in
    the process that reads (and reopened after a fork).
    """

    def __init__(self, files: Sequence[str], file_sizes: Sequence[int] | None = None,
                 merge_gap: int | str | None = None, rank: np.ndarray | None = None,
                 fadvise_random: bool = True, storage_options: dict | None = None,
                 direct_io: bool = False, retry: RetryPolicy | None = None):
        self.files = [local_path(f) for f in files]
        self.file_sizes = None if file_sizes is None else np.asarray(file_sizes, dtype=np.int64)
        self.remote = bool(self.files) and is_url(self.files[0])
        self.merge_gap = default_merge_gap(self.files) if merge_gap is None else merge_gap
        if self.merge_gap == "neighbors" and rank is None:
            raise ValueError('merge_gap="neighbors" needs rank (file-order position per id)')
        self.rank = rank
        self.fadvise_random = fadvise_random
        # O_DIRECT: bypass the page cache and read whole logical blocks only (see read())
        self.direct_io = bool(direct_io) and not self.remote and hasattr(os, "O_DIRECT")
        self._align: dict[int, int] = {}
        self.storage_options = storage_options or {}
        self.retry = retry or RetryPolicy()  # remote requests: timeout, retries, backoff
        self.counters = ReadCounters()
        self._pid = None
        self._fds: dict[int, int] = {}
        self._checked: set[int] = set()
        self._fs = None
        self._client = None

    # -- opening and checking -------------------------------------------------------
    def _ensure_process(self) -> None:
        if self._pid != os.getpid():  # after a fork: the parent's descriptors are not ours
            self._pid = os.getpid()
            self._fds = {}
            self._checked = set()
            self._fs = self._client = None  # the parent's stays alive (storage.filesystem)

    def _filesystem(self):
        if self._fs is None:
            url, opts = self.files[0], self.storage_options
            if is_s3(url):  # botocore's own retries off: read/s3.py counts the attempts
                opts = fs_options(url, self.retry.timeout, opts, retries=0)
            self._fs, _ = filesystem(url, **opts)
        return self._fs

    def _http(self) -> HttpRanges | None:
        """The checked range client for http(s) and s3 datasets (None for other schemes);
        one per process (the s3 client keeps its presigned URLs)."""
        if self._client is None and is_s3(self.files[0]):
            self._client = S3Ranges(self._filesystem(), self.retry)
        elif self._client is None and is_http(self.files[0]):
            self._client = HttpRanges(self._filesystem(), self.retry)
        return self._client

    def _expect_size(self, i: int, size: int) -> None:
        if self.file_sizes is not None and int(self.file_sizes[i]) != int(size):
            raise ShardError(f"shard {self.files[i]} has {size} bytes, the manifest says "
                             f"{int(self.file_sizes[i])} (truncated or replaced)")

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            path = self.files[i]
            try:
                fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if self.direct_io else 0))
            except FileNotFoundError as e:
                raise ShardMissing(f"shard {path} is missing") from e
            self._expect_size(i, os.fstat(fd).st_size)
            if self.direct_io:
                self._align[i] = logical_block_size(path)
            elif self.fadvise_random and hasattr(os, "posix_fadvise"):
                # no readahead: pruned samples next to planned ones stay on the disk
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[i] = fd
        return fd

    def check(self, i: int) -> None:
        """Open file ``i`` (once per process) and check its size against the manifest."""
        self._ensure_process()
        if i in self._checked:
            return
        if self.remote:
            http = self._http()
            try:
                size = http.size(self.files[i]) if http else self._filesystem().size(self.files[i])
            except FileNotFoundError as e:
                raise ShardMissing(f"shard {self.files[i]} is missing") from e
            if size is not None:
                self._expect_size(i, size)
        else:
            self._fd(i)
        self._checked.add(i)

    def close(self) -> None:
        """Close the descriptors opened by this process."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}
        self._checked = set()

    def probe(self) -> None:
        """Check file 0 and read one byte of it: a remote dataset whose server is
        unreachable, lacks the shard or ignores ``Range`` fails here, once, before an
        epoch starts (two small requests)."""
        if not self.files:
            return
        self.check(0)
        if self.remote and (self.file_sizes is None or int(self.file_sizes[0]) > 0):
            zero = np.zeros(1, np.int64)
            self.read(zero, zero, np.ones(1, np.int64), ids=zero)
            self.counters = ReadCounters()  # the probe is not part of any epoch's reads

    def like(self, **changes) -> "RangeReader":
        """A new reader with this one's settings, ``changes`` applied (its own counters)."""
        kw = dict(files=self.files, file_sizes=self.file_sizes, merge_gap=self.merge_gap,
                  rank=self.rank, fadvise_random=self.fadvise_random,
                  storage_options=self.storage_options, direct_io=self.direct_io,
                  retry=self.retry)
        kw.update(changes)
        return RangeReader(**kw)

    def __getstate__(self):  # picklable for spawned workers: no descriptors travel
        d = dict(self.__dict__)
        d.update(_pid=None, _fds={}, _checked=set(), _fs=None, _client=None)
        return d

    # -- reading ------------------------------------------------------------------
    def read(self, file: np.ndarray, offset: np.ndarray, length: np.ndarray,
             ids: np.ndarray | None = None, samples: int | None = None) -> list[memoryview]:
        """Read ranges; returns one buffer per range, in the order given.

        ``ids`` (the sample of each range) are needed for ``merge_gap="neighbors"``; ranges
        of one sample close together share a request (``ranges.MEMBER_GAP``).  ``samples``:
        how many samples the ranges hold, for the counters (default: one per range; a
        sample read with its extra members has several).
        """
        self._ensure_process()
        t0 = time.perf_counter()
        file = np.asarray(file, dtype=np.int64)
        offset = np.asarray(offset, dtype=np.int64)
        length = np.asarray(length, dtype=np.int64)
        end = offset + length
        rank = None
        if self.merge_gap == "neighbors":
            rank = np.asarray(self.rank)[np.asarray(ids, dtype=np.int64)]
        owner = None if ids is None else np.asarray(ids, dtype=np.int64)
        order, group, g_file, g_start, g_end = merge_ranges(file, offset, end, self.merge_gap, rank,
                                                            owner=owner)
        for i in np.unique(g_file):
            self.check(int(i))
        if self.remote:
            urls = [self.files[int(i)] for i in g_file]
            http = self._http()
            if http is not None:
                blobs = http.ranges(urls, g_start.tolist(), g_end.tolist())
            else:
                blobs = self._filesystem().cat_ranges(urls, g_start.tolist(), g_end.tolist(),
                                                      on_error="raise")
        elif self.direct_io:
            blobs = []
            for k, (i, s, e) in enumerate(zip(g_file.tolist(), g_start.tolist(), g_end.tolist())):
                blob, a, b = _pread_direct(self._fd(i), s, e, self._align[i])
                blobs.append(blob)
                g_start[k], g_end[k] = a, b  # what the device transferred (block-aligned)
            # re-base the per-sample slices below on the aligned starts
        else:
            blobs = []
            for i, s, e in zip(g_file.tolist(), g_start.tolist(), g_end.tolist()):
                b = os.pread(self._fd(i), e - s, s)
                blobs.append(b)
        out: list = [None] * len(file)
        starts_sorted = offset[order]
        ends_sorted = end[order]
        for k in range(len(order)):
            g = group[k]
            blob = blobs[g]
            a = int(starts_sorted[k] - g_start[g])
            b = int(ends_sorted[k] - g_start[g])
            if b > len(blob):
                raise ShardError(f"short read from {self.files[int(g_file[g])]} at "
                                 f"{int(starts_sorted[k])}: got {len(blob) - a} of {b - a} bytes")
            out[order[k]] = memoryview(blob)[a:b]
        self.counters.add(len(file) if samples is None else samples, int(length.sum()), int((g_end - g_start).sum()), len(g_file),
                          time.perf_counter() - t0)
        return out

    def read_into(self, file: np.ndarray, offset: np.ndarray, length: np.ndarray,
                  out: np.ndarray, rows: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Read range ``j`` into ``out[rows[j], :length[j]]`` (``out``: uint8 [B, L]).

        Local files without merging are read straight into the rows (one ``preadv`` per
        range, in file order, no intermediate buffers: the hot path of a packed batch);
        everything else goes through :meth:`read` and is copied.  Counters as in ``read``.
        """
        file = np.asarray(file, dtype=np.int64)
        offset = np.asarray(offset, dtype=np.int64)
        length = np.asarray(length, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        if self.remote or self.direct_io or self.merge_gap != 0:
            for r, buf in zip(rows.tolist(), self.read(file, offset, length, ids)):
                out[r, :len(buf)] = np.frombuffer(buf, dtype=np.uint8)
            return
        self._ensure_process()
        t0 = time.perf_counter()
        order = np.lexsort((offset, file))
        for i in np.unique(file):
            self.check(int(i))
        fds = self._fds
        # rows as memoryview slices of the flat buffer (a numpy view per range costs more)
        flat = memoryview(out).cast("B") if out.flags.c_contiguous else None
        w = out.shape[1]
        for f, s, n, r in zip(file[order].tolist(), offset[order].tolist(),
                              length[order].tolist(), rows[order].tolist()):
            got = os.preadv(fds[f], [out[r, :n] if flat is None else flat[r * w:r * w + n]], s)
            if got != n:
                raise ShardError(f"short read from {self.files[f]} at {s}: got {got} of {n} bytes")
        n = int(length.sum())
        self.counters.add(len(file), n, n, len(file), time.perf_counter() - t0)


def logical_block_size(path: str) -> int:
    """The logical block size of the device holding ``path`` (O_DIRECT alignment); 4096 if unknown."""
    d = os.stat(path).st_dev
    for p in (f"/sys/dev/block/{os.major(d)}:{os.minor(d)}/queue/logical_block_size",
              f"/sys/dev/block/{os.major(d)}:{os.minor(d)}/../queue/logical_block_size"):
        try:
            with open(p) as f:
                return max(512, int(f.read()))
        except (OSError, ValueError):
            continue
    return 4096


def _pread_direct(fd: int, start: int, end: int, align: int):
    """O_DIRECT read of the aligned blocks covering [start, end): (bytes, a, b) with the
    aligned range [a, b) actually transferred (the buffer must be page-aligned: mmap)."""
    import mmap
    a = start - start % align
    b = -(-end // align) * align
    buf = mmap.mmap(-1, b - a)
    try:
        n = os.preadv(fd, [buf], a)
        return bytes(buf[:n]), a, a + n
    finally:
        buf.close()
