"""The reference policies: every sample (`full`), uniform random pruning drawn independently
per epoch (`uniform`) and uniform without replacement across epochs (`rs2`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..scores import Scores
from .base import Policy, PolicyOutput
from .credits import Credits

__all__ = ["FullPolicy", "UniformPolicy", "RS2Policy"]


class FullPolicy(Policy):
    """Every sample, every epoch (the baseline)."""

    name = "full"
    uses_epochs = False
    uses_scores = False

    def is_full_epoch(self, epoch: int) -> bool:
        """Always: this policy never prunes."""
        return True


class UniformPolicy(Policy):
    """Uniform random dynamic pruning: each sample with probability K/N, weight 1."""

    name = "uniform"
    uses_epochs = False
    uses_scores = False

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        n = len(scores)
        return PolicyOutput(np.full(n, k / n), np.ones(n, np.float32), np.zeros(n, np.float32))


class RS2Policy(Policy):
    """RS2 (Okanovic et al., ICLR 2024): uniform subsets without replacement across epochs.

    Carry-over credits with every p_i = K/N (`credits.py`): exactly K per epoch, no sample
    twice before every other had its turn (up to the epoch that straddles two rounds),
    weight 1. The credits are the policy's state (saved with the Loader's).
    """

    name = "rs2"
    uses_epochs = False
    uses_scores = False

    def __init__(self, keep: float = 0.7, epochs: int | None = None) -> None:
        super().__init__(keep, epochs)
        self._credits = Credits()

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        n = len(scores)
        sel = np.zeros(n)
        sel[self._credits.take(np.full(n, k / n), epoch, k, rng)] = 1.0
        return PolicyOutput(sel, np.ones(n, np.float32), np.zeros(n, np.float32), hard=True)

    def state_dict(self) -> dict[str, Any]:
        """The carry-over credits."""
        return {"credits": self._credits.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the credits saved by `state_dict()`."""
        if sd:
            self._credits.load_state_dict(sd["credits"])
