"""convert(): source dataset -> WebDataset tar shards or a Zarr v3 store, plus the manifest.

Steps: open the source; seeded shuffle; (image folders) decode every candidate image once to
find corrupt files, sizes and formats; split the kept ids into shards; write shards in
parallel (each atomically, each followed by a small journal entry in ``OUT/.convert/`` so an
interrupted run resumes where it stopped); write the manifest last. See docs/formats.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ConvertError
from .header import MANIFEST_VERSION, ManifestError
from .manifest import open_dataset, write_manifest
from .outdir import (STATE_DIR, OutLock, check_not_inside, pause_point, prepare_out,
                     start_state)
from .registry import FORMATS, Format, SamplePlan, ShardTask, get_format, remember_source
from .images import probe_image, unreadable_reason
from .sources import Source, SourceError, detect_source_type, open_source
from .storage import is_url
from .walk import display

__all__ = ["convert", "parse_resize", "ConvertError", "SourceError"]

DEFAULT_SHARD_BYTES = 64 << 20
PROBE_CHUNK = 256


class _Interrupted(RuntimeError):
    """Raised by the test hook ``_stop_after`` to simulate a crash between shards."""


# ----------------------------------------------------------------------------- helpers

def parse_resize(resize) -> tuple[int, int] | None:
    """``"HxW"`` / (H, W) / None -> (H, W) or None; ValueError unless both are >= 1 (checked
    before OUT is touched: a 0x0 plan would fail only after it was recorded)."""
    if resize is None:
        return None
    if isinstance(resize, (tuple, list)):
        if len(resize) != 2 or not all(isinstance(v, (int, np.integer)) for v in resize):
            raise ValueError(f"resize must be (H, W) integers, got {resize!r}")
        h, w = (int(v) for v in resize)
    else:
        m = re.fullmatch(r"\s*(\d+)[xX](\d+)\s*", str(resize))
        if not m:
            raise ValueError(f"resize must look like HxW (e.g. 32x32), got {resize!r}")
        h, w = int(m.group(1)), int(m.group(2))
    if h < 1 or w < 1:
        raise ValueError(f"resize must be at least 1x1, got {h}x{w}")
    return h, w


def _probe_chunk(paths: list[str]) -> list[tuple]:
    out = []
    for p in paths:
        try:
            out.append((True, *probe_image(p), ""))
        except Exception as e:  # noqa: BLE001 - any decoder failure means "bad image"
            out.append((False, "", 0, 0, 0, unreadable_reason(e)))
    return out


def _ignore_sigint() -> None:
    # pool workers leave Ctrl-C to the parent, which stops them: one message, no
    # traceback per worker
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pool_map(fn, tasks, workers: int, ordered: bool = True):
    """Yield fn(task) for each task, in a spawn pool when workers > 1 (zarr's I/O thread
    makes fork unsafe)."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield fn(t)
        return
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(min(workers, len(tasks)), _ignore_sigint) as pool:
        it = pool.imap(fn, tasks) if ordered else pool.imap_unordered(fn, tasks)
        yield from it


# ----------------------------------------------------------------------------- shards

def _write_shard(task: ShardTask) -> dict:
    """Write one shard (runs in a worker), journal it, return its rows."""
    res = FORMATS[task.format].write_shard(task)
    rows = np.stack([np.asarray(res.offsets, np.int64), np.asarray(res.lengths, np.int64),
                     np.asarray(res.crcs, np.int64), res.shapes[:, 0], res.shapes[:, 1],
                     res.shapes[:, 2]], axis=1)
    _journal(task.out, task.k, rows, res.entry)
    return {"k": task.k, "rows": rows, "entry": res.entry, "written": True}


def _journal(out: str, k: int, rows: np.ndarray, entry: dict) -> None:
    state = os.path.join(out, STATE_DIR)
    tmp = os.path.join(state, f".shard-{k:06d}.npy.tmp")
    with open(tmp, "wb") as f:
        np.save(f, rows, allow_pickle=False)
    os.replace(tmp, os.path.join(state, f"shard-{k:06d}.npy"))
    tmp = os.path.join(state, f".shard-{k:06d}.json.tmp")
    Path(tmp).write_text(json.dumps(entry))
    os.replace(tmp, os.path.join(state, f"shard-{k:06d}.json"))   # the "done" marker


