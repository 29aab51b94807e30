"""The epoch planner: inclusion probabilities + seed + epoch -> shard-aware, per-rank plan.

Pure numpy and deterministic: the plan depends only on (PolicyOutput, seed, epoch, manifest
file/offset columns, world_size, window, pad), never on the rank, so every rank computes the
same global plan and takes its own row. Steps (docs/algorithm.md, "The planner"):

1. selection: systematic PPS sampling over a random order -> exactly K ids, P(i) = p_i;
2. order: shards in a seeded random order, grouped into windows of `window` shards; inside a
   window the shards' samples are randomly interleaved, each shard's samples in byte order;
3. slicing: the ordered list is cut into `world_size` equal contiguous rows (remainder padded
   with id -1 / weight 0, or dropped with pad=False).

Random streams: numpy Generator(PCG64(SeedSequence([seed, epoch, stream]))), stream constants
below; global RNGs are never touched.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .policies import Policy, PolicyOutput
from .scores import Scores

__all__ = ["Plan", "make_plan", "num_steps", "EpochPlanner", "select", "sampling_order", "shard_order",
           "byte_order", "worker_batches", "rng_for"]

STREAM_POLICY, STREAM_SELECT, STREAM_ORDER = 1, 2, 3


def rng_for(seed: int, epoch: int, stream: int, *extra: int) -> np.random.Generator:
    """Independent generator for (seed, epoch, stream, *extra)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), stream, *extra])))


@dataclass
class Plan:
    """One epoch's plan. Arrays have axes [rank, position-in-rank-order].

    ids int64 (-1 = padding), weights float32 (0 for padding), mixup float32 (0 for
    padding). `num_selected` is K (drawn samples); `num_planned` the real entries kept
    (K, or fewer with pad=False).
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
        return self.ids.shape[0]

    @property
    def per_rank(self) -> int:
        return self.ids.shape[1]

    @property
    def num_planned(self) -> int:
        return int(np.count_nonzero(self.ids >= 0))

    def rank(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, weights, mixup) of rank r, in reading order."""
        if not 0 <= r < self.world_size:
            raise ValueError(f"rank {r} out of range for world_size {self.world_size}")
        return self.ids[r], self.weights[r], self.mixup[r]

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


def num_steps(k: int, world_size: int, batch_size: int, drop_last: bool, pad: bool = True) -> int:
    """Optimizer steps per epoch for K planned samples (same on every rank)."""
    if world_size < 1 or batch_size < 1:
        raise ValueError("world_size and batch_size must be >= 1")
    per_rank = -(-k // world_size) if pad else k // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def worker_batches(num_batches: int, worker: int, num_workers: int) -> np.ndarray:
    """Batch indices of one data worker: round-robin, as torch's DataLoader assigns them,
    so reading the workers' batches in turn reproduces the plan order."""
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} out of range for num_workers {num_workers}")
    return np.arange(worker, num_batches, num_workers)


# -- 1. selection ------------------------------------------------------------------------
def _validate(p: np.ndarray) -> int:
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"p must be a non-empty 1-D array, got shape {p.shape}")
    lo, hi = float(p.min()), float(p.max())
    if not (lo >= -1e-9 and hi <= 1 + 1e-9):
        raise ValueError(f"inclusion probabilities must lie in [0, 1], got [{lo}, {hi}]")
    total = float(p.sum())
    k = int(round(total))
    if abs(total - k) > 1e-6 * max(1.0, total):
        raise ValueError(f"inclusion probabilities must sum to an integer K, got {total}")
    return k


_BLOCK = 1 << 16   # samples per block of the sampling order (p block of 512 KiB stays in cache)
_CHUNK_BLOCKS = 32  # blocks processed at once: small, reused work buffers instead of O(N) ones


