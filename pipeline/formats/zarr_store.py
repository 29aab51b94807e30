"""Zarr v3 stores: a uint8 (N,H,W,C) image array with the sharding codec, labels, keys.

Layout (``OUT/data.zarr``, a zarr v3 group):
``images``: uint8 (N,H,W,C), inner chunks (1,H,W,C) (one sample each), shards (S,H,W,C),
no compressor, so each sample's payload is its raw C-order pixels, H*W*C bytes;
``labels``: int32 (N,); ``keys``: int64 (N,) (source order index). Each shard object is
``data.zarr/images/c/<k>/0/0/0``; it ends with the shard index: S little-endian uint64
``(offset, nbytes)`` pairs (one per inner chunk, C order) and a 4-byte CRC32C of them.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

GROUP = "data.zarr"
IMAGES = "images"
EMPTY = np.uint64(2**64 - 1)      # index entry of a chunk that was never written


def shard_relpath(k: int) -> str:
    """Path of shard ``k`` of the images array, relative to OUT."""
    return f"{GROUP}/{IMAGES}/c/{k}/0/0/0"


def create_store(out: str, shape: tuple[int, int, int, int], samples_per_shard: int,
                 labels: np.ndarray, keys: np.ndarray, attributes: dict) -> None:
    """Create the group, the (empty) sharded images array and the filled labels/keys arrays."""
    import zarr
    n, h, w, c = shape
    group = zarr.open_group(os.path.join(out, GROUP), mode="w", zarr_format=3, attributes=attributes)
    group.create_array(IMAGES, shape=shape, dtype="uint8", chunks=(1, h, w, c),
                       shards=(samples_per_shard, h, w, c), compressors=None, filters=None,
                       fill_value=0, dimension_names=("sample", "height", "width", "channel"),
                       # an all-zero image must still be stored: the manifest points at it
                       config={"write_empty_chunks": True})
    chunk = max(1, min(n, 1 << 20))
    group.create_array("labels", data=labels.astype(np.int32), chunks=(chunk,))
    group.create_array("keys", data=keys.astype(np.int64), chunks=(chunk,))


def write_shard(out: str, k: int, start: int, pixels: np.ndarray, samples_per_shard: int):
    """Write rows ``start:start+len(pixels)`` (= shard ``k``) with zarr; return
    (relpath, offsets, lengths, file size, sha256) read back from the shard index."""
    import zarr
    rel = shard_relpath(k)
    # A leftover shard (from an interrupted or damaged run) would be read back and merged by
    # zarr, failing on its checksum: this shard is rewritten from scratch.
    if os.path.exists(os.path.join(out, rel)):
        os.unlink(os.path.join(out, rel))
    # write_empty_chunks is a run-time setting, not stored in the metadata: pass it here too
    arr = zarr.open_array(os.path.join(out, GROUP, IMAGES), mode="r+").with_config(
        {"write_empty_chunks": True})
    arr[start:start + len(pixels)] = pixels          # zarr writes the shard atomically
    with open(os.path.join(out, rel), "rb") as f:
        data = f.read()
    offsets, nbytes = parse_shard_index(data, samples_per_shard, rel)
    n = len(pixels)
    if np.any(offsets[:n] == EMPTY):
        raise RuntimeError(f"{rel}: zarr left a sample unwritten")
    return rel, offsets[:n].astype(np.uint64), nbytes[:n].astype(np.uint64), len(data), \
        hashlib.sha256(data).hexdigest()


def parse_shard_index(data: bytes, chunks_per_shard: int, name: str = "shard"):
    """(offsets, nbytes) uint64 arrays from a shard object's trailing index; checks its CRC32C."""
    import crc32c
    size = 16 * chunks_per_shard
    if len(data) < size + 4:
        raise ValueError(f"{name}: {len(data)} bytes is too short for a {chunks_per_shard}-chunk index")
    index = data[len(data) - size - 4: len(data) - 4]
    stored = int.from_bytes(data[-4:], "little")
    if crc32c.crc32c(index) != stored:
        raise ValueError(f"{name}: shard index checksum mismatch (truncated or modified)")
    pairs = np.frombuffer(index, dtype="<u8").reshape(chunks_per_shard, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()
