"""Convert into an object store (``s3://bucket/prefix``): stage locally, upload, verify.

``convert(src, "s3://bucket/prefix", ...)`` converts into a local *stage* directory first
(the ordinary converter: each shard written atomically and journaled, so an interrupted
conversion resumes), then uploads the stage's files one object each and checks every
upload: a ``HeadObject`` afterwards must report the local size, the MD5 of the bytes as
ETag (the server also checks the ``Content-MD5`` sent with the body) and the sha256 this
upload stores in the object's metadata.  ``manifest.json`` goes up last, after every
other object is verified, so a half-uploaded dataset has no manifest and
``open_dataset`` refuses it as incomplete.  A re-run resumes: the stage is already
complete, objects whose size and sha256 match are not sent again.

The stage directory is ``stage`` if given, else ``$XDG_CACHE_HOME/swdpp/stage/<hash of
the URL>`` (so that a re-run finds it); it holds a full local copy and may be deleted
once the upload is complete.  Objects are sent with a single ``PutObject`` (up to 5 GiB
each, S3's limit; the default shard size is 64 MiB).
"""
from __future__ import annotations

import base64
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import ConvertError
from .header import HEADER_NAME
from .manifest import COLUMN_DIR
from .outdir import LOCK_NAME, STATE_DIR, OutLock, pause_point
from .storage import access_denied, filesystem, fs_options, is_s3, read_url

__all__ = ["convert_to_url", "upload_dataset", "stage_dir"]

MAX_OBJECT = 5 << 30      # bytes in one PutObject (S3's limit)
SHA_KEY = "sha256"        # object metadata key (x-amz-meta-sha256) set by this upload


def stage_dir(url: str) -> Path:
    """The default local stage of a conversion into ``url`` (stable across re-runs)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "swdpp" / "stage" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def convert_to_url(src, url: str, *, stage: str | os.PathLike | None = None,
                   storage_options: dict | None = None, workers: int = 1,
                   overwrite: bool = False, progress: bool = False, **options) -> dict:
    """Convert ``src`` into the stage, then :func:`upload_dataset` it to ``url``; the
    summary of ``convert`` with ``out`` = the URL, ``stage``, ``uploaded``, ``upload_skipped``."""
    from .convert import convert
    if not is_s3(url):
        raise ConvertError(f"cannot write a dataset to {url}: only s3:// URLs (or local "
                           "directories) are writable")
    stage = Path(stage) if stage is not None else stage_dir(url)
    summary = convert(src, stage, workers=workers, overwrite=overwrite, progress=progress,
                      **options)
    up = upload_dataset(stage, url, storage_options, overwrite=overwrite,
                        workers=max(4, workers))
    status = summary["status"]
    if status == "already complete" and up["uploaded"]:
        status = "uploaded"
    elif status == "converted" and up["skipped"]:
        status = "resumed"
    return {**summary, "status": status, "out": url.rstrip("/"), "stage": str(stage),
            "uploaded": up["uploaded"], "upload_skipped": up["skipped"],
            "bytes_uploaded": up["bytes"]}


class _Bucket:
    """put / head of objects under one ``s3://bucket/prefix`` (s3fs's client, synchronous)."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url = url.rstrip("/")
        self.fs = filesystem(self.url, **fs_options(self.url, storage_options=storage_options))[0]
        self.bucket, _, self.prefix = self.url[len("s3://"):].partition("/")

    def _call(self, method: str, rel: str, **kw):
        from fsspec.asyn import sync
        key = f"{self.prefix}/{rel}" if self.prefix else rel
        where = f"{self.url}/{rel}"
        try:
            return sync(self.fs.loop, self.fs._call_s3, method, Bucket=self.bucket, Key=key, **kw)
        except PermissionError as e:
            raise ConvertError(access_denied(where, e)) from e
        except FileNotFoundError:
            raise
        except OSError as e:
            raise ConvertError(f"{method} {where} failed: {e}") from e

    def head(self, rel: str) -> dict | None:
        """The object's HeadObject answer, None if it does not exist."""
        try:
            return self._call("head_object", rel)
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        self._call("delete_object", rel)

    def put_verified(self, local: Path, rel: str) -> tuple[bool, int]:
        """Upload ``local`` as ``rel`` unless an object with its size and sha256 is there;
        check the upload; return (uploaded?, bytes sent)."""
        size = local.stat().st_size
        if size > MAX_OBJECT:
            raise ConvertError(f"{local} has {size} bytes, more than one PutObject takes "
                               f"({MAX_OBJECT}): convert with a smaller --shard-bytes")
        data = local.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if _matches(self.head(rel), size, sha, None):
            return False, 0
        md5 = hashlib.md5(data)
        try:
            self._call("put_object", rel, Body=data, Metadata={SHA_KEY: sha},
                       ContentMD5=base64.b64encode(md5.digest()).decode())
        except FileNotFoundError as e:
            raise ConvertError(f"cannot upload to {self.url}/{rel}: the bucket "
                               f"{self.bucket!r} does not exist ({e})") from e
        head = self.head(rel)
        if not _matches(head, size, sha, md5.hexdigest()):
            raise ConvertError(f"upload of {local} to {self.url}/{rel} did not verify: the server "
                               f"reports {_describe(head)}, sent {size} bytes, md5 "
                               f"{md5.hexdigest()}, sha256 {sha[:16]}...")
        return True, size


