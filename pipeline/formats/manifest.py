"""The per-sample location table of a converted dataset, and ``open_dataset``.

A dataset directory holds ``manifest.json`` (the header: ``header.ManifestHeader``) and
``manifest/<column>.npy`` (one row per sample, plain ``.npy``, memory-mapped for local
paths). See docs/formats.md.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from . import layout
from .header import (HEADER_NAME, MANIFEST_VERSION, FileEntry, ManifestError, ManifestHeader,
                     header_path, read_header)
from .storage import (access_denied, connection_failure, filesystem, fs_options, is_url, local_path,
                      read_url, unreachable)

__all__ = ["COLUMN_DIR", "COLUMNS", "OPTIONAL_COLUMNS", "FieldColumns", "field_column",
           "Dataset", "write_manifest",
           "open_dataset", "ManifestError", "ManifestHeader", "FileEntry", "read_header"]

T = TypeVar("T")
COLUMN_DIR = "manifest"
# column name on disk -> (dtype, Dataset attribute)
COLUMNS = {
    "file": ("<u4", "file"),
    "offset": ("<u8", "offset"),
    "length": ("<u4", "length"),
    "label": ("<i4", "labels"),
    "key": ("<i8", "keys"),
    "crc32": ("<u4", "crc32"),
}
OPTIONAL_COLUMNS = {"shape": ("<u2", "shapes")}     # (N,3) H,W,C; only when sizes differ
# per recorded field (header "fields"): field.<name>.offset / field.<name>.length
FIELD_PARTS = {"offset": "<u8", "length": "<u4"}


def field_column(name: str, part: str) -> str:
    """The column holding ``part`` ("offset" or "length") of field ``name``'s member."""
    return f"field.{name}.{part}"


def _column_dtype(name: str) -> str:
    if name in COLUMNS or name in OPTIONAL_COLUMNS:
        return (COLUMNS.get(name) or OPTIONAL_COLUMNS[name])[0]
    head, _, part = name.rpartition(".")
    if head.startswith("field.") and part in FIELD_PARTS:
        return FIELD_PARTS[part]
    raise ValueError(f"unknown manifest column {name!r}")


@dataclass(frozen=True)
class FieldColumns:
    """Where one field's member lies for every sample: byte ``offset`` in the sample's
    file (the image's) and ``length`` (numpy columns, len N)."""

    offset: np.ndarray
    length: np.ndarray


