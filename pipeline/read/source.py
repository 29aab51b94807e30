"""The stateless per-batch source shared by every backend: table row -> payloads + meta.

Everything it depends on is on disk (the table published before the epoch, the
bad-sample mask, the manifest columns), so it runs in any worker process, forked or
spawned, and gives the same answer for the same batch.  What it hands to the decode
stage is a :class:`SourceBatch`: the encoded payloads (or raw pixels) and one
``META_DTYPE`` record per row; what it read goes into the table's counters file.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from ..formats.checksum import crc32
from .reader import RangeReader
from .sniff import looks_decodable, pil_decodable, plausible_structure
from .table import EpochTable

__all__ = ["Flag", "META_DTYPE", "SourceBatch", "PlannedSource", "BadSamples", "make_filler",
           "meta_to_array", "meta_from_array"]


class Flag(IntEnum):
    """What a row of a batch holds."""

    OK = 0        # the planned sample's bytes
    PAD = 1       # padding (no sample): the filler, weight 0
    CORRUPT = 2   # a sample whose bytes failed their checksum or decoding: the filler


# one record per row; all int64 so that it crosses DALI as a plain [B, 4] int64 array
META_DTYPE = np.dtype([("id", "<i8"), ("label", "<i8"), ("flag", "<i8"), ("length", "<i8")])


def meta_to_array(meta: np.ndarray) -> np.ndarray:
    """``META_DTYPE [B]`` -> int64 ``[B, 4]`` (for DALI outputs, which take plain arrays)."""
    return np.ascontiguousarray(meta).view(np.int64).reshape(len(meta), len(META_DTYPE.names))


def meta_from_array(a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`meta_to_array` (copies: DALI reuses its buffers)."""
    a = np.array(a, dtype=np.int64, copy=True).reshape(-1, len(META_DTYPE.names))
    return a.view(META_DTYPE).reshape(len(a))


@dataclass
class SourceBatch:
    """One batch as read: ``payload`` is a list of per-row uint8 arrays (encoded bytes, or
    HWC pixels for raw/npy), or one uint8 ``[B, packed_len]`` array whose rows are each a
    sample's bytes followed by zeros; ``meta`` is ``META_DTYPE [B]``; ``fields`` the
    requested extra members of each row's sample (a padding row: its fill sample's)."""

    payload: list | np.ndarray
    meta: np.ndarray
    # requested extra members: name -> one ``bytes`` per row (b"" where the row carries
    # no sample: the filler, a known-bad or corrupt sample)
    fields: dict[str, list[bytes]] = field(default_factory=dict)


def make_filler(codec: str, sample_shape, channels: int) -> np.ndarray:
    """A valid sample delivered for padding rows and skipped samples (never read from disk)."""
    shape = tuple(sample_shape) if sample_shape else (8, 8, channels)
    if codec in ("raw", "npy"):
        return np.zeros(shape, dtype=np.uint8)
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L" if channels == 1 else "RGB", (shape[1], shape[0])).save(
        buf, "PNG" if codec == "png" else "JPEG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


class BadSamples:
    """The mask of samples known to be bad (uint8 per sample, a ``.npy`` shared by every
    process of a loader): later batches deliver them as the filler without reading them."""

    def __init__(self, path: str, n: int | None = None):
        self.path = path
        if n is not None:
            np.save(path, np.zeros(n, dtype=np.uint8))
        self._mask: np.ndarray | None = None

    def __getstate__(self):
        return {"path": self.path, "_mask": None}

    @property
    def mask(self) -> np.ndarray:
        if self._mask is None:
            self._mask = np.load(self.path, mmap_mode="r+")
        return self._mask

    def mark(self, ids) -> None:
        self.mask[np.asarray(ids, dtype=np.int64)] = 1
        self.mask.flush()

    def reset(self, ids=()) -> None:
        """Exactly ``ids`` are bad (restoring a checkpoint)."""
        self.mask[:] = 0
        self.mark(ids)

    def ids(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.mask)).astype(np.int64)


