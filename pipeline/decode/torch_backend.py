"""The torch backend: a ``DataLoader`` and torchvision, with the DALI backend's semantics.

The DataLoader iterates over *batch indices* of the table the backend published for the
epoch (``batch_size=None``, a plain ``range`` sampler), so nothing is planned inside
``__iter__``: the plan is fixed before the DataLoader exists.  Each worker reads a batch
with :class:`pipeline.read.source.PlannedSource`, decodes with torchvision and applies the
parameters drawn in :mod:`pipeline.decode.augment` (the same crops and flips as the DALI
backend).  Used where DALI is not installed, and as the benchmark baseline.
"""
from __future__ import annotations

import functools
import io
import os
import time
import warnings
from typing import Iterator

import numpy as np
import torch

from ..formats.imagesize import batch_hw
from ..read.ranges import ReadCounters
from ..read.sniff import PNG_SIGNATURE, plausible_image
from ..read.source import Flag, PlannedSource, meta_from_array, meta_to_array
from ..read.table import TableHeader
from .augment import AugmentParams, AugmentSpec, rrc_pixels, sample_params
from .backend import Backend, RawBatch, uneven_sizes
from .procs import (die_with_parent_default, ignore_stop_signals, init_reader_process,
                    reader_processes)

__all__ = ["TorchBackend", "transform", "decode"]


def _crop_pad(img: torch.Tensor, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
    """Crop window [y0, y0+h) x [x0, x0+w) of CHW ``img``; outside the image is zero."""
    c, hh, ww = img.shape
    out = img.new_zeros((c, h, w))
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, hh), min(x0 + w, ww)
    if ye > ys and xe > xs:
        out[:, ys - y0:ye - y0, xs - x0:xe - x0] = img[:, ys:ye, xs:xe]
    return out


def _center_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre ``size`` window as DALI's crop (``crop_pos`` 0.5) places it: an odd
    margin puts the extra pixel before the window (torchvision's ``center_crop`` rounds
    half to even, one pixel apart from DALI on half of the odd margins)."""
    (h, w), (hh, ww) = size, img.shape[-2:]
    if h > hh or w > ww:  # smaller than the window: torchvision pads it
        from torchvision.transforms.v2 import functional as F
        return F.center_crop(img, [h, w])
    top, left = int((hh - h) / 2 + 0.5), int((ww - w) / 2 + 0.5)
    return img[..., top:top + h, left:left + w]


def transform(img: torch.Tensor, p: AugmentParams, j: int, spec: AugmentSpec) -> torch.Tensor:
    """Apply ``spec`` with row ``j`` of ``p`` to a CHW uint8 image -> float CHW."""
    from torchvision.transforms.v2 import functional as F

    (y0, x0), (ph, pw) = p.anchor[j], p.shape[j]
    if spec.mode == "pad_crop":
        if spec.resize_shorter:  # another size: to the output size first, as eval does
            img = _center_crop(F.resize(img, [spec.resize_shorter], antialias=True), spec.out_size)
        img = _crop_pad(img, int(y0), int(x0), int(ph), int(pw))
    elif spec.mode == "rrc":
        (top, left), (h, w) = rrc_pixels(p.anchor[j], p.shape[j],
                                         np.asarray(img.shape[1:], dtype=np.float32))
        img = F.resized_crop(img, int(top), int(left), int(h), int(w), list(spec.out_size),
                             antialias=True)
    elif spec.mode == "resize_center":
        img = F.resize(img, [spec.resize_shorter], antialias=True)
        if spec.out_size:
            img = _center_crop(img, spec.out_size)
    if spec.flip and p.flip[j]:
        img = img.flip(-1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (img.float() - mean) / std


def _decode_pil(payload: np.ndarray, channels: int) -> torch.Tensor:
    """PIL's decode (raises on damage instead of crashing) -> CHW uint8 tensor, with the
    image's EXIF orientation applied and 16-bit samples scaled to 8 bits, as DALI does."""
    from PIL import Image, ImageOps
    with Image.open(io.BytesIO(payload.tobytes())) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: PIL's convert clips
            a = (np.asarray(im, dtype=np.uint32) * 255 + 32767) // 65535
            im = Image.fromarray(a.astype(np.uint8), "L")
        a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
    return torch.from_numpy(a.reshape(*a.shape[:2], channels).copy()).permute(2, 0, 1)


