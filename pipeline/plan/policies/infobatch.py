"""InfoBatch (Qin et al., ICLR 2024): prune below-mean-loss samples, rescale survivors."""
from __future__ import annotations

import math

import numpy as np

from ..scores import Scores
from .base import Policy, PolicyOutput, _top_k

__all__ = ["InfoBatchPolicy"]


class InfoBatchPolicy(Policy):
    """InfoBatch (Qin et al., ICLR 2024) at a fixed budget K (see docs/algorithm.md).

    Candidates are seen samples whose EMA loss is strictly below the mean over seen
    samples; exactly N-K of them are pruned uniformly at random, so each candidate is
    pruned with probability r_e = (N-K)/|C| and survivors get weight 1/(1-r_e). `r` caps
    r_e: if |C| < (N-K)/r, the lowest-loss samples above the mean join the candidates
    (reported in info["above_mean_candidates"]). Epoch 0 (no losses yet) and the last
    (1-delta) of the epochs use full data. With `budget="epoch"` (the paper's) `keep` is
    kept in every pruned epoch, so the run reads more than `keep` of its sample visits;
    `budget="run"` pays for the full epochs: the pruned ones keep (keep*E - F)/(E - F).
    """

    name = "infobatch"

    def __init__(self, keep: float = 0.7, epochs: int | None = None, *, r: float = 0.5,
                 delta: float = 0.875, budget: str = "epoch") -> None:
        super().__init__(keep, epochs)
        if budget not in ("epoch", "run"):
            raise ValueError(f"infobatch budget must be 'epoch' (keep in every pruned epoch) or 'run' "
                             f"(keep = fraction of the whole run), got {budget!r}")
        if budget == "run" and self.epochs is None:
            raise ValueError("infobatch budget='run' needs epochs")
        if not 0.0 < r < 1.0:
            raise ValueError(f"infobatch r (largest prune probability) must be in (0, 1), got {r!r}")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"infobatch delta (fraction of epochs that prune) must be in (0, 1], got {delta!r}")
        self.r, self.delta, self.budget = float(r), float(delta), budget
        self.pruned_keep = self.keep
        if budget == "run" and self.keep < 1.0:
            e = self.epochs
            full = sum(self.is_full_epoch(t) for t in range(e))
            if full >= e or self.keep * e - full <= 0:
                raise ValueError(f"infobatch keep={self.keep} over {e} epochs leaves nothing for the pruned "
                                 f"epochs once its {full} full epoch(s) are paid for; raise keep or delta")
            self.pruned_keep = (self.keep * e - full) / (e - full)

    def epoch_keep(self, epoch: int) -> float:
        """The kept fraction of a pruned epoch (see `budget`)."""
        return self.pruned_keep

    def is_full_epoch(self, epoch: int) -> bool:
        """Epoch 0 (no losses yet) and the last (1 - delta) of the epochs."""
        if self.keep >= 1.0 or epoch == 0:
            return True
        return self.epochs is not None and epoch >= self.delta * self.epochs

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        n = len(scores)
        d = n - k                                       # number to prune
        seen = scores.seen
        s = scores.ema.astype(np.float64)
        mean = s[seen].mean() if seen.any() else 0.0
        cand = seen & (s < mean)
        n_c = int(np.count_nonzero(cand))
        need = min(n, math.ceil(d / self.r))            # candidates needed to keep r_e <= r
        extra = 0
        if n_c < need:
            # Not enough below-mean samples: add the lowest-loss others (unseen last).
            rest = np.flatnonzero(~cand)
            key = np.where(seen[rest], s[rest], np.inf)
            add = rest[_top_k(-key, need - n_c, rng)]
            cand[add] = True
            extra = int(np.count_nonzero(seen[add] & (s[add] >= mean)))
            n_c = need
        r_e = d / n_c
        p = np.ones(n)
        p[cand] = 1.0 - r_e
        weight = np.ones(n, np.float32)
        weight[cand] = 1.0 / (1.0 - r_e)
        info = {"r_effective": r_e, "candidates": n_c, "above_mean_candidates": extra, "mean": mean}
        return PolicyOutput(p, weight, np.zeros(n, np.float32), info=info)
