"""Small torch.distributed helpers (no-ops when torch.distributed is not initialized).

`dist_env()` is the one answer to "which process am I": the loader, the trainer and the
tests all ask it. torch is imported lazily so that the planner stays importable and cheap
without it. Collectives run on CPU tensors for gloo and on the current CUDA device for NCCL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DistEnv", "dist_env", "is_initialized", "all_gather_varlen", "check_plan_digest"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: global rank, number of ranks, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:  # torch missing: single process by definition
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def is_initialized() -> bool:
    """True when torch.distributed is available and its process group is initialized."""
    return _dist() is not None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def dist_env() -> DistEnv:
    """Rank, world size and local rank of this process.

    From torch.distributed when its process group is initialized; else from the variables
    torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), so a trainer can place itself before it
    initializes the group; else a single process (0, 1, 0). torch.distributed has no
    portable notion of a node, so the local rank always comes from LOCAL_RANK (0 if unset).
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    dist = _dist()
    if dist is not None:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent distributed environment: rank {rank}, world size {world_size}, "
                         f"local rank {local_rank} (need world_size >= 1, 0 <= rank < world_size, "
                         "local_rank >= 0)")
    return DistEnv(int(rank), int(world_size), int(local_rank))


def _device():
    import torch

    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_varlen(a: np.ndarray) -> np.ndarray:
    """Concatenate a 1-D array of any length from every rank, in rank order.

    Lengths are exchanged first, then every rank pads to the longest (all_gather needs
    equal shapes). The dtype is kept (ids travel as int64, losses as float32).
    """
    dist = _dist()
    if dist is None:
        return a
    import torch

    dev = _device()
    world = dist.get_world_size()
    n = torch.tensor([a.size], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    longest = max(sizes)
    buf = torch.zeros(longest, dtype=torch.from_numpy(a[:0]).dtype, device=dev)
    buf[: a.size] = torch.from_numpy(np.ascontiguousarray(a)).to(dev)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf)
    return np.concatenate([o[:s].cpu().numpy() for o, s in zip(out, sizes)])


def check_plan_digest(plan_or_digest: Any) -> None:
    """Compare a plan's digest across ranks; raise RuntimeError naming ranks that differ.

    Accepts a `Plan` (uses `.digest`) or a hex digest string. Every rank raises, so no
    rank is left waiting in a later collective. No-op without torch.distributed.
    """
    dist = _dist()
    if dist is None:
        return
    digest = getattr(plan_or_digest, "digest", plan_or_digest)
    raw = bytes.fromhex(digest)
    if len(raw) % 8:
        raw = raw + b"\0" * (8 - len(raw) % 8)
    mine = np.frombuffer(raw, dtype=np.int64).copy()
    everyone = all_gather_varlen(mine).reshape(dist.get_world_size(), -1)
    groups: dict[bytes, list[int]] = {}
    for r, row in enumerate(everyone):
        groups.setdefault(row.tobytes(), []).append(r)
    if len(groups) > 1:
        parts = "; ".join(f"ranks {ranks}: {key.hex()[:16]}" for key, ranks in groups.items())
        epoch = getattr(plan_or_digest, "epoch", "?")
        raise RuntimeError(
            f"epoch plan differs across ranks (epoch {epoch}): {parts}. Every rank must plan "
            "from identical scores, seed and settings; did a rank skip Scores.sync()?")
