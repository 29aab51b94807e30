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
a truncated or non-tar file, a label that is missing or not an integer class index
(0..``MAX_LABEL``): ``strict`` raises
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
import shutil
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .storage import filesystem, is_url
from .tarscan import ShardReader, TarError, scan_shard, split_key

__all__ = ["IndexError_", "expand_shards", "split_key", "check_fields", "index"]

# integer labels are class indices: classes "0".."max" are written, so a stray large value
# (an id stored as the label) would make millions of classes; 1,000,000 is far above any
# classification label set in use (ImageNet-21k: 21,841)
MAX_LABEL = 999_999
IMAGE_EXTS = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "mixed", "bmp": "mixed",
              "ppm": "mixed", "pgm": "mixed", "tif": "mixed", "tiff": "mixed"}


class IndexError_(ValueError):
    """A shard or sample that cannot be indexed (the message names the shard and member)."""


def expand_shards(spec: str, storage_options: dict | None = None) -> list[str]:
    """A directory (its ``*.tar``), a glob, a brace pattern (``shard-{000..127}.tar``), a
    text file listing one shard per line, or URLs of the same (a URL "directory": a prefix
    of an object store, or any URL ending in "/"); sorted where listed."""
    if is_url(spec) and "{" not in spec:
        http = spec.startswith(("http://", "https://"))
        # over HTTP "?" starts a query (a presigned URL) and "[" an IPv6 host: only "*" globs
        wild = "*" in spec.split("?", 1)[0] if http else any(c in spec for c in "*?[")
        pattern = spec if wild else None
        if pattern is None and spec.endswith("/"):
            pattern = spec + "*.tar"
        elif pattern is None and not spec.endswith(".tar") and not http:
            # an object store answers "is this a prefix" with a listing; over HTTP that
            # question would GET the URL (a whole shard), so only a final "/" says it there
            fs, path = filesystem(spec, **(storage_options or {}))
            if fs.isdir(path):
                pattern = spec + "/*.tar"
        if pattern is not None:
            fs, path = filesystem(pattern, **(storage_options or {}))
            found = sorted(fs.unstrip_protocol(p) if "://" not in p else p for p in fs.glob(path))
            if not found:
                raise IndexError_(f"no shards match {pattern!r}")
            return found
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


def _json_path(obj, path: str):
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


def _label_reader(spec: str) -> Callable[[str, dict], int | str]:
    """``spec`` -> ``label(key, members)``: an int, or for ``key:`` a class name; raises
    ValueError.  ``members[ext]`` is ``(offset, size, name, data)`` for the label member."""
    if spec.startswith("key:"):
        rx = re.compile(spec[4:])

        def from_key(key: str, members: dict) -> str:
            m = rx.search(key)
            if m is None or not m.groups():
                raise ValueError(f"key {key!r} does not match {spec[4:]!r} (with a group)")
            return m.group(1)
        return from_key
    ext, _, path = spec.partition(":")

    def from_member(key: str, members: dict) -> int:
        m = members.get(ext)
        if m is None:
            raise ValueError(f"no .{ext} member")
        raw = m[3]
        if not path:
            text = raw.strip()
            if text.isdigit() and len(text) <= 6:  # the common case: a few ASCII digits
                return int(text)
            value = raw.decode("utf-8").strip()
        else:
            value = _json_path(json.loads(raw), path)
        if isinstance(value, bool) or not re.fullmatch(r"-?\d+", str(value).strip()):
            raise ValueError(f"label {value!r} in .{ext} is not an integer")
        v = int(str(value).strip())
        if not 0 <= v <= MAX_LABEL:
            raise ValueError(f"label {v} in .{ext} is not a class index (0..{MAX_LABEL})")
        return v
    return from_member


def _label_exts(label: str) -> frozenset:
    return frozenset() if label.startswith("key:") else frozenset([label.partition(":")[0]])


