"""verify(): re-read every sample of a converted dataset through its manifest."""
from __future__ import annotations

import hashlib
import os
import tarfile

import numpy as np

from .errors import VerifyError
from .header import ManifestError
from .manifest import open_dataset
from .registry import FORMATS
from .checksum import crc32
from .wds import BLOCK, member_name

__all__ = ["verify", "VerifyError"]


def _read_file(ds, path: str) -> bytes:
    try:
        return ds.read_file(path)
    except FileNotFoundError as e:
        raise VerifyError(f"shard missing: {path}") from e


def _wds_label(view: memoryview, offset: int, i: int, path: str) -> int:
    """The label stored with sample ``i`` of one of our tars: its ``<id>.cls`` member (a
    header and one data block) sits right before the payload's header (formats/wds.py)."""
    data = offset - 2 * BLOCK
    try:
        hdr = tarfile.TarInfo.frombuf(bytes(view[data - BLOCK:data]), "utf-8", "strict")
        if hdr.name != member_name(i, "cls"):
            raise ValueError(f"member {hdr.name!r} where {member_name(i, 'cls')!r} belongs")
        return int(bytes(view[data:data + hdr.size]).decode("ascii"))
    except (ValueError, tarfile.TarError, UnicodeDecodeError) as e:
        raise VerifyError(f"shard {path}: the label member of sample {i} is damaged: {e}") from e


def _zarr_labels(ds) -> np.ndarray:
    """The store's own ``labels`` array (formats/zarr_store.py)."""
    import zarr
    from .zarr_store import GROUP

    root = f"{ds.root}/{GROUP}"
    try:
        group = zarr.open_group(root, mode="r", storage_options=ds.storage_options if ds.is_remote else None)
        return np.asarray(group["labels"][:])
    except Exception as e:  # noqa: BLE001 - any failure: the store's labels cannot be read
        raise VerifyError(f"{root}: its labels array cannot be read ({type(e).__name__}: {e})") from e


def _label_mismatch(ds, i: int, stored: int, where: str) -> VerifyError:
    return VerifyError(f"{where}: sample {i} is stored with label {stored}, the manifest says "
                       f"{int(ds.labels[i])}")


def verify(out: str | os.PathLike, *, progress: bool = False,
           storage_options: dict | None = None) -> dict:
    """Check counts, file sizes and sha256, every sample's CRC32, and what the format adds
    (wds: DALI index files, the tar member before each sample; zarr: the shard index).
    ``out`` may be a URL (``s3://...``, read with ``storage_options``).
    Return a report dict; raise VerifyError naming the shard."""
    from tqdm import tqdm
    try:
        ds = open_dataset(out, storage_options)
    except (ManifestError, OSError, ValueError) as e:
        raise VerifyError(str(e)) from e
    fmt = FORMATS[ds.format]
    n = len(ds)
    if len(ds.classes) and (ds.labels.min() < 0 or ds.labels.max() >= len(ds.classes)):
        raise VerifyError(f"{out}: labels outside 0..{len(ds.classes) - 1}")
    if np.any(ds.file >= len(ds.files)):
        raise VerifyError(f"{out}: manifest refers to a file index beyond the {len(ds.files)} files")
    counts = np.bincount(ds.file, minlength=len(ds.files))
    fmt.check_dataset(ds)
    # the labels stored beside the images (not for shards indexed in place: their label
    # member is wherever the source put it)
    wds_labels = ds.format == "wds" and ds.manifest.member_name != "source"
    if ds.format == "zarr":
        stored = _zarr_labels(ds)
        if len(stored) != n:
            raise VerifyError(f"{out}: the store holds {len(stored)} labels, the manifest {n}")
        bad = np.flatnonzero(stored != ds.labels)
        if len(bad):
            raise _label_mismatch(ds, int(bad[0]), int(stored[bad[0]]), f"{out} (data.zarr/labels)")
    checked = 0
    bar = tqdm(total=n, desc="verify", unit="img", disable=not progress)
    for fi, (path, entry) in enumerate(zip(ds.files, ds.file_entries)):
        data = _read_file(ds, path)
        if len(data) != entry.size:
            what = "truncated" if len(data) < entry.size else "modified (size changed)"
            raise VerifyError(f"shard {what}: {path} is {len(data)} bytes, manifest says {entry.size}")
        if entry.sha256 is not None and hashlib.sha256(data).hexdigest() != entry.sha256:
            raise VerifyError(f"shard modified: {path} (sha256 differs from the manifest)")
        rows = np.flatnonzero(ds.file == fi)
        fmt.check_shard(ds, fi, path, data, rows)
        view = memoryview(data)
        for i in rows:
            off, ln = int(ds.offset[i]), int(ds.length[i])
            payload = view[off: off + ln]
            if len(payload) != ln or (ds.has_checksums and crc32(payload) != int(ds.crc32[i])):
                raise VerifyError(f"shard {path}: sample {i} (offset {off}) has a bad checksum")
            fmt.check_sample(ds, int(i), view, off, path)
            if wds_labels and _wds_label(view, off, int(i), path) != int(ds.labels[i]):
                raise _label_mismatch(ds, int(i), _wds_label(view, off, int(i), path), f"shard {path}")
            checked += 1
        bar.update(len(rows))
    bar.close()
    if checked != n:
        raise VerifyError(f"{out}: checked {checked} samples, manifest has {n}")
    checks = ["sizes"] + (["sha256"] if any(e.sha256 for e in ds.file_entries) else []) + (
        ["per-sample CRC32"] if ds.has_checksums else []) + ["locations"] + (
        ["labels"] if wds_labels or ds.format == "zarr" else [])
    return {"out": str(ds.root), "format": ds.format, "num_samples": n, "num_files": len(ds.files),
            "samples_per_file": counts.tolist(), "ok": True, "checks": checks}
