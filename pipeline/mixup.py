"""Probabilistic mixup on the batch's device, and the mixup-aware per-sample loss.

Each real sample ``i`` of a batch is mixed with probability ``p_mix[i]`` (from the
epoch plan) with a partner drawn from the same batch; ``lambda_i = max(l, 1 - l)`` with
``l ~ Beta(alpha, alpha)`` so the primary sample dominates (docs/algorithm.md,
"Mixup and score updates"):
``x_i <- lambda_i x_i + (1 - lambda_i) x_partner(i)`` (partners' *original* images).
The loss of a mixed sample is ``lambda_i CE(z_i, y_i) + (1 - lambda_i) CE(z_i, y_partner)``;
an unmixed sample has ``lambda_i = 1`` (plain cross-entropy).

All randomness comes from ``(seed, epoch, rank, step)`` (numpy Philox, see
``augment.step_rng``), so a resumed epoch mixes exactly the same pairs with the same
lambdas.  Padding rows (id -1) are never mixed and never chosen as partners.

Score updates follow docs/algorithm.md: only the primary sample of a row is updated,
with its own component ``CE(z_i, y_i)`` and weight ``lambda_i`` (1 when unmixed); see
:func:`score_update`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import step_rng


@dataclass
class MixInfo:
    """Who was mixed with whom: ``partner[i]`` (index in the batch), ``lam[i]``, ``mixed[i]``."""

    partner: torch.Tensor  # int64 [B]; i itself when not mixed
    lam: torch.Tensor      # float32 [B]; 1.0 when not mixed
    mixed: torch.Tensor    # bool [B]

    def to(self, device) -> "MixInfo":
        return MixInfo(self.partner.to(device), self.lam.to(device), self.mixed.to(device))


def draw_mixup(p_mix: np.ndarray, valid: np.ndarray, alpha: float, seed: int, epoch: int,
               rank: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decide (partner, lam, mixed) for one batch, as numpy arrays; pure function."""
    b = len(p_mix)
    rng = step_rng(seed, epoch, rank, step, stream=2)
    u = rng.random(b)
    lam_draw = rng.beta(alpha, alpha, size=b) if alpha > 0 else np.ones(b)
    lam_draw = np.maximum(lam_draw, 1.0 - lam_draw)  # the primary dominates: lam >= 0.5
    perm = rng.permutation(b)
    partner = np.arange(b, dtype=np.int64)
    vidx = np.flatnonzero(valid)
    if len(vidx) > 1:
        # a permutation of the valid rows (drawn from a full-batch permutation so the
        # draws do not depend on how many rows are padding)
        pv = vidx[np.argsort(perm[: len(vidx)], kind="stable")]
        partner[vidx] = pv
    mixed = valid & (u < np.asarray(p_mix, dtype=np.float64)) & (partner != np.arange(b))
    lam = np.where(mixed, lam_draw, 1.0).astype(np.float32)
    partner = np.where(mixed, partner, np.arange(b))
    return partner, lam, mixed


def apply_mixup(images: torch.Tensor, info: MixInfo) -> torch.Tensor:
    """Mix images (any float layout with batch first) on their device; returns a new tensor."""
    if not bool(info.mixed.any()):
        return images
    lam = info.lam.to(images.dtype).view(-1, *([1] * (images.dim() - 1)))
    return lam * images + (1 - lam) * images.index_select(0, info.partner)


def mixup_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, info: MixInfo | None = None,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy, lambda-weighted over the two labels of mixed samples."""
    ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    if info is None or not bool(info.mixed.any()):
        return ce
    ce_b = F.cross_entropy(logits, labels.index_select(0, info.partner), reduction="none",
                           label_smoothing=label_smoothing)
    lam = info.lam.to(ce.dtype)
    return lam * ce + (1 - lam) * ce_b


def score_update(logits: torch.Tensor, labels: torch.Tensor, info: MixInfo | None = None,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, weight) per row for the score update: the primary's own CE and ``lambda``."""
    ce = F.cross_entropy(logits.detach(), labels, reduction="none",
                         label_smoothing=label_smoothing)
    if info is None:
        return ce, torch.ones_like(ce)
    return ce, info.lam.to(ce.dtype)
