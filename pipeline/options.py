"""The Loader's less common options, grouped by the stage they configure (frozen, validated).

    pipeline.Loader(ds, 256, keep=0.7, ..., options=LoaderOptions.of(merge_gap=0, prefetch=4))

``LoaderOptions.of(**flat)`` routes each keyword to its group and refuses unknown names,
listing the allowed ones; the groups can also be built directly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Mapping

from .batch import FieldKind, LastBatch

__all__ = ["OnCorrupt", "FieldKind", "PlanOptions", "ReadOptions", "DecodeOptions", "BatchOptions",
           "LoaderOptions"]


class OnCorrupt(str, Enum):
    """What a sample whose bytes fail their checksum or decoding does to the run."""

    SKIP = "skip"    # warn once per shard, count, deliver as padding (weight 0), never read it again
    RAISE = "raise"  # stop with CorruptSampleError naming the sample and its file


def _enum(cls, value, name: str):
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in cls]}, not {value!r}") from None


@dataclass(frozen=True)
class PlanOptions:
    """Planning: policy options, shard window, ranks (default: torch.distributed), and an
    existing ``pipeline.Scores`` to plan from (default: a new one)."""

    policy_kwargs: Mapping[str, Any] = field(default_factory=dict)
    window: int = 4
    world_size: int | None = None
    rank: int | None = None
    scores: Any = None

    def __post_init__(self):
        if int(self.window) < 1:
            raise ValueError(f"window must be >= 1, got {self.window!r}")
        if self.world_size is not None and int(self.world_size) < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size!r}")
        if self.rank is not None and self.world_size is not None and not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank!r} out of range for world_size {self.world_size}")


def _field_kinds(spec) -> dict[str, FieldKind]:
    """``None`` / names / ``{name: kind}`` -> ``{name: FieldKind}`` (checked)."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        raise ValueError(f"fields must be a list of names or a {{name: kind}} mapping, not the "
                         f"string {spec!r}")
    items = spec.items() if isinstance(spec, Mapping) else ((n, FieldKind.BYTES) for n in spec)
    out = {}
    for name, kind in items:
        if not isinstance(name, str) or not name or name in out:
            raise ValueError(f"fields: {name!r} is not a field name, or is named twice")
        out[name] = _enum(FieldKind, kind, f"fields[{name!r}]")
    return out


@dataclass(frozen=True)
class ReadOptions:
    """Reading: request merging (bytes or "neighbors"; default per storage), checks, remote
    storage options, O_DIRECT, the corrupt-sample rule and the work directory.

    ``request_timeout`` (seconds without a byte from the server) and ``retries`` (with
    backoff) bound how long an http(s) read may fail before it raises (read/remote.py);
    ``max_corrupt_fraction`` of an epoch's planned samples corrupt stops the run
    (read/corrupt.py).

    ``fields``: extra members recorded in the manifest (``shard.py index --fields``) to
    deliver as ``Batch.fields``: names (as bytes) or ``{name: "bytes" | "str" | "json"}``;
    read with each planned sample, in its image's request where adjacent."""

    merge_gap: int | str | None = None
    verify_crc: bool = True
    verify_files: str | None = "size"
    storage_options: Mapping[str, Any] | None = None
    direct_io: bool = False
    on_corrupt: OnCorrupt = OnCorrupt.SKIP
    workdir: str | None = None
    request_timeout: float = 10.0
    retries: int = 3
    fields: Mapping[str, FieldKind] | tuple[str, ...] | None = None
    # stop the run when more than this fraction of an epoch's planned samples is corrupt
    # (a damaged or replaced shard, not a stray bad file); None = never stop
    max_corrupt_fraction: float | None = 0.01

    def __post_init__(self):
        object.__setattr__(self, "on_corrupt", _enum(OnCorrupt, self.on_corrupt, "on_corrupt"))
        object.__setattr__(self, "fields", _field_kinds(self.fields))
        f = self.max_corrupt_fraction
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float))
                              or not 0 <= float(f) <= 1):
            raise ValueError(f"max_corrupt_fraction must be in [0, 1] or None, not {f!r}")
        if not float(self.request_timeout) > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {self.request_timeout!r}")
        if isinstance(self.retries, bool) or int(self.retries) != self.retries or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if self.verify_files not in (None, "size", "checksum"):
            raise ValueError(f"verify_files must be 'size', 'checksum' or None, not {self.verify_files!r}")
        g = self.merge_gap
        if not (g is None or g == "neighbors" or (isinstance(g, int) and g >= 0)):
            raise ValueError(f"merge_gap must be bytes >= 0, 'neighbors' or None, not {g!r}")


