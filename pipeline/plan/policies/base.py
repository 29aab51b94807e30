"""What every policy shares: the output type, the budget K, the base class and two helpers
(top-k with random tie-breaking, capped inclusion probabilities).

The maths and the reasons for every default are in docs/algorithm.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..scores import Scores

__all__ = ["PolicyOutput", "Policy", "budget", "capped_probabilities", "score_weights"]


@dataclass
class PolicyOutput:
    """p float64[N] inclusion probabilities; weight float32[N] loss weights (used for the
    selected samples); mixup float32[N] mixup probabilities; hard: p is a 0/1 selection;
    info: diagnostics (effective rates etc.), not part of the plan."""

    p: np.ndarray
    weight: np.ndarray
    mixup: np.ndarray
    hard: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def budget(keep: float, n: int) -> int:
    """K = round(keep * N) (half rounds up), at least 1."""
    return max(1, min(n, int(math.floor(keep * n + 0.5))))


def _full(n: int) -> PolicyOutput:
    """Every sample, weight 1, no mixup (a full epoch)."""
    return PolicyOutput(np.ones(n), np.ones(n, np.float32), np.zeros(n, np.float32), hard=True)


def _top_k(score: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the k largest scores, ties at the threshold broken uniformly at random."""
    n = score.size
    if k >= n:
        return np.arange(n)
    if k <= 0:
        return np.empty(0, np.int64)
    thr = np.partition(score, n - k)[n - k]           # k-th largest value
    above = np.flatnonzero(score > thr)
    tied = np.flatnonzero(score == thr)
    pick = rng.choice(tied.size, k - above.size, replace=False)
    return np.concatenate([above, tied[np.sort(pick)]])


def capped_probabilities(w: np.ndarray, k: int, p_min: float) -> tuple[np.ndarray, float]:
    """p_i = f + (1 - f) * min(1, c * w_i) with sum(p) = k exactly (up to rounding).

    Returns (p float64, c). `f = min(p_min, k/N)` is the floor. c is the fixed point of
    the standard capping iteration ("water-filling" from above): c = (k' - |U|) /
    sum_{i not in U} w_i with U = {c w_i >= 1} and k' = (k - N f) / (1 - f); c grows
    monotonically and U only grows, so it terminates (each pass is a single compare over
    w). w must be >= 0 (float32 is fine: sums are taken in float64).
    """
    n = w.size
    f = min(p_min, k / n)
    kk = (k - n * f) / (1.0 - f) if f < 1.0 else 0.0   # mass to place above the floor
    if kk <= 1e-12 * n:
        return np.full(n, k / n), 0.0
    # A tiny positive floor on w keeps the problem solvable when fewer than k' samples
    # have w > 0 (e.g. many perfectly learned samples with loss 0).
    pos = int(np.count_nonzero(w > 0))
    if pos < kk + 1:
        w = w + np.float32(1e-6) * (w.max() if pos else np.float32(1.0))
    total = float(np.sum(w, dtype=np.float64))
    n_cap, rest = 0, total
    for _ in range(200):
        c = (kk - n_cap) / rest
        capped = w >= 1.0 / c
        m = int(np.count_nonzero(capped))
        if m == n_cap:
            break
        n_cap = m
        rest = total - float(np.sum(w[capped], dtype=np.float64))
    else:  # pragma: no cover - would need an adversarial w
        raise RuntimeError("capped_probabilities did not converge")
    p = np.multiply(w, c, dtype=np.float64)
    np.minimum(p, 1.0, out=p)
    p *= 1.0 - f
    p += f
    return p, c


def score_weights(scores: Scores, std_coef: float, temperature: float) -> np.ndarray:
    """w_i = (s_i / max s)^(1/temperature) in [0, 1] (float32), s_i = ema_i + std_coef * std_i.

    Never-seen samples get the largest seen score (optimism: they are visited early); with
    nothing seen yet every w_i is 1. Scores are shifted to >= 0 if losses were negative.
    """
    seen = scores.seen
    s = np.sqrt(scores.var)
    s *= np.float32(std_coef)
    s += scores.ema
    all_seen = bool(seen.all())
    if not all_seen and not seen.any():
        return np.ones(s.size, np.float32)
    lo = s.min() if all_seen else s[seen].min()
    if lo < 0:          # losses are normally >= 0; shift otherwise so powers are defined
        s -= lo
    if not all_seen:
        s[~seen] = s[seen].max()
    top = s.max()
    if top > 0:
        s /= top
        if temperature != 1.0:
            s **= np.float32(1.0 / temperature)
    else:
        s[:] = 1.0
    return s


class Policy:
    """Base class. Subclasses set `name` and implement `_select`."""

    name = "?"
    # whether the run's length shapes the plans (schedules, budgets spread over the run);
    # planning past `epochs` is then outside what the policy was made for (EpochPlanner warns)
    uses_epochs = True
    # whether the plans follow the reported losses (a policy that does, left without any,
    # quietly prunes blind: EpochPlanner warns)
    uses_scores = True

    def __init__(self, keep: float = 0.7, epochs: int | None = None) -> None:
        if not (isinstance(keep, (int, float)) and 0.0 < keep <= 1.0):
            raise ValueError(f"keep must be in (0, 1], got {keep!r}")
        if epochs is not None and (int(epochs) != epochs or epochs < 1):
            raise ValueError(f"epochs must be a positive integer or None, got {epochs!r}")
        self.keep = float(keep)
        self.epochs = None if epochs is None else int(epochs)

    def is_full_epoch(self, epoch: int) -> bool:
        """True when this epoch trains on all samples (no pruning)."""
        return self.keep >= 1.0

    def epoch_keep(self, epoch: int) -> float:
        """The kept fraction of a pruned epoch (`keep`, unless a policy spreads its budget)."""
        return self.keep

    def num_selected(self, n: int, epoch: int) -> int:
        """K of `epoch` for `n` samples, known before the epoch (for LR schedules)."""
        return n if self.is_full_epoch(epoch) else budget(self.epoch_keep(epoch), n)

    def __call__(self, scores: Scores, epoch: int, rng: np.random.Generator) -> PolicyOutput:
        """This epoch's probabilities, loss weights and mixup probabilities from `scores`."""
        n = len(scores)
        if self.is_full_epoch(epoch):
            return _full(n)
        out = self._select(scores, epoch, rng, budget(self.epoch_keep(epoch), n))
        out.info.setdefault("policy", self.name)
        return out

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        """The output of a pruned epoch that keeps `k` samples."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What the policy carries from epoch to epoch ({} for a stateless policy)."""
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore `state_dict()`; a stateless policy has nothing to restore."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"
