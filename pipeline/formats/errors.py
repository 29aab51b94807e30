"""Errors of the converter and the verifier (each message names the file, sample or value).

They live here, below the format registry, because the per-format writers and checks in
``registry`` raise them as well as ``convert`` and ``verify``.
"""
from __future__ import annotations

__all__ = ["ConvertError", "VerifyError"]


class ConvertError(RuntimeError):
    """A conversion that cannot proceed (message names the file, sample or value)."""


class VerifyError(ValueError):
    """A converted dataset that does not match its manifest (message names the shard)."""