def default_parallelism(device_type: str, backend: str, local_files: bool) -> tuple[int, int]:
    """``(reader processes, DALI CPU threads)`` when the caller names neither, from this
    rank's share of the cores (``os.cpu_count() / LOCAL_WORLD_SIZE``).

    By measurement (docs/benchmarks.md, "Defaults"): on a CPU-only device DALI decodes on
    the CPU, one thread per core up to 4, and local files are read in the main process;
    with a GPU the CPU threads feed the mixed decoder and the graph's CPU operators, and 8
    threads with 4 reader processes beat 4 threads with 2 by 1.3x on 16 cores (half of the
    cores as threads, up to 8; 2 readers below 8 cores)."""
    share = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    if device_type == "cuda":
        return (4 if share >= 8 else 2), max(1, min(8, share // 2))
    return (0 if (backend == "dali" and local_files) else 2), max(1, min(4, share))


@dataclass(frozen=True)
class DecodeOptions:
    """Decoding: output size override, DALI CPU threads (default: :func:`default_parallelism`),
    batches in flight per reader, how DALI starts its reader processes, and how encoded
    payloads of similar sizes reach DALI's decoder (``payload``): ``"packed"``, one
    ``[B, width]`` array (the default; the GPU graph cuts each row back with ``slice``), or
    ``"rows"``, one view per sample of that array (only its bytes; no ``slice``, but
    per-sample feed work in DALI's main thread; docs/benchmarks.md, GPU session 12)."""

    image_size: int | None = None
    num_threads: int | None = None
    prefetch: int = 2
    py_start_method: str = "fork"
    payload: str = "packed"

    def __post_init__(self):
        if int(self.prefetch) < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch!r}")
        if self.num_threads is not None and int(self.num_threads) < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads!r}")
        if self.py_start_method not in ("fork", "spawn"):
            raise ValueError(f"py_start_method must be 'fork' or 'spawn', not {self.py_start_method!r}")
        if self.payload not in ("packed", "rows"):
            raise ValueError(f"payload must be 'packed' or 'rows', not {self.payload!r}")


@dataclass(frozen=True)
class BatchOptions:
    """Batching: the last partial batch (pad or drop; drop applies to training only) and
    the Beta(alpha, alpha) of mixup's lambda."""

    last_batch: LastBatch = LastBatch.PAD
    mixup_alpha: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "last_batch", _enum(LastBatch, self.last_batch, "last_batch"))
        if not float(self.mixup_alpha) >= 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {self.mixup_alpha!r}")


@dataclass(frozen=True)
class LoaderOptions:
    """All groups, plus ``train`` (False: evaluation, see ``Loader.for_eval``)."""

    plan: PlanOptions = field(default_factory=PlanOptions)
    read: ReadOptions = field(default_factory=ReadOptions)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    batch: BatchOptions = field(default_factory=BatchOptions)
    train: bool = True

    @classmethod
    def of(cls, **flat: Any) -> "LoaderOptions":
        """Build from flat keywords (``merge_gap=0, world_size=2, ...``)."""
        groups = {"plan": PlanOptions, "read": ReadOptions, "decode": DecodeOptions,
                  "batch": BatchOptions}
        owner = {f.name: g for g, c in groups.items() for f in fields(c)}
        unknown = sorted(set(flat) - set(owner) - {"train"})
        if unknown:
            raise ValueError(f"unknown loader option(s) {unknown}; allowed: "
                             f"{sorted(owner) + ['train']}")
        kw = {g: c(**{k: v for k, v in flat.items() if owner.get(k) == g})
              for g, c in groups.items()}
        return cls(**kw, train=bool(flat.get("train", True)))