@dataclass
class ShardIndex:
    """What one shard contributes: per kept sample its image member and label (and field
    members), DALI's index text, and what reading it cost."""

    offset: list[int] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    label: list = field(default_factory=list)
    codecs: set = field(default_factory=set)
    fields: list[tuple] = field(default_factory=list)    # per sample ((offset, size), ...)
    idx_lines: list[str] = field(default_factory=list)   # DALI index v1.2, one line a sample
    size: int = 0
    fetched: int = 0
    problems: list[str] = field(default_factory=list)

    def idx_text(self) -> str:
        """DALI's webdataset index (v1.2) of the shard, as pipeline/formats/wds.py writes it:
        per sample its members (ext, data offset, size, name)."""
        return f"v1.2 {len(self.offset)}\n" + "".join(self.idx_lines)

    def save(self, path: str) -> None:
        """Write to ``path`` (.npz of plain arrays, no pickle): how a worker process hands its
        shard back."""
        n = len(self.offset)
        meta = {"size": self.size, "fetched": self.fetched, "problems": self.problems,
                "codecs": sorted(self.codecs)}
        np.savez(path, offset=np.asarray(self.offset, np.int64), length=np.asarray(self.length, np.int64),
                 label=np.asarray(self.label) if n else np.zeros(0, np.int64),
                 fields=np.asarray(self.fields, np.int64).reshape(n, -1) if self.fields else np.zeros((n, 0), np.int64),
                 idx=np.frombuffer("".join(self.idx_lines).encode(), np.uint8),
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))

    @classmethod
    def load(cls, path: str) -> "ShardIndex":
        """Read what :meth:`save` wrote."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            label = z["label"]
            return cls(offset=z["offset"], length=z["length"],
                       label=label.tolist() if label.dtype.kind == "U" else label,
                       codecs=set(meta["codecs"]), fields=[tuple(map(tuple, r.reshape(-1, 2))) for r in z["fields"]]
                       if z["fields"].shape[1] else [], idx_lines=[z["idx"].tobytes().decode()],
                       size=meta["size"], fetched=meta["fetched"], problems=meta["problems"])


def _why_skipped(key: str, members: dict, seen: set, fields: tuple[str, ...], label,
                 label_spec: str) -> tuple[str | None, str | None, object]:
    """(reason to skip or None, image extension, label) of one sample."""
    image = None
    for e in members:
        # a member asked for as a field is not the image (e.g. a .png mask beside a .jpg)
        if e.lower() in IMAGE_EXTS and e not in fields:
            image = e
            break
    if key in seen:
        return "duplicate key (its members are not consecutive)", image, None
    if image is None:
        exts = sorted(members)
        return (f"no image member (members: {exts[:8]}{' ...' if len(exts) > 8 else ''};"
                " a dot in a key ends it, as in WebDataset)"), None, None
    absent = [f for f in fields if f not in members]
    if absent:
        return f"no .{absent[0]} member (asked for by --fields {','.join(fields)})", image, None
    try:
        return None, image, label(key, members)
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        return f"label {label_spec!r}: {e}", image, None


def _index_shard(path: str, label: str, strict: bool, storage_options: dict | None,
                 fields: tuple[str, ...] = ()) -> ShardIndex:
    """The samples of one shard that can be indexed, and the problems of the others."""
    out = ShardIndex()
    try:
        r = ShardReader(path, storage_options)
    except (OSError, FileNotFoundError) as e:
        raise IndexError_(f"{path}: cannot open ({e})") from e
    try:
        out.size = r.size
        try:
            samples = scan_shard(r, path, _label_exts(label))
        except TarError as e:  # a truncated or non-tar shard
            if strict:
                raise IndexError_(str(e)) from None
            out.problems.append(f"{e} (shard skipped)")
            samples = []
        read_label, seen = _label_reader(label), set()
        for key, members in samples:
            image, lab = None, None
            for e in members:   # the common case inline: first image member, label readable
                if e.lower() in IMAGE_EXTS and e not in fields:  # ImageNet's .JPEG too
                    image = e
                    break
            try:
                ok = (image is not None and key not in seen
                      and (not fields or all(f in members for f in fields)))
                if ok:
                    lab = read_label(key, members)
            except (ValueError, KeyError, UnicodeDecodeError):
                ok = False
            if not ok:
                why, _, _ = _why_skipped(key, members, seen, fields, read_label, label)
                seen.add(key)
                msg = f"{path}: sample {key!r}: {why}"
                if strict:
                    raise IndexError_(msg)
                out.problems.append(msg)
                continue
            seen.add(key)
            m = members[image]
            out.offset.append(m[0])
            out.length.append(m[1])
            out.label.append(lab)
            out.codecs.add(image)
            if fields:
                out.fields.append(tuple(members[f][:2] for f in fields))
            out.idx_lines.append(" ".join([f"{ext} {v[0]} {v[1]} {v[2]}"
                                           for ext, v in members.items()]) + "\n")
        out.fetched = r.fetched
        return out
    finally:
        r.close()


def _index_to_file(path: str, npz: str, label: str, strict: bool, fields: tuple[str, ...]) -> None:
    """A worker process's job: index one local shard and save it to ``npz``."""
    _index_shard(path, label, strict, None, fields).save(npz)


