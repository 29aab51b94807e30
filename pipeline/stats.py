"""Per-epoch accounting: what was read, decoded and waited for, versus the full dataset.

An epoch's counters add up: over the parts of an epoch interrupted and resumed
(:meth:`EpochStats.merge`) and over the ranks of a DDP run (:meth:`EpochStats.all_reduce`,
or :meth:`EpochStats.total` for parts held by one process: an epoch resumed on fewer
ranks).  What a part read ahead but never delivered (the batches in flight when it
stopped) is counted apart (``*_abandoned``): those batches are read again after the
resume, so ``samples_read`` / ``bytes_read`` of a resumed epoch equal an uninterrupted one's.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Protocol

# Fields that describe the epoch or the rank rather than count anything: never added up.
_NOT_COUNTERS = frozenset({"epoch", "rank", "world_size", "resumed_at_step"})


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def sum_over_ranks(values: dict[str, Any], device: Any = None) -> dict[str, Any]:
    """Sum each number of ``values`` over the ranks of torch.distributed, keeping int/float.

    Returns a copy of ``values`` unchanged without an initialized process group. ``device``
    is where the collective runs (the rank's CUDA device for NCCL, CPU for gloo).
    """
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # no torch: a single process by definition
        return dict(values)
    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = list(values)
    # float64 holds integer counters exactly up to 2**53
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: int(v) if isinstance(values[k], numbers.Integral) else float(v)
            for k, v in zip(keys, t.tolist())}


class ReadCounts(Protocol):
    """What a reader reports (``pipeline.read`` ``ReadCounters``)."""

    samples: int
    bytes: int
    payload: int
    requests: int
    seconds: float


@dataclass
class EpochStats:
    """Counters of one epoch on one rank (sums over the backend's worker processes).

    ``dataset_*`` describe the whole dataset; ``*_fraction`` compare this rank's reads
    with its share of the full dataset (``dataset / world_size``).
    """

    epoch: int
    rank: int = 0
    world_size: int = 1
    steps: int = 0             # batches delivered
    samples_planned: int = 0   # real (non-padding) samples this rank was planned to deliver
    samples_delivered: int = 0  # real samples yielded in batches
    samples_read: int = 0      # samples whose bytes were read
    samples_corrupt: int = 0   # skipped: checksum mismatch or decode failure
    samples_padding: int = 0   # padding rows (weight 0) in the last batch / rank padding
    num_nonfinite: int = 0     # losses reported through Loader.update that were NaN/inf (ignored)
    bytes_read: int = 0        # bytes transferred from storage (payload + merge slack)
    payload_read: int = 0      # bytes of the samples themselves
    samples_abandoned: int = 0  # read for batches never delivered (the epoch was left early)
    bytes_abandoned: int = 0
    requests: int = 0          # range requests issued
    dataset_samples: int = 0
    dataset_payload: int = 0   # sum of all samples' payload bytes
    dataset_file_bytes: int = 0  # sum of all shard sizes
    read_s: float = 0.0        # seconds inside reads (summed over workers)
    decode_s: float = 0.0      # seconds decoding + augmenting (torch backend; 0 if unknown)
    wait_s: float = 0.0        # seconds the training loop waited for the next batch
    epoch_s: float = 0.0       # wall time from the epoch's start to its last batch
    resumed_at_step: int = 0
    corrupt_ids: list = field(default_factory=list)

    @property
    def merge_slack(self) -> int:
        return self.bytes_read - self.payload_read

    @property
    def samples_fraction(self) -> float:
        share = self.dataset_samples / max(self.world_size, 1)
        return self.samples_read / share if share else 0.0

    @property
    def bytes_fraction(self) -> float:
        share = self.dataset_payload / max(self.world_size, 1)
        return self.bytes_read / share if share else 0.0

    @property
    def images_per_s(self) -> float:
        return self.samples_delivered / self.epoch_s if self.epoch_s > 0 else 0.0

    def counter_names(self) -> list[str]:
        """Fields that add up over parts of an epoch and over ranks.

        Everything numeric but the epoch/rank description and the ``dataset_*`` totals
        (the same on every rank and every part).
        """
        return [f.name for f in fields(self) if f.name not in _NOT_COUNTERS
                and not f.name.startswith("dataset_") and _is_number(getattr(self, f.name))]

    def add_reads(self, c: ReadCounts) -> None:
        """Add a reader's counters (samples, bytes, payload, requests, seconds)."""
        self.samples_read += int(c.samples)
        self.bytes_read += int(c.bytes)
        self.payload_read += int(c.payload)
        self.requests += int(c.requests)
        self.read_s += float(c.seconds)

    def add_abandoned(self, c: ReadCounts) -> None:
        """Count the reads of batches read ahead but never delivered (``Backend.abandon``)."""
        self.samples_abandoned += int(c.samples)
        self.bytes_abandoned += int(c.bytes)
        self.read_s += float(c.seconds)

    @classmethod
    def total(cls, parts: list[EpochStats]) -> EpochStats:
        """Every counter of ``parts`` (one epoch, several ranks' parts) added up in this
        process, as :meth:`all_reduce` does across processes; the description and the
        ``dataset_*`` totals are the first part's."""
        if not parts:
            raise ValueError("EpochStats.total needs at least one part")
        out = replace(parts[0], corrupt_ids=[i for p in parts for i in p.corrupt_ids])
        for name in out.counter_names():
            setattr(out, name, sum(getattr(p, name) for p in parts))
        return out

    def merge(self, prior: EpochStats) -> EpochStats:
        """The whole epoch from this part (after a resume) and ``prior`` (the part before the stop).

        Counters are added, except ``samples_planned``: the resumed part plans only what was
        left, so what ``prior`` delivered is added to it. The epoch/rank description, the
        ``dataset_*`` totals and ``resumed_at_step`` are this part's.
        """
        out = replace(self, corrupt_ids=list(prior.corrupt_ids) + list(self.corrupt_ids))
        for name in self.counter_names():
            if name != "samples_planned":
                setattr(out, name, getattr(self, name) + getattr(prior, name))
        out.samples_planned = self.samples_planned + prior.samples_delivered
        return out

    def all_reduce(self, device: Any = None) -> EpochStats:
        """These stats with every counter summed over the ranks (a copy; unchanged without DDP).

        ``dataset_*`` totals are not summed. The ratio properties of the result compare all
        ranks' reads with one rank's share, so per-rank ratios come from the unreduced stats.
        """
        return replace(self, **sum_over_ranks({n: getattr(self, n) for n in self.counter_names()}, device))

    def to_json(self) -> dict:
        """The numbers of :meth:`as_dict` (derived values too, the id list left out).

        What checkpoints store: plain numbers, which ``torch.load(weights_only=True)`` accepts.
        """
        return {k: v for k, v in self.as_dict().items() if _is_number(v)}

    @classmethod
    def from_json(cls, d: dict) -> EpochStats:
        """Inverse of :meth:`to_json` (derived values are recomputed, not read)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def ratios(self) -> dict:
        """The per-rank ratios: ``samples_fraction``, ``bytes_fraction``, ``images_per_s``."""
        return dict(samples_fraction=self.samples_fraction, bytes_fraction=self.bytes_fraction,
                    images_per_s=self.images_per_s)

    def as_dict(self) -> dict:
        """Every field, plus ``merge_slack`` and :meth:`ratios`."""
        d = asdict(self)
        d.update(merge_slack=self.merge_slack, **self.ratios())
        return d

    def __str__(self) -> str:
        return (f"epoch {self.epoch} rank {self.rank}: {self.samples_delivered} samples delivered, "
                f"{self.samples_read} read ({self.samples_fraction:.1%} of full; padding rows "
                f"re-read planned samples), {self.bytes_read / 1e6:.2f} MB read "
                f"({self.bytes_fraction:.1%} of full payload) in {self.requests} requests, "
                f"{self.samples_corrupt} corrupt skipped; read {self.read_s:.2f}s, "
                f"decode {self.decode_s:.2f}s, wait {self.wait_s:.2f}s, "
                f"epoch {self.epoch_s:.2f}s ({self.images_per_s:.0f} img/s)")
