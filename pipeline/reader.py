"""Read the byte ranges of planned samples only, and count what was read.

Local files are read with ``os.pread`` on descriptors opened with
``posix_fadvise(POSIX_FADV_RANDOM)``: without it the kernel's readahead window
(8 MB on the development disk) pulls the pruned samples between two planned ones
off the disk too, so skipping them in the plan would save nothing at the device
(see docs/architecture.md, "Loader").  URLs (``http(s)://``, ``s3://``, ...) go
through fsspec's ``cat_ranges``, one request per merged range.

Merging: ranges of the same file are merged into one request when they are close.
``merge_gap`` is either a byte count (merge when the gap between two ranges is at
most that many bytes) or ``"neighbors"`` (merge two planned samples only when no
other sample of the dataset lies between them, so the slack is only container
framing such as tar headers and padding, never a pruned sample's payload).
Defaults: local files ``0`` (no merging: a pread is cheap), URLs ``"neighbors"``
(a request costs a round trip).  Every byte of slack is counted in ``bytes`` and
``slack`` so the savings reported are what was really transferred.
"""
from __future__ import annotations

import os
import zlib
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LOCAL_MERGE_GAP = 0
REMOTE_MERGE_GAP = "neighbors"
MAX_MERGED_BYTES = 8 << 20  # never build a single request larger than this


class ShardError(IOError):
    """A shard is missing, truncated, replaced or fails its checksum; the message names it."""


def is_url(path: str) -> bool:
    """True for fsspec URLs (``scheme://``) other than ``file://``."""
    return "://" in path and not path.startswith("file://")


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

    def as_array(self) -> np.ndarray:
        """Pack into int64[5] (seconds in ns) so workers can ship it beside a batch."""
        return np.array([self.samples, self.bytes, self.payload, self.requests,
                         int(self.seconds * 1e9)], dtype=np.int64)

    def add_array(self, a: np.ndarray) -> None:
        """Accumulate a packed array produced by :meth:`as_array`."""
        self.samples += int(a[0]); self.bytes += int(a[1]); self.payload += int(a[2])
        self.requests += int(a[3]); self.seconds += float(a[4]) / 1e9

    def add(self, samples: int, payload: int, transferred: int, requests: int, seconds: float) -> None:
        """Count one read call."""
        self.samples += samples; self.payload += payload; self.bytes += transferred
        self.requests += requests; self.seconds += seconds

    def reset(self) -> None:
        self.samples = self.bytes = self.payload = self.requests = 0
        self.seconds = 0.0


