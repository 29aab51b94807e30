"""Index existing WebDataset tar shards in place: a manifest, without copying a byte of them.

``index(shards, out, label="cls")`` walks the tar headers of every shard (ustar, PAX extended
headers, GNU long names; a member's data is skipped, never read, except the small label
member when the label comes from one), groups members into samples by WebDataset's key
rule (the member name up to the first dot of its basename, directories included;
consecutive members with one key form one sample), picks the image member by extension,
reads the label as ``label`` says, records the extra members named by ``fields``
(``txt``, ``json``, ...: their offsets and sizes), and writes ``OUT/manifest.json`` + ``OUT/manifest/``
(docs/formats.md, "Indexed shards") plus DALI index files beside OUT.  The result opens
with ``open_dataset`` and works wherever a converted dataset does.

Label specs: ``cls`` (the default; ``cls2``, ``txt``, ... name other members the same way:
ASCII decimal integers), ``json:PATH`` (a key path in the ``.json`` member, e.g.
``json:label``, ``json:meta.class``), ``key:REGEX`` (the first group of a regular
expression searched in the key, e.g. the class directory; class names sorted).

Shards may be local paths or ``http(s)://`` / fsspec URLs (headers fetched with ranged
reads, one small window per header).  A sample without an image member, a duplicate key,
a truncated or non-tar file, a label that is missing or not an integer: ``strict`` raises
:class:`IndexError_` naming shard and member; otherwise the sample (or shard) is skipped and
reported in the summary.  Indexed datasets have no checksums (the ``crc32`` column is 0 and
``params.checksums`` is false): the loader then skips CRC checks.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .storage import is_url

__all__ = ["IndexError_", "expand_shards", "walk_tar", "check_fields", "index"]

BLOCK = 512
IMAGE_EXTS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "mixed", "bmp": "mixed",
              "ppm": "mixed", "pgm": "mixed", "tif": "mixed", "tiff": "mixed"}
WINDOW = 1536  # bytes fetched per remote header: the header, a small member and the next header


class IndexError_(ValueError):
    """A shard or sample that cannot be indexed (the message names the shard and member)."""


@dataclass(frozen=True)
class Member:
    name: str
    offset: int   # of the member's data
    size: int


@dataclass
class Sample:
    key: str
    members: dict[str, Member] = field(default_factory=dict)   # extension -> member


def expand_shards(spec: str) -> list[str]:
    """A directory (its ``*.tar``), a glob, a brace pattern (``shard-{000..127}.tar``), a
    text file listing one shard per line, or URLs of the same; sorted where listed."""
    if not is_url(spec) and os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    if not is_url(spec) and os.path.isfile(spec) and not spec.endswith(".tar"):
        with open(spec) as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]
    if "{" in spec:
        import braceexpand
        return list(braceexpand.braceexpand(spec))
    if not is_url(spec) and any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]


def _octal(field_: bytes, where: str) -> int:
    if field_[:1] and field_[0] & 0x80:          # GNU base-256 for large sizes
        return int.from_bytes(field_[1:], "big")
    s = field_.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise IndexError_(f"{where}: not a tar header (size field {field_!r})") from None


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        n = int(data[pos:sp])
        key, _, value = data[sp + 1:pos + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += n
    return out


def walk_tar(read_at: Callable[[int, int], bytes], size: int, name: str) -> Iterator[Member]:
    """The regular-file members of a tar of ``size`` bytes, reading only their headers
    (``read_at(offset, n)`` returns up to n bytes)."""
    pos, long_name, pax = 0, None, {}
    while pos + BLOCK <= size:
        hdr = read_at(pos, BLOCK)
        if len(hdr) < BLOCK:
            raise IndexError_(f"{name}: truncated tar header at offset {pos}")
        if hdr == b"\0" * BLOCK:
            return                                   # end-of-archive marker
        # ustar/GNU magic, else (v7 tar, or not a tar at all) the header checksum decides
        if hdr[257:262] != b"ustar" and _octal(hdr[148:156], name) != (
                sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])):
            raise IndexError_(f"{name}: corrupt or non-tar data at offset {pos} (header checksum)")
        typ = hdr[156:157]
        raw = hdr[124:136]
        try:  # the common case: an octal number, NUL/space padded
            msize = int(raw.rstrip(b"\0 ") or b"0", 8)
        except ValueError:
            msize = _octal(raw, name)
        data_at = pos + BLOCK
        nxt = data_at + -(-msize // BLOCK) * BLOCK
        if typ in (b"x", b"L"):                      # PAX extended header / GNU long name
            blob = read_at(data_at, msize)
            if typ == b"L":
                long_name = blob.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                pax = _pax(blob)
        elif typ in (b"0", b"\0", b"7"):
            mname = pax.get("path") or long_name
            if mname is None:
                prefix = hdr[345:500].split(b"\0", 1)[0]
                mname = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
                if prefix and hdr[257:263] == b"ustar\0":  # POSIX ustar (GNU uses it otherwise)
                    mname = prefix.decode("utf-8", "replace") + "/" + mname
            msize = int(pax.get("size", msize))
            nxt = data_at + -(-msize // BLOCK) * BLOCK
            if data_at + msize > size:
                raise IndexError_(f"{name}: member {mname} runs past the end of the file (truncated)")
            yield Member(mname, data_at, msize)
            long_name, pax = None, {}
        else:                                         # directories, links, global headers
            long_name, pax = (long_name, pax) if typ == b"g" else (None, {})
        pos = nxt
    if pos < size:
        raise IndexError_(f"{name}: truncated (ends inside a tar header at offset {pos})")


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = the name up to the first dot of its basename; ext = the rest."""
    cut = name.rfind("/") + 1
    dot = name.find(".", cut)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def group_samples(members: Iterator[Member]) -> Iterator[Sample]:
    """Consecutive members with one key form a sample (WebDataset's grouping)."""
    cur: Sample | None = None
    for m in members:
        key, ext = split_key(m.name)
        if cur is None or key != cur.key:
            if cur is not None:
                yield cur
            cur = Sample(key)
        cur.members[ext] = m
    if cur is not None:
        yield cur