def _journaled(out: str, k: int, n_rows: int) -> dict | None:
    """The journal of shard k if it is complete and its data file still matches."""
    state = os.path.join(out, STATE_DIR)
    jpath = os.path.join(state, f"shard-{k:06d}.json")
    if not os.path.exists(jpath):
        return None
    entry = json.loads(Path(jpath).read_text())
    rows = np.load(os.path.join(state, f"shard-{k:06d}.npy"), allow_pickle=False)
    files = [entry] + ([entry["index"]] if "index" in entry else [])
    for e in files:
        p = os.path.join(out, e["path"])
        if not os.path.exists(p) or os.path.getsize(p) != e["size"] or len(rows) != n_rows:
            return None
    return {"k": k, "rows": rows, "entry": entry, "written": False}


# ----------------------------------------------------------------------------- plan

def _readable(source: Source, order: np.ndarray, want: int, probes: dict[int, tuple],
              skipped: list[dict], workers: int, strict: bool, progress: bool) -> np.ndarray:
    """The first ``want`` keys of ``order`` whose image decodes (one full decode each);
    fills ``probes`` (key -> PIL format, H, W, C) and ``skipped`` ({path, error})."""
    from tqdm import tqdm
    n_src = len(order)
    bar = tqdm(total=want, desc="check images", unit="img", disable=not progress)
    pos, kept = 0, []
    while len(kept) < want and pos < n_src:
        batch = order[pos: pos + max(want - len(kept), 1)]
        pos += len(batch)
        chunks = [[source.paths[i] for i in batch[j:j + PROBE_CHUNK]]
                  for j in range(0, len(batch), PROBE_CHUNK)]
        results = [r for chunk in _pool_map(_probe_chunk, chunks, workers) for r in chunk]
        for key, r in zip(batch, results):
            if r[0]:
                probes[int(key)] = r[1:5]
                kept.append(int(key))
                bar.update(1)
            else:
                if strict:
                    raise ConvertError(f"corrupt or unreadable image {display(source.paths[key])}: {r[5]}")
                skipped.append({"path": display(source.paths[key]), "error": r[5]})
    bar.close()
    for s in skipped:
        print(f"warning: skipped unreadable image {s['path']}: {s['error']}", file=sys.stderr)
    return np.asarray(kept[:want], np.int64)


def _plan_samples(fmt: Format, source: Source, keys: np.ndarray, probes: dict[int, tuple],
                  encode: str | None, resize: tuple[int, int] | None) -> tuple[SamplePlan, int]:
    """What each kept sample becomes in ``fmt``, and the channels a decoder yields.

    The decoders deliver GRAY or RGB (alpha dropped): the dataset is 1 channel when every
    image is grayscale, else 3, and every re-encoded payload is made to hold that."""
    if source.is_encoded:
        probe_shapes = np.asarray([probes[int(k)][1:4] for k in keys], np.int64)
        channels = 1 if np.all(probe_shapes[:, 2] == 1) else 3
        plan = fmt.plan_images([probes[int(k)][0] for k in keys], probe_shapes, channels,
                               encode, resize, source.root)
    else:
        h, w, channels = source.images().shape[1:]     # C is 1 or 3 (sources.py)
        if resize:
            h, w = resize
        plan = fmt.plan_arrays((int(h), int(w), int(channels)), encode)
    return plan, int(channels)


def _task(fmt: Format, out: str, k: int, sl: slice, name: str, source: Source,
          keys: np.ndarray, labels: np.ndarray, plan: SamplePlan, channels: int, resize,
          quality: int, encode: str | None, samples_per_shard: int) -> ShardTask:
    """Shard ``k``: the samples ``sl`` of the kept order."""
    return ShardTask(
        out=out, k=k, format=fmt.name, name=name, ids=np.arange(sl.start, sl.stop, dtype=np.int64),
        keys=keys[sl], labels=labels[sl], resize=resize, quality=quality,
        encode=encode or "png", samples_per_shard=samples_per_shard,
        sample_shape=plan.sample_shape, channels=channels,
        source=None if source.is_encoded else source,
        paths=[source.paths[i] for i in keys[sl]] if source.is_encoded else None,
        exts=plan.exts[sl] if plan.exts else None,
        targets=plan.targets[sl] if plan.exts else None,
        probe_shapes=plan.probe_shapes[sl] if plan.probe_shapes is not None else None)


# ----------------------------------------------------------------------------- convert

