"""Augmentation presets shared by the DALI and torch backends.

The random parameters of each sample (crop window, flip) are drawn here, in numpy,
from ``(seed, epoch, rank, step)`` -- not by DALI's or torchvision's own RNGs -- so that:
  * a resumed epoch replays exactly the same augmentations;
  * both backends apply the same crops and flips to the same samples.
The backends only *apply* the parameters (DALI: ``fn.slice`` + ``fn.resize`` +
``fn.crop_mirror_normalize``; torch: the same geometry with tensor ops).

Parameters per sample (:class:`AugmentParams`): ``anchor (y0, x0)``, ``shape (h, w)``, ``flip``.
  * ``pad_crop`` (cifar): absolute pixel window; ``y0, x0`` in ``[-pad, pad]`` (outside the
    image is zero-padded), ``h, w`` = output size.
  * ``rrc`` (imagenet, train): window relative to the image (``0..1``), then resized; the
    backends turn it into whole pixels with :func:`rrc_pixels` (at least one pixel, inside
    the image, so that a 1x1 image trains too).
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
        if train:
            return AugmentSpec(name, True, channels, size, "pad_crop", True, pad=pad,
                               mean=mean, std=std)
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


def sample_params(spec: AugmentSpec, n: int, seed: int, epoch: int, rank: int,
                  step: int) -> AugmentParams:
    """Per-sample augmentation parameters for one batch (see module doc)."""
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
        # relative area and aspect ratio (torchvision draws log-uniform aspect too)
        area = g.uniform(spec.scale[0], spec.scale[1], size=n)
        r = np.exp(g.uniform(np.log(spec.ratio[0]), np.log(spec.ratio[1]), size=n))
        h = np.clip(np.sqrt(area / r), 0.0, 1.0)
        w = np.clip(np.sqrt(area * r), 0.0, 1.0)
        anchor[:, 0] = g.uniform(0, 1, size=n) * (1 - h)
        anchor[:, 1] = g.uniform(0, 1, size=n) * (1 - w)
        shape[:, 0], shape[:, 1] = h, w
    if spec.flip:
        flip[:] = g.integers(0, 2, size=n)
    return AugmentParams(anchor, shape, flip)