def decode(payload: np.ndarray, codec: str, channels: int, checked: bool = False) -> torch.Tensor:
    """Encoded bytes (or HWC pixels for raw/npy) -> CHW uint8 tensor, as DALI's decoder
    gives it: EXIF orientation applied, 16-bit samples scaled to 8 bits.  Raises on bytes
    that do not decode.

    JPEG and PNG (told by their first bytes, whatever the dataset's codec) go to
    torchvision's decoders; other formats (WebP, whose orientation torchvision ignores,
    BMP, TIFF, ...) and anything torchvision refuses go to PIL.  torchvision's PNG decoder
    crashes the process (SIGSEGV after a libpng error) on a damaged deflate stream, which
    a checksum written after the damage does not catch, so a PNG that fails the structural
    check of read/sniff.py goes to PIL too, which raises; ``checked``: the reader already
    ran that check (no checksum to verify)."""
    if codec in ("raw", "npy") or payload.ndim == 3:
        a = np.ascontiguousarray(payload)
        if not a.flags.writeable:  # bytes read from storage: torch would warn, and may write
            a = a.copy()
        return torch.from_numpy(a).permute(2, 0, 1)
    head = payload[:8].tobytes()
    png = head == PNG_SIGNATURE
    if not (png or head[:2] == b"\xff\xd8") or (png and not checked and not plausible_image(payload)):
        return _decode_pil(payload, channels)
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    data = torch.from_numpy(np.array(payload, copy=True))
    try:
        img = (decode_png if png else decode_jpeg)(data, mode=mode, apply_exif_orientation=True)
    except RuntimeError:  # e.g. a CMYK or arithmetic-coded JPEG: PIL, which raises on damage
        return _decode_pil(payload, channels)
    if img.dtype != torch.uint8:  # a 16-bit PNG: 0..65535 -> 0..255, rounded
        img = ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    return img


def _worker_init(_: int, parent: tuple[int, bool]) -> None:
    # ignore SIGTERM/SIGINT (torch's worker handler dies on them, and the main process's
    # SIGCHLD handler then raises wherever it is) and die with the main process (procs.py)
    init_reader_process(*parent)
    ignore_stop_signals()  # torch set its own SIGTERM handler after the fork
    # one intra-op thread per worker: the workers are the parallelism (oversubscribed
    # intra-op threads make per-image ops far slower on few cores)
    torch.set_num_threads(1)


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style over the batches of one published table: index i -> (images, meta, ns,
    fields)."""

    def __init__(self, source: PlannedSource, path: str, spec: AugmentSpec, channels: int):
        self.source, self.path, self.spec, self.channels = source, path, spec, channels

    def __len__(self) -> int:
        return self.source.table(self.path).limit

    def __getitem__(self, i: int):
        table = self.source.table(self.path)
        sb = self.source.batch(table, i)
        h = table.header
        params = sample_params(self.spec, len(sb.meta), h.seed, h.epoch, h.rank, h.first_step + i,
                               batch_hw(sb.payload) if self.spec.mode == "rrc" else None)
        t0 = time.perf_counter()
        codec, ch = self.source.codec, self.channels
        checked = not self.source.verify_crc  # the reader sniffed every payload
        imgs = []
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders (in favour of torchcodec) on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            for j, buf in enumerate(sb.payload):
                try:
                    imgs.append(transform(decode(buf, codec, ch, checked), params, j,
                                          self.spec))
                except (RuntimeError, OSError, ValueError):  # undecodable: the filler, flagged corrupt
                    sb.meta["flag"][j] = Flag.CORRUPT
                    imgs.append(transform(decode(self.source.filler, codec, ch), params, j,
                                          self.spec))
        decode_ns = int((time.perf_counter() - t0) * 1e9)
        for j in np.flatnonzero(sb.meta["flag"] == Flag.CORRUPT).tolist():
            for values in sb.fields.values():  # an undecodable image: no sample, no fields
                values[j] = b""
        err = uneven_sizes([tuple(x.shape) for x in imgs])
        if err is not None:
            raise err
        return torch.stack(imgs), meta_to_array(sb.meta), decode_ns, sb.fields


class TorchBackend(Backend):
    """DataLoader workers (or the main process with ``num_workers=0``) + torchvision."""

    name = "torch"

    def __init__(self, config):
        super().__init__(config)
        self._it = None
        # import torchvision here, once, so forked workers inherit it (a fresh import in
        # every worker of every epoch is slow)
        import torchvision.io  # noqa: F401
        import torchvision.transforms.v2.functional  # noqa: F401

    def start(self, ids: np.ndarray, header: TableHeader) -> Iterator[RawBatch]:
        cfg = self.config
        table = self._publish(ids, header, f"torch-{self._serial}")
        ds = _BatchDataset(cfg.source, table.path, cfg.spec, cfg.channels)
        dl = torch.utils.data.DataLoader(
            ds, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch if cfg.num_workers > 0 else None,
            persistent_workers=False, pin_memory=False,
            worker_init_fn=functools.partial(_worker_init,
                                             parent=(os.getpid(), die_with_parent_default())))
        with reader_processes():  # the workers are forked here
            self._it = iter(dl)
        for j, (images, meta, decode_ns, fields) in enumerate(self._it):
            self._delivered = j + 1
            yield RawBatch(images, meta_from_array(meta.numpy()), table.reads(j, j + 1),
                           int(decode_ns) / 1e9, fields)
        self._it = None
        self._finish()

    def abandon(self) -> ReadCounters:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # the workers are gone before their table is removed
        return self._finish()
