"""Policies: per-sample scores -> inclusion probabilities, loss weights, mixup probabilities.

Every policy has the same interface::

    policy = get_policy(name, keep=0.7, epochs=E, **options)
    out = policy(scores, epoch, rng)          # PolicyOutput, arrays of length N
    policy.num_selected(n, epoch)             # K of that epoch, known before training

`out.p` sums to exactly K (up to float rounding; the planner draws exactly K), or holds a
hard 0/1 selection with exactly K ones (`out.hard`). The maths and the reasons for every
default are in docs/algorithm.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .scores import Scores

__all__ = ["PolicyOutput", "Policy", "POLICIES", "get_policy", "budget", "capped_probabilities"]


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
    monotonically and U only grows, so it terminates (typically in < 10 passes, each a
    single compare over w). w must be >= 0 (float32 is fine: sums are taken in float64).
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


class Policy:
    """Base class. Subclasses set `name` and implement `_select`."""

    name = "?"

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
        return n if self.is_full_epoch(epoch) else budget(self.epoch_keep(epoch), n)

    def __call__(self, scores: Scores, epoch: int, rng: np.random.Generator) -> PolicyOutput:
        n = len(scores)
        if self.is_full_epoch(epoch):
            return _full(n)
        out = self._select(scores, epoch, rng, budget(self.epoch_keep(epoch), n))
        out.info.setdefault("policy", self.name)
        return out

    def _select(self, scores: Scores, epoch: int, rng: np.random.Generator, k: int) -> PolicyOutput:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class FullPolicy(Policy):
    """Every sample, every epoch (the baseline)."""

    name = "full"

    def is_full_epoch(self, epoch: int) -> bool:
        return True


class UniformPolicy(Policy):
    """Uniform random dynamic pruning: each sample with probability K/N, weight 1."""

    name = "uniform"

    def _select(self, scores, epoch, rng, k):
        n = len(scores)
        return PolicyOutput(np.full(n, k / n), np.ones(n, np.float32), np.zeros(n, np.float32))


class InfoBatchPolicy(Policy):
    """InfoBatch (Qin et al., ICLR 2024) at a fixed budget K (see docs/algorithm.md).

    Candidates are seen samples whose EMA loss is strictly below the mean over seen
    samples; exactly N-K of them are pruned uniformly at random, so each candidate is
    pruned with probability r_e = (N-K)/|C| and survivors get weight 1/(1-r_e). `r` caps
    r_e: if |C| < (N-K)/r, the lowest-loss samples above the mean join the candidates
    (reported in info["above_mean_candidates"]). Epoch 0 (no losses yet) and the last
    (1-delta) of the epochs use full data.
    """

    name = "infobatch"

    def __init__(self, keep=0.7, epochs=None, *, r: float = 0.5, delta: float = 0.875):
        super().__init__(keep, epochs)
        if not 0.0 < r < 1.0:
            raise ValueError(f"infobatch r (largest prune probability) must be in (0, 1), got {r!r}")
        if not 0.0 < delta <= 1.0:
            raise ValueError(f"infobatch delta (fraction of epochs that prune) must be in (0, 1], got {delta!r}")
        self.r, self.delta = float(r), float(delta)

    def is_full_epoch(self, epoch):
        if self.keep >= 1.0 or epoch == 0:
            return True
        return self.epochs is not None and epoch >= self.delta * self.epochs

    def _select(self, scores, epoch, rng, k):
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


class _BanditPolicy(Policy):
    """Shared parts of Raju et al. (2021)'s bandit-style pruning: hard top-K by a score,
    never-seen samples first (score +inf), weight 1, no mixup."""

    def _score(self, scores: Scores) -> np.ndarray:
        raise NotImplementedError

    def _hard(self, idx: np.ndarray, n: int, info: dict) -> PolicyOutput:
        p = np.zeros(n)
        p[idx] = 1.0
        return PolicyOutput(p, np.ones(n, np.float32), np.zeros(n, np.float32), hard=True, info=info)


class UCBPolicy(_BanditPolicy):
    """Keep the K samples with the largest upper confidence bound ema + c*std."""

    name = "ucb"

    def __init__(self, keep=0.7, epochs=None, *, c: float = 1.0):
        super().__init__(keep, epochs)
        if not c >= 0:
            raise ValueError(f"ucb c (confidence multiplier) must be >= 0, got {c!r}")
        self.c = float(c)

    def _select(self, scores, epoch, rng, k):
        ucb = scores.ema + self.c * np.sqrt(scores.var)
        ucb = np.where(scores.seen, ucb.astype(np.float64), np.inf)
        return self._hard(_top_k(ucb, k, rng), len(scores), {})


class EpsGreedyPolicy(_BanditPolicy):
    """Keep the round((1-eps)K) highest-EMA-loss samples plus eps*K uniformly from the rest."""

    name = "eps_greedy"

    def __init__(self, keep=0.7, epochs=None, *, eps: float = 0.1):
        super().__init__(keep, epochs)
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"eps_greedy eps (explored fraction) must be in [0, 1], got {eps!r}")
        self.eps = float(eps)

    def _select(self, scores, epoch, rng, k):
        n = len(scores)
        score = np.where(scores.seen, scores.ema.astype(np.float64), np.inf)
        k_greedy = int(math.floor((1.0 - self.eps) * k + 0.5))
        greedy = _top_k(score, k_greedy, rng)
        rest_mask = np.ones(n, bool)
        rest_mask[greedy] = False
        rest = np.flatnonzero(rest_mask)
        explore = rest[np.sort(rng.choice(rest.size, k - k_greedy, replace=False))]
        return self._hard(np.concatenate([greedy, explore]), n, {"greedy": k_greedy})


class SwDPPPolicy(Policy):
    """Soft probabilistic selection from learning dynamics (our SwDPP formulation).

    score s_i = ema_i + std_coef * sqrt(var_i) (never-seen: the largest seen score);
    w_i = (s_i / max s)^(1/temperature); p_i = f + (1-f) min(1, c w_i), sum p = K, f = p_min;
    weight_i = (K/N) / p_i (clipped at max_weight if set);
    mixup_i = mixup * (1 - K/N) * (1 - p_i) / (1 - f).
    The first `warmup` and last `anneal` epochs use full data. With `budget="run"` (the
    default, when `epochs` is known) `keep` is the fraction of the whole run's sample
    visits: the pruned epochs keep (keep*E - F)/(E - F), F = warmup + anneal, so that the
    full epochs are paid for; `budget="epoch"` keeps `keep` in every pruned epoch.
    """

    name = "swdpp"

    def __init__(self, keep=0.7, epochs=None, *, temperature: float = 2.0, p_min: float | None = None,
                 std_coef: float = 0.5, max_weight: float | None = None, mixup: float = 1.0,
                 warmup: int = 1, anneal: int | None = None, budget: str = "run"):
        super().__init__(keep, epochs)
        if budget not in ("run", "epoch"):
            raise ValueError(f"swdpp budget must be 'run' (keep = fraction of the whole run) or "
                             f"'epoch' (keep = fraction of each pruned epoch), got {budget!r}")
        if anneal is None:
            anneal = 0 if self.epochs is None else int(round(0.125 * self.epochs))
        if int(warmup) != warmup or warmup < 0 or int(anneal) != anneal or anneal < 0:
            raise ValueError(f"swdpp warmup and anneal must be integers >= 0, got {warmup!r}, {anneal!r}")
        if anneal and self.epochs is None:
            raise ValueError("swdpp anneal > 0 needs epochs (the annealing epochs are the last ones)")
        self.budget = budget
        self.pruned_keep = self._pruned_keep(int(warmup), int(anneal))
        if not temperature > 0:
            raise ValueError(f"swdpp temperature must be > 0, got {temperature!r}")
        if p_min is None:
            p_min = min(0.1, self.pruned_keep / 2)
        if not 0.0 < p_min <= self.pruned_keep:
            raise ValueError(f"swdpp p_min must be in (0, {self.pruned_keep:.4g}] (the kept fraction of a "
                             f"pruned epoch), got {p_min!r}")
        if not std_coef >= 0:
            raise ValueError(f"swdpp std_coef must be >= 0, got {std_coef!r}")
        if max_weight is not None and not max_weight >= 1.0:
            raise ValueError(f"swdpp max_weight must be >= 1 or None, got {max_weight!r}")
        if not 0.0 <= mixup <= 1.0:
            raise ValueError(f"swdpp mixup (largest mixup probability scale) must be in [0, 1], got {mixup!r}")
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
                f"swdpp keep={self.keep} over {self.epochs} epochs leaves nothing for the pruned epochs "
                f"once {full} full epoch(s) (warmup={warmup}, anneal={anneal}) are paid for; raise keep or "
                f"epochs, lower warmup/anneal, or pass budget='epoch'")
        return k

    def epoch_keep(self, epoch):
        return self.pruned_keep

    def is_full_epoch(self, epoch):
        if self.keep >= 1.0 or epoch < self.warmup:
            return True
        return self.epochs is not None and epoch >= self.epochs - self.anneal

    def sample_scores(self, scores: Scores) -> np.ndarray:
        """s_i >= 0 (float32): optimistic (the largest seen score) for never-seen samples."""
        seen = scores.seen
        s = np.sqrt(scores.var)
        s *= np.float32(self.std_coef)
        s += scores.ema
        all_seen = bool(seen.all())
        if not all_seen and not seen.any():
            return np.ones(s.size, np.float32)
        lo = s.min() if all_seen else s[seen].min()
        if lo < 0:          # losses are normally >= 0; shift otherwise so powers are defined
            s -= lo
        if not all_seen:
            s[~seen] = s[seen].max()
        return s

    def _select(self, scores, epoch, rng, k):
        n = len(scores)
        w = self.sample_scores(scores)
        top = w.max()
        if top > 0:
            w /= top
            if self.temperature != 1.0:
                w **= np.float32(1.0 / self.temperature)
        else:
            w[:] = 1.0
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


POLICIES: dict[str, Callable[..., Policy]] = {
    cls.name: cls for cls in (FullPolicy, UniformPolicy, InfoBatchPolicy, UCBPolicy, EpsGreedyPolicy, SwDPPPolicy)
}


def get_policy(name: str, keep: float = 0.7, epochs: int | None = None, **options: Any) -> Policy:
    """Build a policy by name; unknown names or options raise ValueError listing what is allowed."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    import inspect

    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "keep", "epochs")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {unknown}; allowed: {allowed or 'none'}")
    return cls(keep=keep, epochs=epochs, **options)
