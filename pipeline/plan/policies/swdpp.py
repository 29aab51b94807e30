"""SwDPP: soft, score-driven inclusion probabilities, balanced across epochs by carry-over
credits, with a tilt that follows a schedule (docs/algorithm.md, "SwDPP")."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..scores import Scores
from .base import Policy, PolicyOutput, capped_probabilities, score_weights
from ..sampling import select
from .credits import Credits

__all__ = ["SwDPPPolicy", "tilt_strength"]

SCHEDULES = ("sine", "constant")
WEIGHTS = ("none", "importance", "rescale", "epoch")
SELECTIONS = ("credits", "draws")
SHAPES = ("soft", "above_mean")
ANNEALS = ("step", "ramp")
# `stagger=None` staggers the credits below this keep. With the split at budget K the
# below-mean samples share what the sure ones leave unless that falls under the floor
# K/(2N), which happens once more than keep/(2-keep) of the samples are above the mean:
# 33% at keep 0.5 (usual for a right-skewed loss), 54% at keep 0.7 (rare). Then the floor
# samples come due as one cohort and staggering pays (at keep 0.5 on CIFAR-10); where the
# floor does not bind it cost a little at keep 0.7 (docs/results.md, session 14). 0.6 lies
# between the two measured keeps.
STAGGER_BELOW = 0.6


def tilt_strength(epoch: int, epochs: int | None, tilt: float, schedule: str) -> float:
    """lambda_e: `tilt * sin^2(pi e / E)` ("sine": 0 at the start, `tilt` midway, back
    towards 0 at the end) or `tilt` ("constant", and whenever E is unknown)."""
    if schedule == "constant" or epochs is None:
        return float(tilt)
    return float(tilt) * math.sin(math.pi * epoch / epochs) ** 2


def above_mean_probabilities(scores: Scores, std_coef: float, k: int, f: float,
                             relative: bool = False) -> np.ndarray:
    """InfoBatch's split at a budget of K: samples scoring above the mean of the seen ones
    (score = ema + std_coef * std, with `relative` both divided by the mean loss of the
    epoch of the sample's last loss, `Scores.relative`; unseen ones count as above) get 1,
    the rest share K - H equally; when that share would fall below ``f`` the rest get
    ``f`` and the sure ones share what remains (sum K, every p in [f, 1])."""
    n = len(scores)
    if relative:
        ema, std = scores.relative()
        s = std * std_coef + ema
    else:
        s = np.sqrt(scores.var, dtype=np.float64) * std_coef + scores.ema
    seen = scores.seen
    hard = ~seen
    if seen.any():
        hard |= seen & (s > s[seen].mean())
    h = int(hard.sum())
    if h == 0 or h == n:
        return np.full(n, k / n)
    rest = (k - h) / (n - h)
    p = np.empty(n)
    if rest >= f:
        p[hard], p[~hard] = 1.0, min(rest, 1.0)
    else:
        p[~hard], p[hard] = f, (k - f * (n - h)) / h
    return p


class SwDPPPolicy(Policy):
    """Soft selection from learning dynamics, K samples in every epoch, visits balanced.

    score  s_i = ema_i + std_coef * std_i (never seen: the largest seen score);
    q_i  (`q="above_mean"`, the default since session 9): InfoBatch's rule at the same
         budget: every sample whose score is above the mean of the seen ones (and every
         unseen one) is sure, q_i = 1, the others share what is left equally, never below
         f = floor * K/N (the sure ones give way if needed);
    q_i  (`q="soft"`, the default of sessions 5-8): w_i = (s_i / max s)^(1/temperature),
         q_i = f + (1-f) min(1, c w_i), sum q = K (`capped_probabilities`);
    p_i  = (1 - lambda_e) K/N + lambda_e q_i         (sum p = K, p_i >= f; lambda_e = tilt
         with `schedule="constant"`, the default, or the sine schedule);
    selection: carry-over credits (`credits.py`): sample i gets about sum_e p_i visits;
    weight_i = min(max_weight, N/K) for every sample (`weights="epoch"`, the default since
               session 12: a pruned epoch takes K/N of a full epoch's steps, each scaled
               up to cover the same distance), 1 ("none", the default before),
               min(max_weight, (K/N) / p_i) ("importance") or min(max_weight, 1 / p_i)
               ("rescale": InfoBatch's, 1 for a sure sample);
    mixup_i = mixup * (1 - K/N) * (1 - p_i) / (1 - f).
    `anneal=0`: every epoch reads exactly K = round(keep N), no full epochs to pay for.
    `anneal` > 0, `anneal_shape="step"`: the last F = ceil(anneal E) epochs train on full
    data (InfoBatch's annealing) and the others pay for them, K = round(keep' N),
    keep' = (keep E - F) / (E - F); the sine schedule then spans the E - F pruned epochs.
    `anneal_shape="ramp"`: over the last F epochs the kept fraction rises linearly from
    keep' to 1 (epoch E - F + j keeps keep' + (1 - keep')(j + 1)/F, the last one is full),
    keep' = (keep E - (F + 1)/2) / (E - (F + 1)/2): the same run budget.
    `anneal=None` (the default since session 10): F = round(E / 8) from E = 12 on (see
    `_anneal_epochs`).
    `warmup=W`: the first W epochs train on full data (InfoBatch's epoch 0: every sample
    gets a loss before the first split), paid for by the pruned ones like the annealing
    epochs; 0 (the default) starts pruning at epoch 0 with uniform probabilities.
    `guard=True`: f follows the run's keep and no sample is left out of more than
    G = ceil(1/f) epochs in a row (`gap_bound`); off by default (it cost accuracy).
    `relative=True` (`q="above_mean"`): scores divided by the mean loss of the epoch in
    which each was measured (`Scores.relative`), so a sample not seen for some epochs is
    not counted hard only because its loss is older.
    `stagger=True`: the credits start at random phases in [0, 1) (`credits.Credits`), so
    the samples at the floor come due spread over the epochs, not together; `None` (the
    default since session 14): on where keep < 0.6, where the floor binds (see
    `STAGGER_BELOW`).
    `selection="draws"` (session 18, off): each epoch drawn independently of the others with
    P(i taken) = p_i exactly (`sampling.select`, systematic PPS on a random order), as
    InfoBatch draws; visits balance only on average and the gap is unbounded.
    """

    name = "swdpp"

    def __init__(self, keep: float = 0.7, epochs: int | None = None, *, temperature: float = 2.0,
                 std_coef: float = 0.5, floor: float = 0.5, tilt: float = 1.0,
                 schedule: str = "constant", weights: str = "epoch", max_weight: float = 2.0,
                 mixup: float = 0.0, anneal: float | None = None, q: str = "above_mean",
                 anneal_shape: str = "step", guard: bool = False, stagger: bool | None = None,
                 relative: bool = False, warmup: int = 0, selection: str = "credits") -> None:
        super().__init__(keep, epochs)
        if not temperature > 0:
            raise ValueError(f"swdpp temperature must be > 0, got {temperature!r}")
        if not std_coef >= 0:
            raise ValueError(f"swdpp std_coef must be >= 0, got {std_coef!r}")
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"swdpp floor (smallest p_i as a fraction of K/N) must be in (0, 1], got {floor!r}")
        if not 0.0 <= tilt <= 1.0:
            raise ValueError(f"swdpp tilt (largest mix of the score-driven probabilities) must be in [0, 1], "
                             f"got {tilt!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"swdpp schedule must be one of {SCHEDULES}, got {schedule!r}")
        if q not in SHAPES:
            raise ValueError(f"swdpp q must be one of {SHAPES}, got {q!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"swdpp weights must be one of {WEIGHTS}, got {weights!r}")
        if not max_weight >= 1.0:
            raise ValueError(f"swdpp max_weight must be >= 1, got {max_weight!r}")
        if not 0.0 <= mixup <= 1.0:
            raise ValueError(f"swdpp mixup (largest mixup probability scale) must be in [0, 1], got {mixup!r}")
        self.temperature, self.std_coef, self.floor = float(temperature), float(std_coef), float(floor)
        self.tilt, self.schedule, self.weights = float(tilt), schedule, weights
        self.max_weight, self.mixup, self.q = float(max_weight), float(mixup), q
        if anneal is not None and not 0.0 <= anneal < 1.0:
            raise ValueError(f"swdpp anneal (fraction of final full-data epochs) must be in [0, 1), got {anneal!r}")
        if anneal_shape not in ANNEALS:
            raise ValueError(f"swdpp anneal_shape must be one of {ANNEALS}, got {anneal_shape!r}")
        if not isinstance(guard, bool):
            raise ValueError(f"swdpp guard must be true or false, got {guard!r}")
        if stagger is not None and not isinstance(stagger, bool):
            raise ValueError(f"swdpp stagger must be true, false or null (by keep), got {stagger!r}")
        if not isinstance(relative, bool):
            raise ValueError(f"swdpp relative must be true or false, got {relative!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"swdpp selection must be one of {SELECTIONS}, got {selection!r}")
        if selection == "draws" and guard:
            raise ValueError("swdpp guard bounds the gap through the credits; it needs selection='credits'")
        self.guard, self.relative, self.selection = guard, relative, selection
        if not (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0):
            raise ValueError(f"swdpp warmup (full-data epochs at the start) must be an integer >= 0, "
                             f"got {warmup!r}")
        if warmup and self.keep < 1.0 and self.epochs is None:
            raise ValueError("swdpp warmup needs epochs (the full epochs are paid for by the others)")
        self.warmup = warmup if self.keep < 1.0 else 0
        self.stagger = bool(self.keep < STAGGER_BELOW) if stagger is None else stagger
        self.anneal, self.anneal_shape = anneal, anneal_shape
        self.anneal_epochs = self._anneal_epochs(anneal)
        f, e, w = self.anneal_epochs, self.epochs, self.warmup
        self.pruned_keep, self.pruned_epochs = self.keep, self.epochs
        if f or w:
            paid = self._paid(f) + w
            if f + w >= e or self.keep * e - paid <= 0:
                raise ValueError(f"swdpp keep={self.keep} over {e} epochs leaves nothing for the pruned "
                                 f"epochs once {w} warm-up and {f} annealing epoch(s) are paid for")
            self.pruned_epochs = e - f
            self.pruned_keep = (self.keep * e - paid) / (e - paid)
        self._credits = Credits(self.stagger)

    def _paid(self, f: int) -> float:
        """Full epochs' worth of samples that F annealing epochs read above keep'."""
        return f if self.anneal_shape == "step" else (f + 1) / 2

    def _anneal_epochs(self, anneal: float | None) -> int:
        """F, the annealing epochs: ceil(anneal E) for a given `anneal` (an error if the
        run cannot pay for them); for `anneal=None` (the default) round(E / 8) where that
        is at least 2 (E >= 12: 4 of 30 epochs, as measured; a run of 10 epochs lost with
        1 or 2), and none where E is unknown or a pruned epoch would keep less than half
        of `keep`."""
        if self.keep >= 1.0 or anneal == 0.0:
            return 0
        e = self.epochs
        if anneal is None:
            f = math.floor(e / 8 + 0.5) if e is not None else 0
            if not 2 <= f < e:
                return 0
            return f if self.keep * e - self._paid(f) >= (e - self._paid(f)) * self.keep / 2 else 0
        if e is None:
            raise ValueError("swdpp anneal needs epochs (the full epochs are paid for by the others)")
        f = math.ceil(anneal * e)
        if f >= e or self.keep * e - self._paid(f) <= 0:
            raise ValueError(f"swdpp keep={self.keep} over {e} epochs leaves nothing for the pruned "
                             f"epochs once {f} annealing epoch(s) are paid for; lower anneal")
        return f

    def is_full_epoch(self, epoch: int) -> bool:
        """keep 1, one of the first `warmup` epochs, or one of the last F epochs ("step";
        "ramp": the last epoch)."""
        if self.keep >= 1.0 or epoch < self.warmup:
            return True
        if not self.anneal_epochs:
            return False
        return epoch >= (self.pruned_epochs if self.anneal_shape == "step" else self.epochs - 1)

    def epoch_keep(self, epoch: int) -> float:
        """keep, or keep' (rising to 1 over a ramp) when annealing is paid for (see the
        class docstring)."""
        if self.anneal_shape == "ramp" and self.anneal_epochs and epoch >= self.pruned_epochs:
            f = self.anneal_epochs
            return min(1.0, self.pruned_keep + (1.0 - self.pruned_keep) * (epoch - self.pruned_epochs + 1) / f)
        return self.pruned_keep

    def p_floor(self, k: int, n: int) -> float:
        """f, the smallest p_i: `floor` times this epoch's K/N; with `guard`, `floor` times
        the run's keep (not the pruned epochs' keep', which annealing lowers), at most K/N."""
        if self.guard:
            return min(self.floor * self.keep, k / n)
        return self.floor * k / n

    def gap_bound(self, k: int, n: int) -> int | None:
        """With `guard`: G = ceil(1 / f), and no sample is left out of more than G epochs in
        a row (the credits' guard, `credits.carry_over`; 3 at keep 0.7, 4 at keep 0.5).
        Without (the default): None, the credits alone (simulated with half of the samples
        above the mean: 3 at keep 0.7 without annealing, 4 with it; 2 in CIFAR-10 runs of
        30 epochs; the guard cost 0.17 pts at 30 epochs, docs/results.md)."""
        if not self.guard:
            return None
        return max(1, math.ceil(1.0 / self.p_floor(k, n) - 1e-9))

    def probabilities(self, scores: Scores, epoch: int, k: int) -> tuple[np.ndarray, dict[str, Any]]:
        """p float64[N] (sum K, each in [f, 1]) and diagnostics, before the selection."""
        n = len(scores)
        f = self.p_floor(k, n)
        lam = tilt_strength(epoch, self.pruned_epochs, self.tilt, self.schedule)
        info: dict[str, Any] = {"tilt": lam, "p_floor": f}
        if lam <= 0.0 or f >= 1.0:
            return np.full(n, k / n), info
        if self.q == "above_mean":
            q, c = above_mean_probabilities(scores, self.std_coef, k, f, self.relative), 1.0
        else:
            q, c = capped_probabilities(score_weights(scores, self.std_coef, self.temperature), k, f)
        q *= lam
        q += (1.0 - lam) * (k / n)
        info["scale_c"] = c
        return q, info

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        n = len(scores)
        p, info = self.probabilities(scores, epoch, k)
        if self.selection == "draws":   # independent per epoch: P(i taken) = p_i exactly
            ids = select(p, rng)
        else:
            ids = self._credits.take(p, epoch, k, rng, gap=self.gap_bound(k, n))
        sel = np.zeros(n)
        sel[ids] = 1.0
        weight = np.ones(n, np.float32)
        if self.weights == "epoch":
            weight.fill(min(self.max_weight, n / k))
        elif self.weights != "none":
            np.divide(k / n if self.weights == "importance" else 1.0, p, out=weight, casting="same_kind")
            np.minimum(weight, np.float32(self.max_weight), out=weight)
        mix = np.zeros(n, np.float32)
        f = info["p_floor"]
        if self.mixup > 0 and f < 1.0:
            np.subtract(1.0, p, out=mix, casting="same_kind")
            mix *= np.float32(self.mixup * (1.0 - k / n) / (1.0 - f))
            np.clip(mix, 0.0, 1.0, out=mix)
        info["p_max"] = float(p.max())
        return PolicyOutput(sel, weight, mix, hard=True, info=info)

    def state_dict(self) -> dict[str, Any]:
        """The carry-over credits (see `credits.Credits`)."""
        return {"credits": self._credits.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the credits saved by `state_dict()`."""
        if sd:
            self._credits.load_state_dict(sd["credits"])
