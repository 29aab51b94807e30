"""Writers for the on-disk formats (WebDataset tar shards, Zarr v3 stores) and the converter.

    from pipeline.formats import convert, verify
    convert(src, out, format="wds" | "zarr", ...) -> summary dict
    verify(out) -> report dict (raises VerifyError naming the bad shard)

Modules: sources (read ImageFolder / CIFAR / IDX / npz), images (encode/decode), wds (tar +
DALI index writer), zarr_store (sharded Zarr v3 array), convert (orchestration, resume),
verify (re-read every sample through the manifest). Formats: docs/formats.md.
"""
from __future__ import annotations

from .convert import ConvertError, convert
from .sources import SourceError
from .verify import VerifyError, verify

__all__ = ["convert", "verify", "ConvertError", "SourceError", "VerifyError"]
