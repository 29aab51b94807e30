"""Step 1 of the planner: systematic PPS sampling, exactly K ids with P(i) = p_i.

Pure numpy; the generator comes from the caller (the planner passes its Stream.SELECT one).
The proof of exactness and the cost of the sampling order are in docs/algorithm.md.
"""
from __future__ import annotations

import numpy as np

__all__ = ["check_probabilities", "sampling_order", "select"]


def check_probabilities(p: np.ndarray) -> int:
    """K = sum(p) after checking that p is 1-D, non-empty, in [0, 1] and sums to an integer."""
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
    k = check_probabilities(p)
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
