"""The on-disk formats behind one interface: ``FORMATS = {"wds": ..., "zarr": ...}``.

A :class:`Format` holds what differs between WebDataset tar shards and Zarr v3 stores: the
options it takes, what each sample becomes (codec, shape), the bytes a sample takes (to
size shards), how a shard is written and named, which header fields it adds, and what
``verify`` checks per shard and per sample. ``convert`` and ``verify`` keep the steps that
are the same for every format; a new format is one class here plus its byte writer.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from . import images as imgs
from . import wds as wds_mod
from . import zarr_store
from .errors import ConvertError, VerifyError
from .checksum import crc32

if TYPE_CHECKING:        # type hints only: manifest imports this module
    from .manifest import Dataset
    from .sources import Source

__all__ = ["FORMATS", "Format", "SamplePlan", "ShardTask", "ShardOutput", "get_format",
           "remember_source"]


@dataclass
class SamplePlan:
    """What the kept samples become: the codec, the (H,W,C) all share (None: sizes differ)
    and, for image folders, each one's probed (H,W,C) and (wds) stored extension and
    re-encoding (None = stored byte for byte)."""

    codec: str
    sample_shape: tuple[int, int, int] | None
    probe_shapes: np.ndarray | None = None
    exts: list[str] | None = None
    targets: list[str | None] | None = None


@dataclass(frozen=True, eq=False)
class ShardTask:
    """Everything a worker needs to write shard ``k`` (pickled to spawned workers)."""

    out: str
    k: int
    format: str
    name: str                       # shard name prefix
    ids: np.ndarray                 # manifest rows of this shard (consecutive)
    keys: np.ndarray                # their positions in the source
    labels: np.ndarray
    resize: tuple[int, int] | None
    quality: int
    encode: str                     # array sources: the encoding (png unless --encode)
    samples_per_shard: int
    sample_shape: tuple[int, int, int] | None
    channels: int = 3               # what every payload holds once decoded: 1 or 3
    source: Source | None = None    # array sources
    paths: list[str] | None = None  # image folders
    exts: list[str] | None = None
    targets: list[str | None] | None = None
    probe_shapes: np.ndarray | None = None


@dataclass
class ShardOutput:
    """Per-sample (offset, length, crc32, H/W/C) of a written shard and its journal entry
    ``{path, size, sha256[, index]}``."""

    offsets: Sequence[int] | np.ndarray
    lengths: Sequence[int] | np.ndarray
    crcs: np.ndarray
    shapes: np.ndarray
    entry: dict[str, Any]


_SOURCE_CACHE: dict[str, Source] = {}


def remember_source(source: Source) -> None:
    """Let shards written in this process use ``source`` (its pixels already loaded)."""
    _SOURCE_CACHE[source.fingerprint] = source


def _cached(source: Source) -> Source:
    # Array sources are re-loaded once per worker process, not shipped with every task.
    return _SOURCE_CACHE.setdefault(source.fingerprint, source)


def _resized(pixels: np.ndarray, resize: tuple[int, int] | None) -> np.ndarray:
    if resize is None or tuple(pixels.shape[:2]) == tuple(resize):
        return pixels
    return imgs.decode_bytes(imgs.encode_array(pixels, "png")[0], resize=resize)


class Format(ABC):
    """The per-format parts of ``convert`` and ``verify`` (one instance each in FORMATS)."""

    name: ClassVar[str]

    def check_options(self, encode: str | None) -> None:
        """Raise ValueError for an option this format does not take."""

    @abstractmethod
    def plan_images(self, pil_formats: list[str], probe_shapes: np.ndarray, channels: int,
                    encode: str | None, resize: tuple[int, int] | None, root: str) -> SamplePlan:
        """What image-folder samples (PIL format, (H,W) of each; ``channels`` 1|3) become."""

    @abstractmethod
    def plan_arrays(self, sample_shape: tuple[int, int, int], encode: str | None) -> SamplePlan:
        """What pixel-array samples of one (H,W,C) become."""

    @abstractmethod
    def bytes_per_sample(self, source: Source, keys: np.ndarray, plan: SamplePlan,
                         encode: str | None, quality: int) -> float:
        """Estimated bytes one sample takes in a shard (to turn --shard-bytes into a count)."""

    def create(self, out: str, plan: SamplePlan, samples_per_shard: int, labels: np.ndarray,
               keys: np.ndarray, source: Source) -> None:
        """Set up OUT before the first shard (a fresh conversion only)."""

    @abstractmethod
    def write_shard(self, task: ShardTask) -> ShardOutput:
        """Write one shard atomically (runs in a worker)."""

    @abstractmethod
    def owns(self, name: str) -> bool:
        """True for an entry of OUT this format writes (--overwrite removes only those)."""

    def remove_partial(self, out: str) -> list[str]:
        """Remove the half-written files a killed shard write leaves; return their paths."""
        return []

    @abstractmethod
    def header_fields(self, entries: list[dict[str, Any]], plan: SamplePlan,
                      samples_per_shard: int) -> dict[str, Any]:
        """This format's manifest.json fields, from the shards' journal entries."""

    def check_dataset(self, ds: Dataset) -> None:
        """verify: whole-dataset checks; raise VerifyError."""

    def check_shard(self, ds: Dataset, fi: int, path: str, data: bytes, rows: np.ndarray) -> None:
        """verify: checks of data file ``fi`` (bytes ``data``, samples ``rows``)."""

    def check_sample(self, ds: Dataset, i: int, view: memoryview, offset: int, path: str) -> None:
        """verify: checks of sample ``i`` at ``offset`` in ``view`` (its file's bytes)."""


# ----------------------------------------------------------------------------- WebDataset

def _folder_samples(task: ShardTask) -> tuple[list[wds_mod.TarSample], np.ndarray]:
    """Image-folder samples: stored byte for byte unless ``targets[j]`` asks to re-encode."""
    samples, shapes = [], np.zeros((len(task.ids), 3), np.int64)
    for j, (sid, label, path) in enumerate(zip(task.ids, task.labels, task.paths)):
        with open(path, "rb") as f:
            data = f.read()
        target = task.targets[j]
        if target is None:
            ext, shapes[j] = task.exts[j], task.probe_shapes[j]
        else:
            # the dataset's channels (1|3, no alpha): a .npy is delivered as stored
            pixels = imgs.decode_bytes(data, channels=task.channels, resize=task.resize)
            data, ext = imgs.encode_array(pixels, target, task.quality)
            shapes[j] = pixels.shape
        samples.append(wds_mod.TarSample(int(sid), int(label), data, ext))
    return samples, shapes


def _array_samples(task: ShardTask) -> tuple[list[wds_mod.TarSample], np.ndarray]:
    """Pixel-array samples, encoded (PNG by default: lossless, grayscale stays 1 channel)."""
    source = _cached(task.source)
    samples, shapes = [], np.zeros((len(task.ids), 3), np.int64)
    for j, (sid, key, label) in enumerate(zip(task.ids, task.keys, task.labels)):
        pixels = _resized(source.images()[key], task.resize)
        data, ext = imgs.encode_array(pixels, task.encode, task.quality)
        shapes[j] = pixels.shape
        samples.append(wds_mod.TarSample(int(sid), int(label), data, ext))
    return samples, shapes


class WdsFormat(Format):
    """WebDataset tar shards plus DALI index files; payloads stay encoded images."""

    name = "wds"

    def plan_images(self, pil_formats, probe_shapes, channels, encode, resize, root):
        native = [imgs.EXT_OF_FORMAT.get(f) for f in pil_formats]
        # None = store byte for byte; else the encoding to re-encode with: --encode, or
        # (--resize) JPEG stays JPEG, or formats other than JPEG/PNG become PNG (lossless)
        targets = [encode or (("jpeg" if e == "jpg" else "png") if resize else
                              (None if e else "png")) for e in native]
        exts = [e if t is None else {"jpeg": "jpg"}.get(t, t) for e, t in zip(native, targets)]
        codecs = sorted({imgs.CODEC_OF_EXT[e] for e in exts})
        probe = probe_shapes.copy()
        probe[:, 2] = channels      # what the decoders deliver: one size is one (H,W)
        hw = {tuple(s) for s in probe[:, :2]} if resize is None else {tuple(resize)}
        shape = (*(int(v) for v in next(iter(hw))), channels) if len(hw) == 1 else None
        return SamplePlan(codecs[0] if len(codecs) == 1 else "mixed", shape, probe,
                          exts, targets)

    def plan_arrays(self, sample_shape, encode):
        ext = {"jpeg": "jpg"}.get(encode or "png", encode or "png")
        return SamplePlan(imgs.CODEC_OF_EXT[ext], sample_shape)

    def bytes_per_sample(self, source, keys, plan, encode, quality):
        if source.is_encoded and not any(t is not None for t in plan.targets):
            return float(np.mean([wds_mod.tar_bytes(os.path.getsize(source.paths[k]))
                                  for k in keys[:1024]]))
        if source.is_encoded:
            return float(wds_mod.tar_bytes(int(np.prod(plan.probe_shapes[0]))))
        x = source.images()[keys[:64]]      # encoded sizes vary: measure a few samples
        return float(np.mean([wds_mod.tar_bytes(len(imgs.encode_array(a, encode or "png",
                                                                      quality)[0]))
                              for a in x]))

    def write_shard(self, task):
        samples, shapes = (_folder_samples if task.paths is not None else _array_samples)(task)
        rel = f"{task.name}-{task.k:06d}.tar"
        res = wds_mod.write_tar(os.path.join(task.out, rel), samples)
        idx_rel = wds_mod.index_path(rel)
        wds_mod.write_index(os.path.join(task.out, idx_rel), res.index_text)
        crcs = np.asarray([crc32(s.payload) for s in samples], np.int64)
        idx_bytes = res.index_text.encode()
        entry = {"path": rel, "size": res.size, "sha256": res.sha256,
                 "index": {"path": idx_rel, "size": len(idx_bytes),
                           "sha256": hashlib.sha256(idx_bytes).hexdigest()}}
        return ShardOutput(res.offsets, res.lengths, crcs, shapes, entry)

    def owns(self, name):
        return re.fullmatch(r".+-\d{6}\.(tar|idx)(\.tmp)?", name) is not None

    def remove_partial(self, out):
        found = [p for p in sorted(os.listdir(out)) if re.fullmatch(r".+-\d{6}\.(tar|idx)\.tmp", p)]
        for p in found:
            os.unlink(os.path.join(out, p))
        return found

    def header_fields(self, entries, plan, samples_per_shard):
        return {"index_files": [e["index"] for e in entries], "member_name": "{id:09d}.{ext}"}

    def check_dataset(self, ds):
        for e in ds.manifest.index_files or ():       # DALI index files: present, unchanged
            p = f"{ds.root}/{e.path}" if ds.is_remote else os.path.join(ds.root, e.path)
            try:
                data = ds.read_file(p)
            except FileNotFoundError:
                raise VerifyError(f"index file missing: {p}") from None
            if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
                raise VerifyError(f"index file modified: {p}")

    def check_sample(self, ds, i, view, offset, path):
        try:
            name = wds_mod.header_name_at(view, offset)
        except Exception as e:  # noqa: BLE001 - any parse failure means "no header here"
            raise VerifyError(f"shard {path}: no tar header before sample {i}: {e}") from e
        if ds.manifest.member_name == "source":  # indexed in place: the source's own names
            from .index import IMAGE_EXTS
            self._check_source_member(view, offset, int(ds.length[i]), path, f"sample {i}",
                                      lambda ext: ext.lower() in IMAGE_EXTS, "an image")
            key = _source_member(view, offset)[0][0]
            for field, fc in ds.field_columns.items():  # --fields: the same sample's member
                self._check_source_member(view, int(fc.offset[i]), int(fc.length[i]), path,
                                          f"field .{field} of sample {i} ({key})", lambda ext: ext == field,
                                          f"the .{field} member", key)
            return
        if wds_mod.id_of_member(name) != i:
            raise VerifyError(f"shard {path}: member {name} at offset {offset} is not sample {i}")

    @staticmethod
    def _check_source_member(view, offset: int, length: int, path: str, what: str,
                             ext_ok, wanted: str, key: str | None = None) -> None:
        """The member of a shard indexed in place at ``offset``: a valid tar header whose
        size is the recorded ``length`` and whose name (when the header holds all of it:
        GNU and PAX long names live in an earlier record) says ``wanted`` (``key``: of
        that sample)."""
        try:
            (k, ext), size, whole = _source_member(view, offset)
        except Exception as e:  # noqa: BLE001 - any parse failure means "no header here"
            raise VerifyError(f"shard {path}: no tar header before {what} (offset {offset}): {e}") from e
        if whole and (not ext_ok(ext) or (key is not None and k != key)):
            raise VerifyError(f"shard {path}: {what} points at member {k}.{ext} (offset "
                              f"{offset}), not {wanted}")
        if size != length:
            raise VerifyError(f"shard {path}: the member at offset {offset} has {size} bytes, "
                              f"the index says {length} for {what}")


def _source_member(view, offset: int) -> tuple[tuple[str, str], int, bool]:
    """``((key, ext), size, whole)`` of the ustar header before ``offset``; ``whole``: the
    header's name field holds the whole name (a full 100-byte field may be a GNU or PAX long
    name cut short)."""
    from .index import split_key
    hdr = bytes(view[offset - wds_mod.BLOCK:offset])
    info = tarfile.TarInfo.frombuf(hdr, "utf-8", "strict")
    return split_key(info.name), info.size, hdr[99] == 0


# ----------------------------------------------------------------------------- Zarr

class ZarrFormat(Format):
    """One sharded Zarr v3 uint8 (N,H,W,C) array: payloads are raw pixels, one shape."""

    name = "zarr"

    def check_options(self, encode):
        if encode is not None:
            raise ValueError("--encode applies to WebDataset output only: Zarr stores raw pixels")

    def plan_images(self, pil_formats, probe_shapes, channels, encode, resize, root):
        hw = {tuple(s) for s in probe_shapes[:, :2]}
        if resize is None and len(hw) > 1:
            (h1, w1), (h2, w2) = sorted(hw)[:2]
            raise ConvertError(f"images in {root} differ in size ({h1}x{w1}, {h2}x{w2}, "
                               f"...): Zarr stores a fixed (N,H,W,C) array, use --resize HxW")
        h, w = resize or next(iter(hw))
        return SamplePlan("raw", (int(h), int(w), channels), probe_shapes)

    def plan_arrays(self, sample_shape, encode):
        return SamplePlan("raw", sample_shape)

    def bytes_per_sample(self, source, keys, plan, encode, quality):
        return float(np.prod(plan.sample_shape))

    def create(self, out, plan, samples_per_shard, labels, keys, source):
        zarr_store.create_store(out, (len(keys), *plan.sample_shape), samples_per_shard,
                                labels, keys, {"classes": source.classes, "codec": "raw",
                                               "source": source.description})

    def write_shard(self, task):
        h, w, c = task.sample_shape
        n = len(task.ids)
        block = np.empty((n, h, w, c), np.uint8)
        if task.paths is not None:
            for j, path in enumerate(task.paths):
                with open(path, "rb") as f:
                    px = imgs.decode_bytes(f.read(), channels=c, resize=task.resize)
                if px.shape != (h, w, c):
                    raise ConvertError(f"{path}: image is {px.shape[0]}x{px.shape[1]}, the "
                                       f"store holds {h}x{w}: use --resize {h}x{w}")
                block[j] = px
        else:
            src = _cached(task.source).images()
            for j, key in enumerate(task.keys):
                block[j] = _resized(src[key], task.resize)
        rel, offsets, lengths, size, sha = zarr_store.write_shard(
            task.out, task.k, int(task.ids[0]), block, task.samples_per_shard)
        crcs = np.asarray([crc32(block[j]) for j in range(n)], np.int64)
        shapes = np.tile(np.asarray([h, w, c], np.int64), (n, 1))
        return ShardOutput(offsets, lengths, crcs, shapes, {"path": rel, "size": size,
                                                            "sha256": sha})

    def owns(self, name):
        return name == zarr_store.GROUP

    def remove_partial(self, out):
        # zarr writes each object to "<name>.<uuid>.partial" and renames it when complete
        found = sorted(str(p) for p in Path(out, zarr_store.GROUP).rglob("*.partial"))
        for p in found:
            os.unlink(p)
        return found

    def header_fields(self, entries, plan, samples_per_shard):
        shape = list(plan.sample_shape)
        return {"zarr": {"group": zarr_store.GROUP, "images": zarr_store.IMAGES,
                         "labels": "labels", "keys": "keys", "chunk_shape": [1, *shape],
                         "shard_shape": [samples_per_shard, *shape]}}

    def check_shard(self, ds, fi, path, data, rows):
        spc = ds.manifest.samples_per_shard
        if spc is None:
            raise VerifyError(f"{ds.root}: a zarr manifest needs samples_per_shard")
        try:
            offs, lens = zarr_store.parse_shard_index(data, spc, path)
        except ValueError as e:
            raise VerifyError(str(e)) from e
        local = rows - fi * spc
        if not (np.array_equal(offs[local], ds.offset[rows])
                and np.array_equal(lens[local], ds.length[rows])):
            raise VerifyError(f"shard {path}: its index disagrees with the manifest")


FORMATS: dict[str, Format] = {f.name: f for f in (WdsFormat(), ZarrFormat())}


def get_format(name: str) -> Format:
    """The registered format ``name``; ValueError listing the known names otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"format must be {' or '.join(map(repr, FORMATS))}, "
                         f"got {name!r}") from None
