"""Per-epoch metrics as JSON lines (``RUN_DIR/metrics.jsonl``), one object per epoch.

Fields written by ``trainers.classify`` (see docs/training.md for the full list): epoch,
kept (planned samples), steps, samples_read, bytes_read, requests, full_samples,
full_bytes, data_wait_s, compute_s, eval_s, epoch_s, wall_s (cumulative training wall time),
train_loss, test_acc, test_loss, lr, loss_hist (histogram of per-sample training losses).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Append-only JSONL writer; each record is flushed and fsynced so a killed run keeps its lines.

    ``resume_epoch``: on resume, drop records of epochs >= it (they will be written again).
    """

    def __init__(self, path: str | os.PathLike, resume_epoch: int | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_epoch is None:
            self.path.write_text("")
        else:
            keep = [r for r in read_jsonl(self.path) if int(r.get("epoch", -1)) < resume_epoch]
            self.path.write_text("".join(json.dumps(_clean(r)) + "\n" for r in keep))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file (missing file -> empty list; a torn last line is skipped)."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def loss_histogram(losses: Iterable[np.ndarray] | np.ndarray, bins: int = 40, hi: float = 8.0) -> dict:
    """Histogram of per-sample losses on fixed bins over [0, hi] (last bin collects the tail)."""
    x = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in losses]) if not isinstance(losses, np.ndarray) else losses.ravel()
    x = x[np.isfinite(x)] if x.size else x
    edges = np.linspace(0.0, hi, bins + 1)
    counts, _ = np.histogram(np.clip(x, 0.0, hi - 1e-9), bins=edges)
    return {"edges": edges.round(6).tolist(), "counts": counts.tolist(),
            "mean": float(x.mean()) if x.size else None, "n": int(x.size)}