def _matches(head: dict | None, size: int, sha: str, md5: str | None) -> bool:
    """Whether a HeadObject answer is the object with ``size`` bytes and ``sha`` (and, just
    after our own single-part upload, ETag ``md5``)."""
    if head is None or int(head.get("ContentLength", -1)) != size:
        return False
    if (head.get("Metadata") or {}).get(SHA_KEY) != sha:
        return False
    return md5 is None or str(head.get("ETag", "")).strip('"') == md5


def _describe(head: dict | None) -> str:
    if head is None:
        return "no such object"
    return (f"{head.get('ContentLength')} bytes, ETag {head.get('ETag')}, sha256 "
            f"{(head.get('Metadata') or {}).get(SHA_KEY)}")


def _stage_files(stage: Path) -> list[str]:
    """The stage's dataset files, relative: data and index files, then the manifest's
    columns; manifest.json excluded (it goes last)."""
    skip = {HEADER_NAME, LOCK_NAME}
    out = []
    for path in sorted(stage.rglob("*")):
        rel = path.relative_to(stage).as_posix()
        if not path.is_file() or rel in skip or rel.split("/")[0] == STATE_DIR:
            continue
        if path.name.startswith("."):   # a writer's temporary file
            continue
        out.append(rel)
    return sorted(out, key=lambda rel: (rel.startswith(COLUMN_DIR + "/"), rel))  # data first


def upload_dataset(stage: str | os.PathLike, url: str, storage_options: dict | None = None, *,
                   overwrite: bool = False, workers: int = 4) -> dict:
    """Upload the complete converted dataset in ``stage`` to ``url`` (see the module
    docstring); return ``{"uploaded", "skipped", "bytes"}``.  A different dataset (another
    fingerprint) already complete at ``url`` is refused unless ``overwrite``."""
    import json
    stage = Path(stage)
    header = json.loads((stage / HEADER_NAME).read_text())
    dest = _Bucket(url, storage_options)
    with OutLock(stage):   # one upload of a stage at a time (and no conversion into it)
        old = dest.head(HEADER_NAME)
        if old is not None:
            try:
                there = json.loads(read_url(f"{dest.url}/{HEADER_NAME}", storage_options))
            except (OSError, ValueError):
                there = {}
            if there.get("fingerprint") != header.get("fingerprint"):
                if not overwrite:
                    raise ConvertError(f"{dest.url} holds a different dataset (fingerprint "
                                       f"{str(there.get('fingerprint'))[:12]}...): use --overwrite")
                # from here until the new manifest is up, the dataset is incomplete
                dest.delete(HEADER_NAME)
        files = _stage_files(stage)
        uploaded = skipped = sent = 0

        def one(rel: str) -> tuple[bool, int]:
            return dest.put_verified(stage / rel, rel)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            for k, (did, n) in enumerate(pool.map(one, files)):
                uploaded, skipped, sent = uploaded + did, skipped + (not did), sent + n
                if k == 0:
                    pause_point("upload")
        did, n = dest.put_verified(stage / HEADER_NAME, HEADER_NAME)   # last: now complete
        if uploaded or did:
            print(f"uploaded {uploaded + did} object(s) to {dest.url} ({sent + n} bytes), "
                  f"{skipped} already there", file=sys.stderr)
        return {"uploaded": uploaded + did, "skipped": skipped + (not did), "bytes": sent + n}
