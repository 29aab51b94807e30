"""The epoch planner: inclusion probabilities + seed + epoch -> shard-aware, per-rank plan.

Pure numpy and deterministic: the plan depends only on (PolicyOutput, seed, epoch, manifest
file/offset columns, world_size, window, pad), never on the rank, so every rank computes the
same global plan and takes its own row. Steps (docs/algorithm.md, "The planner"):

1. selection (`sampling.select`): systematic PPS sampling -> exactly K ids, P(i) = p_i;
2. order: shards in a seeded random order, grouped into windows of `window` shards; inside a
   window the shards' samples are randomly interleaved, each shard's samples in byte order;
3. slicing: the ordered list is cut into `world_size` equal contiguous rows (remainder padded
   with id -1 / weight 0, or dropped with pad=False).

`eval_plan` is the evaluation counterpart: every sample once, in byte order, through the same
slicing. `reslice` / `remaining_plan` re-cut what is left of an epoch for another number of
ranks (an epoch resumed on a different world size). Random streams: `pipeline.streams.rng` with Stream.POLICY / SELECT / ORDER; global
RNGs are never touched.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..formats.layout import byte_order
from ..streams import Stream, rng
from .policies.base import Policy, PolicyOutput
from .sampling import check_probabilities, select
from .scores import Scores

__all__ = ["Plan", "RankPlan", "make_plan", "eval_plan", "num_steps", "EpochPlanner", "shard_order",
           "worker_batches", "reslice", "remaining_plan"]


class RankPlan(NamedTuple):
    """One rank's row of a plan, in reading order (-1 / 0 / 0 on padding)."""

    ids: np.ndarray
    weights: np.ndarray
    mixup: np.ndarray


@dataclass
class Plan:
    """One epoch's plan. Arrays have axes [rank, position-in-rank-order].

    ids int64 (-1 = padding), weights float32 (0 for padding), mixup float32 (0 for
    padding). `num_selected` is K (drawn samples); `num_planned` the real entries kept
    (K, or fewer with pad=False). `window` 0 marks an evaluation plan (plain byte order).
    """

    epoch: int
    num_selected: int
    ids: np.ndarray
    weights: np.ndarray
    mixup: np.ndarray
    seed: int = 0
    window: int = 8
    _digest: str | None = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        """Number of rows (ranks)."""
        return self.ids.shape[0]

    @property
    def per_rank(self) -> int:
        """Entries per rank, padding included."""
        return self.ids.shape[1]

    @property
    def num_planned(self) -> int:
        """Real (non-padding) entries over all ranks."""
        return int(np.count_nonzero(self.ids >= 0))

    def rank(self, r: int) -> RankPlan:
        """(ids, weights, mixup) of rank r, in reading order."""
        if not 0 <= r < self.world_size:
            raise ValueError(f"rank {r} out of range for world_size {self.world_size}")
        return RankPlan(self.ids[r], self.weights[r], self.mixup[r])

    @property
    def digest(self) -> str:
        """blake2b-128 of epoch, K and the ids/weights/mixup bytes (computed once, lazily)."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(np.array([self.epoch, self.num_selected, *self.ids.shape], np.int64).tobytes())
            for a in (self.ids, self.weights, self.mixup):
                h.update(np.ascontiguousarray(a).data)
            self._digest = h.hexdigest()
        return self._digest


def _per_rank(k: int, world_size: int, pad: bool) -> int:
    """Entries per rank for K planned samples: padded up, or the remainder dropped."""
    return -(-k // world_size) if pad else k // world_size


def num_steps(k: int, world_size: int, batch_size: int, drop_last: bool, pad: bool = True) -> int:
    """Optimizer steps per epoch for K planned samples (same on every rank)."""
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be >= 1")
    per_rank = _per_rank(k, world_size, pad)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def worker_batches(num_batches: int, worker: int, num_workers: int) -> np.ndarray:
    """Batch indices of one data worker: round-robin, as torch's DataLoader assigns them,
    so reading the workers' batches in turn reproduces the plan order."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} out of range for num_workers {num_workers}")
    return np.arange(worker, num_batches, num_workers)


