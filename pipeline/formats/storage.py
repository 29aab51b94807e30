"""Where a dataset's files live: local paths or fsspec URLs (the one URL predicate)."""
from __future__ import annotations

__all__ = ["is_url", "local_path"]


def is_url(path: str) -> bool:
    """True for fsspec URLs (``scheme://``: http(s), s3, gs, ...) other than ``file://``."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    """``file://`` stripped; other paths unchanged."""
    p = str(path)
    return p[len("file://"):] if p.startswith("file://") else p
