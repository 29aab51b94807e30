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

A gap bound G (optional; `swdpp` with `guard=True` sets it from its smallest probability)
makes "never unseen for more than G epochs in a row" a guarantee rather than a tendency:
a sample left out of the last G epochs is due, and the due samples are taken before any
other (by credit among themselves). Credits alone keep the gap near 1/p_min, but a sample whose
p_i falls (a hard sample turning easy) can sit one epoch longer; the guard moves a few
such samples ahead (tested: gap <= G over 30 annealed epochs; it cost accuracy at 30
epochs on CIFAR-10, hence off by default, docs/algorithm.md).

The credits and the epochs since each sample was last taken are the policy's state: kept
for the epoch being planned and the next one, saved in the Loader's state and restored on
resume, so a resumed or re-planned epoch gets the same selection (docs/algorithm.md,
"Carry-over credits").
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import _top_k

__all__ = ["carry_over", "Credits"]

# Credits are sums of float probabilities: two samples with the same history can differ in
# the last bits; rounding to this grid makes them tie, and ties are broken at random.
_GRID = 1e-9


def carry_over(credits: np.ndarray, p: np.ndarray, k: int, rng: np.random.Generator,
               since: np.ndarray | None = None, gap: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(ids of the K taken samples in ascending order, the credits after this epoch).
    With ``since`` (epochs since each sample was last taken) and a bound ``gap``, the
    samples left out of the last ``gap`` epochs come first."""
    c = np.add(credits, p, dtype=np.float64)
    key = np.round(c / _GRID) * _GRID
    if gap is not None and since is not None:
        due = since >= gap
        if due.any():  # above every other key, in the same order among themselves
            key = np.where(due, key + (key.max() - key.min() + 1.0), key)
    ids = np.sort(_top_k(key, int(k), rng))
    c[ids] -= 1.0
    return ids, c


class Credits:
    """The credits of one run: those at the start of the epoch last planned, and after it,
    with the epochs since each sample was last taken (the same two moments).

    `take(p, epoch, k, rng, gap)` plans `epoch` from the state at its start; asking for the
    same epoch again gives the same ids, asking for the next one moves on. A fresh object
    starts at 0 credits (and nothing overdue) at the first epoch it is asked for, or with
    `stagger` at credits drawn uniformly from [0, 1) with that epoch's generator: a random
    phase per sample, so that samples with the same probabilities (a policy's floor) come
    due in different epochs instead of all in the same one (systematic sampling with a
    random start; docs/algorithm.md, "Staggered credits").
    """

    def __init__(self, stagger: bool = False) -> None:
        self.stagger = stagger                    # start at random credits in [0, 1)
        self.epoch: int | None = None
        self.start: np.ndarray | None = None      # credits at the start of `epoch`
        self.after: np.ndarray | None = None      # credits after `epoch` (once planned)
        self.since: np.ndarray | None = None      # epochs since last taken, at the start
        self.since_after: np.ndarray | None = None

    def take(self, p: np.ndarray, epoch: int, k: int, rng: np.random.Generator,
             gap: int | None = None) -> np.ndarray:
        """The ids taken in `epoch` (see the class docstring)."""
        n = p.size
        if self.epoch is None or self.start is None:
            start = rng.random(n) if self.stagger else np.zeros(n)
            self.epoch, self.start, self.after = int(epoch), start, None
            self.since, self.since_after = np.zeros(n, np.int64), None
        elif epoch == self.epoch + 1 and self.after is not None:
            self.epoch, self.start, self.after = int(epoch), self.after, None
            self.since, self.since_after = self.since_after, None
        elif epoch != self.epoch:
            raise RuntimeError(f"the policy's credits are at epoch {self.epoch}; epochs are planned "
                               f"in order (asked for epoch {epoch}): load the state saved at epoch "
                               f"{epoch} to resume there")
        if self.start.size != n:
            raise ValueError(f"the credits are for {self.start.size} samples, the scores for {n}")
        if self.since is None or self.since.size != n:  # a state saved before session 11
            self.since = np.zeros(n, np.int64)
        ids, self.after = carry_over(self.start, p, k, rng, self.since, gap)
        self.since_after = self.since + 1
        self.since_after[ids] = 0
        return ids

    def state_dict(self) -> dict[str, Any]:
        """Torch tensors and ints (safe for torch.load(weights_only=True))."""
        import torch

        def t(a, dtype):
            return torch.from_numpy(np.array(a if a is not None else np.zeros(0), dtype))
        return {"epoch": -1 if self.epoch is None else self.epoch, "start": t(self.start, np.float64),
                "after": t(self.after, np.float64), "since": t(self.since, np.int64),
                "since_after": t(self.since_after, np.int64)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from `state_dict()` (torch tensors or numpy arrays); a state saved before
        the gap bound existed (no ``since``) restarts the count of unseen epochs at 0."""
        def arr(key: str, dtype) -> np.ndarray | None:
            if key not in sd:
                return None
            a = sd[key]
            a = np.asarray(a.numpy() if hasattr(a, "numpy") else a, dtype).reshape(-1)
            return a.copy() if a.size else None
        epoch = int(sd["epoch"])
        self.epoch = None if epoch < 0 else epoch
        self.start, self.after = arr("start", np.float64), arr("after", np.float64)
        self.since, self.since_after = arr("since", np.int64), arr("since_after", np.int64)
        for name, a in (("start", self.start), ("after", self.after)):
            if a is not None and not np.isfinite(a).all():
                raise ValueError(f"the policy state's credits ({name}) hold non-finite values")
        for name, a in (("since", self.since), ("since_after", self.since_after)):
            if a is not None and (a < 0).any():
                raise ValueError(f"the policy state's unseen-epoch counts ({name}) hold negative values")
