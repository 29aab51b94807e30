"""Per-sample learning dynamics: EMA of the loss, its running variance, count, last epoch.

Updates are buffered locally (`update`) and applied once per epoch (`sync`), so the
committed state, and with it the epoch plan, only changes at epoch boundaries. Under
`torch.distributed` the buffers of all ranks are gathered first (ids int64, losses and
weights float32, separate collectives), so every rank ends with identical scores.

Memory: 24 bytes per sample (ema, var, rel_ema, rel_var float32; count, last_epoch int32)
plus the pending buffer (16 bytes per reported loss until the next sync).
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from . import distributed as _dist

__all__ = ["Scores", "SCORE_LIMIT"]

_STATE_VERSION = 1

# |ema| and sqrt(var) are kept at most SCORE_LIMIT, so var <= SCORE_LIMIT**2 = 1e30 fits
# float32 (max 3.4e38) and the policies' sums and products (ema + c*std, a few million of
# them added in float64) stay finite. Any real loss is many orders of magnitude below it.
SCORE_LIMIT = 1e15


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy view/copy of a numpy array, torch tensor (any device) or sequence."""
    if type(x).__module__.startswith("torch"):
        x = x.detach()
        if x.is_floating_point() and x.dtype.itemsize < 4:
            x = x.float()                # bfloat16/float16 (autocast losses): numpy lacks bf16
        x = x.to("cpu").numpy()
    return np.asarray(x)