def _index_all(paths: list[str], out: str, label: str, strict: bool, storage_options: dict | None,
               fields: tuple[str, ...], workers: int, progress: bool) -> list[ShardIndex]:
    """Every shard's :class:`ShardIndex`, ``workers`` shards at once: threads for URLs (they
    wait on the network), processes for local files (the walk is CPU-bound Python, which
    threads would run on one core).  A worker hands its shard back as an .npz file under
    ``out`` (plain arrays, no pickle), removed at the end."""
    import multiprocessing as mp
    import shutil
    import tempfile
    import threading
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
    from itertools import repeat

    from tqdm import tqdm

    workers = max(1, min(int(workers), len(paths)))
    def bar(it):
        return tqdm(it, total=len(paths), desc="index", unit="shard") if progress else it
    if workers == 1 or any(is_url(p) for p in paths):
        with ThreadPoolExecutor(workers) as pool:
            one = lambda p: _index_shard(p, label, strict, storage_options, fields)  # noqa: E731
            return list(bar(pool.map(one, paths)))
    # fork starts a worker in milliseconds (spawn re-imports numpy: ~0.3 s each), and is safe
    # while this process runs no other thread (tqdm's monitor only sleeps and reads its own
    # bars); otherwise spawn
    others = [t for t in threading.enumerate() if t is not threading.current_thread()
              and type(t).__name__ != "TMonitor"]
    single = not others and "fork" in mp.get_all_start_methods()
    tmp = tempfile.mkdtemp(prefix=".index-", dir=out)
    try:
        files = [os.path.join(tmp, f"{i:06d}.npz") for i in range(len(paths))]
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork" if single else "spawn")) as pool:
            list(bar(pool.map(_index_to_file, paths, files, repeat(label), repeat(strict), repeat(fields))))
        return [ShardIndex.load(f) for f in files]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    from .manifest import field_column, write_manifest

    fields = check_fields(fields)
    paths = expand_shards(shards, storage_options) if isinstance(shards, str) else list(shards)
    if not paths:
        raise IndexError_(f"no shards match {shards!r}")
    paths = [p if is_url(p) else os.path.abspath(p) for p in paths]
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    try:
        results = _index_all(paths, out, label, strict, storage_options, fields, workers, progress)
    except BaseException:
        if created:  # nothing of ours is worth keeping; a folder the user had stays
            shutil.rmtree(out, ignore_errors=True)
        raise
    if not sum(len(g.offset) for g in results):
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise IndexError_(f"no sample could be indexed from {len(paths)} shard(s): "
                          + "; ".join([pr for g in results for pr in g.problems][:5]))
    entries, idx_entries, problems, fetched, total = [], [], [], 0, 0
    idx_dir = os.path.join(out, "index")
    os.makedirs(idx_dir, exist_ok=True)
    for fi, (path, got) in enumerate(zip(paths, results)):
        problems += got.problems
        fetched += got.fetched
        total += got.size
        entries.append({"path": path, "size": got.size})
        name = f"{fi:06d}-{os.path.basename(path)[:-4] if path.endswith('.tar') else 'shard'}.idx"
        text = got.idx_text().encode()
        with open(os.path.join(idx_dir, name), "wb") as f:
            f.write(text)
        idx_entries.append({"path": f"index/{name}", "size": len(text),
                            "sha256": hashlib.sha256(text).hexdigest()})
    n = sum(len(g.offset) for g in results)
    labels = [g.label for g in results if len(g.label)]
    if isinstance(labels[0][0], str):
        flat = [v for part in labels for v in part]
        classes = sorted(set(flat))
        lab = np.searchsorted(np.asarray(classes), np.asarray(flat)).astype(np.int32)
    else:
        lab = np.concatenate([np.asarray(part, np.int64) for part in labels])
        classes = [str(c) for c in range(int(lab.max()) + 1)]
    codecs = {IMAGE_EXTS[e.lower()] for g in results for e in g.codecs}
    header = {"format": "wds", "codec": codecs.pop() if len(codecs) == 1 else "mixed",
              "classes": classes, "sample_shape": None, "channels": 3, "num_samples": n,
              "files": entries, "index_files": idx_entries, "member_name": "source",
              "params": {"indexed": True, "checksums": False, "label": label},
              "created_by": "tools/shard.py index", **({"fields": list(fields)} if fields else {})}
    columns = {"file": np.concatenate([np.full(len(g.offset), fi) for fi, g in enumerate(results)]),
               "offset": np.concatenate([np.asarray(g.offset, np.int64) for g in results]),
               "length": np.concatenate([np.asarray(g.length, np.int64) for g in results]),
               "label": lab, "key": np.arange(n), "crc32": np.zeros(n)}
    for j, f in enumerate(fields):  # where each sample's field member lies (its image's shard)
        at = np.asarray([v[j] for g in results for v in g.fields], dtype=np.int64).reshape(n, 2)
        columns[field_column(f, "offset")], columns[field_column(f, "length")] = at[:, 0], at[:, 1]
    write_manifest(out, header, columns)
    return {"out": out, "num_samples": n, "num_shards": len(paths), "skipped": problems,
            "bytes_fetched": fetched, "shard_bytes": total}
