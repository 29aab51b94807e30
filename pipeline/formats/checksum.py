"""The payload checksum of the manifest: CRC-32 as zlib computes it (the ``crc32`` column).

Computed with zlib-ng's vectorised CRC-32 (PCLMULQDQ / VPCLMULQDQ on x86, PMULL on Arm:
several times zlib's speed on large payloads; it is on the read path of every sample),
and with the standard library's ``zlib.crc32`` where the ``zlib-ng`` package is absent.
Both give the same value for the same bytes, so manifests written either way agree.
"""
from __future__ import annotations

try:
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - the package is a dependency; stay correct without it
    from zlib import crc32 as _crc32

__all__ = ["crc32"]


def crc32(data) -> int:
    """CRC-32 (zlib's polynomial and conventions) of a bytes-like object."""
    return _crc32(data)
