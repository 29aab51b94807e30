"""Walk the headers of a tar shard without reading its members' data, and group the members
into WebDataset samples.

Tar layout (POSIX ustar, with GNU and PAX extensions), all that is read here: a 512-byte
header per member (name at bytes 0-99, size in octal at 124-135, checksum at 148-155, type
flag at 156, magic ``ustar`` at 257, ustar name prefix at 345-499), then the member's data
padded to a multiple of 512; a PAX extended header (type ``x``) or a GNU long name (type
``L``) is a member whose data holds the next member's path/size; zero blocks end the
archive.

:func:`scan_shard` is the hot loop of ``tools/shard.py index``: it walks and groups in one
pass, without an object per member, and reads the data of the few members it is asked for
(the label member).  A shard on a server is read through :class:`ShardReader`, which asks
only for the bytes the walk needs: the first ``HEAD`` bytes of a header (everything but the
ustar prefix, fetched only when its first byte says there is one), the data of a PAX record
or a label; and, since the walk tells it what it expects to read next (the layout of the
samples seen so far), one request covers a header and the small data right after it.
"""
from __future__ import annotations

import mmap
import os

from .storage import filesystem, is_url

__all__ = ["BLOCK", "TarError", "split_key", "scan_shard", "ShardReader"]

BLOCK = 512
HEAD = 346              # header bytes a remote walk needs: up to and including prefix[0]
MERGE_GAP = 256         # a gap smaller than one HTTP response's headers is fetched, not skipped
_ZERO = b"\0" * BLOCK
_REGULAR = (ord("0"), 0, ord("7"))
_PAX, _LONGNAME, _GLOBAL = ord("x"), ord("L"), ord("g")


