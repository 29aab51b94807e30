"""The Loader's state for checkpoints: where an epoch stands, the scores, the policy's
carry-over, the bad samples, and what decides the plans (so that a state is only loaded
into a Loader that makes the same plans).  A mixin of :class:`pipeline.loader.Loader`:
every value is a torch tensor or a python scalar (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import torch

from .plan.elastic import combine_states

__all__ = ["LoaderState", "STATE_VERSION"]

STATE_VERSION = 2  # 2: "layout" (an epoch's earlier parts and their world sizes)


class LoaderState:
    """``state_dict`` / ``load_state_dict`` of the Loader (uses its attributes)."""

    def state_dict(self) -> dict:
        """Position and scores (torch tensors / python scalars: ``torch.load(weights_only=True)``).

        ``layout``: int64 ``[parts, 2]``, the parts of the current epoch so far as (world
        size, steps consumed), so that the epoch can resume on another world size.
        """
        epoch, step = self._position
        parts = list(self._segments(epoch))
        parts.append((self.world_size, step - sum(s for _, s in parts)))
        layout = np.array([p for p in parts if p[1] > 0], dtype=np.int64).reshape(-1, 2)
        return {
            "version": STATE_VERSION, "epoch": int(epoch), "step": int(step),
            "seed": self.seed, "world_size": self.world_size, "rank": self.rank,
            "synced_epoch": -1 if self._synced_epoch is None else int(self._synced_epoch),
            "scores": None if self.scores is None else self.scores.state_dict(),
            "policy": {} if self.policy is None else self.policy.state_dict(),
            "bad": torch.from_numpy(self.bad.ids()),
            "layout": torch.from_numpy(layout),
            "plan": self._plan_key(),
        }

    def _plan_key(self) -> dict:
        """What decides the plans and batches a state's position counts (checked on load)."""
        key = {"batch_size": self.batch_size, "train": self.train}
        if self.policy is not None:
            key.update(policy=self.policy_name, keep=self.policy.keep if self.policy_name != "full" else 1.0,
                       policy_kwargs=json.dumps(dict(self._policy_kwargs), sort_keys=True, default=str))
            if self.policy.uses_epochs:
                key["epochs"] = self.epochs
        return key

    def load_state_dict(self, sd: dict | list[dict]) -> None:
        """Restore; the next ``epoch(sd["epoch"])`` skips the batches already consumed.

        ``sd``: this rank's own state (same world size), or every rank's states in rank
        order, to resume on any world size: the epoch's remaining samples are re-sliced
        across this loader's ranks, scores and pending losses carried over
        (:func:`pipeline.plan.elastic.combine_states`).
        """
        every = isinstance(sd, (list, tuple))
        at = combine_states(list(sd) if every else [sd], self.rank, self.world_size, self.seed, every,
                            plan=self._plan_key())
        if at.scores is not None and self.scores is not None:
            self.scores.load_state_dict(at.scores)
        if self.policy is not None:
            if not at.policy and self.policy.state_dict() and at.epoch > 0:
                warnings.warn(f"the loader state has no state of policy {self.policy_name!r} (saved by an "
                              "older version): its carry-over credits restart at 0, so the plans from "
                              "here differ from an uninterrupted run's", RuntimeWarning, stacklevel=2)
            self.policy.load_state_dict(at.policy)
        self._synced_epoch = None if at.synced_epoch < 0 else at.synced_epoch
        self._plan = None
        self.bad.reset(at.bad)
        self._layout = (at.epoch, at.parts)
        self._resume = (at.epoch, at.step)
        self._position = self._resume