def convert(src, out, **options) -> dict:
    """Convert ``src`` into ``out`` (format "wds" or "zarr"); return a summary dict.

    Options: see ``_convert``. ``limit`` keeps the first N samples after the seeded shuffle.
    Re-running the same call resumes (finished shards are skipped), also after a kill at
    any point; a different dataset in ``out`` is refused unless ``overwrite``; a second
    conversion into the same ``out`` at the same time is refused (``outdir.OutLock``).
    Corrupt images are skipped and reported (``strict`` makes them fatal).
    An ``s3://bucket/prefix`` ``out`` is converted into a local stage and uploaded
    (formats/upload.py; options ``stage``, ``storage_options``).
    """
    if is_url(str(out)):
        from .upload import convert_to_url
        return convert_to_url(src, str(out), **options)
    out = Path(out).absolute()
    kind = check_not_inside(Path(src), out, lambda name: options.get("source_type") or
                            detect_source_type(Path(src), options.get("split"), ignore=name))
    options["source_type"] = kind or options.get("source_type")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with OutLock(out) as lock:
            if lock.took_over:
                print(f"note: {out}: took over the lock of a conversion that is no longer running "
                      f"(pid {lock.took_over.get('pid')})", file=sys.stderr)
            pause_point("locked")
            return _convert(src, out, **options)
    except BaseException:
        try:                      # do not leave an empty OUT behind a refused conversion
            if created and not any(out.iterdir()):
                out.rmdir()
        except OSError:
            pass
        raise


