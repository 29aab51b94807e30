"""The one random-stream scheme of the library: every random choice has its own stream.

A generator is owned by ``(seed, epoch, stream, *extra)`` (``extra``: rank, step, ...), so a
result never depends on how many draws another part of the library made, a resumed epoch
replays the same draws, and global RNGs are never touched::

    rng(seed, epoch, Stream.SELECT)                  # planner: which samples
    rng(seed, epoch, Stream.AUGMENT, rank, step)     # decode: crop windows and flips
    rng(seed, epoch, Stream.MIXUP, rank, step)       # batch: mixup pairs and lambdas

numpy ``Generator(PCG64(SeedSequence([seed, epoch, stream, *extra])))``; all inputs must be
non-negative integers.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

__all__ = ["Stream", "rng"]


class Stream(IntEnum):
    """What a generator is for (values are part of the seeding: never renumber)."""

    POLICY = 1    # a policy's own random choices (ties, exploration)
    SELECT = 2    # the planner's systematic sampling
    ORDER = 3     # the planner's shard-aware order
    AUGMENT = 4   # per-sample augmentation parameters (per rank and step)
    MIXUP = 5     # mixup partners and lambdas (per rank and step)


def rng(seed: int, epoch: int, stream: Stream, *extra: int) -> np.random.Generator:
    """An independent generator for ``(seed, epoch, stream, *extra)``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [int(seed), int(epoch), int(stream), *(int(x) for x in extra)])))
