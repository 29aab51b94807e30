"""verify(): re-read every sample of a converted dataset through its manifest."""
from __future__ import annotations

import hashlib
import os
import zlib

import numpy as np

from ..manifest import ManifestError, open_dataset
from . import wds as wds_mod
from . import zarr_store


class VerifyError(ValueError):
    """A converted dataset that does not match its manifest (message names the shard)."""


def verify(out, *, progress: bool = False) -> dict:
    """Check counts, file sizes and sha256, every sample's CRC32, the tar member names (wds)
    or the shard index (zarr). Return a report dict; raise VerifyError naming the shard."""
    from tqdm import tqdm
    try:
        ds = open_dataset(out)
    except (ManifestError, OSError, ValueError) as e:
        raise VerifyError(str(e)) from e
    n = len(ds)
    if len(ds.classes) and (ds.labels.min() < 0 or ds.labels.max() >= len(ds.classes)):
        raise VerifyError(f"{out}: labels outside 0..{len(ds.classes) - 1}")
    if np.any(ds.file >= len(ds.files)):
        raise VerifyError(f"{out}: manifest refers to a file index beyond the {len(ds.files)} files")
    counts = np.bincount(ds.file, minlength=len(ds.files))
    extra = [e for e in ds.header.get("index_files", [])]
    for e in extra:        # DALI index files: present and unchanged
        p = os.path.join(ds.root, e["path"])
        if not os.path.exists(p):
            raise VerifyError(f"index file missing: {p}")
        with open(p, "rb") as f:
            data = f.read()
        if len(data) != e["size"] or hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise VerifyError(f"index file modified: {p}")
    checked = 0
    bar = tqdm(total=n, desc="verify", unit="img", disable=not progress)
    for fi, path in enumerate(ds.files):
        entry = ds.file_entries[fi]
        if not os.path.exists(path):
            raise VerifyError(f"shard missing: {path}")
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != entry["size"]:
            what = "truncated" if len(data) < entry["size"] else "modified (size changed)"
            raise VerifyError(f"shard {what}: {path} is {len(data)} bytes, manifest says {entry['size']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise VerifyError(f"shard modified: {path} (sha256 differs from the manifest)")
        rows = np.flatnonzero(ds.file == fi)
        if ds.format == "zarr":
            spc = int(ds.header["samples_per_shard"])
            try:
                offs, lens = zarr_store.parse_shard_index(data, spc, path)
            except ValueError as e:
                raise VerifyError(str(e)) from e
            local = rows - fi * spc
            if not (np.array_equal(offs[local], ds.offset[rows]) and np.array_equal(lens[local], ds.length[rows])):
                raise VerifyError(f"shard {path}: its index disagrees with the manifest")
        view = memoryview(data)
        for i in rows:
            off, ln = int(ds.offset[i]), int(ds.length[i])
            payload = view[off: off + ln]
            if len(payload) != ln or zlib.crc32(payload) != int(ds.crc32[i]):
                raise VerifyError(f"shard {path}: sample {i} (offset {off}) has a bad checksum")
            if ds.format == "wds":
                try:
                    name = wds_mod.header_name_at(view, off)
                except Exception as e:  # noqa: BLE001
                    raise VerifyError(f"shard {path}: no tar header before sample {i}: {e}") from e
                if wds_mod.id_of_member(name) != i:
                    raise VerifyError(f"shard {path}: member {name} at offset {off} is not sample {i}")
            checked += 1
        bar.update(len(rows))
    bar.close()
    if checked != n:
        raise VerifyError(f"{out}: checked {checked} samples, manifest has {n}")
    return {"out": str(ds.root), "format": ds.format, "num_samples": n, "num_files": len(ds.files),
            "samples_per_file": counts.tolist(), "ok": True}
