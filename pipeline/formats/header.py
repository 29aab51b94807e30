"""manifest.json, typed: :class:`ManifestHeader` and its data files, :class:`FileEntry`.

``from_json`` checks what a header holds (version, keys, types, a registered format) and
names the manifest file when it refuses one; ``to_json`` gives back the same keys and values
in the order the converter writes them, so datasets written before these types open
unchanged. See docs/formats.md for what each field means.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .registry import FORMATS
from .storage import is_url, missing_bucket, read_url

__all__ = ["MANIFEST_VERSION", "HEADER_NAME", "FIELD_NAME", "ManifestError", "FileEntry", "ManifestHeader",
           "header_path", "read_header"]

MANIFEST_VERSION = 1
HEADER_NAME = "manifest.json"
FIELD_NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]*")   # a member extension, lower case


class ManifestError(ValueError):
    """A manifest or a data file that does not match it (message names the file)."""


_KINDS = {int: "an integer", str: "a string", bool: "true or false", dict: "an object",
          list: "a list"}


def _get(data: Mapping, key: str, kind: type, where: str, required: bool = True) -> Any:
    """``data[key]`` checked to be a ``kind`` (an absent or null optional key gives None)."""
    if key not in data or (data[key] is None and not required):
        if required:
            raise ManifestError(f"{where}: missing key {key!r}")
        return None
    value = data[key]
    # bool is an int subclass, but `"channels": true` is a broken header, not 1 channel
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ManifestError(f"{where}: {key!r} must be {_KINDS[kind]}, got "
                            f"{type(value).__name__} {value!r:.60}")
    return value


def _count(data: Mapping, key: str, where: str, required: bool = True) -> int | None:
    value = _get(data, key, int, where, required)
    if value is not None and value < 0:
        raise ManifestError(f"{where}: {key!r} must be >= 0, got {value}")
    return value


def _items(data: Mapping, key: str, kind: type, where: str, required: bool = True) -> list | None:
    values = _get(data, key, list, where, required)
    for j, v in enumerate(values or ()):
        _get({f"{key}[{j}]": v}, f"{key}[{j}]", kind, where)
    return values


@dataclass(frozen=True)
class FileEntry:
    """One data file of a dataset: path relative to the root, size in bytes, sha256."""

    path: str
    size: int
    sha256: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = HEADER_NAME) -> FileEntry:
        """Parse ``{path, size[, sha256]}``; ManifestError naming ``where`` when malformed.
        Unknown keys are ignored: optional fields may be added without a version bump."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: a file entry must be an object {{path, size, "
                                f"sha256}}, got {type(data).__name__}")
        return cls(path=_get(data, "path", str, where), size=_count(data, "size", where),
                   sha256=_get(data, "sha256", str, where, required=False))

    def to_json(self) -> dict[str, Any]:
        """The manifest.json form (keys in the order the converter writes them)."""
        out: dict[str, Any] = {"path": self.path, "size": self.size}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out


def _field_names(data: Mapping, where: str) -> tuple[str, ...] | None:
    """The ``fields`` list (extensions of the extra members recorded per sample), checked."""
    names = _items(data, "fields", str, where, required=False)
    if names is None:
        return None
    for name in names:
        if not FIELD_NAME.fullmatch(name):
            raise ManifestError(f"{where}: field name {name!r} is not a member extension "
                                "(letters, digits, '_', '-', '.')")
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}: 'fields' lists a name twice: {names}")
    return tuple(names)


def _entries(data: Mapping, key: str, where: str, required: bool = True):
    values = _get(data, key, list, where, required)
    if values is None:
        return None
    return tuple(FileEntry.from_json(v, f"{where}: {key}[{j}]") for j, v in enumerate(values))


