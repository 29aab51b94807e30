"""Learning-rate schedules built from the planner's known steps per epoch.

The loader knows every epoch's number of steps before training starts
(``loader.steps_per_epoch(e)``), so the schedule is laid out over the exact total and
never overflows when pruning shrinks epochs (InfoBatch's scheduler issue). The factor is
clamped to the last value if stepped past the end (e.g. a padded final batch).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

SCHEDULES = ("cosine", "linear", "constant")


def total_steps(steps_per_epoch: Sequence[int]) -> int:
    """Sum of the per-epoch step counts."""
    return int(sum(int(s) for s in steps_per_epoch))


def lr_factor_fn(steps_per_epoch: Sequence[int], warmup_epochs: float = 1.0, kind: str = "cosine",
                 final_factor: float = 0.0) -> Callable[[int], float]:
    """Return ``f(step) -> multiplier`` of the base LR: linear warm-up then cosine/linear/constant decay.

    Warm-up spans the steps of the first ``warmup_epochs`` epochs (fractional allowed).
    """
    steps = [int(s) for s in steps_per_epoch]
    total = max(1, sum(steps))
    whole = int(warmup_epochs)
    warm = sum(steps[:whole]) + (warmup_epochs - whole) * (steps[whole] if whole < len(steps) else 0)
    warm = int(min(round(warm), total - 1)) if total > 1 else 0

    def f(step: int) -> float:
        step = min(max(int(step), 0), total - 1)
        if step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm - 1) if total - warm > 1 else 1.0
        t = min(max(t, 0.0), 1.0)
        if kind == "linear":
            return final_factor + (1 - final_factor) * (1 - t)
        if kind == "cosine":
            return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))
        raise ValueError(f"unknown schedule {kind!r}")

    return f


def make_scheduler(optimizer, steps_per_epoch: Sequence[int], warmup_epochs: float = 1.0, kind: str = "cosine"):
    """A ``LambdaLR`` stepped once per optimizer step over exactly ``sum(steps_per_epoch)`` steps."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(steps_per_epoch, warmup_epochs, kind))
