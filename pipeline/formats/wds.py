"""WebDataset tar shards: a deterministic ustar writer and DALI ``v1.2`` index files.

Each sample ``id`` (its manifest row) becomes two members, in sorted order:
``<id:09d>.cls`` (the label as ASCII decimal) then ``<id:09d>.<ext>`` (the payload).
Headers are plain ustar (no PAX): integer mtime 0, mode 0644, uid/gid 0, empty owner names,
so the same input and seed give byte-identical shards.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass

BLOCK = 512
RECORD = 20 * BLOCK          # tar's default record size; archives are padded to it
MTIME = 0
ID_WIDTH = 9


def member_name(sample_id: int, ext: str) -> str:
    """``<id:09d>.<ext>``: DALI's source_info "<tar>:<offset>:<name>" gives the id back."""
    return f"{sample_id:0{ID_WIDTH}d}.{ext}"


def id_of_member(name: str) -> int:
    """Inverse of member_name (accepts a path or DALI source_info's last field)."""
    return int(os.path.basename(name).split(".", 1)[0])


def tar_bytes(payload_len: int) -> int:
    """Bytes one sample takes in a tar: .cls header+block, payload header+padded data."""
    return 3 * BLOCK + -(-payload_len // BLOCK) * BLOCK


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid = size, MTIME, 0o644, 0, 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


@dataclass
class TarSample:
    sample_id: int
    label: int
    payload: bytes
    ext: str


@dataclass
class TarResult:
    offsets: list[int]       # data offset of each payload member
    lengths: list[int]
    size: int
    sha256: str
    index_text: str          # DALI index file contents


def write_tar(path: str, samples: list[TarSample]) -> TarResult:
    """Write ``samples`` (ascending ids) to ``path`` atomically (``.tmp`` then rename)."""
    tmp = path + ".tmp"
    digest = hashlib.sha256()
    offsets, lengths, index_lines = [], [], []
    pos = 0
    with open(tmp, "wb") as f:
        def put(b: bytes):
            nonlocal pos
            f.write(b)
            digest.update(b)
            pos += len(b)

        def member(name: str, data: bytes) -> int:
            put(_header(name, len(data)))
            start = pos
            put(data)
            if len(data) % BLOCK:
                put(b"\0" * (BLOCK - len(data) % BLOCK))
            return start

        for s in samples:
            cls = str(int(s.label)).encode()
            cls_name, img_name = member_name(s.sample_id, "cls"), member_name(s.sample_id, s.ext)
            cls_off = member(cls_name, cls)
            img_off = member(img_name, s.payload)
            offsets.append(img_off)
            lengths.append(len(s.payload))
            index_lines.append(f"cls {cls_off} {len(cls)} {cls_name} "
                               f"{s.ext} {img_off} {len(s.payload)} {img_name}")
        end = pos + 2 * BLOCK
        put(b"\0" * (2 * BLOCK + (-end) % RECORD))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    index_text = f"v1.2 {len(samples)}\n" + "".join(line + "\n" for line in index_lines)
    return TarResult(offsets, lengths, pos, digest.hexdigest(), index_text)


def index_path(tar_path: str) -> str:
    """DALI index file beside a tar: ``<name>-NNNNNN.idx``."""
    return tar_path[: -len(".tar")] + ".idx"


def write_index(path: str, text: str) -> None:
    """Write a DALI index file atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def header_name_at(buf: bytes | memoryview, data_offset: int) -> str:
    """Name in the ustar header just before ``data_offset`` (raises on a corrupt header)."""
    hdr = bytes(buf[data_offset - BLOCK: data_offset])
    return tarfile.TarInfo.frombuf(hdr, "utf-8", "strict").name