def merge_ranges(file: np.ndarray, start: np.ndarray, end: np.ndarray,
                 gap: int | str = 0, rank: np.ndarray | None = None,
                 max_bytes: int = MAX_MERGED_BYTES):
    """Group ranges into requests.

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


class RangeReader:
    """Reads ``(file, offset, length)`` ranges from local files or URLs, counting all I/O.

    Safe to create before ``fork``: descriptors and fsspec clients are opened lazily in
    the process that reads (and reopened after a fork).
    """

    def __init__(self, files: Sequence[str], file_sizes: Sequence[int] | None = None,
                 merge_gap: int | str | None = None, rank: np.ndarray | None = None,
                 fadvise_random: bool = True, storage_options: dict | None = None,
                 direct_io: bool = False):
        self.files = [f[len("file://"):] if f.startswith("file://") else f for f in files]
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
        self.counters = ReadCounters()
        self._pid = None
        self._fds: dict[int, int] = {}
        self._checked: set[int] = set()
        self._fs = None

    # -- opening and checking -------------------------------------------------------
    def _ensure_process(self) -> None:
        if self._pid != os.getpid():  # after a fork: the parent's descriptors are not ours
            self._pid = os.getpid()
            self._fds = {}
            self._checked = set()
            self._fs = None

    def _filesystem(self):
        if self._fs is None:
            import fsspec
            self._fs, _ = fsspec.core.url_to_fs(self.files[0], **self.storage_options)
        return self._fs

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
                raise ShardError(f"shard {path} is missing") from e
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
            fs = self._filesystem()
            try:
                size = fs.size(self.files[i])
            except FileNotFoundError as e:
                raise ShardError(f"shard {self.files[i]} is missing") from e
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

    def __getstate__(self):  # picklable for spawned workers: no descriptors travel
        d = dict(self.__dict__)
        d.update(_pid=None, _fds={}, _checked=set(), _fs=None)
        return d

    # -- reading ------------------------------------------------------------------
    def read(self, file: np.ndarray, offset: np.ndarray, length: np.ndarray,
             ids: np.ndarray | None = None) -> list[memoryview]:
        """Read ranges; returns one buffer per range, in the order given.

        ``ids`` (sample ids) are needed only for ``merge_gap="neighbors"``.
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
        order, group, g_file, g_start, g_end = merge_ranges(file, offset, end, self.merge_gap, rank)
        for i in np.unique(g_file):
            self.check(int(i))
        if self.remote:
            fs = self._filesystem()
            blobs = fs.cat_ranges([self.files[int(i)] for i in g_file],
                                  g_start.tolist(), g_end.tolist(), on_error="raise")
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
        self.counters.add(len(file), int(length.sum()), int((g_end - g_start).sum()), len(g_file),
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
        for f, s, n, r in zip(file[order].tolist(), offset[order].tolist(),
                              length[order].tolist(), rows[order].tolist()):
            got = os.preadv(fds[f], [out[r, :n]], s)
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


def file_order_rank(file: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Each sample's position when all samples are sorted by (file, offset)."""
    order = np.lexsort((np.asarray(offset), np.asarray(file)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank


# -- the epoch table and the stateless batch source shared by both backends ----------

TABLE_HEADER = 8  # int64 header row fields: limit, epoch, first_step, rank, seed, batch, 0, 0


def publish_table(path: str, ids: np.ndarray, epoch: int, first_step: int, rank: int,
                  seed: int) -> None:
    """Write one epoch's remaining batches (int64 ids [n_batches, B], -1 = padding) for workers.

    Row 0 is a header; its first field is the number of batches workers may deliver
    (``limit``), which :func:`cancel_table` lowers to end an abandoned epoch early.
    Written to a temp name then renamed, so a worker never sees a half-written table.
    """
    n, b = ids.shape
    arr = np.full((n + 1, max(b, TABLE_HEADER)), -1, dtype=np.int64)
    arr[0, :6] = [n, epoch, first_step, rank, seed, b]
    arr[1:, :b] = ids
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def cancel_table(path: str, limit: int) -> None:
    """Lower a published table's batch limit (workers see it through their shared mapping)."""
    arr = np.load(path, mmap_mode="r+")
    arr[0, 0] = min(int(arr[0, 0]), int(limit))
    arr.flush()
    del arr


def _column_ref(a: np.ndarray):
    """A memory-mapped manifest column travels as its path (cheap to pickle); else the array."""
    if isinstance(a, np.memmap) and getattr(a, "filename", None):
        try:
            b = np.load(a.filename, mmap_mode="r")
            if b.shape == a.shape and b.dtype == a.dtype:
                return ("npy", str(a.filename))
        except Exception:  # not a .npy file: ship the data itself
            pass
    return ("array", np.ascontiguousarray(a))


def _column(ref) -> np.ndarray:
    return np.load(ref[1], mmap_mode="r") if ref[0] == "npy" else ref[1]


FLAG_OK, FLAG_PAD, FLAG_CORRUPT = 0, 1, 2
META_FIELDS = 9  # id, label, flag, samples, bytes, payload, requests, read_ns, length


class PlannedSource:
    """Stateless batch source: ``(table path, step)`` -> payloads, meta, augmentation params.

    Everything it depends on is on disk (the table published before the epoch, the
    bad-sample mask, the manifest columns) so it can run in any worker process, forked or
    spawned, and give the same answer for the same batch.  ``meta`` rows are
    ``(id, label, flag, samples, bytes, payload, requests, read_ns, length)``; the read
    counters of the whole batch are put on row 0 (zeros elsewhere) so the main process can
    sum them; ``length`` is the byte length of the row's payload as delivered.
    """

    def __init__(self, ds, table_dir: str, reader: RangeReader, spec, filler: np.ndarray,
                 codec: str, sample_shape, verify_crc: bool = True):
        self.table_dir = table_dir
        self.reader = reader
        self.spec = spec
        self.filler = filler
        self.codec = codec
        self.sample_shape = tuple(sample_shape) if sample_shape else None
        self.verify_crc = verify_crc
        self.packed_len: int | None = None  # set by the DALI backend: batches as uint8 [B, L]
        crc = getattr(ds, "crc32", None)
        self._refs = {
            "file": _column_ref(ds.file), "offset": _column_ref(ds.offset),
            "length": _column_ref(ds.length), "label": _column_ref(ds.labels),
            "crc32": None if crc is None else _column_ref(crc),
        }
        self._cols: dict | None = None
        self._tables: dict = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d.update(_cols=None, _tables={})
        return d

    def table_path(self, k: int) -> str:
        return os.path.join(self.table_dir, f"epoch-{k}.npy")

    def _columns(self) -> dict:
        if self._cols is None:
            self._cols = {k: (None if r is None else _column(r)) for k, r in self._refs.items()}
            self._cols["bad"] = np.load(os.path.join(self.table_dir, "bad.npy"), mmap_mode="r")
        return self._cols

    def _table(self, k: int) -> np.ndarray:
        t = self._tables.get(k)
        if t is None:
            t = np.load(self.table_path(k), mmap_mode="r")
            self._tables = {k: t}  # keep only the current epoch's table open
        return t

    def num_batches(self, k: int) -> int:
        return int(self._table(k)[0, 0])

    def header(self, k: int) -> tuple[int, int, int, int, int]:
        """(epoch, first_step, rank, seed, batch_size) of published table ``k``."""
        h = self._table(k)[0]
        return int(h[1]), int(h[2]), int(h[3]), int(h[4]), int(h[5])

    def batch(self, k: int, i: int):
        """Batch ``i`` of table ``k``: (payload, meta int64[B,9], params float32[B,5]).

        ``payload`` is a list of per-sample arrays, or with ``packed_len`` one uint8
        ``[B, packed_len]`` array, each row a sample's bytes followed by zeros (read in
        place: no per-sample buffers).  Raises StopIteration past the table's limit (DALI
        prefetches past the end).
        """
        from .augment import sample_params
        t = self._table(k)
        if i >= int(t[0, 0]):
            raise StopIteration
        epoch, first_step, rank, seed, b = self.header(k)
        ids = np.asarray(t[1 + i, :b])
        cols = self._columns()
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        bad = valid & (np.asarray(cols["bad"][safe]) != 0)
        want = np.flatnonzero(valid & ~bad)
        before = self.reader.counters.as_array()
        sel = ids[want]
        meta = np.zeros((b, META_FIELDS), dtype=np.int64)
        meta[:, 0] = ids
        meta[:, 1] = np.where(valid, np.asarray(cols["label"][safe]), -1)
        meta[~valid, 2] = FLAG_PAD
        meta[bad, 2] = FLAG_CORRUPT
        crc = cols["crc32"] if self.verify_crc else None
        if self.packed_len:
            payload = np.zeros((b, self.packed_len), dtype=np.uint8)
            lengths = np.asarray(cols["length"][sel])
            self.reader.read_into(cols["file"][sel], cols["offset"][sel], lengths, payload, want, sel)
            if crc is not None:
                expect = np.asarray(crc[sel]).tolist()
                for j, n, c in zip(want.tolist(), lengths.tolist(), expect):
                    if zlib.crc32(payload[j, :n]) != c:
                        meta[j, 2] = FLAG_CORRUPT  # reported and masked by the main process
            filler = meta[:, 2] != FLAG_OK
            if filler.any():
                payload[filler] = 0
                payload[filler, :len(self.filler)] = self.filler
        else:
            bufs = self.reader.read(cols["file"][sel], cols["offset"][sel], cols["length"][sel], sel)
            payload = [self.filler] * b
            for j, buf in zip(want.tolist(), bufs):
                if crc is not None and zlib.crc32(buf) != int(crc[ids[j]]):
                    meta[j, 2] = FLAG_CORRUPT  # reported and masked by the main process
                    continue
                payload[j] = self._payload_array(buf)
        meta[0, 3:8] = self.reader.counters.as_array() - before
        meta[:, 8] = len(self.filler)
        ok = want[meta[want, 2] == FLAG_OK]
        meta[ok, 8] = np.asarray(cols["length"][ids[ok]])
        params = sample_params(self.spec, b, seed, epoch, rank, first_step + i)
        return payload, meta, params

    def _payload_array(self, buf) -> np.ndarray:
        if self.codec == "raw":
            return np.frombuffer(buf, dtype=np.uint8).reshape(self.sample_shape)
        if self.codec == "npy":
            import io as _io
            a = np.load(_io.BytesIO(bytes(buf)), allow_pickle=False)
            return a if a.ndim == 3 else a.reshape(*a.shape, 1)
        return np.frombuffer(buf, dtype=np.uint8)
