"""Stage 5, batch: what a training step receives (:class:`Batch`), the last-batch rule,
probabilistic mixup on the batch's device, and the mixup-aware per-sample loss.

Each real sample ``i`` of a batch is mixed with probability ``p_mix[i]`` (from the
epoch plan) with a partner drawn from the same batch; ``lambda_i = max(l, 1 - l)`` with
``l ~ Beta(alpha, alpha)`` so the primary sample dominates (docs/algorithm.md,
"Mixup and score updates"):
``x_i <- lambda_i x_i + (1 - lambda_i) x_partner(i)`` (partners' *original* images).
The loss of a mixed sample is ``lambda_i CE(z_i, y_i) + (1 - lambda_i) CE(z_i, y_partner)``;
an unmixed sample has ``lambda_i = 1`` (plain cross-entropy).

All randomness comes from ``(seed, epoch, rank, step)``
(``streams.rng(seed, epoch, Stream.MIXUP, rank, step)``), so a resumed epoch mixes exactly the same pairs with the same
lambdas.  Padding rows (id -1) are never mixed and never chosen as partners.

Score updates follow docs/algorithm.md: only the primary sample of a row is updated,
with its own component ``CE(z_i, y_i)`` and weight ``lambda_i`` (1 when unmixed); see
:func:`score_update`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .streams import Stream, rng


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
    g = rng(seed, epoch, Stream.MIXUP, rank, step)
    u = g.random(b)
    lam_draw = g.beta(alpha, alpha, size=b) if alpha > 0 else np.ones(b)
    lam_draw = np.maximum(lam_draw, 1.0 - lam_draw)  # the primary dominates: lam >= 0.5
    perm = g.permutation(b)
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


class LastBatch(str, Enum):
    """What happens to an epoch's last partial batch on a rank."""

    PAD = "pad"     # filled with padding rows (id -1, weight 0)
    DROP = "drop"   # not delivered (training only)


@dataclass(frozen=True)
class BatchPlan:
    """One rank's epoch cut into batches: ``ids`` int64 ``[steps, B]`` (-1 = padding),
    ``weights`` and ``mixup`` float32 ``[steps, B]`` (0 on padding), ``fill`` int64
    ``[steps, B]``: the real sample read for each padding row (-1 = the filler, and on
    real rows).  ``first_step`` numbers the first row (an epoch resumed on another world
    size continues its step count, see ``Loader.load_state_dict``)."""

    ids: np.ndarray
    weights: np.ndarray
    mixup: np.ndarray
    fill: np.ndarray
    first_step: int = 0

    @property
    def steps(self) -> int:
        """Steps of the epoch on this rank, counting from step 0."""
        return self.first_step + int(self.ids.shape[0])

    def rows(self, start: int) -> np.ndarray:
        """The table rows of steps ``start..`` (int64 ``[n, 2, B]``: ids, fill), what a
        backend publishes (read/table.py)."""
        lo = start - self.first_step
        return np.stack([self.ids[lo:], self.fill[lo:]], axis=1)

    def row(self, step: int) -> int:
        """Index of ``step`` in the arrays."""
        return step - self.first_step


