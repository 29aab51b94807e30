"""The same semantics as the DALI backend with a torch ``DataLoader`` and torchvision.

The DataLoader iterates over *batch indices* of the table the loader published for the
epoch (``batch_size=None``, a plain ``range`` sampler), so nothing is planned inside
``__iter__``: the plan is fixed before the DataLoader exists.  Each worker reads a batch
with :class:`pipeline.reader.PlannedSource`, decodes with ``torchvision.io.decode_image``
and applies the parameters drawn in :mod:`pipeline.augment` (same crops and flips as the
DALI backend).  Used where DALI is not installed, and as the benchmark baseline.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from .augment import AugmentSpec


def _crop_pad(img: torch.Tensor, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
    """Crop window [y0, y0+h) x [x0, x0+w) of CHW ``img``; outside the image is zero."""
    c, hh, ww = img.shape
    out = img.new_zeros((c, h, w))
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + h, hh), min(x0 + w, ww)
    if ye > ys and xe > xs:
        out[:, ys - y0:ye - y0, xs - x0:xe - x0] = img[:, ys:ye, xs:xe]
    return out


def transform(img: torch.Tensor, p: np.ndarray, spec: AugmentSpec) -> torch.Tensor:
    """Apply ``spec`` with parameters ``p`` (float32[5]) to a CHW uint8 image -> float CHW."""
    from torchvision.transforms.v2 import functional as F

    if spec.mode == "pad_crop":
        img = _crop_pad(img, int(p[0]), int(p[1]), int(p[2]), int(p[3]))
    elif spec.mode == "rrc":
        _, hh, ww = img.shape
        top, left = int(round(p[0] * hh)), int(round(p[1] * ww))
        h = max(1, min(hh - top, int(round(p[2] * hh))))
        w = max(1, min(ww - left, int(round(p[3] * ww))))
        img = F.resized_crop(img, top, left, h, w, list(spec.out_size), antialias=True)
    elif spec.mode == "resize_center":
        img = F.resize(img, [spec.resize_shorter], antialias=True)
        if spec.out_size:
            img = F.center_crop(img, list(spec.out_size))
    if spec.flip and p[4] >= 0.5:
        img = img.flip(-1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (img.float() - mean) / std


def decode(payload: np.ndarray, codec: str, channels: int) -> torch.Tensor:
    """Encoded bytes (or HWC pixels for raw/npy) -> CHW uint8 tensor."""
    if codec in ("raw", "npy") or payload.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(payload)).permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg, decode_png
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    data = torch.from_numpy(np.array(payload, copy=True))
    # the codec-specific decoders: decode_image costs ~2.5 ms per call here vs ~30 us
    fn = {"jpeg": decode_jpeg, "png": decode_png}.get(codec, decode_image)
    return fn(data, mode=mode)


def _worker_init(_: int) -> None:
    # one intra-op thread per worker: the workers are the parallelism (oversubscription
    # made per-image ops ~10x slower on 2 cores)
    torch.set_num_threads(1)


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style over the batches of one published table: index i -> (images, meta)."""

    def __init__(self, source, k: int, spec: AugmentSpec, codec: str, channels: int):
        self.source, self.k, self.spec = source, k, spec
        self.codec, self.channels = codec, channels

    def __len__(self) -> int:
        return self.source.num_batches(self.k)

    def __getitem__(self, i: int):
        payload, meta, params = self.source.batch(self.k, i)
        t0 = time.perf_counter()
        imgs = []
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders (in favour of torchcodec) on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            self._decode_all(payload, meta, params, imgs)
        decode_ns = int((time.perf_counter() - t0) * 1e9)
        return torch.stack(imgs), torch.from_numpy(meta), decode_ns

    def _decode_all(self, payload, meta, params, imgs) -> None:
        for j, buf in enumerate(payload):
            try:
                imgs.append(transform(decode(buf, self.codec, self.channels), params[j], self.spec))
            except RuntimeError:
                # undecodable bytes: deliver the filler and flag the sample as corrupt
                meta[j, 2] = 2
                imgs.append(transform(decode(self.source.filler, self.codec, self.channels),
                                      params[j], self.spec))


def iterate(source, k: int, spec: AugmentSpec, codec: str, channels: int, num_workers: int,
            prefetch: int = 2):
    """Yield (images float NCHW CPU, meta numpy, decode_ns) for each batch of table ``k``."""
    # import torchvision here, once, so forked workers inherit it (importing it in each
    # fresh worker costs ~3 s per epoch on this machine)
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401
    ds = _BatchDataset(source, k, spec, codec, channels)
    dl = torch.utils.data.DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers,
        prefetch_factor=prefetch if num_workers > 0 else None,
        persistent_workers=False, pin_memory=False, worker_init_fn=_worker_init)
    for images, meta, decode_ns in dl:
        yield images, meta.numpy(), int(decode_ns)
