"""The on-disk formats (WebDataset tar shards, Zarr v3 stores), the manifest, the converter.

    from pipeline.formats import convert, verify
    convert(src, out, format="wds" | "zarr", ...) -> summary dict
    verify(out) -> report dict (raises VerifyError naming the bad shard)

Modules, lowest first: storage (local path or URL), layout (byte order of samples), errors,
images (encode/decode), wds (tar + DALI index writer), zarr_store (sharded Zarr v3 array),
registry (``FORMATS``: the per-format parts of convert and verify), manifest (the
per-sample location table, ``open_dataset``), sources (read ImageFolder / CIFAR / IDX /
npz), convert (orchestration, resume), verify (re-read every sample through the manifest).
Formats: docs/formats.md.
"""
from __future__ import annotations

from .convert import ConvertError, convert
from .sources import SourceError
from .verify import VerifyError, verify

__all__ = ["convert", "verify", "ConvertError", "SourceError", "VerifyError"]