def write_manifest(out: str | os.PathLike, header: ManifestHeader | Mapping[str, Any],
                   columns: dict[str, np.ndarray]) -> None:
    """Write the columns, then the header last (atomically): a manifest.json that exists
    describes a complete dataset. ``header`` may also be a dict in the manifest.json layout;
    either way it is checked as ``open_dataset`` will check it, and ``version`` and
    ``columns`` are set here."""
    out = Path(out)
    where = str(out / HEADER_NAME)
    if not isinstance(header, ManifestHeader):
        header = ManifestHeader.from_json({**header, "version": MANIFEST_VERSION}, where)
    (out / COLUMN_DIR).mkdir(parents=True, exist_ok=True)
    n = header.num_samples
    spec = {}
    for name, arr in columns.items():
        dtype = _column_dtype(name)
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if len(arr) != n:
            raise ValueError(f"column {name} has {len(arr)} rows, expected {n}")
        tmp = out / COLUMN_DIR / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, out / COLUMN_DIR / f"{name}.npy")
        spec[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
    header = replace(header, version=MANIFEST_VERSION, columns=spec)
    tmp = out / f".{HEADER_NAME}.tmp"
    tmp.write_text(json.dumps(header.to_json(), indent=1) + "\n")
    os.replace(tmp, out / HEADER_NAME)


class _FromHeader(Generic[T]):
    """A read-only Dataset attribute that reads the ManifestHeader field ``name`` (so the
    header stays the one copy of these values)."""

    def __init__(self, name: str | None = None):
        self.name = name

    def __set_name__(self, owner: type, attr: str) -> None:
        self.name = self.name or attr

    def __get__(self, ds: Dataset | None, owner: type | None = None) -> T:
        return self if ds is None else getattr(ds.manifest, self.name)


# ----------------------------------------------------------------------------- dataset

@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A converted dataset: its header plus numpy columns (len N, row = sample id).

    ``header`` is manifest.json as read (tools index it directly), ``manifest`` the same
    parsed and checked. Header values (``format``, ``codec``, ...) read through to
    ``manifest``; derived tables (``files``, ``byte_order``, ...) are computed once, on
    first use.
    """

    root: str
    header: dict[str, Any]
    manifest: ManifestHeader
    file: np.ndarray            # index into ``files``
    offset: np.ndarray          # payload byte offset inside that file
    length: np.ndarray          # payload bytes
    labels: np.ndarray
    keys: np.ndarray            # position of the sample in the source's own order
    crc32: np.ndarray           # CRC-32 (zlib's) of the payload (formats/checksum.py)
    shapes: np.ndarray | None = None     # (N,3) H,W,C; only when sizes differ
    field_columns: Mapping[str, FieldColumns] = field(default_factory=dict)  # header "fields"
    storage_options: dict[str, Any] | None = None   # fsspec options of a remote root (s3 keys)

    def __post_init__(self) -> None:
        named = {name: getattr(self, attr) for name, (_, attr) in COLUMNS.items()}
        for f, fc in self.field_columns.items():
            named.update({field_column(f, "offset"): fc.offset, field_column(f, "length"): fc.length})
        for name, column in named.items():
            if column is None or len(column) != self.num_samples:
                raise ManifestError(f"{self.root}: column {name} is missing or does not have "
                                    f"{self.num_samples} rows")
        self._check_columns()

    def _check_columns(self) -> None:
        """Refuse columns that point outside the header (cheap: a min/max per column), so
        that a damaged manifest fails here, naming it, not as an IndexError mid-epoch."""
        where = header_path(self.root)
        n_files, n_classes = len(self.manifest.files), len(self.manifest.classes)
        index = self.manifest.index_files
        if index is not None and len(index) != n_files:
            raise ManifestError(f"{where}: {len(index)} index files for {n_files} data files")
        if self.num_samples == 0:
            return
        top = int(self.file.max())
        if top >= n_files:
            raise ManifestError(f"{where}: samples point at data file {top}, but 'files' lists only "
                                f"{n_files} (the file list is cut short?)")
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise ManifestError(f"{where}: label {bad} is outside the {n_classes} classes "
                                f"(0..{n_classes - 1})")
        self._check_ends(self.offset, self.length, "")
        for f, fc in self.field_columns.items():
            self._check_ends(fc.offset, fc.length, f"'s .{f} member")

    def _check_ends(self, offset: np.ndarray, length: np.ndarray, what: str) -> None:
        """Refuse a range (the image's, or a field member's) that ends past its file."""
        sizes = self.file_sizes.astype(np.uint64)
        for a in range(0, self.num_samples, 1 << 22):      # bounded work memory at any N
            sl = slice(a, a + (1 << 22))
            end = np.asarray(offset[sl], np.uint64) + np.asarray(length[sl], np.uint64)
            over = np.flatnonzero(end > sizes[np.asarray(self.file[sl])])
            if over.size:
                i = a + int(over[0])
                fi = int(self.file[i])
                raise ManifestError(f"{header_path(self.root)}: sample {i}{what} ends at byte "
                                    f"{int(end[over[0]])}, past the end of "
                                    f"{self.file_entries[fi].path} ({int(sizes[fi])} bytes)")

    # Header values: "wds" or "zarr"; jpeg, png, npy, raw or mixed; channels a decoder
    # yields; rows (= len(ds)); the (H, W, C) all samples share, None if sizes differ.
    format = _FromHeader[str]()
    codec = _FromHeader[str]()
    channels = _FromHeader[int]()
    num_samples = _FromHeader[int]()
    sample_shape = _FromHeader["tuple[int, int, int] | None"]()
    file_entries = _FromHeader["tuple[FileEntry, ...]"]("files")   # ``file`` indexes them

    @property
    def field_names(self) -> tuple[str, ...]:
        """Extra members recorded per sample (``tools/shard.py index --fields``), in order."""
        return tuple(self.field_columns)

    @property
    def fingerprint(self) -> str:
        """sha256 naming the exact bytes of this conversion ("" if the header has none)."""
        return self.manifest.fingerprint or ""

    @property
    def is_remote(self) -> bool:
        """True for a URL root (columns in memory, data read by range requests)."""
        return is_url(self.root)

    @property
    def has_checksums(self) -> bool:
        """False for shards indexed in place (formats/index.py): the crc32 column is empty."""
        return (self.manifest.params or {}).get("checksums", True) is not False

    @cached_property
    def classes(self) -> list[str]:
        """Class names: label ``i`` is ``classes[i]``."""
        return list(self.manifest.classes)

    @cached_property
    def files(self) -> list[str]:
        """Full path (or URL) of each data file."""
        # entries are relative to the root, or (shards indexed in place) absolute paths / URLs
        if self.is_remote:
            return [e.path if is_url(e.path) else f"{self.root}/{e.path}" for e in self.file_entries]
        return [e.path if is_url(e.path) else os.path.join(self.root, e.path)
                for e in self.file_entries]

    @cached_property
    def file_sizes(self) -> np.ndarray:
        """int64 byte size of each data file, as the header records it."""
        return np.asarray([e.size for e in self.file_entries], dtype=np.int64)

    @cached_property
    def byte_order(self) -> np.ndarray | None:
        """Ids sorted by (file, offset), or None when ids already are (``layout.byte_order``)."""
        return layout.byte_order(self.file, self.offset)

    @cached_property
    def file_rank(self) -> np.ndarray:
        """Each sample's position in byte order (``layout.file_rank``)."""
        return layout.file_rank(self.byte_order, len(self))

    @cached_property
    def _fs(self):
        """The filesystem of the data files (the root's, or the shards' own URLs)."""
        url = next((f for f in self.files if is_url(f)), self.root)
        opts = fs_options(url, storage_options=self.storage_options)  # bounded requests
        return filesystem(url, **opts)[0]

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"Dataset({self.root!r}, format={self.format}, codec={self.codec}, n={len(self)}, "
                f"classes={len(self.classes)}, files={len(self.files)})")

    def read(self, i: int) -> bytes:
        """Payload bytes of sample ``i`` (one range read; debug/verify convenience)."""
        return self._read_range(i, self.offset, self.length)

    def read_field(self, name: str, i: int) -> bytes:
        """The bytes of sample ``i``'s ``name`` member (a recorded field; one range read)."""
        fc = self.field_columns.get(name)
        if fc is None:
            raise KeyError(f"{self.root}: no field {name!r} (recorded: {list(self.field_names)})")
        return self._read_range(i, fc.offset, fc.length)

    def _read_range(self, i: int, offsets: np.ndarray, lengths: np.ndarray) -> bytes:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range 0..{self.num_samples - 1}")
        off, n = int(offsets[i]), int(lengths[i])
        path = self.files[int(self.file[i])]
        if is_url(path):
            data = self._fs.cat_file(path, start=off, end=off + n)
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, n, off)
            finally:
                os.close(fd)
        if len(data) != n:
            raise ManifestError(f"{path}: read {len(data)} bytes for sample {i}, expected {n} "
                                f"at offset {off} (file truncated, or a server without range "
                                "requests?)")
        return data

    def read_file(self, path: str) -> bytes:
        """The whole file ``path`` (local, or a URL through this dataset's filesystem);
        FileNotFoundError if it is absent."""
        if is_url(path):
            return self._fs.cat_file(path)
        with open(path, "rb") as f:
            return f.read()

    def check_files(self, verify_checksum: bool = False) -> None:
        """Raise ManifestError naming the first data file that is missing, has the wrong size
        (truncated/modified) or (with ``verify_checksum``) whose sha256 differs (replaced)."""
        for path, entry in zip(self.files, self.file_entries):
            try:
                size = self._fs.size(path) if is_url(path) else os.path.getsize(path)
            except PermissionError as e:
                raise ManifestError(access_denied(path, e)) from e
            except OSError as e:
                fail = connection_failure(e) if is_url(path) else None
                if fail is not None:  # no answer from the server: the file may well exist
                    raise ManifestError(unreachable(path, fail)) from e
                raise ManifestError(f"data file missing: {path} ({e})") from e
            if size != entry.size:
                what = "truncated" if size < entry.size else "modified (grew)"
                raise ManifestError(f"data file {what}: {path} is {size} bytes, manifest says "
                                    f"{entry.size}")
            if verify_checksum and entry.sha256 is not None:
                digest = hashlib.sha256()
                opener = self._fs.open if is_url(path) else open
                with opener(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                if digest.hexdigest() != entry.sha256:
                    raise ManifestError(f"data file modified or replaced: {path} (sha256 "
                                        f"{digest.hexdigest()[:16]}..., manifest says "
                                        f"{entry.sha256[:16]}...)")


def _load_column(root: str, name: str, remote: bool, optional: bool = False,
                 storage_options: dict | None = None) -> np.ndarray | None:
    if remote:
        url = f"{root}/{COLUMN_DIR}/{name}.npy"
        try:
            return np.load(io.BytesIO(read_url(url, storage_options)), allow_pickle=False)
        except FileNotFoundError:
            if optional:
                return None
            raise ManifestError(f"manifest column missing: {url}")
    path = os.path.join(root, COLUMN_DIR, f"{name}.npy")
    if not os.path.exists(path):
        if optional:
            return None
        raise ManifestError(f"manifest column missing: {path}")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def open_dataset(path_or_url: str | os.PathLike, storage_options: dict | None = None) -> Dataset:
    """Open a converted dataset (a local directory or an ``http(s)://``/``s3://``/fsspec
    URL root; ``storage_options`` configure that filesystem, e.g. s3's ``endpoint_url``,
    ``key``, ``secret``; the Loader reads with them too).

    Local columns are memory-mapped; remote ones are fetched into memory. Data files are
    not touched here: ``Dataset.check_files()`` checks them on demand.
    """
    root = str(path_or_url).rstrip("/")
    remote = is_url(root)
    if not remote:
        root = os.path.abspath(local_path(root))
    opts = dict(storage_options) if storage_options else None
    header = read_header(root, opts)
    manifest = ManifestHeader.from_json(header, header_path(root))
    columns = {attr: _load_column(root, name, remote, storage_options=opts)
               for name, (_, attr) in COLUMNS.items()}
    for name in set(manifest.columns or {}) & set(OPTIONAL_COLUMNS):
        columns[OPTIONAL_COLUMNS[name][1]] = _load_column(root, name, remote, optional=True,
                                                          storage_options=opts)
    columns["field_columns"] = {
        f: FieldColumns(*(_load_column(root, field_column(f, part), remote, storage_options=opts)
                          for part in FIELD_PARTS))
        for f in manifest.fields or ()}
    return Dataset(root=root, header=header, manifest=manifest, storage_options=opts, **columns)
