"""Where samples lie in their files: the byte order of a dataset (pure numpy).

Both the planner (to visit selected samples shard by shard, in file order) and the reader
(to merge only neighbouring samples) need the same permutation; a ``Dataset`` computes it
once (``Dataset.byte_order`` / ``Dataset.file_rank``) from these functions.
"""
from __future__ import annotations

import numpy as np

__all__ = ["byte_order", "file_rank"]


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


def file_rank(order: np.ndarray | None, n: int) -> np.ndarray:
    """Each sample's position in byte order (the inverse of ``order``; None = identity)."""
    if order is None:
        return np.arange(n, dtype=np.int64)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order), dtype=np.int64)
    return rank
