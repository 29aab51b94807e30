"""SwDPP v1 (sessions 1-4): independent soft selection per epoch, full warm-up/annealing epochs,
importance weights and probabilistic mixup. Kept under the name `swdpp_v1` for comparison."""
from __future__ import annotations

import numpy as np

from ..scores import Scores
from .base import Policy, PolicyOutput, capped_probabilities, score_weights

__all__ = ["SwDPPv1Policy"]


class SwDPPv1Policy(Policy):
    """The first SwDPP formulation (superseded by `swdpp`, docs/algorithm.md).

    score s_i = ema_i + std_coef * sqrt(var_i) (never-seen: the largest seen score);
    w_i = (s_i / max s)^(1/temperature); p_i = f + (1-f) min(1, c w_i), sum p = K, f = p_min;
    weight_i = (K/N) / p_i (clipped at max_weight if set);
    mixup_i = mixup * (1 - K/N) * (1 - p_i) / (1 - f).
    The first `warmup` and last `anneal` epochs use full data. With `budget="run"` (the
    default, when `epochs` is known) `keep` is the fraction of the whole run's sample
    visits: the pruned epochs keep (keep*E - F)/(E - F), F = warmup + anneal, so that the
    full epochs are paid for; `budget="epoch"` keeps `keep` in every pruned epoch.
    """

    name = "swdpp_v1"

    def __init__(self, keep: float = 0.7, epochs: int | None = None, *, temperature: float = 2.0,
                 p_min: float | None = None, std_coef: float = 0.5, max_weight: float | None = None,
                 mixup: float = 1.0, warmup: int = 1, anneal: int | None = None,
                 budget: str = "run") -> None:
        super().__init__(keep, epochs)
        if budget not in ("run", "epoch"):
            raise ValueError(f"swdpp_v1 budget must be 'run' (keep = fraction of the whole run) or "
                             f"'epoch' (keep = fraction of each pruned epoch), got {budget!r}")
        if anneal is None:
            anneal = 0 if self.epochs is None else int(round(0.125 * self.epochs))
        if int(warmup) != warmup or warmup < 0 or int(anneal) != anneal or anneal < 0:
            raise ValueError(f"swdpp_v1 warmup and anneal must be integers >= 0, got {warmup!r}, {anneal!r}")
        if anneal and self.epochs is None:
            raise ValueError("swdpp_v1 anneal > 0 needs epochs (the annealing epochs are the last ones)")
        self.budget = budget
        self.pruned_keep = self._pruned_keep(int(warmup), int(anneal))
        if not temperature > 0:
            raise ValueError(f"swdpp_v1 temperature must be > 0, got {temperature!r}")
        if p_min is None:
            p_min = min(0.1, self.pruned_keep / 2)
        if not 0.0 < p_min <= self.pruned_keep:
            raise ValueError(f"swdpp_v1 p_min must be in (0, {self.pruned_keep:.4g}] (the kept fraction of a "
                             f"pruned epoch), got {p_min!r}")
        if not std_coef >= 0:
            raise ValueError(f"swdpp_v1 std_coef must be >= 0, got {std_coef!r}")
        if max_weight is not None and not max_weight >= 1.0:
            raise ValueError(f"swdpp_v1 max_weight must be >= 1 or None, got {max_weight!r}")
        if not 0.0 <= mixup <= 1.0:
            raise ValueError(f"swdpp_v1 mixup (largest mixup probability scale) must be in [0, 1], got {mixup!r}")
        self.temperature, self.p_min, self.std_coef = float(temperature), float(p_min), float(std_coef)
        self.max_weight, self.mixup = max_weight, float(mixup)
        self.warmup, self.anneal = int(warmup), int(anneal)

    def _pruned_keep(self, warmup: int, anneal: int) -> float:
        """keep of a pruned epoch: `keep`, or with budget="run" what is left for the pruned
        epochs once the full ones are paid for (needs epochs; without them, full epochs add)."""
        if self.budget == "epoch" or self.epochs is None or self.keep >= 1.0:
            return self.keep
        full = min(self.epochs, warmup + anneal)
        if full == self.epochs:
            return 1.0
        k = (self.keep * self.epochs - full) / (self.epochs - full)
        if k <= 0.0:
            raise ValueError(
                f"swdpp_v1 keep={self.keep} over {self.epochs} epochs leaves nothing for the pruned epochs "
                f"once {full} full epoch(s) (warmup={warmup}, anneal={anneal}) are paid for; raise keep or "
                f"epochs, lower warmup/anneal, or pass budget='epoch'")
        return k

    def epoch_keep(self, epoch: int) -> float:
        """The kept fraction of every pruned epoch (see `budget`)."""
        return self.pruned_keep

    def is_full_epoch(self, epoch: int) -> bool:
        """The first `warmup` and the last `anneal` epochs."""
        if self.keep >= 1.0 or epoch < self.warmup:
            return True
        return self.epochs is not None and epoch >= self.epochs - self.anneal

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        n = len(scores)
        w = score_weights(scores, self.std_coef, self.temperature)
        p, c = capped_probabilities(w, k, self.p_min)
        del w
        f = min(self.p_min, k / n)
        weight = np.empty(n, np.float32)
        np.divide(k / n, p, out=weight, casting="same_kind")
        if self.max_weight is not None:
            np.minimum(weight, np.float32(self.max_weight), out=weight)
        mix = np.zeros(n, np.float32)
        if f < 1.0 and self.mixup > 0:
            # m_i = mixup * (1 - K/N) * (1 - p_i) / (1 - f), in [0, mixup * (1 - K/N)]
            np.subtract(1.0, p, out=mix, casting="same_kind")
            mix *= np.float32(self.mixup * (1.0 - k / n) / (1.0 - f))
            np.clip(mix, 0.0, 1.0, out=mix)
        info = {"p_floor": f, "scale_c": c}
        return PolicyOutput(p, weight, mix, info=info)
