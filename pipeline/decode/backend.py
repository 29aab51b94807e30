"""The backend interface: a published epoch table in, decoded and augmented batches out.

A backend owns its whole lifecycle: its DALI pipeline or DataLoader and their worker
processes, the tables it publishes for them (read/table.py), and its recovery from a
sample that kills the decoder.  The Loader only calls::

    backend = BACKENDS[name](config)           # workers may start here (before CUDA)
    for raw in backend.start(ids, header):     # ids int64 [steps, 2, B]: ids, fill (table.py)
        ...                                    # RawBatch: images, meta, reads, decode_s, fields
    reads = backend.abandon()                  # the caller left early: stop, drain, clean up
    backend.close()                            # stop workers, for good

``start`` yields exactly one :class:`RawBatch` per row of ``ids``, in order, each row's
``meta["id"]`` equal to the planned ids ``ids[:, 0]`` (-1 = padding; a padding row carries
its fill sample ``ids[:, 1]``, or the filler, as known-bad rows do).
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import numpy as np
import torch

from ..read.ranges import ReadCounters
from ..read.sniff import pil_decodable
from ..read.source import PlannedSource
from ..read.table import EpochTable, TableHeader
from .augment import AugmentSpec

__all__ = ["Backend", "BackendConfig", "RawBatch", "decodable", "uneven_sizes"]


@dataclass(frozen=True, eq=False)
class BackendConfig:
    """What a backend needs from the Loader (validated there)."""

    source: PlannedSource
    spec: AugmentSpec
    batch_size: int
    channels: int
    device: torch.device
    workdir: str
    num_workers: int     # reader processes; 0 = read in the main process
    num_threads: int     # DALI CPU threads
    prefetch: int        # batches in flight per reader
    seed: int
    py_start_method: str  # "fork" or "spawn" for DALI's reader processes
    payload: str = "packed"  # DecodeOptions.payload: "packed" or "rows"


@dataclass
class RawBatch:
    """One decoded batch: ``images`` float NCHW (on the training device when the backend
    decodes there, else CPU), ``meta`` ``META_DTYPE [B]``, what producing it read, and the
    seconds spent decoding and augmenting (0 when the backend cannot tell); ``fields``: the
    requested extra members of each row, as raw bytes (``SourceBatch.fields``)."""

    images: torch.Tensor
    meta: np.ndarray
    reads: ReadCounters
    decode_s: float = 0.0
    fields: dict[str, list[bytes]] = field(default_factory=dict)  # SourceBatch.fields


def uneven_sizes(shapes: list[tuple[int, ...]]) -> ValueError | None:
    """The error for a batch whose images differ in size (no preset resized them), or None."""
    kinds = sorted(set(map(tuple, shapes)))
    if len(kinds) < 2:
        return None
    return ValueError(f"the images of a batch have different sizes ({kinds[0]} and {kinds[1]} among "
                      f"{len(kinds)} shapes) and a batch is one tensor: augment=None keeps each "
                      "image's size, so pass image_size= (resize and centre crop) or a preset "
                      "(\"cifar\", \"imagenet\")")


def decodable(data: bytes, codec: str) -> bool:
    """True when PIL can decode an encoded sample in a format every backend decodes (raw
    pixels always are)."""
    return codec in ("raw", "npy") or pil_decodable(data)


class Backend(ABC):
    """Base class: table naming and the bookkeeping of the table being delivered."""

    name: ClassVar[str] = "?"

    def __init__(self, config: BackendConfig):
        self.config = config
        self._serial = 0                    # tables published by this backend, ever
        self._active: EpochTable | None = None
        self._delivered = 0                 # batches of the active table yielded so far

    def _publish(self, ids: np.ndarray, header: TableHeader, name: str) -> EpochTable:
        self._serial += 1
        path = os.path.join(self.config.workdir, f"{name}.npy")
        self._active = EpochTable.publish(path, ids, header)
        self._delivered = 0
        return self._active

    def _finish(self) -> ReadCounters:
        """Forget the active table; return what its undelivered batches read."""
        t, self._active = self._active, None
        if t is None:
            return ReadCounters()
        reads = t.reads(self._delivered)
        t.remove()
        return reads

    @abstractmethod
    def start(self, ids: np.ndarray, header: TableHeader) -> Iterator[RawBatch]:
        """Deliver the batches of ``ids`` (int64 ``[steps, 2, B]``, ``BatchPlan.rows``) in order."""

    @abstractmethod
    def abandon(self) -> ReadCounters:
        """End the epoch being delivered; return the reads of batches never delivered."""

    def close(self) -> None:
        """Stop worker processes (idempotent)."""
        self.abandon()
