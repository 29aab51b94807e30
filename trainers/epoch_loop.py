"""The epoch loop of ``python -m trainers.classify``: training steps, evaluation, and one
metrics record per epoch.

An epoch can stop between two steps (SIGTERM/SIGUSR1 or ``--max-steps``): its counters so
far go into the checkpoint (``partial``), and the resumed process adds them to the rest of
the epoch, so the epoch's record is the same as if it had not stopped (time included; the
``io`` block's steps, reads and fractions are the whole epoch's). On resume the ids logs
are cut back to the checkpoint's position, so a replayed step (after a kill -9) is logged
once.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.stats import EpochStats, sum_over_ranks

from .metrics import MetricsWriter, loss_histogram
from .optim import scale_weight_decay
from .run_setup import Progress, Run, save_checkpoint


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and all its descendants (loader workers).

    Robust to other jobs competing for the cores, unlike wall time. Linux: summed from
    /proc; elsewhere: this process only (``time.process_time``).
    """
    try:
        tick = os.sysconf("SC_CLK_TCK")
        parent: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields_ = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)] = int(fields_[1])
            ticks[int(d)] = int(fields_[11]) + int(fields_[12])
        me = os.getpid()
        total, todo = 0, [me]
        children: dict[int, list[int]] = {}
        for pid, pp in parent.items():
            children.setdefault(pp, []).append(pid)
        while todo:
            pid = todo.pop()
            total += ticks.get(pid, 0)
            todo.extend(children.get(pid, []))
        return total / tick
    except (OSError, ValueError, IndexError):
        return time.process_time()


def mean_loss_weight(w: torch.Tensor) -> float:
    """The mean of the positive loss weights of a step's batch, over all ranks of a DDP run
    (the same factor on every rank: a per-rank decay would make the replicas drift apart);
    1 when no row carries a weight."""
    real = w > 0
    acc = torch.stack([(w * real).sum(), real.sum().to(w.dtype)]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(acc)
    return float(acc[0] / acc[1]) if acc[1] > 0 else 1.0


def train_step(model: nn.Module, batch: Any, opt: Any, sched: Any, loader: Any, device: torch.device, amp: bool,
               label_smoothing: float = 0.0, scale_decay: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a planned batch: weighted (mixup-aware) loss, backward, optimizer and
    schedule step, per-sample losses reported to the loader. Returns (losses, weights).
    ``scale_decay``: the weight decay of this step is scaled by the mean loss weight of the
    batch's real rows over all ranks (`optim.scale_weight_decay`; padding rows weigh 0 and
    do not count)."""
    x = batch.images
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    losses = batch.loss(logits.float(), label_smoothing=label_smoothing)
    w = batch.weights.to(losses.dtype)
    (losses * w).mean().backward()
    if scale_decay:
        scale_weight_decay(opt, mean_loss_weight(w))
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    det = losses.detach()
    loader.update(batch.ids, det)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so that the caller's timer measures the step
    return det, w


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: bool) -> dict:
    """Top-1 accuracy and mean CE over every sample of ``loader`` (one pass, no pruning)."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader.epoch(0):
        x, y = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True).long()
        valid = batch.weights > 0  # padding rows of the last batch have weight 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        ce = nn.functional.cross_entropy(logits, y, reduction="none")
        correct += int(((logits.argmax(1) == y) & valid).sum())
        total += int(valid.sum())
        loss_sum += float(ce[valid].sum())
    model.train()
    return {"test_acc": correct / max(1, total), "test_loss": loss_sum / max(1, total), "test_n": total}


