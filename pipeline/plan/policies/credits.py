"""Carry-over credits: systematic sampling across epochs (the selection of `rs2` and `swdpp`).

Every epoch each sample earns its inclusion probability as credit, the K samples with the
most credit are taken, and each taken sample pays 1::

    c_i <- c_i + p_i            (sum_i p_i = K)
    S   =  the K largest c_i    (ties broken uniformly at random, seeded)
    c_i <- c_i - 1  for i in S

So after E epochs sample i was visited sum_t p_i(t) - c_i times: its visits follow its
probabilities with an error bounded by its credit (tested: |c_i| stays below 1 plus the
largest p), it is never taken twice in an epoch, and with all p_i = K/N it is RS2's
sampling without replacement (a sample returns only once every other has had its turn,
give or take the epoch that straddles two rounds). Exactly K per epoch.

The credits are the policy's state: one array per epoch, kept for the epoch being planned
and the next one, saved in the Loader's state and restored on resume, so a resumed or
re-planned epoch gets the same selection (docs/algorithm.md, "Carry-over credits").
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import _top_k

__all__ = ["carry_over", "Credits"]

# Credits are sums of float probabilities: two samples with the same history can differ in
# the last bits; rounding to this grid makes them tie, and ties are broken at random.
_GRID = 1e-9


def carry_over(credits: np.ndarray, p: np.ndarray, k: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the K taken samples in ascending order, the credits after this epoch)."""
    c = np.add(credits, p, dtype=np.float64)
    ids = np.sort(_top_k(np.round(c / _GRID) * _GRID, int(k), rng))
    c[ids] -= 1.0
    return ids, c


class Credits:
    """The credits of one run: those at the start of the epoch last planned, and after it.

    `take(p, epoch, k, rng)` plans `epoch` from the credits at its start; asking for the
    same epoch again gives the same ids, asking for the next one moves on. A fresh object
    starts at 0 credits at the first epoch it is asked for.
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.start: np.ndarray | None = None      # credits at the start of `epoch`
        self.after: np.ndarray | None = None      # credits after `epoch` (once planned)

    def take(self, p: np.ndarray, epoch: int, k: int, rng: np.random.Generator) -> np.ndarray:
        """The ids taken in `epoch` (see the class docstring)."""
        n = p.size
        if self.epoch is None or self.start is None:
            self.epoch, self.start, self.after = int(epoch), np.zeros(n), None
        elif epoch == self.epoch + 1 and self.after is not None:
            self.epoch, self.start, self.after = int(epoch), self.after, None
        elif epoch != self.epoch:
            raise RuntimeError(f"the policy's credits are at epoch {self.epoch}; epochs are planned "
                               f"in order (asked for epoch {epoch}): load the state saved at epoch "
                               f"{epoch} to resume there")
        if self.start.size != n:
            raise ValueError(f"the credits are for {self.start.size} samples, the scores for {n}")
        ids, self.after = carry_over(self.start, p, k, rng)
        return ids

    def state_dict(self) -> dict[str, Any]:
        """Torch tensors and ints (safe for torch.load(weights_only=True))."""
        import torch

        t = lambda a: torch.from_numpy(np.array(a if a is not None else np.zeros(0), np.float64))  # noqa: E731
        return {"epoch": -1 if self.epoch is None else self.epoch, "start": t(self.start), "after": t(self.after)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from `state_dict()` (torch tensors or numpy arrays)."""
        def arr(key: str) -> np.ndarray | None:
            a = sd[key]
            a = np.asarray(a.numpy() if hasattr(a, "numpy") else a, np.float64).reshape(-1)
            return a.copy() if a.size else None
        epoch = int(sd["epoch"])
        self.epoch = None if epoch < 0 else epoch
        self.start, self.after = arr("start"), arr("after")
        for name, a in (("start", self.start), ("after", self.after)):
            if a is not None and not np.isfinite(a).all():
                raise ValueError(f"the policy state's credits ({name}) hold non-finite values")
