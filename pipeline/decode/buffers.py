"""Output buffers a backend reuses once nothing else holds their memory.

A fresh batch-sized tensor per batch costs page faults on every batch (allocations this
large are mapped and unmapped by malloc each time), which on large images is several
times the cost of the copy into it.  A pooled buffer is handed out again only when no one
outside the pool holds it: neither the tensor object (a Batch, a list the caller kept)
nor its memory (a view, a slice); so a caller never sees a batch's data change.
"""
from __future__ import annotations

import sys

import torch

__all__ = ["TensorPool"]

# reference counts of a pooled tensor that only the pool holds, as seen inside take():
# the pool's list, the loop variable, getrefcount's argument; and for its storage the
# tensor's own reference plus the temporary storage object
_FREE_REFS = 3
_FREE_STORAGE_USES = 2


def _storage_uses(t: torch.Tensor) -> int | None:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else int(use_count(t.untyped_storage()._cdata))


class TensorPool:
    """At most ``capacity`` buffers; beyond that (all in use) a fresh tensor is returned."""

    def __init__(self, capacity: int = 4):
        self.capacity = int(capacity)
        self._bufs: list[torch.Tensor] = []
        self.allocated = 0   # buffers ever allocated (for tests and benchmarks)

    def take(self, shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A tensor of ``shape`` that no one else holds (contents undefined)."""
        shape = tuple(int(s) for s in shape)
        for t in self._bufs:
            if (t.shape == shape and t.dtype == dtype and t.device == torch.device(device)
                    and sys.getrefcount(t) == _FREE_REFS and _storage_uses(t) == _FREE_STORAGE_USES):
                return t
        t = torch.empty(shape, dtype=dtype, device=device)
        self.allocated += 1
        if _storage_uses(t) is not None:
            if len(self._bufs) >= self.capacity:
                self._bufs.pop(0)  # e.g. the shape changed: forget the oldest
            self._bufs.append(t)
        return t