def trim_ids_logs(run: Run, p: Progress) -> None:
    """Cut ``ids-rank<r>.jsonl`` back to the steps before ``p`` (the checkpoint's position):
    steps a killed process logged after its last checkpoint are replayed, and logged again.
    Every rank trims its own log; rank 0 also those of ranks the run no longer has."""
    paths = [run.out / f"ids-rank{run.rank}.jsonl"]
    if run.is_main:
        paths += [q for q in run.out.glob("ids-rank*.jsonl")
                  if q.stem[len("ids-rank"):].isdigit() and int(q.stem[len("ids-rank"):]) >= run.world_size]
    for path in paths:
        _trim_ids_log(Path(path), p.epoch, p.step_in_epoch)


def _trim_ids_log(path: Path, epoch: int, step: int) -> None:
    """Keep the lines of steps before (``epoch``, ``step`` consumed); a torn last line goes too."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(r["epoch"]) < epoch or (int(r["epoch"]) == epoch and int(r["step"]) <= step):
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class StopFlag:
    """SIGTERM/SIGUSR1 flag: finish the current step, checkpoint, exit."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the signals (where possible) until :meth:`restore`."""
        for s in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.flag = True


def any_rank(flag: bool, run: Run) -> bool:
    """True on every rank if ``flag`` is true on any rank (so that all ranks stop at the same step)."""
    if not run.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


