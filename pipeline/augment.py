"""Augmentation presets shared by the DALI and torch backends.

The random parameters of each sample (crop window, flip) are drawn here, in numpy,
from ``(seed, epoch, rank, step)`` -- not by DALI's or torchvision's own RNGs -- so that:
  * a resumed epoch replays exactly the same augmentations;
  * both backends apply the same crops and flips to the same samples.
The backends only *apply* the parameters (DALI: ``fn.slice`` + ``fn.resize`` +
``fn.crop_mirror_normalize``; torch: the same geometry with tensor ops).

Parameters per sample, float32[5]: ``(y0, x0, h, w, flip)``.
  * ``pad_crop`` (cifar): absolute pixel window; ``y0, x0`` in ``[-pad, pad]`` (outside the
    image is zero-padded), ``h, w`` = output size.
  * ``rrc`` (imagenet, train): window relative to the image (``0..1``), then resized.
  * eval / None: unused (zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def step_rng(seed: int, epoch: int, rank: int, step: int, stream: int) -> np.random.Generator:
    """A generator owned by one (seed, epoch, rank, step) and one purpose (``stream``)."""
    return np.random.Generator(np.random.Philox(key=np.array(
        [seed & 0xFFFFFFFFFFFFFFFF, ((epoch & 0xFFFFFF) << 40) | ((rank & 0xFFFF) << 24)
         | (step & 0xFFFFFF) | (stream << 62)], dtype=np.uint64)))


def sample_params(spec: AugmentSpec, n: int, seed: int, epoch: int, rank: int,
                  step: int) -> np.ndarray:
    """Per-sample augmentation parameters float32[n, 5] for one batch (see module doc)."""
    out = np.zeros((n, 5), dtype=np.float32)
    if spec.out_size is not None:
        out[:, 2], out[:, 3] = spec.out_size
    if not spec.train or not spec.random:
        return out
    rng = step_rng(seed, epoch, rank, step, stream=1)
    if spec.mode == "pad_crop":
        out[:, 0:2] = rng.integers(-spec.pad, spec.pad + 1, size=(n, 2))
    elif spec.mode == "rrc":
        # relative area and aspect ratio (torchvision draws log-uniform aspect too)
        area = rng.uniform(spec.scale[0], spec.scale[1], size=n)
        logr = rng.uniform(np.log(spec.ratio[0]), np.log(spec.ratio[1]), size=n)
        r = np.exp(logr)
        h = np.clip(np.sqrt(area / r), 0.0, 1.0)
        w = np.clip(np.sqrt(area * r), 0.0, 1.0)
        out[:, 0] = rng.uniform(0, 1, size=n) * (1 - h)
        out[:, 1] = rng.uniform(0, 1, size=n) * (1 - w)
        out[:, 2], out[:, 3] = h, w
    if spec.flip:
        out[:, 4] = rng.integers(0, 2, size=n)
    return out