# -- 2. shard-aware order ----------------------------------------------------------------
def shard_order(ids: np.ndarray, file: np.ndarray, rng: np.random.Generator, window: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """Reorder ids (given in byte order) shard-aware, into `out` (allocated if None).

    Shards are visited in a random order, `window` at a time; inside a window the
    samples of its shards are interleaved uniformly at random (shuffle the multiset of
    shard labels, then give each label occurrence the next sample of that shard), which
    keeps each shard's samples in byte order while batches mix `window` shards.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    k = ids.size
    if out is None:
        out = np.empty(k, ids.dtype)
    if k == 0:
        return out
    f = np.take(file, ids)                    # non-decreasing: ids are in byte order
    n_files = int(f[-1]) + 1
    bounds = np.searchsorted(f, np.arange(n_files + 1))
    del f
    starts, counts = bounds[:-1], np.diff(bounds)
    visit = rng.permutation(n_files)
    visit = visit[counts[visit] > 0]          # shards with selected samples, in visit order
    pos = 0
    for g in range(0, visit.size, window):
        group = visit[g:g + window]
        lens = counts[group]
        m = int(lens.sum())
        dst = out[pos:pos + m]
        if group.size == 1:
            dst[:] = ids[starts[group[0]]:starts[group[0]] + m]
        else:
            seg = np.concatenate([ids[starts[s]:starts[s] + n] for s, n in zip(group, lens)])
            lab = np.repeat(np.arange(group.size, dtype=np.uint8 if window < 256 else np.int32), lens)
            rng.shuffle(lab)
            # stable sort of the labels (radix for uint8): its j-th entry is the position
            # of the j-th sample of the window's concatenated (label-ordered) segments
            dst[np.argsort(lab, kind="stable")] = seg
        pos += m
    return out


# -- 3. slicing and plans -----------------------------------------------------------------
def _slots(k: int, world_size: int, pad: bool) -> tuple[np.ndarray, int]:
    """(id buffer, entries per rank) for K ordered ids cut into `world_size` equal rows.

    The caller writes its ordered ids into buffer[:K] in place (no second O(K) id array);
    the rest of the buffer is padding (-1). With pad=False the remainder is dropped later.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    per_rank = _per_rank(k, world_size, pad)
    return np.full(max(per_rank * world_size, k), -1, np.int64), per_rank


def _rows(flat_ids: np.ndarray, k: int, world_size: int, per_rank: int, weight: np.ndarray | float,
          mixup: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The [rank, position] ids / weights / mixup of a filled `_slots` buffer.

    `weight` / `mixup`: per-sample arrays indexed by id, or one value for every real
    entry; padding gets weight 0 and mixup 0.
    """
    total = per_rank * world_size
    flat_ids = flat_ids[:total]               # pad=False: drop the remainder
    m = min(k, total)
    cols = []
    for src in (weight, mixup):
        col = np.zeros(total, np.float32)
        if np.ndim(src) == 0:
            col[:m] = src
        else:
            np.take(src, flat_ids[:m], out=col[:m])
        cols.append(col.reshape(world_size, per_rank))
    return flat_ids.reshape(world_size, per_rank), cols[0], cols[1]


def make_plan(out: PolicyOutput, *, seed: int, epoch: int, file: np.ndarray, offset: np.ndarray,
              world_size: int = 1, window: int = 8, pad: bool = True,
              order: np.ndarray | None | str = "auto") -> Plan:
    """The epoch plan for a policy output (see the module docstring).

    `order`: the (file, offset) sort permutation from `byte_order` (None = ids already in
    byte order); "auto" computes it (EpochPlanner caches it across epochs).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    p = np.asarray(out.p)
    n = p.size
    if len(file) != n or len(offset) != n:
        raise ValueError(f"file/offset have {len(file)}/{len(offset)} rows, probabilities {n}")
    if isinstance(order, str):
        order = byte_order(file, offset)
    sel_rng = rng(seed, epoch, Stream.SELECT)
    if out.hard:
        ids = np.flatnonzero(p >= 0.5)
        if ids.size != check_probabilities(p) or np.count_nonzero((p > 0) & (p < 1)):
            raise ValueError("a hard policy output must hold only 0 and 1 probabilities")
    else:
        ids = select(p, sel_rng)
    k = ids.size
    if order is not None:  # express the selection in byte order without sorting
        inv_mask = np.zeros(n, bool)
        inv = np.empty(n, np.int64)
        inv[order] = np.arange(n)
        inv_mask[inv[ids]] = True
        ids = order[np.flatnonzero(inv_mask)]
    flat_ids, per_rank = _slots(k, world_size, pad)
    shard_order(ids, file, rng(seed, epoch, Stream.ORDER), window, out=flat_ids[:k])
    del ids                                   # freed before the weight columns are allocated
    rows = _rows(flat_ids, k, world_size, per_rank, out.weight, out.mixup)
    return Plan(int(epoch), int(k), *rows, seed=int(seed), window=int(window))


def eval_plan(n: int, order: np.ndarray | None, world_size: int) -> Plan:
    """Every sample once, in byte order, cut into `world_size` equal contiguous rows.

    `order`: the permutation from `byte_order` (None = ids already in byte order). Real
    entries get weight 1 and mixup 0; the remainder is padded with -1 / 0 / 0.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if order is not None and len(order) != n:
        raise ValueError(f"order has {len(order)} entries for {n} samples")
    flat_ids, per_rank = _slots(n, world_size, pad=True)
    flat_ids[:n] = np.arange(n) if order is None else order
    rows = _rows(flat_ids, n, world_size, per_rank, 1.0, 0.0)
    return Plan(0, n, *rows, seed=0, window=0)


def reslice(plan: Plan, consumed: int, world_size: int) -> Plan:
    """What is left of `plan` once every rank consumed the first `consumed` entries of its
    row, cut into `world_size` equal contiguous rows (padding -1 / 0 / 0 at the end).

    A plan's rows are consecutive pieces of one ordered list, padded only at its end, so
    the rows' remainders taken in rank order keep that order (and its shard locality):
    nothing left is lost or repeated. `reslice(plan, 0, w)` is the plan `make_plan` gives
    for `w` ranks. Pure: every rank computes the same rows.
    """
    if consumed < 0:
        raise ValueError(f"consumed must be >= 0, got {consumed}")
    ids = plan.ids[:, consumed:].reshape(-1)
    real = ids >= 0
    k = int(real.sum())
    flat, per_rank = _slots(k, world_size, pad=True)
    flat[:k] = ids[real]
    total = per_rank * world_size
    cols = []
    for a in (plan.weights, plan.mixup):
        col = np.zeros(total, np.float32)
        col[:k] = a[:, consumed:].reshape(-1)[real]
        cols.append(col.reshape(world_size, per_rank))
    return Plan(plan.epoch, plan.num_selected, flat[:total].reshape(world_size, per_rank), *cols,
                seed=plan.seed, window=plan.window)


def remaining_plan(plan: Plan, segments, batch_size: int, world_size: int) -> Plan:
    """The rest of an epoch after `segments`, cut for `world_size` ranks.

    `segments`: the epoch's earlier parts in order, `(ranks, steps)` each: that part ran
    on `ranks` rows (the remainder before it re-sliced, `reslice`) and every rank consumed
    `steps` batches of `batch_size` entries. With `LastBatch.DROP` a part's dropped tail is
    still left and goes into the next part.
    """
    for ranks, steps in segments:
        plan = reslice(reslice(plan, 0, int(ranks)), int(steps) * batch_size, int(ranks))
    return reslice(plan, 0, world_size)


class EpochPlanner:
    """Policy + scores + manifest columns -> Plan per epoch (pure: never syncs scores).

    The Loader calls `scores.sync()` at the start of every epoch, then `plan(epoch)`.
    """

    def __init__(self, policy: Policy, scores: Scores, file: np.ndarray, offset: np.ndarray, seed: int,
                 world_size: int = 1, window: int = 8, pad: bool = True,
                 order: np.ndarray | None | str = "auto") -> None:
        """`order`: the manifest's `byte_order` permutation if already known (None = ids in
        byte order); "auto" computes it here."""
        if len(file) != len(scores) or len(offset) != len(scores):
            raise ValueError(f"manifest has {len(file)} rows but scores has {len(scores)} samples")
        if not isinstance(order, str) and order is not None and len(order) != len(scores):
            raise ValueError(f"order has {len(order)} entries but scores has {len(scores)} samples")
        self.policy, self.scores = policy, scores
        self.file, self.offset = file, offset
        self.seed, self.world_size, self.window, self.pad = int(seed), int(world_size), int(window), bool(pad)
        # cached: the manifest does not change between epochs
        self._order = byte_order(file, offset) if isinstance(order, str) else order
        self._past_warned = self._blind_warned = False

    def policy_output(self, epoch: int) -> PolicyOutput:
        """The policy's output for `epoch` from the current (synced) scores."""
        return self.policy(self.scores, epoch, rng(self.seed, epoch, Stream.POLICY))

    def plan(self, epoch: int) -> Plan:
        """The plan of `epoch`; raises RuntimeError if the policy's K differs from the announced one."""
        epochs = self.policy.epochs
        if self.policy.uses_epochs and epochs is not None and epoch >= epochs and not self._past_warned:
            self._past_warned = True
            n = len(self.scores)
            warnings.warn(f"epoch {epoch} is past the {epochs} epoch(s) the policy {self.policy.name!r} was "
                          f"made for (epochs={epochs}): it spreads its budget and schedule over those, so "
                          f"this epoch follows its last epoch's rule and reads "
                          f"{self.policy.num_selected(n, epoch)} of {n} samples, outside the run's "
                          f"budget; pass the run's length as epochs (Loader(..., epochs=N))", RuntimeWarning, stacklevel=3)
        if (epoch >= 1 and self.policy.uses_scores and not self._blind_warned
                and not np.any(self.scores.count)):
            self._blind_warned = True
            warnings.warn(f"epoch {epoch}: no losses have been reported (Loader.update(batch.ids, "
                          f"losses) after each step), so policy {self.policy.name!r} plans from empty "
                          "scores: it prunes without knowing which samples are hard",
                          RuntimeWarning, stacklevel=3)
        out = self.policy_output(epoch)
        plan = make_plan(out, seed=self.seed, epoch=epoch, file=self.file, offset=self.offset,
                         world_size=self.world_size, window=self.window, pad=self.pad, order=self._order)
        expected = self.policy.num_selected(len(self.scores), epoch)
        if plan.num_selected != expected:
            raise RuntimeError(f"policy {self.policy.name!r} produced K={plan.num_selected} in epoch "
                               f"{epoch}, but announced {expected}")
        return plan

    def steps_per_epoch(self, epoch: int, batch_size: int, drop_last: bool) -> int:
        """Optimizer steps of `epoch` on every rank (known before the epoch)."""
        k = self.policy.num_selected(len(self.scores), epoch)
        return num_steps(k, self.world_size, batch_size, drop_last, pad=self.pad)

    def schedule(self, batch_size: int, drop_last: bool) -> list[int]:
        """Steps of every epoch (needs policy.epochs): for building an LR schedule up front."""
        if self.policy.epochs is None:
            raise ValueError("schedule() needs the policy's number of epochs")
        return [self.steps_per_epoch(e, batch_size, drop_last) for e in range(self.policy.epochs)]
