"""The per-sample location table of a converted dataset, and ``open_dataset``.

A dataset directory holds ``manifest.json`` (the header) and ``manifest/<column>.npy``
(one row per sample, plain ``.npy``, memory-mapped for local paths). See docs/formats.md.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

MANIFEST_VERSION = 1
HEADER_NAME = "manifest.json"
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


class ManifestError(ValueError):
    """A manifest or a data file that does not match it (message names the file)."""


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def write_manifest(out: str | os.PathLike, header: dict, columns: dict[str, np.ndarray]) -> None:
    """Write the columns, then the header last (atomically): a manifest.json that exists
    describes a complete dataset."""
    out = Path(out)
    (out / COLUMN_DIR).mkdir(parents=True, exist_ok=True)
    n = header["num_samples"]
    spec = {}
    for name, arr in columns.items():
        dtype = (COLUMNS.get(name) or OPTIONAL_COLUMNS[name])[0]
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if len(arr) != n:
            raise ValueError(f"column {name} has {len(arr)} rows, expected {n}")
        tmp = out / COLUMN_DIR / f".{name}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, out / COLUMN_DIR / f"{name}.npy")
        spec[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape)}
    header = dict(header, version=MANIFEST_VERSION, columns=spec)
    tmp = out / f".{HEADER_NAME}.tmp"
    tmp.write_text(json.dumps(header, indent=1) + "\n")
    os.replace(tmp, out / HEADER_NAME)


def read_header(path_or_url: str | os.PathLike) -> dict:
    """The JSON header of a dataset directory (or URL)."""
    root = str(path_or_url).rstrip("/")
    if _is_url(root):
        import fsspec
        with fsspec.open(f"{root}/{HEADER_NAME}", "rb") as f:
            return json.loads(f.read())
    p = Path(root) / HEADER_NAME
    if not p.exists():
        raise ManifestError(f"no {HEADER_NAME} in {root}: not a converted dataset "
                            "(or the conversion did not finish)")
    return json.loads(p.read_text())


class Dataset:
    """A converted dataset: header fields plus numpy columns (len N, row = sample id)."""

    def __init__(self, root: str, header: dict, columns: dict[str, np.ndarray]):
        self.root = root
        self.header = header
        self.is_remote = _is_url(root)
        if header.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{root}: manifest version {header.get('version')} is not "
                                f"supported (this code reads version {MANIFEST_VERSION})")
        self.format: str = header["format"]
        self.codec: str = header["codec"]
        self.classes: list[str] = list(header["classes"])
        shape = header.get("sample_shape")
        self.sample_shape: tuple[int, int, int] | None = tuple(shape) if shape else None
        self.channels: int = int(header["channels"])
        self.num_samples: int = int(header["num_samples"])
        self.file_entries: list[dict] = header["files"]
        sep = "/" if self.is_remote else os.sep
        self.files: list[str] = [f"{root}{sep}{e['path']}" if self.is_remote
                                 else os.path.join(root, e["path"]) for e in self.file_entries]
        self.file_sizes = np.asarray([e["size"] for e in self.file_entries], dtype=np.int64)
        for name, (_, attr) in {**COLUMNS, **OPTIONAL_COLUMNS}.items():
            setattr(self, attr, columns.get(name))
        for name in COLUMNS:
            if columns.get(name) is None or len(columns[name]) != self.num_samples:
                raise ManifestError(f"{root}: column {name} is missing or does not have "
                                    f"{self.num_samples} rows")
        self._fs = None

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (f"Dataset({self.root!r}, format={self.format}, codec={self.codec}, n={len(self)}, "
                f"classes={len(self.classes)}, files={len(self.files)})")

    @property
    def fingerprint(self) -> str:
        return self.header.get("fingerprint", "")

    def _filesystem(self):
        if self._fs is None:
            import fsspec
            self._fs = fsspec.core.url_to_fs(self.root)[0]
        return self._fs

    def read(self, i: int) -> bytes:
        """Payload bytes of sample ``i`` (one range read; debug/verify convenience)."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range 0..{self.num_samples - 1}")
        path = self.files[int(self.file[i])]
        off, n = int(self.offset[i]), int(self.length[i])
        if self.is_remote:
            data = self._filesystem().cat_file(path, start=off, end=off + n)
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

    def check_files(self, verify_checksum: bool = False) -> None:
        """Raise ManifestError naming the first data file that is missing, has the wrong size
        (truncated/modified) or (with ``verify_checksum``) whose sha256 differs (replaced)."""
        for path, entry in zip(self.files, self.file_entries):
            try:
                size = (self._filesystem().size(path) if self.is_remote else os.path.getsize(path))
            except (FileNotFoundError, OSError) as e:
                raise ManifestError(f"data file missing: {path} ({e})") from e
            if size != entry["size"]:
                what = "truncated" if size < entry["size"] else "modified (grew)"
                raise ManifestError(f"data file {what}: {path} is {size} bytes, manifest says "
                                    f"{entry['size']}")
            if verify_checksum and "sha256" in entry:
                digest = hashlib.sha256()
                opener = self._filesystem().open if self.is_remote else open
                with opener(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        digest.update(block)
                if digest.hexdigest() != entry["sha256"]:
                    raise ManifestError(f"data file modified or replaced: {path} (sha256 "
                                        f"{digest.hexdigest()[:16]}..., manifest says "
                                        f"{entry['sha256'][:16]}...)")


def _load_column(root: str, name: str, remote: bool, optional: bool = False) -> np.ndarray | None:
    if remote:
        import fsspec
        url = f"{root}/{COLUMN_DIR}/{name}.npy"
        try:
            with fsspec.open(url, "rb") as f:
                return np.load(io.BytesIO(f.read()), allow_pickle=False)
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


def open_dataset(path_or_url: str | os.PathLike) -> Dataset:
    """Open a converted dataset (a local directory or an ``http(s)://``/fsspec URL root).

    Local columns are memory-mapped; remote ones are fetched into memory. Data files are
    not touched here: ``Dataset.check_files()`` checks them on demand.
    """
    root = str(path_or_url).rstrip("/")
    remote = _is_url(root)
    if not remote:
        root = os.path.abspath(root[len("file://"):] if root.startswith("file://") else root)
    header = read_header(root)
    optional = set(header.get("columns", {})) & set(OPTIONAL_COLUMNS)
    columns = {name: _load_column(root, name, remote) for name in COLUMNS}
    for name in optional:
        columns[name] = _load_column(root, name, remote, optional=True)
    return Dataset(root, header, columns)
