"""Per-epoch accounting: what was read, decoded and waited for, versus the full dataset."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class EpochStats:
    """Counters of one epoch on one rank (sums over the backend's worker processes).

    ``dataset_*`` describe the whole dataset; ``*_fraction`` compare this rank's reads
    with its share of the full dataset (``dataset / world_size``).
    """

    epoch: int
    rank: int = 0
    world_size: int = 1
    steps: int = 0
    samples_planned: int = 0   # real (non-padding) samples this rank was planned to deliver
    samples_delivered: int = 0  # real samples yielded in batches
    samples_read: int = 0      # samples whose bytes were read
    samples_corrupt: int = 0   # skipped: checksum mismatch or decode failure
    samples_padding: int = 0   # padding rows (weight 0) in the last batch / rank padding
    bytes_read: int = 0        # bytes transferred from storage (payload + merge slack)
    payload_read: int = 0      # bytes of the samples themselves
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

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(merge_slack=self.merge_slack, samples_fraction=self.samples_fraction,
                 bytes_fraction=self.bytes_fraction, images_per_s=self.images_per_s)
        return d

    def __str__(self) -> str:
        return (f"epoch {self.epoch} rank {self.rank}: {self.samples_delivered} samples "
                f"({self.samples_fraction:.1%} of full), read {self.bytes_read / 1e6:.2f} MB "
                f"({self.bytes_fraction:.1%} of full payload) in {self.requests} requests, "
                f"{self.samples_corrupt} corrupt skipped; read {self.read_s:.2f}s, "
                f"decode {self.decode_s:.2f}s, wait {self.wait_s:.2f}s, "
                f"epoch {self.epoch_s:.2f}s ({self.images_per_s:.0f} img/s)")
