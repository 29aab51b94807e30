"""The two reference policies: every sample (`full`) and uniform random pruning (`uniform`)."""
from __future__ import annotations

import numpy as np

from ..scores import Scores
from .base import Policy, PolicyOutput

__all__ = ["FullPolicy", "UniformPolicy"]


class FullPolicy(Policy):
    """Every sample, every epoch (the baseline)."""

    name = "full"

    def is_full_epoch(self, epoch: int) -> bool:
        """Always: this policy never prunes."""
        return True


class UniformPolicy(Policy):
    """Uniform random dynamic pruning: each sample with probability K/N, weight 1."""

    name = "uniform"

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        n = len(scores)
        return PolicyOutput(np.full(n, k / n), np.ones(n, np.float32), np.zeros(n, np.float32))
