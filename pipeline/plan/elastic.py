"""Resuming an epoch on another world size: the ranks' saved states -> one rank's resume point.

Every rank plans the same global epoch, so a checkpoint made with W ranks resumes with W'
ranks in the same epoch (docs/reliability.md, "Padding, resume and world sizes"):

* position: all ranks stopped at the same step; the epoch's *layout* lists its parts so
  far as ``(world size, steps consumed)``; the remainder of the global plan is re-sliced
  for W' ranks (``planner.remaining_plan``), none lost, none repeated;
* scores: the committed scores are the same on every rank after a sync (rank 0's are
  taken); each rank's *pending* losses (reported since the last sync) are in its own
  state, and old rank ``r``'s go to new rank ``r % W'``, so that the next sync applies each
  exactly once;
* known-bad samples: the union of every rank's.

Pure numpy on the state dicts ``Loader.state_dict`` writes (torch tensors or numpy arrays).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["ResumePoint", "combine_states", "SUPPORTED_VERSIONS"]

SUPPORTED_VERSIONS = (1, 2)  # 1: no layout (the epoch ran on one world size)


@dataclass(frozen=True)
class ResumePoint:
    """Where one rank of a (possibly resized) run resumes."""

    epoch: int
    step: int                             # batches consumed per rank, over all parts
    parts: tuple[tuple[int, int], ...]    # finished earlier parts: (world size, steps)
    scores: dict | None                   # Scores state (committed + this rank's pending)
    bad: np.ndarray                       # int64 ids known to be bad
    synced_epoch: int
    policy: dict                          # the policy's state (the same on every rank)


def _pending_of(committed: dict, parts: list[dict]) -> dict:
    """A Scores state: ``committed``'s scores with the pending (unsynced) losses of ``parts``."""
    out = dict(committed)
    for k in ("pending_ids", "pending_losses", "pending_weights"):
        out[k] = np.concatenate([np.asarray(committed[k])[:0]] + [np.asarray(p[k]) for p in parts])
    out["pending_nonfinite"] = sum(int(p["pending_nonfinite"]) for p in parts)
    return out


def combine_states(states: list[dict[str, Any]], rank: int, world_size: int, seed: int,
                   every_rank: bool = True, plan: dict[str, Any] | None = None) -> ResumePoint:
    """The resume point of ``rank`` of ``world_size`` from the saved states.

    ``states``: every rank's, in rank order (any world size), or with ``every_rank=False``
    one rank's own state (the same world size).  ``plan``: what decides this loader's plans
    and batches (batch size, policy, keep, ...; the ``"plan"`` entry of a state), checked
    against the saved one where both name a key.  Raises ValueError naming what does not fit.
    """
    if not states:
        raise ValueError("no loader state given")
    for st in states:
        if int(st.get("version", -1)) not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported Loader state version {st.get('version')!r}")
        if int(st["seed"]) != seed:
            raise ValueError(f"state was saved with seed {int(st['seed'])}, this loader has seed {seed}")
    saved = states[0].get("plan") or {}
    differ = [f"{k} {saved[k]!r} -> {plan[k]!r}" for k in sorted(set(saved) & set(plan or {}))
              if saved[k] != plan[k]]
    if differ:  # the position counts batches of another plan: samples would be skipped or repeated
        raise ValueError(f"the loader state was saved by a Loader with other plans ({'; '.join(differ)}): "
                         "its position would skip or repeat samples; resume with the same settings")
    old_w = int(states[0]["world_size"])
    where = [(int(st["epoch"]), int(st["step"]), int(st["world_size"])) for st in states]
    if len(set(where)) > 1:
        raise ValueError(f"the ranks' loader states disagree on (epoch, step, world size): {where}")
    if not every_rank:
        if len(states) != 1:
            raise ValueError(f"every_rank=False takes one rank's state, got {len(states)}")
        if old_w != world_size:
            raise ValueError(f"state was saved with world size {old_w}, this loader has {world_size}: "
                             "pass every rank's state (a list, in rank order) to resume on another "
                             "world size")
        mine = states
    elif len(states) != old_w:
        raise ValueError(f"{len(states)} loader states given for a run of {old_w} ranks")
    else:
        mine = [st for r, st in enumerate(states) if r % world_size == rank]
    epoch, step, _ = where[0]
    layout = states[0].get("layout")
    parts = [(old_w, step)] if layout is None else [
        (int(w), int(s)) for w, s in np.asarray(layout, dtype=np.int64).reshape(-1, 2)]
    parts = [p for p in parts if p[1] > 0]
    if sum(s for _, s in parts) != step:
        raise ValueError(f"the state's layout {parts} does not add up to its step {step}")
    if parts and parts[-1][0] == world_size:
        parts = parts[:-1]  # the last part ran on this world size: it just continues
    scores = states[0].get("scores")
    if scores is not None:
        scores = _pending_of(scores, [st["scores"] for st in mine])
    bad = np.unique(np.concatenate([np.zeros(0, np.int64)] + [
        np.asarray(st.get("bad", np.zeros(0)), dtype=np.int64).reshape(-1) for st in states]))
    return ResumePoint(epoch, step, tuple(parts), scores, bad, int(states[0]["synced_epoch"]),
                       dict(states[0].get("policy") or {}))
