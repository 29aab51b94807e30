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
import zlib
from pathlib import Path

import numpy as np

from . import images as imgs
from . import wds as wds_mod
from . import zarr_store
from .sources import Source, SourceError, open_source, probe_image
from ..manifest import HEADER_NAME, COLUMN_DIR, MANIFEST_VERSION, write_manifest

STATE_DIR = ".convert"
DEFAULT_SHARD_BYTES = 64 << 20
PROBE_CHUNK = 256


class ConvertError(RuntimeError):
    """A conversion that cannot proceed (message names the file, sample or value)."""


class _Interrupted(RuntimeError):
    """Raised by the test hook ``_stop_after`` to simulate a crash between shards."""


# ----------------------------------------------------------------------------- helpers

def parse_resize(resize) -> tuple[int, int] | None:
    """``"HxW"`` / (H, W) / None -> (H, W) or None."""
    if resize is None or isinstance(resize, tuple):
        return resize
    if isinstance(resize, list):
        return tuple(resize)
    m = re.fullmatch(r"(\d+)[xX](\d+)", str(resize))
    if not m:
        raise ValueError(f"resize must look like HxW (e.g. 32x32), got {resize!r}")
    return int(m.group(1)), int(m.group(2))


def _tar_bytes(payload_len: int) -> int:
    """Bytes one sample takes in a tar: .cls header+block, payload header+padded data."""
    return 3 * 512 + -(-payload_len // 512) * 512


_SOURCE_CACHE: dict[str, Source] = {}


def _cached(source: Source) -> Source:
    # Array sources are re-loaded once per worker process, not shipped with every task.
    return _SOURCE_CACHE.setdefault(source.fingerprint, source)


def _probe_chunk(paths: list[str]) -> list[tuple]:
    out = []
    for p in paths:
        try:
            out.append((True, *probe_image(p), ""))
        except Exception as e:  # noqa: BLE001 - any decoder failure means "bad image"
            out.append((False, "", 0, 0, 0, f"{type(e).__name__}: {e}"))
    return out


def _pool_map(fn, tasks, workers: int, ordered: bool = True):
    """Yield fn(task) for each task, in a spawn pool when workers > 1 (zarr's I/O thread
    makes fork unsafe)."""
    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            yield fn(t)
        return
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
        it = pool.imap(fn, tasks) if ordered else pool.imap_unordered(fn, tasks)
        yield from it


# ----------------------------------------------------------------------------- shard writers

def _write_shard(task: dict) -> dict:
    """Write one shard (runs in a worker), journal it, return its rows."""
    if task["format"] == "wds":
        samples, shapes = (_folder_samples if task["paths"] is not None else _array_samples)(task)
        return _finish_wds(task, samples, shapes)
    return _write_zarr_shard(task)


def _folder_samples(task: dict):
    """Image-folder samples: stored byte for byte unless ``targets[j]`` asks to re-encode."""
    samples, shapes = [], np.zeros((len(task["ids"]), 3), np.int64)
    for j, (sid, label, path) in enumerate(zip(task["ids"], task["labels"], task["paths"])):
        with open(path, "rb") as f:
            data = f.read()
        target = task["targets"][j]
        if target is None:
            ext, shapes[j] = task["exts"][j], task["probe_shapes"][j]
        else:
            pixels = imgs.decode_bytes(data, resize=task["resize"])
            data, ext = imgs.encode_array(pixels, target, task["quality"])
            shapes[j] = pixels.shape
        samples.append(wds_mod.TarSample(int(sid), int(label), data, ext))
    return samples, shapes


def _array_samples(task: dict):
    """Pixel-array samples, encoded (PNG by default: lossless, grayscale stays 1 channel)."""
    source = _cached(task["source"])
    samples, shapes = [], np.zeros((len(task["ids"]), 3), np.int64)
    for j, (sid, key, label) in enumerate(zip(task["ids"], task["keys"], task["labels"])):
        pixels = _resized(source.images()[key], task["resize"])
        data, ext = imgs.encode_array(pixels, task["encode"], task["quality"])
        shapes[j] = pixels.shape
        samples.append(wds_mod.TarSample(int(sid), int(label), data, ext))
    return samples, shapes


def _resized(pixels: np.ndarray, resize) -> np.ndarray:
    if resize is None or tuple(pixels.shape[:2]) == tuple(resize):
        return pixels
    return imgs.decode_bytes(imgs.encode_array(pixels, "png")[0], resize=resize)


def _finish_wds(task: dict, samples: list, shapes: np.ndarray) -> dict:
    out, k = task["out"], task["k"]
    rel = f"{task['name']}-{k:06d}.tar"
    res = wds_mod.write_tar(os.path.join(out, rel), samples)
    idx_rel = rel[:-4] + ".idx"
    wds_mod.write_index(os.path.join(out, idx_rel), res.index_text)
    crcs = np.asarray([zlib.crc32(s.payload) for s in samples], np.int64)
    idx_bytes = res.index_text.encode()
    entry = {"path": rel, "size": res.size, "sha256": res.sha256,
             "index": {"path": idx_rel, "size": len(idx_bytes),
                       "sha256": hashlib.sha256(idx_bytes).hexdigest()}}
    return _done(task, res.offsets, res.lengths, crcs, shapes, entry)


def _write_zarr_shard(task: dict) -> dict:
    h, w, c = task["sample_shape"]
    n = len(task["ids"])
    block = np.empty((n, h, w, c), np.uint8)
    if task["paths"] is not None:
        for j, path in enumerate(task["paths"]):
            with open(path, "rb") as f:
                px = imgs.decode_bytes(f.read(), channels=c, resize=task["resize"])
            if px.shape != (h, w, c):
                raise ConvertError(f"{path}: image is {px.shape[0]}x{px.shape[1]}, the store "
                                   f"holds {h}x{w}: use --resize {h}x{w}")
            block[j] = px
    else:
        src = _cached(task["source"]).images()
        for j, key in enumerate(task["keys"]):
            block[j] = _resized(src[key], task["resize"])
    rel, offsets, lengths, size, sha = zarr_store.write_shard(
        task["out"], task["k"], int(task["ids"][0]), block, task["samples_per_shard"])
    crcs = np.asarray([zlib.crc32(block[j]) for j in range(n)], np.int64)
    shapes = np.tile(np.asarray([h, w, c], np.int64), (n, 1))
    return _done(task, offsets, lengths, crcs, shapes, {"path": rel, "size": size, "sha256": sha})


def _done(task, offsets, lengths, crcs, shapes, entry) -> dict:
    rows = np.stack([np.asarray(offsets, np.int64), np.asarray(lengths, np.int64),
                     np.asarray(crcs, np.int64), shapes[:, 0], shapes[:, 1], shapes[:, 2]], axis=1)
    _journal(task["out"], task["k"], rows, entry)
    return {"k": task["k"], "rows": rows, "entry": entry, "written": True}


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


# ----------------------------------------------------------------------------- output dir

def _owned(name: str) -> bool:
    return (name in (HEADER_NAME, COLUMN_DIR, STATE_DIR, zarr_store.GROUP)
            or re.fullmatch(r".+-\d{6}\.(tar|idx)(\.tmp)?", name) is not None
            or name.startswith(f".{HEADER_NAME}"))


def _prepare_out(out: Path, fingerprint: str, overwrite: bool) -> str:
    """Return "fresh", "resume" or "done"; refuse a different dataset unless overwrite."""
    out.mkdir(parents=True, exist_ok=True)
    existing = None
    if (out / HEADER_NAME).exists():
        existing = json.loads((out / HEADER_NAME).read_text()).get("fingerprint")
        status = "done"
    elif (out / STATE_DIR / "state.json").exists():
        existing = json.loads((out / STATE_DIR / "state.json").read_text()).get("fingerprint")
        status = "resume"
    else:
        status = "fresh"
    entries = [p for p in out.iterdir()]
    if existing == fingerprint and not overwrite:
        return status
    if entries and not overwrite:
        if existing is not None:
            raise ConvertError(f"{out} already holds a different dataset or conversion "
                               f"(fingerprint {existing[:12]}, this one {fingerprint[:12]}): "
                               "use --overwrite to replace it")
        raise ConvertError(f"{out} is not empty and holds no conversion: choose an empty "
                           "directory or use --overwrite")
    for p in entries:                       # --overwrite removes only what we write
        if _owned(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return "fresh"


# ----------------------------------------------------------------------------- convert

def convert(src, out, *, format: str = "wds", source_type: str | None = None,
            split: str | None = None, samples_per_shard: int | None = None,
            shard_bytes: int | None = None, workers: int = 1, seed: int = 0,
            shuffle: bool = True, encode: str | None = None, quality: int = 95,
            resize=None, overwrite: bool = False, strict: bool = False,
            limit: int | None = None, name: str | None = None, progress: bool = True,
            _stop_after: int | None = None) -> dict:
    """Convert ``src`` into ``out`` (format "wds" or "zarr"); return a summary dict.

    ``limit`` keeps the first N samples after the seeded shuffle. Re-running the same call
    resumes (finished shards are skipped); a different dataset in ``out`` is refused unless
    ``overwrite``. Corrupt images are skipped and reported (``strict`` makes them fatal).
    """
    from tqdm import tqdm
    t0 = time.perf_counter()
    if format not in ("wds", "zarr"):
        raise ValueError(f"format must be 'wds' or 'zarr', got {format!r}")
    if encode not in (None, "png", "jpeg", "npy"):
        raise ValueError(f"encode must be png, jpeg or npy, got {encode!r}")
    if format == "zarr" and encode is not None:
        raise ValueError("--encode applies to WebDataset output only: Zarr stores raw pixels")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    resize = parse_resize(resize)
    name = name or "shard"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name must be letters, digits, '_', '-', '.', got {name!r}")
    out = Path(out).absolute()

    source = open_source(src, source_type=source_type, split=split)
    params = {"format": format, "seed": seed, "shuffle": shuffle, "limit": limit,
              "encode": encode, "quality": quality if encode == "jpeg" or resize else None,
              "resize": list(resize) if resize else None, "samples_per_shard": samples_per_shard,
              "shard_bytes": shard_bytes, "name": name, "strict": strict}
    fingerprint = hashlib.sha256(json.dumps(
        {"version": MANIFEST_VERSION, "source": source.fingerprint, "params": params},
        sort_keys=True).encode()).hexdigest()
    status = _prepare_out(out, fingerprint, overwrite)
    if status == "done":
        from ..manifest import ManifestError, open_dataset
        try:
            open_dataset(out).check_files()     # sizes only: cheap; --verify does checksums
        except ManifestError as e:
            raise ConvertError(f"{out} holds this dataset, complete, but damaged ({e}): "
                               "re-run with --overwrite to convert again") from e
        header = json.loads((out / HEADER_NAME).read_text())
        return {"out": str(out), "status": "already complete", "format": format,
                "num_samples": header["num_samples"], "num_shards": len(header["files"]),
                "shards_written": 0, "shards_skipped": len(header["files"]),
                "skipped_samples": len(header["source"].get("skipped", [])),
                "seconds": time.perf_counter() - t0, "fingerprint": fingerprint}
    (out / STATE_DIR).mkdir(exist_ok=True)

    # ---- order: seeded shuffle, then (image folders) drop unreadable images
    n_src = len(source)
    order = np.random.default_rng(seed).permutation(n_src) if shuffle else np.arange(n_src)
    want = n_src if limit is None else min(limit, n_src)
    skipped: list[dict] = []
    probes: dict[int, tuple] = {}
    if source.is_encoded:
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
                        raise ConvertError(f"corrupt or unreadable image {source.paths[key]}: {r[5]}")
                    skipped.append({"path": source.paths[key], "error": r[5]})
        bar.close()
        keys = np.asarray(kept[:want], np.int64)
        for s in skipped:
            print(f"warning: skipped unreadable image {s['path']}: {s['error']}", file=sys.stderr)
    else:
        keys = order[:want].astype(np.int64)
    n = len(keys)
    if n == 0:
        raise ConvertError(f"empty source: no readable samples in {source.root}")
    labels = source.labels[keys]

    # ---- what each sample becomes
    exts = targets = probe_shapes = None
    sample_shape = None
    if source.is_encoded:
        fmts = [probes[int(k)][0] for k in keys]
        probe_shapes = np.asarray([probes[int(k)][1:4] for k in keys], np.int64)
        if format == "wds":
            native = [imgs.EXT_OF_FORMAT.get(f) for f in fmts]
            # None = store byte for byte; else the encoding to re-encode with: --encode, or
            # (--resize) JPEG stays JPEG, or formats other than JPEG/PNG become PNG (lossless)
            targets = [encode or (("jpeg" if e == "jpg" else "png") if resize else
                                  (None if e else "png")) for e in native]
            exts = [e if t is None else {"jpeg": "jpg"}.get(t, t) for e, t in zip(native, targets)]
            codecs = sorted({imgs.CODEC_OF_EXT[e] for e in exts})
            codec = codecs[0] if len(codecs) == 1 else "mixed"
            shp = probe_shapes.copy()
            if resize:
                shp[:, 0], shp[:, 1] = resize
            if len({tuple(s) for s in shp}) == 1:
                sample_shape = tuple(int(v) for v in shp[0])
        else:
            c = 1 if np.all(probe_shapes[:, 2] == 1) else 3
            hw = {tuple(s) for s in probe_shapes[:, :2]}
            if resize is None and len(hw) > 1:
                (h1, w1), (h2, w2) = sorted(hw)[:2]
                raise ConvertError(f"images in {source.root} differ in size ({h1}x{w1}, {h2}x{w2}, "
                                   f"...): Zarr stores a fixed (N,H,W,C) array, use --resize HxW")
            h, w = resize or next(iter(hw))
            sample_shape, codec = (int(h), int(w), c), "raw"
    else:
        h, w, c = source.images().shape[1:]
        if resize:
            h, w = resize
        sample_shape = (int(h), int(w), int(c))
        if format == "wds":
            codec = imgs.CODEC_OF_EXT[{"jpeg": "jpg"}.get(encode or "png", encode or "png")]
        else:
            codec = "raw"
    channels = sample_shape[2] if sample_shape else (
        int(probe_shapes[0, 2]) if len(set(probe_shapes[:, 2])) == 1 else 3)
    if format == "wds" and codec == "jpeg" and channels in (2, 4):
        channels -= 1
        sample_shape = sample_shape and (*sample_shape[:2], channels)

    # ---- shard plan
    if samples_per_shard is None:
        if format == "zarr":
            per = float(np.prod(sample_shape))
        elif source.is_encoded and not any(t is not None for t in targets):
            per = float(np.mean([_tar_bytes(os.path.getsize(source.paths[k])) for k in keys[:1024]]))
        elif source.is_encoded:
            per = float(_tar_bytes(int(np.prod(probe_shapes[0]))))
        else:   # estimate encoded size from a few samples
            x = source.images()[keys[:64]]
            per = float(np.mean([_tar_bytes(len(imgs.encode_array(a, encode or "png", quality)[0]))
                                 for a in x]))
        samples_per_shard = max(1, int((shard_bytes or DEFAULT_SHARD_BYTES) // max(per, 1)))
    samples_per_shard = min(samples_per_shard, n)
    num_shards = -(-n // samples_per_shard)
    ids = np.arange(n, dtype=np.int64)

    state = {"fingerprint": fingerprint, "num_samples": n, "samples_per_shard": samples_per_shard}
    state_path = out / STATE_DIR / "state.json"
    if status == "fresh" or not state_path.exists():
        if format == "zarr":
            zarr_store.create_store(str(out), (n, *sample_shape), samples_per_shard, labels, keys,
                                    {"classes": source.classes, "codec": "raw",
                                     "source": source.description})
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
            continue
        sl = slice(a, b)
        tasks.append({
            "out": str(out), "k": k, "format": format, "name": name, "ids": ids[sl],
            "keys": keys[sl], "labels": labels[sl], "resize": resize, "quality": quality,
            "encode": encode or "png", "samples_per_shard": samples_per_shard,
            "sample_shape": sample_shape,
            "source": None if source.is_encoded else source,
            "paths": [source.paths[i] for i in keys[sl]] if source.is_encoded else None,
            "exts": exts[sl] if exts else None,
            "targets": targets[sl] if exts else None,
            "probe_shapes": probe_shapes[sl] if probe_shapes is not None else None,
        })
    _SOURCE_CACHE[source.fingerprint] = source
    bar = tqdm(total=n, initial=sum(len(r["rows"]) for r in results.values()),
               desc=f"write {format}", unit="img", disable=not progress)
    written = 0
    for res in _pool_map(_write_shard, tasks, workers, ordered=False):
        results[res["k"]] = res
        written += 1
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
    files = [{kk: e[kk] for kk in ("path", "size", "sha256")} for e in entries]
    columns = {"file": file_col, "offset": rows[:, 0], "length": rows[:, 1], "label": labels,
               "key": keys, "crc32": rows[:, 2]}
    if sample_shape is None:
        columns["shape"] = rows[:, 3:6]
    header = {
        "format": format, "codec": codec, "classes": source.classes,
        "sample_shape": list(sample_shape) if sample_shape else None, "channels": int(channels),
        "num_samples": n, "samples_per_shard": samples_per_shard, "files": files,
        "source": {**source.description, "fingerprint": source.fingerprint,
                   "skipped": skipped},
        "seed": seed, "shuffle": shuffle, "params": params, "fingerprint": fingerprint,
        "created_by": "swdpp-pipeline tools/shard.py",
    }
    if format == "wds":
        header["index_files"] = [e["index"] for e in entries]
        header["member_name"] = "{id:09d}.{ext}"
    else:
        header["zarr"] = {"group": zarr_store.GROUP, "images": zarr_store.IMAGES,
                          "labels": "labels", "keys": "keys",
                          "chunk_shape": [1, *sample_shape],
                          "shard_shape": [samples_per_shard, *sample_shape]}
    write_manifest(out, header, columns)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)

    seconds = time.perf_counter() - t0
    payload = int(rows[:, 1].sum())
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {
        "out": str(out), "status": "resumed" if status == "resume" else "converted",
        "format": format, "codec": codec, "num_samples": n, "num_shards": num_shards,
        "shards_written": written, "shards_skipped": num_shards - written,
        "skipped_samples": len(skipped), "skipped": skipped, "payload_bytes": payload,
        "bytes_on_disk": on_disk, "disk_per_payload": on_disk / max(payload, 1),
        "seconds": seconds, "images_per_s": n / seconds if seconds > 0 else float("inf"),
        "fingerprint": fingerprint,
    }
