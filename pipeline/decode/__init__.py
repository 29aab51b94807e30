"""Stage 4, decode: published tables -> decoded, augmented image batches.

    augment         presets (cifar, imagenet, none) and their per-sample parameters, drawn
                    in numpy from (seed, epoch, rank, step): both backends apply the same
    backend         the Backend interface (start / abandon / close), BackendConfig, RawBatch
    dali_backend    NVIDIA DALI (GPU "mixed" decode or CPU-only)
    torch_backend   torch DataLoader + torchvision (fallback and baseline)

``BACKENDS`` is the registry the Loader chooses from by name.  Imports only
pipeline.read (and pipeline.streams); never a later stage.
"""
from __future__ import annotations

from .backend import Backend
from .dali_backend import DaliBackend
from .torch_backend import TorchBackend

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (DaliBackend, TorchBackend)}

__all__ = ["BACKENDS", "Backend"]
