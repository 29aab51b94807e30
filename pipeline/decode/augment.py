"""Augmentation presets shared by the DALI and torch backends.

The random parameters of each sample (crop window, flip) are drawn here, in numpy,
from ``(seed, epoch, rank, step)`` -- not by DALI's or torchvision's own RNGs -- so that:
  * a resumed epoch replays exactly the same augmentations;
  * both backends apply the same crops and flips to the same samples.
The backends only *apply* the parameters (DALI: ``fn.slice`` + ``fn.resize`` +
``fn.crop_mirror_normalize``; torch: the same geometry with tensor ops).

Parameters per sample (:class:`AugmentParams`): ``anchor (y0, x0)``, ``shape (h, w)``, ``flip``.
  * ``pad_crop`` (cifar): absolute pixel window; ``y0, x0`` in ``[-pad, pad]`` (outside the
    image is zero-padded), ``h, w`` = output size.  Images not of the output size are first
    resized (shorter side) and centre-cropped to it, as evaluation does (``resize_shorter``).
  * ``rrc`` (imagenet, train): window relative to the image (``0..1``), then resized; drawn
    as torchvision's ``RandomResizedCrop`` does, in pixels, where the caller knows each
    image's size (the backends read it from the header: formats/imagesize.py); the
    backends turn it into whole pixels with :func:`rrc_pixels` (at least one pixel, inside
    the image, so that a 1x1 image trains too), which gives back the drawn pixels.
  * eval / None: unused (zeros).
Random stream: ``streams.rng(seed, epoch, Stream.AUGMENT, rank, step)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..streams import Stream, rng

CIFAR_MEAN = (125.307, 122.961, 113.8575)
CIFAR_STD = (51.5865, 50.847, 51.255)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
PRESETS = ("cifar", "imagenet", None)


@dataclass(frozen=True)
class AugmentSpec:
    """What a backend must do to a decoded HWC uint8 image."""

    name: str | None
    train: bool
    channels: int
    out_size: tuple[int, int] | None   # (H, W) of the output; None = keep the input size
    mode: str                          # "pad_crop" | "rrc" | "resize_center" | "none"
    flip: bool
    pad: int = 0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize_shorter: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (255.0,)

    @property
    def random(self) -> bool:
        """True when per-sample parameters matter (training presets)."""
        return self.mode in ("pad_crop", "rrc") or self.flip


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if channels == len(values):
        return tuple(values)
    return (float(np.mean(values)),) * channels


def get_augment(name: str | None, train: bool, channels: int,
                sample_shape: tuple[int, ...] | None, image_size: int | None = None,
                pad: int = 4) -> AugmentSpec:
    """Build the spec of preset ``name`` ("cifar", "imagenet" or None) for a dataset."""
    hw = tuple(sample_shape[:2]) if sample_shape else None
    if name == "cifar":
        size = (image_size, image_size) if image_size else hw
        if size is None:
            raise ValueError('augment="cifar" needs fixed-size samples or image_size=')
        mean, std = _per_channel(CIFAR_MEAN, channels), _per_channel(CIFAR_STD, channels)
        # images of another size (or of varied sizes) are first brought to the output size
        # as evaluation brings them (shorter side, centre crop), then padded and cropped;
        # cutting the window straight from a larger image would train on its top-left corner
        fit = None if size == hw else size[0]
        if train:
            return AugmentSpec(name, True, channels, size, "pad_crop", True, pad=pad,
                               resize_shorter=fit, mean=mean, std=std)
        return AugmentSpec(name, False, channels, size, "none" if size == hw else "resize_center",
                           False, resize_shorter=size[0], mean=mean, std=std)
    if name == "imagenet":
        s = image_size or 224
        mean, std = _per_channel(IMAGENET_MEAN, channels), _per_channel(IMAGENET_STD, channels)
        if train:
            return AugmentSpec(name, True, channels, (s, s), "rrc", True, mean=mean, std=std)
        return AugmentSpec(name, False, channels, (s, s), "resize_center", False,
                           resize_shorter=int(round(s * 256 / 224)), mean=mean, std=std)
    if name is None:
        size = (image_size, image_size) if image_size else None
        mode = "resize_center" if size else "none"
        return AugmentSpec(None, train, channels, size, mode, False,
                           resize_shorter=size[0] if size else None,
                           mean=(0.0,) * channels, std=(255.0,) * channels)
    raise ValueError(f"unknown augment preset {name!r}; choose one of {PRESETS}")


def rrc_pixels(rel, size, hw, minimum=np.minimum, maximum=np.maximum, floor=np.floor):
    """A relative random-resized-crop window -> ``(anchor, size)`` in whole pixels, each
    ``(y, x)``: ``anchor = min(round(rel * hw), hw - 1)``, ``size = max(1, min(hw - anchor,
    round(size * hw)))``, rounding half up.  The element-wise functions are numpy's by
    default; the DALI graph passes ``nvidia.dali.math``'s, so both backends cut the same
    pixels."""
    anchor = minimum(floor(rel * hw + 0.5), hw - 1)
    return anchor, maximum(minimum(hw - anchor, floor(size * hw + 0.5)), 1.0)


@dataclass
class AugmentParams:
    """One batch's per-sample parameters: ``anchor`` float32 [B, 2] ``(y0, x0)``, ``shape``
    float32 [B, 2] ``(h, w)``, ``flip`` int32 [B] (1 = mirror)."""

    anchor: np.ndarray
    shape: np.ndarray
    flip: np.ndarray


def _rrc_windows(spec: AugmentSpec, g: np.random.Generator, n: int, hw: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Relative random-resized-crop windows ``(anchor, shape)`` float64 ``[n, 2]``.

    Where the image's size is known (``hw[j]`` > 0), torchvision's ``RandomResizedCrop``
    (and DALI's ``random_crop`` generator): up to 10 attempts at an area in ``scale`` of
    the image's pixels and an aspect ratio log-uniform in ``ratio`` (width / height, in
    pixels); the first that fits, else the whole image with its ratio clamped to
    ``ratio``, centred; the anchor is uniform over the positions where the window fits.
    Where it is not (a header that does not parse), the first attempt in relative
    coordinates, clipped to the image (aspect ratios relative to the image's own).  The
    draws do not depend on ``hw``: the same stream whatever the images."""
    area = g.uniform(spec.scale[0], spec.scale[1], size=(n, 10))
    r = np.exp(g.uniform(np.log(spec.ratio[0]), np.log(spec.ratio[1]), size=(n, 10)))
    u = g.uniform(0, 1, size=(n, 2))
    h = np.clip(np.sqrt(area[:, 0] / r[:, 0]), 0.0, 1.0)
    w = np.clip(np.sqrt(area[:, 0] * r[:, 0]), 0.0, 1.0)
    anchor = np.stack([u[:, 0] * (1 - h), u[:, 1] * (1 - w)], axis=1)
    shape = np.stack([h, w], axis=1)
    known = np.flatnonzero((hw > 0).all(axis=1)) if hw is not None else np.zeros(0, np.int64)
    if known.size:
        H, W = (hw[known, 0:1].astype(np.float64), hw[known, 1:2].astype(np.float64))
        px = area[known] * H * W
        cw, ch = np.round(np.sqrt(px * r[known])), np.round(np.sqrt(px / r[known]))
        fits = (cw > 0) & (ch > 0) & (cw <= W) & (ch <= H)
        first = fits.argmax(axis=1)
        pick = np.arange(known.size)
        ph, pw = ch[pick, first], cw[pick, first]
        H, W = H[:, 0], W[:, 0]
        top, left = np.floor(u[known, 0] * (H - ph + 1)), np.floor(u[known, 1] * (W - pw + 1))
        miss = ~fits.any(axis=1)
        if miss.any():  # torchvision's fallback: the whole image, ratio clamped, centred
            ratio = W[miss] / H[miss]
            lo, hi = spec.ratio
            fw = np.where(ratio < lo, W[miss], np.where(ratio > hi, np.round(H[miss] * hi), W[miss]))
            fh = np.where(ratio < lo, np.round(W[miss] / lo), H[miss])
            ph[miss], pw[miss] = fh, fw
            top[miss], left[miss] = (H[miss] - fh) // 2, (W[miss] - fw) // 2
        anchor[known] = np.stack([top / H, left / W], axis=1)
        shape[known] = np.stack([ph / H, pw / W], axis=1)
    return anchor, shape


def sample_params(spec: AugmentSpec, n: int, seed: int, epoch: int, rank: int,
                  step: int, hw: np.ndarray | None = None) -> AugmentParams:
    """Per-sample augmentation parameters for one batch (see module doc); ``hw`` int
    ``[n, 2]``: each image's (height, width) where known (0: unknown), for "rrc"."""
    anchor = np.zeros((n, 2), dtype=np.float32)
    shape = np.zeros((n, 2), dtype=np.float32)
    flip = np.zeros(n, dtype=np.int32)
    if spec.out_size is not None:
        shape[:] = spec.out_size
    if not spec.train or not spec.random:
        return AugmentParams(anchor, shape, flip)
    g = rng(seed, epoch, Stream.AUGMENT, rank, step)
    if spec.mode == "pad_crop":
        anchor[:] = g.integers(-spec.pad, spec.pad + 1, size=(n, 2))
    elif spec.mode == "rrc":
        anchor[:], shape[:] = _rrc_windows(spec, g, n, hw)
    if spec.flip:
        flip[:] = g.integers(0, 2, size=n)
    return AugmentParams(anchor, shape, flip)
