"""Raju et al. (2021)'s bandit-style pruning: hard top-K by a score (`ucb`, `eps_greedy`)."""
from __future__ import annotations

import math

import numpy as np

from ..scores import Scores
from .base import Policy, PolicyOutput, _top_k

__all__ = ["UCBPolicy", "EpsGreedyPolicy"]


class _BanditPolicy(Policy):
    """Shared parts: hard top-K by a score, never-seen samples first (score +inf), weight 1,
    no mixup."""

    def _hard(self, idx: np.ndarray, n: int, info: dict) -> PolicyOutput:
        p = np.zeros(n)
        p[idx] = 1.0
        return PolicyOutput(p, np.ones(n, np.float32), np.zeros(n, np.float32), hard=True, info=info)


class UCBPolicy(_BanditPolicy):
    """Keep the K samples with the largest upper confidence bound ema + c*std."""

    name = "ucb"
    uses_epochs = False

    def __init__(self, keep: float = 0.7, epochs: int | None = None, *, c: float = 1.0) -> None:
        super().__init__(keep, epochs)
        if not c >= 0:
            raise ValueError(f"ucb c (confidence multiplier) must be >= 0, got {c!r}")
        self.c = float(c)

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        # float64: ema + c*std must not overflow float32 for a large c (scores are clipped
        # at SCORE_LIMIT, c is the user's)
        ucb = scores.ema.astype(np.float64) + self.c * np.sqrt(scores.var.astype(np.float64))
        ucb = np.where(scores.seen, ucb, np.inf)
        return self._hard(_top_k(ucb, k, rng), len(scores), {})


class EpsGreedyPolicy(_BanditPolicy):
    """Keep the round((1-eps)K) highest-EMA-loss samples plus eps*K uniformly from the rest."""

    name = "eps_greedy"
    uses_epochs = False

    def __init__(self, keep: float = 0.7, epochs: int | None = None, *, eps: float = 0.1) -> None:
        super().__init__(keep, epochs)
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps_greedy eps (explored fraction) must be in [0, 1], got {eps!r}")
        self.eps = float(eps)

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        n = len(scores)
        score = np.where(scores.seen, scores.ema.astype(np.float64), np.inf)
        k_greedy = int(math.floor((1.0 - self.eps) * k + 0.5))
        greedy = _top_k(score, k_greedy, rng)
        rest_mask = np.ones(n, bool)
        rest_mask[greedy] = False
        rest = np.flatnonzero(rest_mask)
        explore = rest[np.sort(rng.choice(rest.size, k - k_greedy, replace=False))]
        return self._hard(np.concatenate([greedy, explore]), n, {"greedy": k_greedy})
