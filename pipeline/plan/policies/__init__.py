"""Policies: per-sample scores -> inclusion probabilities, loss weights, mixup probabilities.

Every policy has the same interface::

    policy = get_policy(name, keep=0.7, epochs=E, **options)
    out = policy(scores, epoch, rng)          # PolicyOutput, arrays of length N
    policy.num_selected(n, epoch)             # K of that epoch, known before training

`out.p` sums to exactly K (up to float rounding; the planner draws exactly K), or holds a
hard 0/1 selection with exactly K ones (`out.hard`). One module per family: baselines
(full, uniform, rs2), infobatch, bandits (ucb, eps_greedy), swdpp, swdpp_v1 (the first
formulation, kept for comparison); carry-over credits in credits; shared parts in base. The
maths and the reasons for every default are in docs/algorithm.md.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from .bandits import EpsGreedyPolicy, UCBPolicy
from .base import Policy, PolicyOutput, budget, capped_probabilities
from .baselines import FullPolicy, RS2Policy, UniformPolicy
from .infobatch import InfoBatchPolicy
from .swdpp import SwDPPPolicy
from .swdpp_v1 import SwDPPv1Policy

__all__ = ["PolicyOutput", "Policy", "POLICIES", "get_policy", "budget", "capped_probabilities",
           "FullPolicy", "UniformPolicy", "RS2Policy", "InfoBatchPolicy", "UCBPolicy", "EpsGreedyPolicy",
           "SwDPPPolicy", "SwDPPv1Policy"]

POLICIES: dict[str, Callable[..., Policy]] = {
    cls.name: cls for cls in (FullPolicy, UniformPolicy, RS2Policy, InfoBatchPolicy, UCBPolicy, EpsGreedyPolicy,
                              SwDPPPolicy, SwDPPv1Policy)
}


def get_policy(name: str, keep: float = 0.7, epochs: int | None = None, **options: Any) -> Policy:
    """Build a policy by name; unknown names or options raise ValueError listing what is allowed."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "keep", "epochs")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"policy {name!r} has no option(s) {unknown}; allowed: {allowed or 'none'}")
    return cls(keep=keep, epochs=epochs, **options)
