"""Streaming data loader that reads only the samples an SwDPP epoch plan selects.

The packages follow the data's path; imports only point down it (docs/architecture.md):

    streams     the one random-stream scheme: every random choice seeded from (seed, epoch, ...)
    formats/    1. on disk: WebDataset tar shards / Zarr v3 stores, their writers and the
                   manifest (per-sample file, offset, length, label) opened by `open_dataset`
    plan/       2. scores (learning dynamics) -> policies -> planner: the epoch plan (pure numpy)
    read/       3. only the planned samples' byte ranges (pread / HTTP / S3), counted
    decode/     4. backends (DALI, torch) decode and augment the published batches
    batch       5. Batch, the last-batch rule, probabilistic mixup, mixup-aware loss
    stats       6. per-epoch accounting of what was read, decoded and saved
    options, loader   `Loader`: plan -> backend -> mixup -> Batch -> stats
"""
from __future__ import annotations

import importlib

# Public names resolved lazily so that `import pipeline` stays cheap (no torch/DALI import).
_EXPORTS = {
    "open_dataset": "formats.manifest",
    "Dataset": "formats.manifest",
    "Scores": "plan.scores",
    "get_policy": "plan.policies",
    "POLICIES": "plan.policies",
    "make_plan": "plan.planner",
    "Plan": "plan.planner",
    "BACKENDS": "decode",
    "Batch": "batch",
    "LastBatch": "batch",
    "EpochStats": "stats",
    "LoaderOptions": "options",
    "Loader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