@dataclass
class EpochCounters:
    """The loop's own per-epoch accumulation on one rank; saved as ``partial`` when an epoch stops."""

    loss_sum: float = 0.0
    n: int = 0              # real (weight > 0) samples trained on
    steps: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    prior_s: float = 0.0    # wall and CPU time of the epoch before the last stop
    prior_cpu_s: float = 0.0
    prior_io: dict = field(default_factory=dict)  # EpochStats.to_json() of the epoch before the last stop
    losses: list = field(default_factory=list)    # per-step arrays of the real samples' losses

    @classmethod
    def from_partial(cls, partial: dict) -> EpochCounters:
        """Counters restored from a checkpoint's ``partial``."""
        acc = cls(**{f.name: partial[f.name] for f in fields(cls) if f.name != "losses" and f.name in partial})
        acc.losses = [np.asarray(partial.get("losses", np.zeros(0, np.float32)), np.float32)]
        return acc

    def to_partial(self) -> dict:
        """What a checkpoint stores (the losses as one array)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["losses"] = np.concatenate(self.losses) if self.losses else np.zeros(0, np.float32)
        return d

    def io(self, st: EpochStats) -> EpochStats:
        """This rank's stats of the whole epoch: ``st`` (this process's part) plus the part before a stop."""
        return st.merge(EpochStats.from_json(self.prior_io)) if self.prior_io else st


class EpochLoop:
    """Trains the epochs left in ``progress``, evaluating, recording and checkpointing each one."""

    def __init__(self, args: argparse.Namespace, run: Run, progress: Progress, loader: Any, test_loader: Any,
                 model: nn.Module, raw_model: nn.Module, opt: Any, sched: Any, steps: list[int],
                 t_start: float) -> None:
        self.args, self.run, self.p = args, run, progress
        self.loader, self.test_loader = loader, test_loader
        self.model, self.raw_model, self.opt, self.sched = model, raw_model, opt, sched
        self.steps, self.t_start = steps, t_start
        self.metrics = MetricsWriter(run.out / "metrics.jsonl", resume_epoch=progress.epoch if args.resume else None,
                                     enabled=run.is_main)
        self.last_eval: dict = {}

    def train(self) -> bool:
        """Run the remaining epochs; True if stopped (signal or ``--max-steps``) before the end."""
        a = self.args
        ids_log = None
        if a.log_ids:
            if a.resume:
                trim_ids_logs(self.run, self.p)
            ids_log = open(self.run.out / f"ids-rank{self.run.rank}.jsonl", "a" if a.resume else "w")
        stopper = StopFlag()
        stopper.install()
        try:
            for epoch in range(self.p.epoch, a.epochs):
                if self._epoch(epoch, stopper, ids_log):
                    return True
        finally:
            stopper.restore()
            if ids_log is not None:
                ids_log.close()
        return False

    def _epoch(self, epoch: int, stopper: StopFlag, ids_log: Any) -> bool:
        """One epoch (or its rest after a resume); True if it stopped before its end."""
        a, run, p = self.args, self.run, self.p
        acc = EpochCounters.from_partial(p.partial) if p.partial else EpochCounters()
        p.partial = {}
        t_epoch, c_epoch = time.perf_counter(), cpu_seconds()
        it = iter(self.loader.epoch(epoch))
        bar = None
        if not a.no_progress and run.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.loader.steps_per_epoch(epoch), initial=p.step_in_epoch, desc=f"epoch {epoch}", leave=False,
                       dynamic_ncols=True, file=sys.stderr)
        self.model.train()
        stopped = False
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            t1 = time.perf_counter()
            det, w = train_step(self.model, batch, self.opt, self.sched, self.loader, run.device, run.amp,
                                a.label_smoothing, a.scale_decay)
            t2 = time.perf_counter()
            lv = det[w > 0].float().cpu().numpy()
            acc.loss_sum += float(lv.sum())
            acc.n += int(lv.size)
            acc.losses.append(lv)
            acc.steps += 1
            acc.data_wait_s += t1 - t0
            acc.compute_s += t2 - t1
            p.step_in_epoch += 1
            p.global_step += 1
            if ids_log is not None:
                ids = batch.ids.cpu().numpy() if torch.is_tensor(batch.ids) else np.asarray(batch.ids)
                ids_log.write(json.dumps({"epoch": epoch, "step": p.step_in_epoch, "ids": ids.tolist()}) + "\n")
                ids_log.flush()
            if bar is not None:
                bar.update(1)
                if acc.steps % 10 == 0:
                    bar.set_postfix(loss=f"{acc.loss_sum / max(1, acc.n):.3f}")
            want_stop = stopper.flag or (a.max_steps is not None and p.global_step >= a.max_steps)
            if any_rank(want_stop, run):
                stopped = True
                break
        if bar is not None:
            bar.close()
        segment_s = time.perf_counter() - t_epoch
        p.wall_s += segment_s
        epoch_s = acc.prior_s + segment_s  # a resumed epoch counts its time before the stop too
        epoch_cpu_s = acc.prior_cpu_s + cpu_seconds() - c_epoch
        p.cpu_s += epoch_cpu_s - acc.prior_cpu_s
        if stopped:
            acc.prior_s, acc.prior_cpu_s = epoch_s, epoch_cpu_s
            acc.prior_io = acc.io(self.loader.stats(epoch)).to_json()
            save_checkpoint(run, self.raw_model, self.opt, self.sched, self.loader, p, acc.to_partial())
            if run.is_main:
                print(f"[classify] stopped at epoch {epoch} step {p.step_in_epoch}; checkpoint in {run.ck_dir}",
                      flush=True)
            return True
        self._finish_epoch(epoch, acc, epoch_s, epoch_cpu_s)
        p.epoch, p.step_in_epoch = epoch + 1, 0
        save_checkpoint(run, self.raw_model, self.opt, self.sched, self.loader, p, None)
        return False

    def _finish_epoch(self, epoch: int, acc: EpochCounters, epoch_s: float, epoch_cpu_s: float) -> None:
        """Evaluate when due, write the epoch's metrics record, print its line."""
        a, run = self.args, self.run
        rec = self.record(epoch, acc, epoch_s, epoch_cpu_s)
        t_eval = time.perf_counter()
        if self.test_loader is not None and ((epoch + 1) % a.eval_every == 0 or epoch + 1 == a.epochs):
            self.last_eval = evaluate(self.raw_model, self.test_loader, run.device, run.amp)
            rec.update(self.last_eval)
        rec["eval_s"] = time.perf_counter() - t_eval
        rec["elapsed_s"] = time.perf_counter() - self.t_start
        self.metrics.write(rec)
        if run.is_main:
            msg = (f"[classify] epoch {epoch}: steps {acc.steps} loss {rec['train_loss']:.4f} "
                   f"read {rec['samples_read']} samples / {rec['bytes_read']} B in {epoch_s:.1f}s "
                   f"(wait {acc.data_wait_s:.1f}s)")
            if "test_acc" in rec:
                msg += f" test_acc {rec['test_acc']:.4f}"
            print(msg, flush=True)

    def record(self, epoch: int, acc: EpochCounters, epoch_s: float, epoch_cpu_s: float) -> dict:
        """The epoch's metrics (before evaluation): counters summed over ranks, see trainers/metrics.py."""
        a, run, p = self.args, self.run, self.p
        st = self.loader.stats(epoch)
        whole = acc.io(st)
        total = whole.all_reduce(run.device)
        counts = sum_over_ranks({"loss_sum": acc.loss_sum, "n": acc.n}, run.device)
        rec: dict[str, Any] = {
            "epoch": epoch, "policy": a.policy, "keep": a.keep, "seed": a.seed,
            "kept": int(total.samples_planned), "steps": acc.steps,
            "samples_read": total.samples_read, "bytes_read": total.bytes_read, "requests": total.requests,
            "full_samples": whole.dataset_samples, "full_bytes": whole.dataset_payload,
            "data_wait_s": acc.data_wait_s, "compute_s": acc.compute_s, "epoch_s": epoch_s,
            "wall_s": p.wall_s, "epoch_cpu_s": epoch_cpu_s, "cpu_s": p.cpu_s,
            "train_loss": counts["loss_sum"] / max(1, counts["n"]), "train_samples": int(counts["n"]),
            "lr": self.opt.param_groups[0]["lr"],
            "loss_hist": loss_histogram(acc.losses if acc.losses else [np.zeros(0)]),
            # the fractions are the whole epoch's (every part, every rank) of the whole
            # dataset, so they do not depend on where the epoch stopped or on the world size
            "io": dict(total.to_json(), **dict(replace(total, world_size=1).ratios(),
                                               images_per_s=whole.images_per_s)),
        }
        rec["num_nonfinite"] = int(total.num_nonfinite)   # NaN/inf losses, ignored by the scores
        if run.is_main and counts["n"] and total.num_nonfinite >= counts["n"]:
            print(f"[classify] warning: epoch {epoch}: all {counts['n']} training losses were NaN/inf "
                  "(the model diverged; try a lower --lr)", file=sys.stderr, flush=True)
        sc = self.loader.scores
        if sc is not None:
            seen = np.asarray(sc.seen)
            # the scores this epoch was planned from (its losses are applied at the next sync)
            rec["score_hist"] = loss_histogram(np.asarray(sc.ema)[seen])
            rec["score_hist"]["seen_fraction"] = float(seen.mean()) if seen.size else 0.0
            # epochs in a row the longest-waiting sample went unread before this one (never
            # read: all of them); the last epoch also counts the gaps still open at the end of
            # the run, so that its largest value over a run is the run's worst gap
            last = np.asarray(sc.last_epoch)
            rec["unseen_max"] = int(epoch - 1 - last.min()) if last.size and epoch > 0 else 0
            if epoch == a.epochs - 1 and last.size:
                rec["unseen_max"] = max(rec["unseen_max"], self._open_gap(epoch, sc, last))
        return rec

    def _open_gap(self, epoch: int, sc: Any, last: np.ndarray) -> int:
        """The longest run of epochs, up to and including ``epoch``, that a sample has gone
        unread at its end: the epoch's own reads (its pending score updates, every rank's)
        close the gaps of the samples it read; never-read samples count every epoch."""
        after = last.astype(np.int64)
        ids = np.asarray(sc.state_dict()["pending_ids"], np.int64)
        after[ids[(ids >= 0) & (ids < after.size)]] = epoch
        if self.run.distributed:
            t = torch.from_numpy(after).to(self.run.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            after = t.cpu().numpy()
        return int(epoch - after.min())