def _convert(src, out: Path, *, format: str = "wds", source_type: str | None = None,
             split: str | None = None, samples_per_shard: int | None = None,
             shard_bytes: int | None = None, workers: int = 1, seed: int = 0,
             shuffle: bool = True, encode: str | None = None, quality: int = 95,
             resize=None, overwrite: bool = False, strict: bool = False,
             limit: int | None = None, name: str | None = None, progress: bool = True,
             _stop_after: int | None = None) -> dict:
    """``convert`` with ``out`` locked."""
    from tqdm import tqdm
    t0 = time.perf_counter()
    fmt = get_format(format)
    if encode not in (None, "png", "jpeg", "npy"):
        raise ValueError(f"encode must be png, jpeg or npy, got {encode!r}")
    fmt.check_options(encode)
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1..100 (JPEG quality), got {quality}")
    resize = parse_resize(resize)
    name = name or "shard"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name must be letters, digits, '_', '-', '.', got {name!r}")

    source = open_source(src, source_type=source_type, split=split)
    for s in source.description.get("skipped_paths", ()):
        print(f"warning: skipped {s['path']}: {s['reason']}", file=sys.stderr)
    params = {"format": format, "seed": seed, "shuffle": shuffle, "limit": limit,
              "encode": encode, "quality": quality if encode == "jpeg" or resize else None,
              "resize": list(resize) if resize else None, "samples_per_shard": samples_per_shard,
              "shard_bytes": shard_bytes, "name": name, "strict": strict}
    fingerprint = hashlib.sha256(json.dumps(
        {"version": MANIFEST_VERSION, "source": source.fingerprint, "params": params},
        sort_keys=True).encode()).hexdigest()
    status = prepare_out(out, fingerprint, overwrite)
    if status == "done":
        try:
            ds = open_dataset(out)
            ds.check_files()     # sizes only: cheap; --verify does checksums
        except ManifestError as e:
            raise ConvertError(f"{out} holds this dataset, complete, but damaged ({e}): "
                               "re-run with --overwrite to convert again") from e
        # a run killed between writing manifest.json and removing its journal
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        return {"out": str(out), "status": "already complete", "format": format,
                "num_samples": len(ds), "num_shards": len(ds.files),
                "shards_written": 0, "shards_skipped": len(ds.files),
                "skipped_samples": len((ds.manifest.source or {}).get("skipped", [])),
                "seconds": time.perf_counter() - t0, "fingerprint": fingerprint}
    start_state(out, fingerprint)   # from here on a killed run resumes (docs/reliability.md)
    removed = fmt.remove_partial(str(out))
    if removed:
        print(f"note: removed {len(removed)} half-written file(s) of an interrupted run "
              f"({removed[0]}{', ...' if len(removed) > 1 else ''})", file=sys.stderr)

    # a refusal before the plan is recorded (sizes Zarr cannot store, --strict and a bad
    # image, nothing readable) leaves nothing behind: the retry its message asks for, with
    # other options, must not find "a different conversion" here
    try:
        # ---- order: seeded shuffle, then (image folders) drop unreadable images
        n_src = len(source)
        order = np.random.default_rng(seed).permutation(n_src) if shuffle else np.arange(n_src)
        want = n_src if limit is None else min(limit, n_src)
        skipped: list[dict] = []
        probes: dict[int, tuple] = {}
        if source.is_encoded:
            pause_point("check")
            keys = _readable(source, order, want, probes, skipped, workers, strict, progress)
        else:
            keys = order[:want].astype(np.int64)
        n = len(keys)
        if n == 0:
            raise ConvertError(f"empty source: no readable samples in {source.root}")
        labels = source.labels[keys]
        plan, channels = _plan_samples(fmt, source, keys, probes, encode, resize)
    except ConvertError:
        if not (out / STATE_DIR / "state.json").exists():   # no shard written yet
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        raise

    # ---- shard plan
    if samples_per_shard is None:
        per = fmt.bytes_per_sample(source, keys, plan, encode, quality)
        samples_per_shard = max(1, int((shard_bytes or DEFAULT_SHARD_BYTES) // max(per, 1)))
    samples_per_shard = min(samples_per_shard, n)
    num_shards = -(-n // samples_per_shard)

    state = {"fingerprint": fingerprint, "num_samples": n, "samples_per_shard": samples_per_shard}
    state_path = out / STATE_DIR / "state.json"
    if status == "fresh" or not state_path.exists():
        fmt.create(str(out), plan, samples_per_shard, labels, keys, source)
        state_path.write_text(json.dumps(state))
    elif json.loads(state_path.read_text()) != state:
        raise ConvertError(f"{state_path} does not match this conversion: use --overwrite")

    # ---- write shards (resuming finished ones)
    results: dict[int, dict] = {}
    tasks = []
    for k in range(num_shards):
        a, b = k * samples_per_shard, min(n, (k + 1) * samples_per_shard)
        done = _journaled(str(out), k, b - a)
        if done is not None:
            results[k] = done
        else:
            tasks.append(_task(fmt, str(out), k, slice(a, b), name, source, keys, labels, plan,
                               channels, resize, quality, encode, samples_per_shard))
    remember_source(source)
    bar = tqdm(total=n, initial=sum(len(r["rows"]) for r in results.values()),
               desc=f"write {format}", unit="img", disable=not progress)
    written = 0
    for res in _pool_map(_write_shard, tasks, workers, ordered=False):
        results[res["k"]] = res
        written += 1
        if written == 1:
            pause_point("write")
        bar.update(len(res["rows"]))
        if _stop_after is not None and written >= _stop_after:
            bar.close()
            raise _Interrupted(f"stopped after {written} shards (test hook)")
    bar.close()

    # ---- manifest
    rows = np.concatenate([results[k]["rows"] for k in range(num_shards)])
    file_col = np.repeat(np.arange(num_shards, dtype=np.uint32),
                         [len(results[k]["rows"]) for k in range(num_shards)])
    entries = [results[k]["entry"] for k in range(num_shards)]
    columns = {"file": file_col, "offset": rows[:, 0], "length": rows[:, 1], "label": labels,
               "key": keys, "crc32": rows[:, 2]}
    if plan.sample_shape is None:
        columns["shape"] = rows[:, 3:6]
    header = {
        "format": format, "codec": plan.codec, "classes": source.classes,
        "sample_shape": list(plan.sample_shape) if plan.sample_shape else None,
        "channels": int(channels), "num_samples": n, "samples_per_shard": samples_per_shard,
        "files": [{kk: e[kk] for kk in ("path", "size", "sha256")} for e in entries],
        "source": {**source.description, "fingerprint": source.fingerprint,
                   "skipped": skipped},
        "seed": seed, "shuffle": shuffle, "params": params, "fingerprint": fingerprint,
        "created_by": "swdpp-pipeline tools/shard.py",
        **fmt.header_fields(entries, plan, samples_per_shard),
    }
    write_manifest(out, header, columns)
    pause_point("manifest")
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)

    seconds = time.perf_counter() - t0
    payload = int(rows[:, 1].sum())
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "out": str(out), "status": "resumed" if status == "resume" else "converted",
        "format": format, "codec": plan.codec, "num_samples": n, "num_shards": num_shards,
        "shards_written": written, "shards_skipped": num_shards - written,
        "skipped_samples": len(skipped), "skipped": skipped, "payload_bytes": payload,
        "bytes_on_disk": on_disk, "disk_per_payload": on_disk / max(payload, 1),
        "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("inf"),
        "fingerprint": fingerprint,
    }
