"""Streaming data loader that reads only the samples an SwDPP epoch plan selects.

Modules follow the data's path:

    formats/    writers for WebDataset tar shards and Zarr v3 stores (used by tools/shard.py)
    manifest    the per-sample location table (file, offset, length, label) and `open_dataset`
    scores      per-sample learning dynamics (EMA loss, variability, last seen), DDP sync
    policies    scores -> inclusion probabilities / loss weights / mixup probabilities (registry)
    planner     pure numpy: probabilities + seed + epoch -> shard-aware, per-rank epoch plan
    reader      byte ranges of planned samples only (pread / fsspec), with I/O counters
    dali_pipeline   DALI decode + augment fed by the plan (GPU "mixed" or CPU-only)
    torch_backend   the same with DataLoader + torchvision (fallback and baseline)
    mixup       probabilistic mixup on the batch's device, mixup-aware loss
    loader      `Loader`: what a training loop iterates
    stats       per-epoch accounting of what was read, decoded and saved
"""
from __future__ import annotations

import importlib

# Public names resolved lazily so that `import pipeline` stays cheap (no torch/DALI import).
_EXPORTS = {
    "open_dataset": "manifest",
    "Dataset": "manifest",
    "Scores": "scores",
    "get_policy": "policies",
    "POLICIES": "policies",
    "make_plan": "planner",
    "Plan": "planner",
    "Loader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