class _PackedRows:
    """The reusable ``[B, L]`` uint8 buffers of packed batches, a ring of them per process.

    A fresh zeroed array per batch costs page faults on every batch (tens of MB a batch
    for photographs).  A consumer that copies a batch before asking for the next one (a
    parallel DALI worker serialises it into shared memory) needs a ring of one; DALI's
    main-process source, which decodes from the buffer itself (``no_copy``), needs as
    many as it may hold (dali_backend.py says how many).  After its payload each row holds
    zeros, as a fresh array would: what an earlier, longer payload left there is cleared."""

    def __init__(self):
        self.bufs: list[np.ndarray] = []
        self.used: list[np.ndarray] = []   # per buffer and row: bytes an earlier batch may have left
        self.cur = 0

    def take(self, b: int, width: int, ring: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The next buffer of the ring, and per row how many of its bytes may be stale."""
        if len(self.bufs) != ring or self.bufs[0].shape != (b, width):
            self.bufs = [np.zeros((b, width), dtype=np.uint8) for _ in range(ring)]
            self.used = [np.zeros(b, dtype=np.int64) for _ in range(ring)]
            self.cur = ring - 1
        self.cur = (self.cur + 1) % ring
        stale = self.used[self.cur]
        self.used[self.cur] = np.full(b, width, dtype=np.int64)  # until finish()
        return self.bufs[self.cur], stale

    def finish(self, before: np.ndarray, lengths: np.ndarray) -> None:
        """Clear each row past its new payload, up to what the earlier batch left there."""
        buf = self.bufs[self.cur]
        for j in np.flatnonzero(before > lengths).tolist():
            buf[j, lengths[j]:before[j]] = 0
        self.used[self.cur] = np.array(lengths, dtype=np.int64)


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


class PlannedSource:
    """``(table, batch index)`` -> :class:`SourceBatch` for one dataset (see module doc)."""

    def __init__(self, ds, reader: RangeReader, bad: BadSamples, filler: np.ndarray,
                 verify_crc: bool = True, fields: tuple[str, ...] = ()):
        self.reader, self.bad, self.filler = reader, bad, filler
        self.fields = tuple(fields)  # extra members read with each sample (docs/formats.md)
        self.codec = ds.codec
        self.sample_shape = tuple(ds.sample_shape) if ds.sample_shape else None
        self.verify_crc = verify_crc
        self.files, self.file_sizes = list(ds.files), np.asarray(ds.file_sizes)
        self._refs = {"file": _column_ref(ds.file), "offset": _column_ref(ds.offset),
                      "length": _column_ref(ds.length), "label": _column_ref(ds.labels),
                      "crc32": _column_ref(ds.crc32)}
        absent = [f for f in self.fields if f not in ds.field_columns]
        if absent:
            raise ValueError(f"{ds.root}: field {absent[0]!r} is not recorded in the manifest "
                             f"(recorded: {list(ds.field_columns)}); index the shards with "
                             f"tools/shard.py index --fields {','.join(self.fields)}")
        for f in self.fields:
            fc = ds.field_columns[f]
            self._refs.update({f"{f}.offset": _column_ref(fc.offset),
                               f"{f}.length": _column_ref(fc.length)})
        self._cols: dict | None = None
        self._tables: dict[str, EpochTable] = {}
        self._num_samples = len(ds)
        self._structure_ok: np.ndarray | None = None   # per sample: checksum and structure passed
        self._packed = _PackedRows()

    def __getstate__(self):
        d = dict(self.__dict__)
        d.update(_cols=None, _tables={}, _structure_ok=None, _packed=_PackedRows())
        return d

    def _columns(self) -> dict:
        if self._cols is None:
            self._cols = {k: _column(r) for k, r in self._refs.items()}
        return self._cols

    def table(self, path: str) -> EpochTable:
        """The table published at ``path`` (opened once; only the latest one stays open)."""
        t = self._tables.get(path)
        if t is None:
            t = EpochTable(path)
            self._tables = {path: t}
        return t

    def packed_len(self) -> int | None:
        """Row width for packed batches when payload sizes are similar (padding waste at
        most 2x), else None; raw and npy payloads are never packed."""
        if self.codec in ("raw", "npy"):
            return None
        lengths = np.asarray(self._columns()["length"])
        top = int(lengths.max()) if len(lengths) else 0
        if not top or top > 2 * float(lengths.mean()):
            return None
        return max(top, len(self.filler))  # padding rows carry the filler

    def batch(self, table: EpochTable, i: int, packed_len: int | None = None,
              ring: int = 1) -> SourceBatch:
        """Batch ``i`` of ``table``; records its reads in the table.  Raises StopIteration
        past the table's limit (DALI prefetches past the end)."""
        if i >= table.limit:
            raise StopIteration
        ids = table.ids(i)
        b = len(ids)
        cols = self._columns()
        valid = ids >= 0
        # the sample each row reads: its own, or for a padding row its fill sample (a real
        # planned sample delivered as padding, id -1 / weight 0); -1 = the filler
        src = np.where(valid, ids, table.fill(i))
        safe = np.where(src >= 0, src, 0)
        bad = (src >= 0) & (np.asarray(self.bad.mask[safe]) != 0)
        want = np.flatnonzero((src >= 0) & ~bad)
        sel = src[want]
        meta = np.zeros(b, dtype=META_DTYPE)
        meta["id"] = ids
        meta["label"] = np.where(valid, np.asarray(cols["label"][safe]), -1)
        meta["flag"][~valid] = Flag.PAD
        meta["flag"][bad & valid] = Flag.CORRUPT
        got = np.zeros(b, dtype=bool)  # rows that carry the bytes they read
        before = self.reader.counters.copy()
        lengths = np.asarray(cols["length"][sel])
        crc = np.asarray(cols["crc32"][sel]) if self.verify_crc else None
        extra: list[list] = []
        if packed_len:
            payload, stale = self._packed.take(b, packed_len, ring)
        if self.fields:  # each sample's members in one request where they are adjacent
            rows, extra = self._read_with_fields(cols, sel)
            if not packed_len:
                payload = [self.filler] * b
            else:
                for j, buf in zip(want.tolist(), rows):
                    payload[j, :len(buf)] = np.frombuffer(buf, dtype=np.uint8)
        elif packed_len:
            self.reader.read_into(cols["file"][sel], cols["offset"][sel], lengths, payload, want, sel)
        else:
            rows = self.reader.read(cols["file"][sel], cols["offset"][sel], lengths, sel)
            payload = [self.filler] * b
        if packed_len:  # memoryview slices of the flat buffer: cheaper than numpy views
            flat, w = memoryview(payload).cast("B"), payload.shape[1]
            rows = [flat[j * w:j * w + n] for j, n in zip(want.tolist(), lengths.tolist())]
        intact = self._intact(rows, crc, sel)
        # a damaged planned row is reported and masked by the main process; a damaged fill
        # sample leaves its padding row with the filler (reported where it is planned)
        meta["flag"][want[~intact & valid[want]]] = Flag.CORRUPT
        got[want[intact]] = True
        fields = {f: [b""] * b for f in self.fields}
        if self.fields or not packed_len:
            for k in np.flatnonzero(intact).tolist():
                j = int(want[k])
                for f, bufs in zip(self.fields, extra):
                    fields[f][j] = bytes(bufs[k])
                if not packed_len:
                    payload[j] = self._payload_array(rows[k])
        if packed_len:
            filler = ~got
            if filler.any():
                payload[filler] = 0
                payload[filler, :len(self.filler)] = self.filler
        table.record(i, self.reader.counters - before)
        meta["length"] = len(self.filler)
        meta["length"][got] = np.asarray(cols["length"][src[got]])
        if packed_len:
            self._packed.finish(stale, meta["length"].astype(np.int64))
        return SourceBatch(payload, meta, fields)

    def _read_with_fields(self, cols: dict, sel: np.ndarray) -> tuple[list, list[list]]:
        """The images of samples ``sel`` and each requested field's members, read together:
        the ranges of one sample share its id, so the reader merges adjacent members into
        one request (``read.ranges.MEMBER_GAP``); counted as ``len(sel)`` samples."""
        k, parts = len(sel), ("",) + tuple(f"{f}." for f in self.fields)
        bufs = self.reader.read(np.tile(np.asarray(cols["file"][sel]), len(parts)),
                                np.concatenate([np.asarray(cols[p + "offset"][sel]) for p in parts]),
                                np.concatenate([np.asarray(cols[p + "length"][sel]) for p in parts]),
                                np.tile(sel, len(parts)), samples=k)
        return bufs[:k], [bufs[k * j:k * (j + 1)] for j in range(1, len(parts))]

    def read_samples(self, ids: np.ndarray) -> tuple[list[bytes], float]:
        """Payloads of ``ids`` read afresh, one request each (finding what killed a decoder),
        and the seconds it took."""
        ids = np.asarray(ids, dtype=np.int64)
        cols = self._columns()
        probe = self.reader.like(merge_gap=0)  # the same storage options, timeout, retries
        try:
            bufs = probe.read(cols["file"][ids], cols["offset"][ids], cols["length"][ids])
            return [bytes(b) for b in bufs], probe.counters.seconds
        finally:
            probe.close()

    def _intact(self, rows: list, crc: np.ndarray | None, sel: np.ndarray) -> np.ndarray:
        """Per row, whether its payload may reach a decoder (see :meth:`_damaged`); the
        checksums of a whole batch are compared at once, and only rows whose checksum
        matched but whose structure was never looked at in this process go one by one."""
        if crc is None or not len(rows):
            return np.fromiter((not self._damaged(buf, None) for buf in rows), dtype=bool, count=len(rows))
        ok = np.fromiter(map(crc32, rows), dtype=np.int64, count=len(rows)) == crc.astype(np.int64)
        if self.codec in ("raw", "npy"):
            return ok
        if self._structure_ok is None:
            self._structure_ok = np.zeros(self._num_samples, dtype=bool)
        for k in np.flatnonzero(ok & ~self._structure_ok[sel]).tolist():
            ok[k] = not self._damaged(rows[k], int(crc[k]), int(sel[k]))
        return ok

    def _damaged(self, buf, crc: int | None, sample: int | None = None) -> bool:
        """True when a payload must not reach a decoder: its CRC32 differs from the
        manifest's (or it matches, but a JPEG's marker chain is broken: bytes stored
        damaged, which would crash DALI's decoder), or, with no checksum to verify, it fails
        the cheap look of read/sniff.py (encoded images) or does not parse as the declared
        pixels.  What fails a structural check gets PIL's second opinion.  A sample whose
        checksum matched and whose structure passed once is not looked at again in this
        process: the same checksum means the same bytes."""
        if crc is not None:
            if crc32(buf) != crc:
                return True
            if self.codec in ("raw", "npy"):
                return False
            if self._structure_ok is None:
                self._structure_ok = np.zeros(self._num_samples, dtype=bool)
            if sample is not None and self._structure_ok[sample]:
                return False
            if not (plausible_structure(buf) or pil_decodable(buf)):
                return True
            if sample is not None:
                self._structure_ok[sample] = True
            return False
        if self.codec not in ("raw", "npy"):
            return not looks_decodable(buf)
        try:
            self._payload_array(buf)
            return False
        except (ValueError, EOFError, OSError):
            return True

    def _payload_array(self, buf) -> np.ndarray:
        if self.codec == "raw":
            return np.frombuffer(buf, dtype=np.uint8).reshape(self.sample_shape)
        if self.codec == "npy":
            a = np.load(io.BytesIO(bytes(buf)), allow_pickle=False)
            return a if a.ndim == 3 else a.reshape(*a.shape, 1)
        return np.frombuffer(buf, dtype=np.uint8)