class _ShardReader:
    """``read_at(offset, n)`` on a local shard (mmap, no readahead) or a URL (ranged reads of
    ``WINDOW`` bytes; the last two are kept, so a header, a small member next to it and, once
    the sample is complete, its label member cost one request)."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.path, self.fetched, self._wins = path, 0, [(0, b""), (0, b"")]
        if is_url(path):
            import fsspec
            self._fs = fsspec.core.url_to_fs(path, **(storage_options or {}))[0]
            self.size = int(self._fs.size(path))
            self._mm = None
        else:
            import mmap
            self._fs = None
            with open(path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
            if self.size and hasattr(self._mm, "madvise"):
                self._mm.madvise(mmap.MADV_RANDOM)  # touch header pages only

    def read_at(self, offset: int, n: int) -> bytes:
        if self._fs is None:
            return self._mm[offset:offset + n]
        for start, buf in self._wins:
            if start <= offset and offset + n <= start + len(buf):
                return buf[offset - start:offset - start + n]
        end = min(self.size, offset + max(n, WINDOW))
        buf = self._fs.cat_file(self.path, start=offset, end=end)
        self.fetched += len(buf)
        self._wins = [self._wins[1], (offset, buf)]
        return buf[:n]

    def close(self) -> None:
        if self._fs is None and self.size:
            self._mm.close()


def _json_path(obj, path: str):
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


def _label(sample: Sample, spec: str, read: Callable[[Member], bytes]):
    """The label of ``sample`` (an int, or for ``key:`` a class name); raises ValueError."""
    if spec.startswith("key:"):
        m = re.search(spec[4:], sample.key)
        if m is None or not m.groups():
            raise ValueError(f"key {sample.key!r} does not match {spec[4:]!r} (with a group)")
        return m.group(1)
    ext, _, path = spec.partition(":")
    if ext not in sample.members:
        raise ValueError(f"no .{ext} member")
    raw = read(sample.members[ext])
    value = _json_path(json.loads(raw), path) if path else raw.decode("utf-8").strip()
    if isinstance(value, bool) or not re.fullmatch(r"-?\d+", str(value).strip()):
        raise ValueError(f"label {value!r} in .{ext} is not an integer")
    return int(str(value).strip())


def _idx_text(samples: list[Sample]) -> str:
    """DALI's webdataset index (v1.2) of one shard, as pipeline/formats/wds.py writes it: per
    sample its members (ext, data offset, size, name)."""
    lines = [" ".join(f"{ext} {m.offset} {m.size} {m.name}" for ext, m in s.members.items())
             for s in samples]
    return f"v1.2 {len(samples)}\n" + "".join(line + "\n" for line in lines)


def _index_shard(path: str, label: str, strict: bool, storage_options: dict | None,
                 fields: tuple[str, ...] = ()):
    """(samples with labels, size, bytes fetched, problems) of one shard."""
    problems: list[str] = []
    try:
        r = _ShardReader(path, storage_options)
    except (OSError, FileNotFoundError) as e:
        raise IndexError_(f"{path}: cannot open ({e})") from e
    try:
        got, seen = [], set()
        try:
            for smp in group_samples(walk_tar(r.read_at, r.size, path)):
                # a member asked for as a field is not the image (e.g. a .png mask beside a .jpg)
                image = [e for e in smp.members if e in IMAGE_EXTS and e not in fields]
                absent = [f for f in fields if f not in smp.members]
                why = None
                if smp.key in seen:
                    why = "duplicate key (its members are not consecutive)"
                elif not image:
                    exts = sorted(smp.members)
                    why = (f"no image member (members: {exts[:8]}{' ...' if len(exts) > 8 else ''};"
                           " a dot in a key ends it, as in WebDataset)")
                elif absent:
                    why = f"no .{absent[0]} member (asked for by --fields {','.join(fields)})"
                else:
                    try:
                        lab = _label(smp, label, lambda m: r.read_at(m.offset, m.size))
                    except (ValueError, KeyError, UnicodeDecodeError) as e:
                        why = f"label {label!r}: {e}"
                seen.add(smp.key)
                if why is not None:
                    msg = f"{path}: sample {smp.key!r}: {why}"
                    if strict:
                        raise IndexError_(msg)
                    problems.append(msg)
                    continue
                got.append((smp, image[0], lab))
        except IndexError_ as e:  # a truncated or non-tar shard
            if strict:
                raise
            problems.append(f"{e} (shard skipped)")
            got = []
        return got, r.size, r.fetched, problems
    finally:
        r.close()


def check_fields(fields) -> tuple[str, ...]:
    """``"txt,json"`` or a sequence of member extensions -> a tuple of distinct names."""
    from .header import FIELD_NAME
    names = [f.strip().lower() for f in (fields.split(",") if isinstance(fields, str) else fields)]
    names = [f for f in names if f]
    for f in names:
        if not FIELD_NAME.fullmatch(f):
            raise IndexError_(f"--fields: {f!r} is not a member extension (e.g. txt, json, cls2)")
    if len(set(names)) != len(names):
        raise IndexError_(f"--fields names a member twice: {names}")
    return tuple(names)


def index(shards: str | list[str], out: str, *, label: str = "cls", strict: bool = False,
          workers: int = 1, storage_options: dict | None = None, progress: bool = False,
          fields: str | tuple[str, ...] = ()) -> dict:
    """Index ``shards`` (see :func:`expand_shards`) into the dataset directory ``out``.

    ``fields``: extensions of extra members (``"txt,json"``) whose offset and size are
    recorded per sample (docs/formats.md, "Fields"); a sample without one of them is
    skipped and reported (``strict``: refused).  Returns a summary (samples, shards,
    skipped problems, bytes fetched for remote shards).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from .manifest import field_column, write_manifest

    fields = check_fields(fields)
    paths = expand_shards(shards) if isinstance(shards, str) else list(shards)
    if not paths:
        raise IndexError_(f"no shards match {shards!r}")
    paths = [p if is_url(p) else os.path.abspath(p) for p in paths]
    os.makedirs(out, exist_ok=True)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        one = lambda p: _index_shard(p, label, strict, storage_options, fields)  # noqa: E731
        results = list(tqdm(pool.map(one, paths), total=len(paths), desc="index", unit="shard",
                            disable=not progress))
    rows, entries, idx_entries, problems, fetched, total = [], [], [], [], 0, 0
    idx_dir = os.path.join(out, "index")
    os.makedirs(idx_dir, exist_ok=True)
    for fi, (path, (got, size, nbytes, probs)) in enumerate(zip(paths, results)):
        problems += probs
        fetched += nbytes
        total += size
        entries.append({"path": path, "size": size})
        name = f"{fi:06d}-{os.path.basename(path)[:-4] if path.endswith('.tar') else 'shard'}.idx"
        text = _idx_text([g[0] for g in got]).encode()
        with open(os.path.join(idx_dir, name), "wb") as f:
            f.write(text)
        idx_entries.append({"path": f"index/{name}", "size": len(text),
                            "sha256": hashlib.sha256(text).hexdigest()})
        rows += [(fi, smp.members[ext].offset, smp.members[ext].size, lab, ext,
                  [(smp.members[f].offset, smp.members[f].size) for f in fields])
                 for smp, ext, lab in got]
    if not rows:
        raise IndexError_(f"no sample could be indexed from {len(paths)} shard(s): "
                          + "; ".join(problems[:5]))
    labels = [r[3] for r in rows]
    if isinstance(labels[0], str):
        classes = sorted(set(labels))
        lab = np.searchsorted(np.asarray(classes), np.asarray(labels)).astype(np.int32)
    else:
        lab = np.asarray(labels, dtype=np.int64)
        if lab.min() < 0:
            raise IndexError_(f"negative label {int(lab.min())} in {paths[0]}...")
        classes = [str(c) for c in range(int(lab.max()) + 1)]
    codecs = {IMAGE_EXTS[r[4]] for r in rows}
    n = len(rows)
    header = {"format": "wds", "codec": codecs.pop() if len(codecs) == 1 else "mixed",
              "classes": classes, "sample_shape": None, "channels": 3, "num_samples": n,
              "files": entries, "index_files": idx_entries, "member_name": "source",
              "params": {"indexed": True, "checksums": False, "label": label},
              "created_by": "tools/shard.py index", **({"fields": list(fields)} if fields else {})}
    columns = {"file": np.asarray([r[0] for r in rows]), "offset": np.asarray([r[1] for r in rows]),
               "length": np.asarray([r[2] for r in rows]), "label": lab,
               "key": np.arange(n), "crc32": np.zeros(n)}
    for j, f in enumerate(fields):  # where each sample's field member lies (its image's shard)
        at = np.asarray([r[5][j] for r in rows], dtype=np.int64).reshape(n, 2)
        columns[field_column(f, "offset")], columns[field_column(f, "length")] = at[:, 0], at[:, 1]
    write_manifest(out, header, columns)
    return {"out": out, "num_samples": n, "num_shards": len(paths), "skipped": problems,
            "bytes_fetched": fetched, "shard_bytes": total}
