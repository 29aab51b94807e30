"""Readers for the source datasets that tools/shard.py converts.

Four kinds, detected from the directory layout (or forced with ``source_type``):

- ``imagefolder``: ``SRC/<class>/<file>`` in any format PIL reads (sizes may differ);
- ``cifar``: CIFAR-10/100 python batches (read with a restricted unpickler: only numpy
  array reconstruction is allowed, so a malicious batch file cannot run code);
- ``idx``: MNIST-family IDX files (``.gz`` or raw), ``split`` picks ``train-*`` / ``t10k-*``;
- ``npz``: one ``.npz`` file with ``x`` (N,H,W[,C]) uint8 and ``y`` (N,) integer arrays
  (optional ``classes`` string array), loaded with ``allow_pickle=False``.

Array sources (cifar, idx, npz) expose ``images()`` -> uint8 (N,H,W,C); image folders expose
``paths``. Every source has ``labels`` (int64, source order), ``classes``, a ``fingerprint``
(sha256 of what identifies the data) and a JSON-able ``description``.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .index import MAX_LABEL
from .walk import WalkReport, display, walk_images

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm"}
SPLIT_DIRS = ("train", "test", "val", "validation")
SOURCE_TYPES = ("imagefolder", "cifar", "idx", "npz")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]


class SourceError(ValueError):
    """A source dataset that cannot be converted (message names the file or value)."""


@dataclass
class Source:
    """One source dataset, in its own order (``key`` = position in this order)."""

    kind: str
    root: str
    split: str | None
    classes: list[str]
    labels: np.ndarray                      # int64, one per sample
    description: dict
    fingerprint: str
    paths: list[str] | None = None          # imagefolder only
    files: list[str] = field(default_factory=list)   # array sources: files to (re)load
    _images: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_encoded(self) -> bool:
        """True when samples are image files (stored byte for byte), False for pixel arrays."""
        return self.kind == "imagefolder"

    def __len__(self) -> int:
        return len(self.labels)

    def images(self) -> np.ndarray:
        """uint8 (N,H,W,C) pixels of an array source (loaded once per process)."""
        if self.is_encoded:
            raise TypeError("an image-folder source has no pixel array")
        if self._images is None:
            self._images = _without_alpha(_LOADERS[self.kind](self)[0])
        return self._images

    def __getstate__(self):
        # Worker processes reload the arrays from the files instead of receiving a copy.
        state = dict(self.__dict__)
        state["_images"] = None
        return state


# ----------------------------------------------------------------------------- detection

def open_source(src: str | os.PathLike, *, source_type: str | None = None,
                split: str | None = None) -> Source:
    """Detect the kind of ``src`` (or use ``source_type``) and open it.

    Raises SourceError naming the file for an unknown layout, an empty source, a missing
    label or an IDX file with the wrong magic number.
    """
    path = Path(src)
    if not path.exists():
        raise SourceError(f"source not found: {path}")
    kind = source_type or detect_source_type(path, split)
    if kind not in SOURCE_TYPES:
        raise SourceError(f"unknown source type {kind!r} for {path} (known: {', '.join(SOURCE_TYPES)})")
    if kind == "imagefolder":
        return _open_imagefolder(path, split)
    if kind == "cifar":
        return _finish_array_source("cifar", path, split, _cifar_files(path, split))
    if kind == "idx":
        return _finish_array_source("idx", path, split, _idx_files(path, split))
    return _finish_array_source("npz", path, split, [_npz_file(path)])


def detect_source_type(path: Path, split: str | None = None, ignore: str | None = None) -> str:
    """Guess the source kind from file names (``ignore``: an entry of ``path`` to leave out,
    the conversion's OUT); raise SourceError when nothing matches."""
    if path.is_file():
        if path.suffix == ".npz":
            return "npz"
        if "idx" in path.name:
            return "idx"
        raise SourceError(f"unknown source type: {path} (expected a directory, a .npz file "
                          "or IDX files; pass --source-type)")
    names = {p.name for p in path.iterdir()} - {ignore}
    if names & {"batches.meta", "data_batch_1", "test_batch"} or {"meta", "train"} <= names and (path / "train").is_file():
        return "cifar"
    if any(d in names for d in ("cifar-10-batches-py", "cifar-100-python")):
        return "cifar"
    if any("idx1-ubyte" in n or "idx3-ubyte" in n for n in names):
        return "idx"
    npz = [n for n in names if n.endswith(".npz")]
    if len(npz) == 1 and not any((path / n).is_dir() for n in names if not n.startswith(".")):
        return "npz"
    if any((path / n).is_dir() for n in names if not n.startswith(".")):
        return "imagefolder"
    raise SourceError(f"unknown source type: nothing in {path} looks like an image folder, "
                      "CIFAR batches, IDX files or an .npz file (pass --source-type)")


# ----------------------------------------------------------------------------- image folder

def _is_split_layout(path: Path) -> bool:
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return bool(subdirs) and all(p.name in SPLIT_DIRS for p in subdirs) and all(
        any(q.is_dir() for q in p.iterdir()) for p in subdirs)


def _open_imagefolder(path: Path, split: str | None) -> Source:
    if not path.is_dir():
        raise SourceError(f"image folder source must be a directory: {path}")
    root = path
    if _is_split_layout(path):
        # SRC=<extract>/cifar10-jpeg: pick SRC/<split> (train by default).
        split = split or "train"
        root = path / split
        if not root.is_dir():
            raise SourceError(f"split {split!r} not found: {root}")
    elif split is not None and (path / split).is_dir():
        root = path / split
    stray = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if stray:
        raise SourceError(f"missing label: image {stray[0]} is not inside a class directory "
                          f"of {root} ({len(stray)} such files)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SourceError(f"empty source: no class directories in {root}")
    for cls in classes:     # class names go into manifest.json: they must be text
        if display(cls) != cls:
            raise SourceError(f"class directory name is not valid UTF-8: {display(str(root / cls))} "
                              "(rename it)")
    paths: list[str] = []
    labels: list[int] = []
    digest = hashlib.sha256()
    report = WalkReport()
    for label, cls in enumerate(classes):
        for full in walk_images(root / cls, IMAGE_EXTENSIONS, report):
            paths.append(full)
            labels.append(label)
            rel = os.fsencode(os.path.relpath(full, root))   # file names may be any bytes
            digest.update(rel + f"\t{os.path.getsize(full)}\t{label}\n".encode())
    if not paths:
        raise SourceError(f"empty source: no image files under {root}")
    digest.update(("\n".join(classes)).encode())
    description = {"type": "imagefolder", "path": str(root), "split": split, "num_samples": len(paths)}
    if report.skipped:
        description["skipped_paths"] = report.skipped
    return Source(kind="imagefolder", root=str(root), split=split, classes=classes,
                  labels=np.asarray(labels, dtype=np.int64), description=description,
                  fingerprint=digest.hexdigest(), paths=paths)


# ----------------------------------------------------------------------------- array sources

def _finish_array_source(kind: str, path: Path, split: str | None, files: list[Path]) -> Source:
    src = Source(kind=kind, root=str(path), split=split, classes=[], labels=np.zeros(0, np.int64),
                 description={}, fingerprint="", files=[str(f) for f in files])
    images, labels, classes = _LOADERS[kind](src)
    if images.ndim == 4 and images.shape[-1] in (2, 4):
        print(f"note: {src.files[0]}: {images.shape[-1]}-channel images: the alpha channel is "
              "dropped (the loader's decoders deliver GRAY or RGB)", file=sys.stderr)
        images = _without_alpha(images)
    if len(images) == 0:
        raise SourceError(f"empty source: no samples in {', '.join(src.files)}")
    class_names(labels, src.files[-1], classes)
    digest = hashlib.sha256()
    digest.update(kind.encode())
    digest.update(str(images.shape).encode())
    digest.update(hashlib.sha256(np.ascontiguousarray(images)).digest())
    digest.update(labels.astype("<i8").tobytes())
    digest.update("\n".join(classes).encode())
    src._images, src.labels, src.classes = images, labels, classes
    src.fingerprint = digest.hexdigest()
    src.description = {"type": kind, "path": str(path), "split": split, "files": src.files,
                       "num_samples": int(len(labels)), "shape": list(images.shape[1:])}
    return src


def _without_alpha(x: np.ndarray) -> np.ndarray:
    """C 2 (LA) or 4 (RGBA) -> 1 or 3, as PIL's LA->L / RGBA->RGB for image folders: the
    loader's decoders deliver GRAY or RGB, and a manifest of 2 or 4 breaks every batch."""
    return np.ascontiguousarray(x[..., :-1]) if x.shape[-1] in (2, 4) else x


def class_names(labels: np.ndarray, path, classes: list[str] | None) -> list[str]:
    """``classes``, or ``"0".."max"`` if none, once every label (in its own dtype: a uint64
    would wrap in int64) is a class index; without names at most MAX_LABEL, as ``index``
    (an id stored as the label would make millions of classes: their names exhaust memory)."""
    top = MAX_LABEL if classes is None else len(classes) - 1
    bad = np.flatnonzero((labels < 0) | (labels > top))
    if len(bad):
        i = int(bad[0])
        raise SourceError(f"label {int(labels[i])} of sample {i} in {path} is outside 0..{top:,}"
                          f"{f' ({len(bad)} such labels)' if len(bad) > 1 else ''}")
    if classes is not None:
        return classes
    return [str(i) for i in range(int(labels.max(initial=-1)) + 1)]


def _as_nhwc(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise SourceError(f"{name}: images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 2, 3, 4):
        raise SourceError(f"{name}: images must be (N,H,W) or (N,H,W,C) with C in 1..4, got {x.shape}")
    return x


# IDX (MNIST family): big-endian header: 0, 0, dtype code, ndim, then ndim uint32 sizes.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (optionally gzip'd); raise SourceError naming it on a bad header."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SourceError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4:
        raise SourceError(f"IDX file {path} is too short ({len(data)} bytes)")
    zero1, zero2, code, ndim = data[0], data[1], data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    if zero1 or zero2 or code not in _IDX_DTYPES or (expect_ndim and ndim != expect_ndim):
        want = f"0x{0x800 + expect_ndim:08X}" if expect_ndim else "0x000008NN"
        raise SourceError(f"IDX file {path} has wrong magic number 0x{magic:08X} (expected {want})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    need = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != need:
        raise SourceError(f"IDX file {path} is truncated or oversized: {len(body)} data bytes, "
                          f"header says {dims} -> {need}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _idx_files(path: Path, split: str | None) -> list[Path]:
    if path.is_file():
        raise SourceError(f"IDX source must be the directory holding the IDX files, not {path}")
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k", None: "train"}.get(split)
    if prefix is None:
        raise SourceError(f"unknown split {split!r} for IDX files (use train or test)")

    def find(kind: str) -> Path:
        hits = sorted(p for p in path.iterdir() if p.name.startswith(f"{prefix}-{kind}")
                      and ("idx3" in p.name or "idx1" in p.name))
        if not hits:
            raise SourceError(f"missing IDX file {path}/{prefix}-{kind}-idx*-ubyte[.gz]"
                              + (" (missing labels)" if kind == "labels" else ""))
        return hits[-1] if len(hits) == 1 else min(hits, key=lambda p: p.suffix != ".gz")
    return [find("images"), find("labels")]


def _load_idx(src: Source):
    img_file, lbl_file = src.files
    images = _as_nhwc(read_idx(img_file, expect_ndim=3), img_file)
    labels = read_idx(lbl_file, expect_ndim=1).astype(np.int64)
    if len(labels) != len(images):
        raise SourceError(f"{lbl_file} has {len(labels)} labels but {img_file} has {len(images)} images")
    classes_txt = Path(img_file).parent / "classes.txt"
    classes = None
    if classes_txt.exists():
        classes = [c for c in classes_txt.read_text().splitlines() if c.strip()]
    elif "fashion" in str(img_file).lower():
        classes = list(FASHION_MNIST_CLASSES)
    return images, labels, class_names(labels, lbl_file, classes)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: allows numpy array reconstruction and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise SourceError(f"cannot read CIFAR batch {path}: {e}") from e
    if not isinstance(obj, dict):
        raise SourceError(f"CIFAR batch {path} is not a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_files(path: Path, split: str | None) -> list[Path]:
    for sub in ("cifar-10-batches-py", "cifar-100-python"):
        if (path / sub).is_dir():
            path = path / sub
    split = split or "train"
    if split not in ("train", "test"):
        raise SourceError(f"unknown split {split!r} for CIFAR batches (use train or test)")
    if (path / "batches.meta").exists() or (path / "data_batch_1").exists():       # CIFAR-10
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta = "batches.meta"
    else:                                                                          # CIFAR-100
        names, meta = [split], "meta"
    files = [path / n for n in names]
    for f in files + [path / meta]:
        if not f.exists():
            raise SourceError(f"missing CIFAR file {f}")
    return files + [path / meta]


def _load_cifar(src: Source):
    *batches, meta_file = src.files
    meta = _unpickle(meta_file)
    names = meta.get("label_names") or meta.get("fine_label_names")
    if names is None:
        raise SourceError(f"{meta_file} has no label_names / fine_label_names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    xs, ys = [], []
    for f in batches:
        d = _unpickle(f)
        if "data" not in d:
            raise SourceError(f"CIFAR batch {f} has no 'data'")
        y = d.get("labels", d.get("fine_labels"))
        if y is None:
            raise SourceError(f"missing labels: CIFAR batch {f} has no 'labels' / 'fine_labels'")
        x = np.asarray(d["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise SourceError(f"CIFAR batch {f}: data {x.shape} and {len(y)} labels do not match")
        xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))   # stored CHW planes
        ys.append(np.asarray(y, dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), classes


def _npz_file(path: Path) -> Path:
    if path.is_file():
        return path
    hits = sorted(path.glob("*.npz"))
    if len(hits) != 1:
        raise SourceError(f"expected exactly one .npz file in {path}, found {len(hits)}")
    return hits[0]


def _load_npz(src: Source):
    f = src.files[0]
    try:
        z = np.load(f, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):    # a .npy given as --source-type npz
            raise ValueError("not an .npz archive")
        with z:
            names, a = z.files, {k: z[k] for k in ("x", "y", "classes") if k in z.files}
    # a damaged or empty archive: zipfile's, zlib's and numpy's own errors, not a traceback
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise SourceError(f"cannot read {f}: {type(e).__name__}: {e}") from e
    if "x" not in a or "y" not in a:
        raise SourceError(f"{'missing labels: ' if 'x' in a else ''}{f} has no "
                          f"{'y' if 'x' in a else 'x'!r} array (found {names})")
    x, y = a["x"], a["y"]
    classes = [str(c) for c in a["classes"]] if "classes" in a else None
    x = _as_nhwc(x, str(f))
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
        raise SourceError(f"{f}: 'y' must be integer (N,) matching x {x.shape}, got {y.dtype} {y.shape}")
    classes = class_names(y, f, classes)
    return x, y.astype(np.int64), classes


_LOADERS = {"idx": _load_idx, "cifar": _load_cifar, "npz": _load_npz}