def _order_chunks(n: int, rng: np.random.Generator):
    """Yield the random sampling order of 0..n-1 in chunks (see `sampling_order`)."""
    b = _BLOCK
    nb = n // b
    if nb < 2:
        yield rng.permutation(n)
        return
    # int32 when ids fit: half the memory traffic of int64. a*x may wrap mod 2^32, which
    # leaves the low 16 bits (all that "& (b - 1)" keeps) exact.
    dt = np.int32 if n < 2**31 else np.int64
    a = (rng.integers(0, b // 2, nb) * 2 + 1).astype(dt)
    c = rng.integers(0, b, nb).astype(dt)
    blocks = rng.permutation(nb).astype(dt)
    tail = n - nb * b
    at = int(rng.integers(0, nb + 1)) if tail else -1     # tail's place among the blocks
    tail_perm = (nb * b + rng.permutation(tail)).astype(dt) if tail else None
    x = np.arange(b, dtype=dt)
    for lo in range(0, nb, _CHUNK_BLOCKS):
        hi = min(lo + _CHUNK_BLOCKS, nb)
        cuts = [(lo, at), None, (at, hi)] if lo <= at < hi else [(lo, hi)]
        for cut in cuts:
            if cut is None:                          # the tail goes before block `at`
                yield tail_perm
            elif cut[0] < cut[1]:
                i, j = cut
                idx = x[None, :] * a[i:j, None]
                idx += c[i:j, None]
                idx &= b - 1
                idx += (blocks[i:j] * b)[:, None]
                yield idx.reshape(-1)
    if at == nb:                                     # ... or after the last block
        yield tail_perm


def sampling_order(n: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh random order of 0..n-1 for systematic sampling, cheap at any n.

    Small n (< 2^17): a uniform random permutation. Large n: blocks of 2^16 consecutive
    ids are visited in random order, and inside a block the ids follow a random affine
    permutation x -> (a*x + c) mod 2^16 (a odd): much cheaper than a full permutation
    because every memory access stays inside one cached block, and it can be produced
    chunk by chunk. Any order gives exact inclusion probabilities; the randomness only
    makes which samples are drawn together change from epoch to epoch (the distance in
    the order between two ids of a block is (y - x) / a mod 2^16, random per epoch).
    """
    return np.concatenate(list(_order_chunks(n, rng)))


def select(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exactly K = sum(p) ids, sorted, each id i included with probability exactly p_i.

    Systematic PPS: walk the samples in a random order (`sampling_order`), lay their
    p_i end to end on [0, K) and take the points u + j (j = 0..K-1, u ~ U(0, 1)):
    sample i is taken iff a point falls in its interval; an interval of length
    p_i <= 1 holds a point with probability exactly p_i and never two. Runs chunk by
    chunk with a carried cumulative sum, so its work memory is O(chunk), not O(N).
    """
    k = _validate(p)
    n = p.size
    if k == n:
        return np.arange(n, dtype=np.int64)
    if k == 0:
        return np.empty(0, np.int64)
    total = float(np.sum(p, dtype=np.float64))
    scale = k / total                   # the cumulative sum then ends at K (forced below)
    u = rng.random()                    # drawn before the order (fixed stream layout)
    if u == 0.0:
        u = 0.5
    mask = np.zeros(n, bool)
    carry = 0.0                         # running sum of p before this chunk
    prev = 0.0                          # ceil(scaled cumsum - u) at the end of the last chunk
    done = 0
    for idx in _order_chunks(n, rng):
        cs = np.take(p, idx).astype(np.float64, copy=False)
        np.clip(cs, 0.0, 1.0, out=cs)
        np.cumsum(cs, out=cs)
        cs += carry
        carry = float(cs[-1])
        cs *= scale
        done += idx.size
        if done == n:
            cs[-1] = k                  # exact total K despite float rounding
        cs -= u
        np.ceil(cs, out=cs)             # number of points u + j below each right end
        hit = np.empty(cs.size, bool)
        hit[0] = cs[0] > prev
        np.greater(cs[1:], cs[:-1], out=hit[1:])
        prev = float(cs[-1])
        mask[idx[hit]] = True
    ids = np.flatnonzero(mask)
    if ids.size != k:  # only reachable through float rounding of an interval > 1
        raise RuntimeError(f"systematic sampling drew {ids.size} samples instead of {k}")
    return ids


# -- 2. shard-aware order ----------------------------------------------------------------
def byte_order(file: np.ndarray, offset: np.ndarray) -> np.ndarray | None:
    """Permutation sorting ids by (file, offset), or None if ids already are in that order
    (the converter writes them so; then no sort is needed)."""
    file = np.asarray(file)
    offset = np.asarray(offset)
    if file.size < 2:
        return None
    df = np.diff(file.astype(np.int64))
    same = df == 0
    if np.all(df >= 0) and np.all(offset[1:][same] > offset[:-1][same]):
        return None
    return np.lexsort((offset, file))


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


# -- 3. plan -------------------------------------------------------------------------------
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
    sel_rng = rng_for(seed, epoch, STREAM_SELECT)
    if out.hard:
        ids = np.flatnonzero(p >= 0.5)
        if ids.size != _validate(p) or np.count_nonzero((p > 0) & (p < 1)):
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
    per_rank = -(-k // world_size) if pad else k // world_size
    total = per_rank * world_size
    flat_ids = np.full(max(total, k), -1, np.int64)
    shard_order(ids, file, rng_for(seed, epoch, STREAM_ORDER), window, out=flat_ids[:k])
    del ids
    flat_ids = flat_ids[:total]               # pad=False: drop the remainder
    flat_w = np.zeros(total, np.float32)
    flat_m = np.zeros(total, np.float32)
    m = min(k, total)
    np.take(out.weight, flat_ids[:m], out=flat_w[:m])
    np.take(out.mixup, flat_ids[:m], out=flat_m[:m])
    shape = (world_size, per_rank)
    return Plan(int(epoch), int(k), flat_ids.reshape(shape), flat_w.reshape(shape), flat_m.reshape(shape),
                seed=int(seed), window=int(window))


class EpochPlanner:
    """Policy + scores + manifest columns -> Plan per epoch (pure: never syncs scores).

    The Loader calls `scores.sync()` at the start of every epoch, then `plan(epoch)`.
    """

    def __init__(self, policy: Policy, scores: Scores, file: np.ndarray, offset: np.ndarray, seed: int,
                 world_size: int = 1, window: int = 8, pad: bool = True) -> None:
        if len(file) != len(scores) or len(offset) != len(scores):
            raise ValueError(f"manifest has {len(file)} rows but scores has {len(scores)} samples")
        self.policy, self.scores = policy, scores
        self.file, self.offset = file, offset
        self.seed, self.world_size, self.window, self.pad = int(seed), int(world_size), int(window), bool(pad)
        self._order = byte_order(file, offset)  # cached: the manifest does not change

    def policy_output(self, epoch: int) -> PolicyOutput:
        return self.policy(self.scores, epoch, rng_for(self.seed, epoch, STREAM_POLICY))

    def plan(self, epoch: int) -> Plan:
        out = self.policy_output(epoch)
        plan = make_plan(out, seed=self.seed, epoch=epoch, file=self.file, offset=self.offset,
                         world_size=self.world_size, window=self.window, pad=self.pad, order=self._order)
        expected = self.policy.num_selected(len(self.scores), epoch)
        if plan.num_selected != expected:
            raise RuntimeError(f"policy {self.policy.name!r} produced K={plan.num_selected} in epoch "
                               f"{epoch}, but announced {expected}")
        return plan

    def steps_per_epoch(self, epoch: int, batch_size: int, drop_last: bool) -> int:
        k = self.policy.num_selected(len(self.scores), epoch)
        return num_steps(k, self.world_size, batch_size, drop_last, pad=self.pad)

    def schedule(self, batch_size: int, drop_last: bool) -> list[int]:
        """Steps of every epoch (needs policy.epochs): for building an LR schedule up front."""
        if self.policy.epochs is None:
            raise ValueError("schedule() needs the policy's number of epochs")
        return [self.steps_per_epoch(e, batch_size, drop_last) for e in range(self.policy.epochs)]