class TarError(ValueError):
    """A truncated or non-tar shard (the message names the shard and the offset)."""


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = the name up to the first dot of its basename; ext = the rest."""
    cut = name.rfind("/") + 1
    dot = name.find(".", cut)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _octal(field_: bytes, where: str) -> int:
    if field_[:1] and field_[0] & 0x80:          # GNU base-256 for large sizes
        return int.from_bytes(field_[1:], "big")
    s = field_.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise TarError(f"{where}: not a tar header (size field {field_!r})") from None


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        n = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += n
    return out


def scan_shard(reader: "ShardReader", name: str, read_exts: frozenset = frozenset(),
               ) -> list[tuple[str, dict[str, tuple]]]:
    """The samples of a tar shard, in order: ``(key, {ext: (data offset, size, member name)})``,
    with the member's data appended to the tuple for extensions in ``read_exts``.
    Consecutive members with one key form one sample (WebDataset's grouping; a key seen again
    later is another sample with the same key).  Raises :class:`TarError` naming the shard for
    a truncated or non-tar file."""
    read_at, size, head = reader.read_at, reader.size, reader.head
    predict = reader.remote        # hints only matter where a request costs something
    layout: dict[tuple, int] = {}  # (two previous member kinds) -> bytes read after the header
    prev = (None, None)
    samples: list = []
    cur_key, cur = None, None
    pos, long_name, pax = 0, None, None
    mm = None if predict else reader.mm     # local: slice the map directly (the hot path)
    while pos + BLOCK <= size:
        if mm is not None:
            hdr = mm[pos:pos + BLOCK]
        else:
            after = layout.get(prev, 0)
            hdr = read_at(pos, head, BLOCK + after if after else 0)
        if len(hdr) < head:
            raise TarError(f"{name}: truncated tar header at offset {pos}")
        if hdr[257:262] != b"ustar":
            if len(hdr) < BLOCK:
                hdr = read_at(pos, BLOCK)            # the checksum needs the whole block
            if hdr == _ZERO:
                return samples                       # end-of-archive marker
            # v7 tar, or not a tar at all: the header checksum decides
            if _octal(hdr[148:156], name) != sum(hdr[:148]) + 8 * 32 + sum(hdr[156:]):
                raise TarError(f"{name}: corrupt or non-tar data at offset {pos} (header checksum)")
        raw = hdr[124:136]
        try:  # the common case: an octal number, NUL/space padded
            msize = int(raw.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            msize = _octal(raw, name)
        data_at = pos + BLOCK
        typ = hdr[156]
        if typ in _REGULAR:
            if long_name is None and pax is None:
                end = hdr.find(b"\0", 0, 100)
                mname = (hdr[:end] if end >= 0 else hdr[:100]).decode("utf-8", "replace")
                if hdr[345] and hdr[257:263] == b"ustar\0":  # POSIX ustar (GNU uses it otherwise)
                    if len(hdr) < BLOCK:
                        hdr = read_at(pos, BLOCK)
                        head = BLOCK    # this writer splits names: fetch whole headers from now
                    mname = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + mname
            else:
                mname = (pax or {}).get("path") or long_name
                if mname is None:
                    mname = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if pax and "size" in pax:
                    msize = int(pax["size"])
                long_name, pax = None, None
            if data_at + msize > size:
                raise TarError(f"{name}: member {mname} runs past the end of the file (truncated)")
            cut = mname.rfind("/") + 1
            dot = mname.find(".", cut)
            key, ext = (mname, "") if dot < 0 else (mname[:dot], mname[dot + 1:].lower())
            if key != cur_key:
                cur_key, cur = key, {}
                samples.append((key, cur))
            if ext in read_exts:
                cur[ext] = (data_at, msize, mname, mm[data_at:data_at + msize] if mm is not None
                            else read_at(data_at, msize))
                kind_read = msize
            else:
                cur[ext] = (data_at, msize, mname)
                kind_read = 0
            kind = ext
        elif typ == _PAX or typ == _LONGNAME:        # applies to the next member
            blob = mm[data_at:data_at + msize] if mm is not None else read_at(data_at, msize)
            if typ == _LONGNAME:
                long_name = blob.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif b"path=" in blob or b"size=" in blob:  # else (e.g. mtime only) nothing we use
                pax = _pax(blob)
            kind, kind_read = typ, msize
        else:                                        # directories, links: drop pending names
            if typ != _GLOBAL:
                long_name, pax = None, None
            kind, kind_read = typ, 0
        if predict:
            layout[prev] = kind_read
            prev = (prev[1], kind)
        pos = data_at + (msize + BLOCK - 1) // BLOCK * BLOCK
    if pos < size:
        raise TarError(f"{name}: truncated (ends inside a tar header at offset {pos})")
    return samples


class ShardReader:
    """``read_at(offset, n, hint=0)`` on a local shard (mmap without readahead: only header
    pages are touched) or a URL (fsspec ranged reads).

    Remote: each call not served by the last response is one request for
    ``[offset, offset + n)``, extended to ``offset + hint`` (the bytes the walk expects to
    read next from here) when what lies between is smaller than ``MERGE_GAP``.
    ``fetched`` and ``requests`` count the bytes received and the requests sent."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.path, self.fetched, self.requests = path, 0, 0
        self._buf_at, self._buf = 0, b""
        self.remote = is_url(path)
        if self.remote:
            self._fs = filesystem(path, **(storage_options or {}))[0]
            self.size = int(self._fs.size(path))
            self.head, self.mm = HEAD, None
        else:
            self._fs, self.head = None, BLOCK
            with open(path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
            if self.size and hasattr(self.mm, "madvise"):
                self.mm.madvise(mmap.MADV_RANDOM)  # touch header pages only

    def read_at(self, offset: int, n: int, hint: int = 0) -> bytes:
        if self._fs is None:
            return self.mm[offset:offset + n]
        start = offset - self._buf_at
        if 0 <= start and offset + n <= self._buf_at + len(self._buf):
            return self._buf[start:start + n]
        # the data a hint points at starts a block after the header: worth one request if
        # the unneeded bytes between are fewer than a second request would cost
        want = hint if hint > n and BLOCK - n <= MERGE_GAP else n
        end = min(self.size, offset + want)
        buf = self._fs.cat_file(self.path, start=offset, end=end)
        self.fetched += len(buf)
        self.requests += 1
        self._buf_at, self._buf = offset, buf
        return buf[:n]

    def close(self) -> None:
        if self._fs is None and self.size:
            self.mm.close()
