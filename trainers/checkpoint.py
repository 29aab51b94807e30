"""Checkpoints that load with ``torch.load(weights_only=True)``.

State dicts of the model, optimizer and scheduler are already tensors and primitives. The
loader/planner state may hold numpy arrays and scalars, which the safe unpickler refuses,
so :func:`to_safe` turns every ``np.ndarray`` into ``{"__ndarray__": uint8 tensor of its
bytes, "dtype": str, "shape": list}`` (exact round trip for every numeric dtype) and numpy
scalars into Python scalars; :func:`from_safe` undoes it. Writes are atomic (temp file +
``os.replace``), so a SIGTERM during a save never leaves a truncated checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

_ND = "__ndarray__"


def to_safe(obj: Any) -> Any:
    """Recursively convert numpy arrays/scalars into types the weights-only unpickler accepts."""
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        if a.dtype.hasobject:
            raise TypeError("object arrays cannot be checkpointed safely")
        raw = torch.frombuffer(bytearray(a.tobytes()), dtype=torch.uint8) if a.nbytes else torch.empty(0, dtype=torch.uint8)
        return {_ND: raw, "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_safe(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def from_safe(obj: Any) -> Any:
    """Inverse of :func:`to_safe`."""
    if isinstance(obj, dict):
        if _ND in obj and "dtype" in obj and "shape" in obj:
            raw = obj[_ND].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {k: from_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_safe(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_safe(v) for v in obj)
    return obj


def save(state: dict, path: str | os.PathLike) -> None:
    """Atomically write ``state`` (converted with :func:`to_safe`) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(to_safe(state), tmp)
    os.replace(tmp, path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` and restore numpy arrays."""
    return from_safe(torch.load(path, map_location=map_location, weights_only=True))