class Scores:
    """Per-sample score store for `n` samples.

    Fields (numpy, length n): `ema` float32 (EMA of the loss), `var` float32 (exponentially
    weighted variance of the loss around the EMA), `count` int32 (epochs in which the sample
    got a loss), `last_epoch` int32 (epoch of the last loss, -1 = never), `rel_ema`,
    `rel_var` float32 (the same of each loss divided by the mean loss of its sync, see
    `relative`).

    `decay` is the EMA decay per observation: ema <- decay*ema + (1-decay)*loss.
    `epoch` is the epoch the pending losses belong to; `sync(epoch)` sets it explicitly,
    plain `sync()` advances it by one whenever it applied something.
    """

    def __init__(self, n: int, *, decay: float = 0.5) -> None:
        n = int(n)
        if n <= 0:
            raise ValueError(f"Scores needs n >= 1 samples, got {n}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.n = n
        self.decay = float(decay)
        self.ema = np.zeros(n, np.float32)
        self.var = np.zeros(n, np.float32)
        self.count = np.zeros(n, np.int32)
        self.last_epoch = np.full(n, -1, np.int32)
        # the same EMA and variance of each loss divided by the mean loss of its sync (an
        # epoch): `relative()`
        self.rel_ema = np.zeros(n, np.float32)
        self.rel_var = np.zeros(n, np.float32)
        self.epoch = 0
        self.num_nonfinite = 0          # NaN/inf losses ignored so far (all ranks, after sync)
        self._pending_nonfinite = 0     # local, not yet synced
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return self.n

    @property
    def seen(self) -> np.ndarray:
        """Boolean mask of samples that have at least one committed loss."""
        return self.count > 0

    @property
    def num_pending(self) -> int:
        """Losses buffered by `update` and not yet applied by `sync`."""
        return sum(len(i) for i, _, _ in self._pending)

    # -- updates -------------------------------------------------------------------------
    def update(self, ids: Any, losses: Any, weights: Any = None) -> tuple[int, int]:
        """Buffer per-sample losses (numpy or torch, any device).

        `weights` (optional, in [0, 1]) scale how far one observation moves the EMA: a
        weight-w loss moves it w times a full step (used for mixed samples, see
        docs/algorithm.md "Mixup and score updates"). Ids equal to -1 (plan padding) are
        skipped. NaN/inf losses are ignored and counted in `num_nonfinite`. Returns
        (real losses given, how many of them were NaN/inf), for the caller's accounting.
        """
        ids = _to_numpy(ids, "ids")
        losses = _to_numpy(losses, "losses")
        if ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
        if losses.shape != ids.shape:
            raise ValueError(f"losses shape {losses.shape} does not match ids shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
        if not (np.issubdtype(losses.dtype, np.floating) or np.issubdtype(losses.dtype, np.integer)):
            raise ValueError(f"losses must be real numbers, got dtype {losses.dtype}")
        ids = ids.astype(np.int64, copy=False)
        losses = losses.astype(np.float32, copy=True)
        if weights is None:
            w = np.ones(ids.shape, np.float32)
        else:
            w = _to_numpy(weights, "weights").astype(np.float32, copy=True)
            if w.shape != ids.shape:
                raise ValueError(f"weights shape {w.shape} does not match ids shape {ids.shape}")
            if not np.all((w >= 0) & (w <= 1)):
                raise ValueError("weights must lie in [0, 1]")
        keep = ids != -1  # padding entries of a plan carry no loss
        if ids.size:
            lo, hi = int(ids.min(initial=0, where=keep)), int(ids.max(initial=0, where=keep))
            if lo < 0 or hi >= self.n:
                bad = lo if lo < 0 else hi
                raise ValueError(f"sample id {bad} out of range [0, {self.n}) (-1 = padding is allowed)")
        finite = np.isfinite(losses)
        real = int(np.count_nonzero(keep))
        nonfinite = int(np.count_nonzero(keep & ~finite))
        self._pending_nonfinite += nonfinite
        keep &= finite & (w > 0)
        if not keep.all():
            ids, losses, w = ids[keep], losses[keep], w[keep]
        if ids.size:
            self._pending.append((ids, losses, w))
        return real, nonfinite

    def sync(self, epoch: int | None = None) -> int:
        """Apply the buffered losses (gathered from all ranks under torch.distributed).

        Call once per epoch, before planning. The applied losses are stamped with
        `self.epoch`; afterwards `self.epoch` becomes `epoch` if given, else it advances by
        one if anything was applied. Returns the number of (global) losses applied.
        """
        ids, losses, w = self._take_pending()
        nonfinite = self._pending_nonfinite
        self._pending_nonfinite = 0
        if _dist.is_initialized():
            counts = _dist.all_gather_varlen(np.array([nonfinite], np.int64))
            nonfinite = int(counts.sum())
            ids = _dist.all_gather_varlen(ids)            # int64
            losses = _dist.all_gather_varlen(losses)      # float32
            w = _dist.all_gather_varlen(w)                # float32
        self.num_nonfinite += nonfinite
        self._apply(ids, losses, w)
        if epoch is not None:
            self.epoch = int(epoch)
        elif ids.size:
            self.epoch += 1
        return int(ids.size)

    def _take_pending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._pending:
            ids = np.concatenate([p[0] for p in self._pending])
            losses = np.concatenate([p[1] for p in self._pending])
            w = np.concatenate([p[2] for p in self._pending])
        else:
            ids, losses, w = np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float32)
        self._pending = []
        return ids, losses, w

    def _apply(self, ids: np.ndarray, losses: np.ndarray, w: np.ndarray) -> None:
        """One EMA step per touched sample with its weighted-mean loss of this sync.

        Aggregating duplicates first makes the result independent of the order in which
        ranks/batches reported, which is what keeps all ranks bit-identical.
        """
        if ids.size == 0:
            return
        wl = w.astype(np.float64) * losses
        if ids.size * 4 >= self.n:
            # dense path: O(n) bincount beats sorting when many samples were touched
            sw = np.bincount(ids, weights=w, minlength=self.n)
            touched = np.flatnonzero(sw > 0)
            sw = sw[touched]
            swl = np.bincount(ids, weights=wl, minlength=self.n)[touched]
        else:
            touched, inv = np.unique(ids, return_inverse=True)
            sw = np.bincount(inv, weights=w, minlength=touched.size)
            swl = np.bincount(inv, weights=wl, minlength=touched.size)
        # A finite float32 loss can still overflow the float32 variance (1e20**2): compute
        # in float64 and clip to SCORE_LIMIT before storing (docs/algorithm.md "Scores").
        mean = np.clip(swl / sw, -SCORE_LIMIT, SCORE_LIMIT)
        alpha = (1.0 - self.decay) * np.minimum(sw, 1.0)
        first = self.count[touched] == 0
        self._ema_step(self.ema, self.var, touched, mean, alpha, first)
        scale = float(np.abs(mean).mean())     # this epoch's mean loss (all ranks: same)
        rel = mean / scale if scale > 0 else mean
        self._ema_step(self.rel_ema, self.rel_var, touched, rel, alpha, first)
        self.count[touched] += 1
        self.last_epoch[touched] = self.epoch

    @staticmethod
    def _ema_step(ema_a: np.ndarray, var_a: np.ndarray, touched: np.ndarray, x: np.ndarray,
                  alpha: np.ndarray, first: np.ndarray) -> None:
        """ema <- ema + alpha (x - ema), var <- (1 - alpha)(var + alpha d^2), in float64,
        clipped to SCORE_LIMIT; a first observation sets ema = x, var = 0."""
        ema = ema_a[touched].astype(np.float64)
        var = var_a[touched].astype(np.float64)
        d = x - ema
        new_ema = np.where(first, x, ema + alpha * d)
        new_var = np.where(first, 0.0, (1.0 - alpha) * (var + alpha * d * d))
        ema_a[touched] = np.clip(new_ema, -SCORE_LIMIT, SCORE_LIMIT)
        var_a[touched] = np.minimum(new_var, SCORE_LIMIT * SCORE_LIMIT)

    def relative(self) -> tuple[np.ndarray, np.ndarray]:
        """(EMA, std) of each sample's losses divided by the mean loss of the epoch that
        measured them (float64): a loss measured epochs ago, when every loss was higher,
        counts as its share of that epoch's mean, not as an absolute value that training
        has since left behind. The mean is over the samples of the sync (the epoch's
        selection, all ranks)."""
        return self.rel_ema.astype(np.float64), np.sqrt(self.rel_var, dtype=np.float64)

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Torch tensors and Python scalars only: safe for torch.load(weights_only=True).

        Includes the pending (unsynced) buffer, so a mid-epoch checkpoint loses nothing.
        """
        import torch

        ids, losses, w = self._take_pending()
        if ids.size:  # keep the buffer alive in this object too
            self._pending.append((ids, losses, w))
        t = lambda a: torch.from_numpy(np.array(a, copy=True))  # noqa: E731 - copies: snapshot
        return {
            "version": _STATE_VERSION, "n": self.n, "decay": self.decay, "epoch": self.epoch,
            "num_nonfinite": self.num_nonfinite, "pending_nonfinite": self._pending_nonfinite,
            "ema": t(self.ema), "var": t(self.var), "count": t(self.count),
            "last_epoch": t(self.last_epoch), "rel_ema": t(self.rel_ema), "rel_var": t(self.rel_var),
            "pending_ids": t(ids), "pending_losses": t(losses), "pending_weights": t(w),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore from `state_dict()` (torch tensors or numpy arrays)."""
        if int(sd.get("version", -1)) != _STATE_VERSION:
            raise ValueError(f"unsupported Scores state version {sd.get('version')!r}")
        if int(sd["n"]) != self.n:
            raise ValueError(f"state is for n={int(sd['n'])} samples, this Scores has n={self.n}")
        arr = lambda k, dt: _to_numpy(sd[k], k).astype(dt, copy=True)  # noqa: E731
        fields = {"ema": np.float32, "var": np.float32, "count": np.int32, "last_epoch": np.int32}
        loaded = {k: arr(k, dt) for k, dt in fields.items()}
        for k, a in loaded.items():
            if a.shape != (self.n,):
                raise ValueError(f"state field {k!r} has shape {a.shape}, expected ({self.n},)")
        ids = arr("pending_ids", np.int64)
        losses = arr("pending_losses", np.float32)
        w = arr("pending_weights", np.float32)
        if not (ids.shape == losses.shape == w.shape) or ids.ndim != 1:
            raise ValueError("pending buffer arrays in the state have mismatched shapes")
        self.decay = float(sd["decay"])
        self.epoch = int(sd["epoch"])
        self.num_nonfinite = int(sd["num_nonfinite"])
        self._pending_nonfinite = int(sd["pending_nonfinite"])
        self.ema, self.var = loaded["ema"], loaded["var"]
        self.count, self.last_epoch = loaded["count"], loaded["last_epoch"]
        self._pending = [(ids, losses, w)] if ids.size else []
        if "rel_ema" in sd:                 # absent in states saved before session 15:
            self.rel_ema, self.rel_var = arr("rel_ema", np.float32), arr("rel_var", np.float32)
            if self.rel_ema.shape != (self.n,) or self.rel_var.shape != (self.n,):
                raise ValueError(f"state fields 'rel_ema'/'rel_var' have shapes {self.rel_ema.shape}/"
                                 f"{self.rel_var.shape}, expected ({self.n},)")
        else:                               # the absolute scores stand in for them
            self.rel_ema, self.rel_var = self.ema.copy(), self.var.copy()
        self._sanitize()

    def _sanitize(self) -> None:
        """Repair scores saved before values were clipped (a checkpoint written after a loss
        of 1e20 holds var = inf, later NaN): out-of-range values are clipped, and NaN scores
        make their sample count as never seen again (measured afresh), with a warning."""
        nan = np.isnan(self.ema) | np.isnan(self.var) | np.isnan(self.rel_ema) | np.isnan(self.rel_var)
        if nan.any():
            warnings.warn(f"Scores: {int(nan.sum())} sample(s) had NaN scores in the loaded state; "
                          f"they count as never seen", RuntimeWarning, stacklevel=3)
            self.ema[nan], self.var[nan], self.count[nan], self.last_epoch[nan] = 0, 0, 0, -1
            self.rel_ema[nan], self.rel_var[nan] = 0, 0
        for ema, var in ((self.ema, self.var), (self.rel_ema, self.rel_var)):
            np.clip(ema, -SCORE_LIMIT, SCORE_LIMIT, out=ema)
            np.clip(var, 0.0, SCORE_LIMIT * SCORE_LIMIT, out=var)