@dataclass(frozen=True, kw_only=True)
class ManifestHeader:
    """manifest.json, typed. Fields are declared in the order they are written, so
    ``to_json`` gives back the same keys and values (docs/formats.md lists their meaning).
    Optional fields are None when absent and then not written (``sample_shape`` is always
    written: null means "sizes differ")."""

    format: str
    codec: str
    classes: tuple[str, ...]
    sample_shape: tuple[int, int, int] | None = None
    channels: int
    num_samples: int
    samples_per_shard: int | None = None
    files: tuple[FileEntry, ...]
    source: dict[str, Any] | None = None
    seed: int | None = None
    shuffle: bool | None = None
    params: dict[str, Any] | None = None
    fingerprint: str | None = None
    created_by: str | None = None
    index_files: tuple[FileEntry, ...] | None = None    # wds: the DALI .idx files
    member_name: str | None = None                      # wds
    fields: tuple[str, ...] | None = None               # wds indexed: extra members recorded
    zarr: dict[str, Any] | None = None                  # zarr: group/array names, chunking
    version: int = MANIFEST_VERSION
    columns: dict[str, Any] | None = None               # {name: {dtype, shape}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = HEADER_NAME) -> ManifestHeader:
        """Parse a header; ManifestError naming ``where`` (the manifest file) for another
        version, a missing key, a value of the wrong type or an unknown format."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: the header must be a JSON object, "
                                f"got {type(data).__name__}")
        version = data.get("version")
        if version != MANIFEST_VERSION or isinstance(version, bool):
            raise ManifestError(f"{where}: manifest version {version} is not supported "
                                f"(this code reads version {MANIFEST_VERSION})")
        fmt = _get(data, "format", str, where)
        if fmt not in FORMATS:
            raise ManifestError(f"{where}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        shape = _items(data, "sample_shape", int, where, required=False)
        if shape is not None and len(shape) != 3:
            raise ManifestError(f"{where}: 'sample_shape' must be [H, W, C] or null, got {shape}")

        def opt(key: str, kind: type) -> Any:
            return _get(data, key, kind, where, required=False)

        return cls(
            format=fmt, codec=_get(data, "codec", str, where),
            classes=tuple(_items(data, "classes", str, where)),
            sample_shape=tuple(shape) if shape else None,
            channels=_count(data, "channels", where),
            num_samples=_count(data, "num_samples", where),
            samples_per_shard=_count(data, "samples_per_shard", where, required=False),
            files=_entries(data, "files", where),
            source=opt("source", dict), seed=opt("seed", int), shuffle=opt("shuffle", bool),
            params=opt("params", dict), fingerprint=opt("fingerprint", str),
            created_by=opt("created_by", str),
            index_files=_entries(data, "index_files", where, required=False),
            member_name=opt("member_name", str), zarr=opt("zarr", dict),
            fields=_field_names(data, where),
            version=version, columns=opt("columns", dict))

    def to_json(self) -> dict[str, Any]:
        """The manifest.json form: ``json.dumps(h.to_json(), indent=1)`` is what is written."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name != "sample_shape":
                continue
            if isinstance(value, tuple):
                value = [v.to_json() if isinstance(v, FileEntry) else v for v in value]
            out[f.name] = value
        return out


def header_path(root: str) -> str:
    """Where the manifest.json of dataset ``root`` (a directory or URL) is."""
    return f"{root}/{HEADER_NAME}" if is_url(root) else os.path.join(root, HEADER_NAME)


def read_header(path_or_url: str | os.PathLike,
                storage_options: dict | None = None) -> dict[str, Any]:
    """The JSON header of a dataset directory (or URL, fetched with ``storage_options``),
    as a dict (not yet checked)."""
    root = str(path_or_url).rstrip("/")
    where = header_path(root)
    if is_url(root):
        try:
            text = read_url(where, storage_options)  # bounded; an unreachable server: ConnectionError naming it
        except FileNotFoundError as e:
            bucket = missing_bucket(root, storage_options)
            if bucket is not None:
                raise ManifestError(f"{root}: the bucket {bucket!r} does not exist (check the "
                                    "name and the endpoint)") from e
            raise ManifestError(f"no {HEADER_NAME} at {where}: not a converted dataset (or "
                                "the conversion did not finish)") from e
    elif not os.path.isdir(root):
        raise ManifestError(f"{root}: no such directory" if not os.path.exists(root) else
                            f"{root}: not a directory (a converted dataset is a directory with "
                            f"{HEADER_NAME})")
    elif not os.path.exists(where):
        raise ManifestError(f"no {HEADER_NAME} in {root}: not a converted dataset "
                            "(or the conversion did not finish)")
    else:
        text = Path(where).read_text()
    try:
        return json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{where}: not valid JSON ({e})") from e