def fill_ids(ids: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
    """What each padding row of ``ids`` (any shape, -1 = padding) reads instead of the
    filler: the padding rows, in row-major order, take ``pool[0], pool[1], ...`` (cycling
    when there are more padding rows than pool entries).  Real rows and an empty or absent
    ``pool`` give -1 (the filler).  Pure: the same plan always gives the same fill."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.full(ids.shape, -1, dtype=np.int64)
    pad = ids < 0
    n = int(pad.sum())
    if n and pool is not None and len(pool):
        pool = np.asarray(pool, dtype=np.int64)
        out[pad] = pool[np.arange(n) % len(pool)]
    return out


def cut_batches(ids: np.ndarray, weights: np.ndarray, mixup: np.ndarray, batch_size: int,
                last: LastBatch, fill_from: np.ndarray | None = None,
                first_step: int = 0) -> BatchPlan:
    """Cut one rank's plan into ``[steps, batch_size]`` arrays (pure function).

    ``fill_from``: real planned samples whose images the padding rows carry (training:
    the rank's own plan, from its start, so that BatchNorm in training mode only ever
    sees real images; :func:`fill_ids`); None: padding rows carry the filler
    (evaluation).  ``first_step``: the step number of the first row.
    """
    steps = len(ids) // batch_size if last is LastBatch.DROP else -(-len(ids) // batch_size)
    total = steps * batch_size

    def fit(a: np.ndarray, fill, dtype) -> np.ndarray:
        out = np.full(total, fill, dtype=dtype)
        m = min(total, len(a))
        out[:m] = a[:m]
        return out.reshape(steps, batch_size)

    ids = np.asarray(ids, dtype=np.int64)
    w = np.where(ids >= 0, weights, 0)
    cut = fit(ids, -1, np.int64)
    return BatchPlan(cut, fit(w, 0.0, np.float32), fit(mixup, 0.0, np.float32),
                     fill_ids(cut, fill_from), int(first_step))


class FieldKind(str, Enum):
    """How a requested extra member (``ReadOptions.fields``) reaches ``Batch.fields``."""

    BYTES = "bytes"   # the member's bytes as stored
    STR = "str"       # UTF-8 text
    JSON = "json"     # the decoded JSON value


_EMPTY = {FieldKind.BYTES: b"", FieldKind.STR: "", FieldKind.JSON: None}


def decode_fields(raw: dict[str, list[bytes]], kinds: dict[str, FieldKind]
                  ) -> tuple[dict[str, list[Any]], dict[int, str]]:
    """Decode each row's extra members as ``kinds`` says.  Returns the values (an empty
    member, as rows without a sample carry, gives ``b""`` / ``""`` / None) and, per row
    whose member does not decode, why (the row gets the empty value)."""
    out: dict[str, list[Any]] = {}
    failed: dict[int, str] = {}
    for name, kind in kinds.items():
        values = list(raw[name])
        if kind is not FieldKind.BYTES:
            for j, data in enumerate(values):
                try:
                    text = data.decode("utf-8") if data else ""
                    values[j] = text if kind is FieldKind.STR else (json.loads(text) if text else None)
                except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are
                    failed.setdefault(j, f"its .{name} member is not {kind.value} ({e})")
                    values[j] = _EMPTY[kind]
        out[name] = values
    return out, failed


def blank_rows(values: dict[str, list[Any]], kinds: dict[str, FieldKind], rows) -> None:
    """Give ``rows`` (now padding: corrupt samples) empty field values."""
    for name, kind in kinds.items():
        for j in rows:
            values[name][j] = _EMPTY[kind]


@dataclass
class Batch:
    """One training step's data.

    ``images`` float NCHW on the loader's device; ``labels`` int64 (0 on padding rows);
    ``ids`` int64 sample ids (-1 = padding or a skipped corrupt sample); ``weights``
    float32 loss weights (0 on padding); ``mix`` who was mixed with whom (or None);
    ``fields`` the requested extra members (``ReadOptions.fields``): name -> one value per
    row, of the row's primary sample (a mixed row's partner's fields are not merged in; a
    padding row carrying a fill sample has that sample's, other padding rows empty ones).
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    mix: MixInfo | None
    epoch: int
    step: int
    fields: dict[str, list[Any]] = field(default_factory=dict)
    # (mixup-aware losses returned by loss(), primaries' CE, lambda): for score_update
    _score: tuple | None = field(default=None, repr=False)

    @property
    def mask(self) -> torch.Tensor:
        """True on real samples."""
        return self.ids >= 0

    def loss(self, logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Per-sample, mixup-aware cross-entropy (0 on padding rows).

        Also remembers, for :meth:`score_update`, what the score update of
        docs/algorithm.md needs: each row's primary CE and its weight ``lambda``.
        """
        ce = mixup_cross_entropy(logits, self.labels, self.mix, label_smoothing)
        out = torch.where(self.mask.to(ce.device), ce, torch.zeros_like(ce))
        if self.mix is not None:
            self._score = (out.detach(),) + score_update(logits, self.labels, self.mix,
                                                         label_smoothing)
        return out

    def score_update(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses, weights) to feed the scores for this batch (docs/algorithm.md).

        Losses equal to what :meth:`loss` returned (the same values, detached or copied)
        are replaced by the primaries' own CE; any other per-sample losses are used as
        given.  Mixed rows get weight ``lambda``, others 1.
        """
        sc = self._score
        if sc is not None and torch.is_tensor(losses) and losses.shape == sc[0].shape \
                and torch.equal(losses.detach().to(sc[0].device), sc[0]):
            return sc[1], sc[2]
        if self.mix is None:
            return losses, torch.ones(len(self), dtype=torch.float32)
        return losses, self.mix.lam

    def __len__(self) -> int:
        return int(self.ids.shape[0])
