"""Train an image classifier on a pruned stream: ``python -m trainers.classify --data OUT ...``.

Each epoch reads only the samples that the policy's plan selects (``pipeline.Loader``),
weights their losses, reports per-sample losses back, and writes one JSON line of metrics
(``RUN_DIR/metrics.jsonl``). The LR schedule is laid out over the loader's known steps per
epoch. The same command under ``torchrun --nproc-per-node N`` trains with DDP (gloo on CPU,
NCCL on GPU); every rank reads its own slice of the same plan. Checkpoints (model,
optimizer, scheduler, loader/planner state, partial-epoch counters) are written at the end
of every epoch and on SIGTERM; ``--resume`` continues mid-epoch with the same remaining
samples. See docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .metrics import MetricsWriter, loss_histogram
from .models import MODELS, build_model, count_parameters
from .optim import OPTIMIZERS, build_optimizer
from .schedule import make_scheduler

POLICIES = ("full", "uniform", "infobatch", "ucb", "eps_greedy", "swdpp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainers.classify",
        description="Train a classifier with per-epoch data pruning on a streaming dataset "
                    "(WebDataset/Zarr written by tools/shard.py). Writes RUN_DIR/metrics.jsonl, "
                    "config.json, summary.json and checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="training dataset directory (tools/shard.py output)")
    d.add_argument("--test-data", default=None, help="test dataset directory (evaluated on every sample)")
    d.add_argument("--backend", default="dali", choices=["dali", "torch"],
                   help="decode/augment backend (torch: DataLoader + torchvision fallback)")
    d.add_argument("--augment", default="auto", help="augmentation: auto | cifar | imagenet | none")
    d.add_argument("--workers", type=int, default=None, help="loader workers (default: the loader's)")
    d.add_argument("--batch-size", type=int, default=128, help="per-rank batch size")
    d.add_argument("--eval-batch-size", type=int, default=512)
    pr = p.add_argument_group("pruning")
    pr.add_argument("--policy", default="swdpp", choices=POLICIES)
    pr.add_argument("--keep", type=float, default=0.7, help="fraction of the data read per epoch")
    pr.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=None,
                    help="probabilistic mixup (default: on for swdpp, off otherwise)")
    pr.add_argument("--policy-kwargs", default="{}", help="JSON dict passed to the policy")
    o = p.add_argument_group("optimisation")
    o.add_argument("--model", default="tiny", choices=MODELS)
    o.add_argument("--width", type=int, default=16, help="channels of the tiny model's first stage")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS)
    o.add_argument("--lr", type=float, default=None, help="base LR (default: 0.1*bs/128 for sgd/lars, 2e-3 adamw)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--label-smoothing", type=float, default=0.0)
    o.add_argument("--warmup-epochs", type=float, default=1.0)
    o.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on GPU)")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="run directory (default runs/<data>-<policy>-k<keep>-s<seed>)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto | cpu | cuda")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    r.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt (mid-epoch if interrupted)")
    r.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and at the end)")
    r.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of the run, checkpoint, exit (same path as SIGTERM)")
    r.add_argument("--log-ids", action="store_true", help="log the sample ids of every step (ids-rank<r>.jsonl)")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


# ---------------------------------------------------------------- helpers

class _Stop:
    """SIGTERM/SIGINT flag: finish the current step, checkpoint, exit."""

    def __init__(self) -> None:
        self.flag = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. called from a test runner thread)
                pass

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.flag = True


def _dist_env() -> tuple[int, int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return ws, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _any(flag: bool, distributed: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _stat(st: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        try:
            v = st[n]
        except (KeyError, TypeError, IndexError):
            v = getattr(st, n, None)
        if v is not None:
            return v
    return default


def _stats_dict(st: Any) -> dict:
    if st is None:
        return {}
    if isinstance(st, dict):
        return dict(st)
    for m in ("as_dict", "to_dict", "_asdict"):
        if hasattr(st, m):
            return dict(getattr(st, m)())
    if hasattr(st, "__dataclass_fields__"):
        import dataclasses
        return dataclasses.asdict(st)
    try:
        return dict(st)
    except (TypeError, ValueError):
        return {k: v for k, v in vars(st).items() if not k.startswith("_")}


def _numeric(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)}


_NOT_SUMMED = ("epoch", "rank", "world_size", "resumed_at_step", "images_per_s")


def _sum_ranks(d: dict, distributed: bool, device: torch.device) -> dict:
    """Sum counters over ranks (seconds are summed too); dataset totals and ratios stay per rank."""
    if not distributed or not d:
        return d
    keys = sorted(k for k in _numeric(d) if not (k in _NOT_SUMMED or k.startswith("dataset_") or
                                                 k.endswith("_fraction")))
    t = torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    out = dict(d)
    out.update({k: (int(v) if isinstance(d[k], (int, np.integer)) else float(v)) for k, v in zip(keys, t.tolist())})
    return out


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
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)] = int(fields[1])
            ticks[int(d)] = int(fields[11]) + int(fields[12])
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


def _default_out(args) -> str:
    name = Path(args.data.rstrip("/")).name
    return str(Path("runs") / f"{name}-{args.policy}-k{args.keep:g}-s{args.seed}")


def resolve_augment(name: str | None, ds) -> str | None:
    """``auto``: "cifar" for small RGB images, "imagenet" for larger RGB, none for grayscale."""
    if name in (None, "none", "None", ""):
        return None
    if name == "auto":
        if int(ds.channels or 3) != 3:
            return None
        return "cifar" if (ds.sample_shape or (0, 0))[0] <= 64 and ds.sample_shape else "imagenet"
    return name


def _make_loader(ds, args, world_size: int, rank: int, device: str, train: bool):
    """Training loader, or (``train=False``) the evaluation loader with the same preset in eval mode.

    ``args.augment`` must already be resolved from the *training* dataset, so that the test set
    is normalised exactly like the training set.
    """
    import pipeline

    aug = resolve_augment(args.augment, ds)
    kw: dict[str, Any] = dict(backend=args.backend, device=device, seed=args.seed)
    if args.workers is not None:
        kw["num_workers"] = args.workers
    if not train:  # the same preset in eval mode: same normalisation, no random augmentation
        if hasattr(pipeline.Loader, "for_eval"):
            return pipeline.Loader.for_eval(ds, batch_size=args.eval_batch_size, augment=aug, **kw)
        return pipeline.Loader(ds, batch_size=args.eval_batch_size, keep=1.0, policy="full", epochs=1,
                               augment=aug, mixup=False, train=False, **kw)
    mixup = args.mixup if args.mixup is not None else args.policy == "swdpp"
    return pipeline.Loader(ds, batch_size=args.batch_size, keep=1.0 if args.policy == "full" else args.keep,
                           policy=args.policy, epochs=args.epochs, augment=aug, mixup=mixup,
                           world_size=world_size, rank=rank, policy_kwargs=json.loads(args.policy_kwargs), **kw)


def _batch_loss(batch, logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-sample (mixup-aware) cross entropy from the batch; label smoothing when supported."""
    if label_smoothing:
        try:
            return batch.loss(logits, label_smoothing=label_smoothing)
        except TypeError:
            pass
    return batch.loss(logits)


def build_training(args, ds, loader, device: torch.device, world_size: int = 1):
    """Model, optimizer and LR schedule for ``args`` (the classify options) on ``ds``.

    Returns ``(model, raw_model, opt, sched, steps, lr)``: ``model`` is what the step calls
    (compiled and/or DDP-wrapped), ``raw_model`` the plain module (checkpoints, evaluation),
    ``steps`` the loader's known steps per epoch, over which the schedule is laid out.
    """
    in_ch = int(ds.channels or 3)
    model = build_model(args.model, len(ds.classes), in_ch, seed=args.seed, width=args.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps = [int(loader.steps_per_epoch(e)) for e in range(args.epochs)]
    global_bs = args.batch_size * world_size
    lr = args.lr if args.lr is not None else (2e-3 if args.optimizer == "adamw" else 0.1 * global_bs / 128)
    opt = build_optimizer(args.optimizer, raw_model, lr, args.momentum, args.weight_decay)
    sched = make_scheduler(opt, steps, args.warmup_epochs, args.schedule)
    return model, raw_model, opt, sched, steps, lr


def train_step(model: nn.Module, batch, opt, sched, loader, device: torch.device, amp: bool,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a planned batch: weighted (mixup-aware) loss, backward, optimizer and
    schedule step, per-sample losses reported to the loader. Returns (losses, weights)."""
    x = batch.images
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    losses = _batch_loss(batch, logits.float(), label_smoothing)
    w = batch.weights.to(losses.dtype)
    (losses * w).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    det = losses.detach()
    loader.update(batch.ids, det)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so that the caller's timer measures the step
    return det, w


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool) -> dict:
    """Top-1 accuracy and mean CE over every sample of ``loader`` (one pass, no pruning)."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader.epoch(0):
        x, y = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True).long()
        w = getattr(batch, "weights", None)
        valid = (w > 0) if w is not None else torch.ones_like(y, dtype=torch.bool)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        logits = logits.float()
        ce = nn.functional.cross_entropy(logits, y, reduction="none")
        correct += int(((logits.argmax(1) == y) & valid).sum())
        total += int(valid.sum())
        loss_sum += float(ce[valid].sum())
    model.train()
    return {"test_acc": correct / max(1, total), "test_loss": loss_sum / max(1, total), "test_n": total}


# ---------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None) -> dict:
    """Train; return the summary dict (also written to RUN_DIR/summary.json on rank 0)."""
    args = build_parser().parse_args(argv)
    import pipeline

    t_start = time.perf_counter()
    world_size, rank, local_rank = _dist_env()
    distributed = world_size > 1
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device, local_rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = args.amp if args.amp is not None else device.type == "cuda"
    out = Path(args.out or _default_out(args))
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    if distributed:
        dist.barrier()

    ds = pipeline.open_dataset(args.data)
    args.augment = resolve_augment(args.augment, ds)
    loader = _make_loader(ds, args, world_size, rank, args.device, train=True)
    test_loader = None
    if args.test_data and is_main:
        test_loader = _make_loader(pipeline.open_dataset(args.test_data), args, 1, 0, args.device, train=False)

    in_ch = int(ds.channels or 3)
    model, raw_model, opt, sched, steps, lr = build_training(args, ds, loader, device, world_size)

    # ---- resume
    ck_dir = out / "ckpt"
    start_epoch, step_in_epoch, global_step, wall_s, cpu_s = 0, 0, 0, 0.0, 0.0
    partial: dict[str, Any] = {}
    if args.resume and (ck_dir / "last.pt").exists():
        ck = checkpoint.load(ck_dir / "last.pt")
        if ck["world_size"] != world_size:
            raise SystemExit(f"checkpoint was written with world size {ck['world_size']}, not {world_size}")
        raw_model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        mine = ck if rank == 0 else checkpoint.load(ck_dir / f"loader-rank{rank}.pt")
        loader.load_state_dict(mine["loader"])
        partial = mine.get("partial", {}) or {}
        start_epoch, step_in_epoch, global_step = ck["epoch"], ck["step_in_epoch"], ck["global_step"]
        wall_s, cpu_s = ck["wall_s"], ck.get("cpu_s", 0.0)
        if is_main:
            print(f"[classify] resumed from {ck_dir/'last.pt'}: epoch {start_epoch} step {step_in_epoch}", flush=True)
    elif args.resume and is_main:
        print(f"[classify] --resume: no checkpoint in {ck_dir}, starting fresh", flush=True)
    resumed_mid = bool(partial)

    config = dict(vars(args), world_size=world_size, lr=lr, steps_per_epoch=steps, dataset_size=len(ds),
                  num_classes=len(ds.classes), in_channels=in_ch, parameters=count_parameters(raw_model),
                  amp=amp, torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                  cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  data_name=Path(args.data.rstrip("/")).name)
    if is_main:
        (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    metrics = MetricsWriter(out / "metrics.jsonl", resume_epoch=start_epoch if args.resume else None, enabled=is_main)
    ids_log = open(out / f"ids-rank{rank}.jsonl", "a" if args.resume else "w") if args.log_ids else None

    stopper = _Stop()
    stopper.install()
    progress = not args.no_progress and is_main
    stopped = False
    last_eval: dict = {}
    try:
        for epoch in range(start_epoch, args.epochs):
            acc = dict(loss_sum=0.0, n=0, steps=0, data_wait_s=0.0, compute_s=0.0, prior_s=0.0, prior_cpu_s=0.0,
                       prior_io={}, losses=[])
            if resumed_mid:
                acc.update({k: partial[k] for k in acc if k in partial})
                acc["losses"] = [np.asarray(partial.get("losses", np.zeros(0, np.float32)), np.float32)]
                resumed_mid = False
            t_epoch, c_epoch = time.perf_counter(), cpu_seconds()
            it = iter(loader.epoch(epoch))
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=steps[epoch], initial=step_in_epoch, desc=f"epoch {epoch}", leave=False,
                           dynamic_ncols=True, file=sys.stderr)
            model.train()
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                det, w = train_step(model, batch, opt, sched, loader, device, amp, args.label_smoothing)
                t2 = time.perf_counter()
                valid = (w > 0)
                lv = det[valid].float().cpu().numpy()
                acc["loss_sum"] += float(lv.sum())
                acc["n"] += int(lv.size)
                acc["losses"].append(lv)
                acc["steps"] += 1
                acc["data_wait_s"] += t1 - t0
                acc["compute_s"] += t2 - t1
                step_in_epoch += 1
                global_step += 1
                if ids_log is not None:
                    ids = batch.ids.cpu().numpy() if torch.is_tensor(batch.ids) else np.asarray(batch.ids)
                    ids_log.write(json.dumps({"epoch": epoch, "step": step_in_epoch, "ids": ids.tolist()}) + "\n")
                    ids_log.flush()
                if bar is not None:
                    bar.update(1)
                    if acc["steps"] % 10 == 0:
                        bar.set_postfix(loss=f"{acc['loss_sum'] / max(1, acc['n']):.3f}")
                want_stop = stopper.flag or (args.max_steps is not None and global_step >= args.max_steps)
                if _any(want_stop, distributed, device):
                    stopped = True
                    break
            if bar is not None:
                bar.close()
            segment_s = time.perf_counter() - t_epoch
            wall_s += segment_s
            epoch_s = acc["prior_s"] + segment_s  # a resumed epoch counts its time before the stop too
            epoch_cpu_s = acc["prior_cpu_s"] + cpu_seconds() - c_epoch
            cpu_s += epoch_cpu_s - acc["prior_cpu_s"]
            if stopped:
                acc["prior_s"], acc["prior_cpu_s"] = epoch_s, epoch_cpu_s
                acc["prior_io"] = _numeric(_stats_dict(loader.stats(epoch)))
                _save(ck_dir, rank, world_size, raw_model, opt, sched, loader, epoch, step_in_epoch, global_step,
                      wall_s, cpu_s, partial=dict(acc, losses=np.concatenate(acc["losses"]) if acc["losses"] else
                                           np.zeros(0, np.float32)))
                if is_main:
                    print(f"[classify] stopped at epoch {epoch} step {step_in_epoch}; checkpoint in {ck_dir}",
                          flush=True)
                break

            # ---- end of epoch: stats, eval, metrics, checkpoint
            io = _stats_dict(loader.stats(epoch))
            prior = acc.get("prior_io") or {}
            for k, v in prior.items():  # counters of the part of a resumed epoch before the stop
                if k in io and isinstance(v, (int, float)) and k not in _NOT_SUMMED and k != "samples_planned" \
                        and not (k.startswith("dataset_") or k.endswith("_fraction")):
                    io[k] = io[k] + v
            if prior and "samples_planned" in io:  # the resumed part plans only what was left
                io["samples_planned"] += prior.get("samples_delivered", 0)
            io_sum = _sum_ranks(_numeric(io), distributed, device)
            counts = _sum_ranks({k: acc[k] for k in ("loss_sum", "n", "steps")}, distributed, device)
            rec: dict[str, Any] = {
                "epoch": epoch, "policy": args.policy, "keep": args.keep, "seed": args.seed,
                "kept": int(_stat(io_sum, "samples_planned", "planned", "kept", default=counts["n"])),
                "steps": acc["steps"],
                "samples_read": _stat(io_sum, "samples_read", "samples"),
                "bytes_read": _stat(io_sum, "bytes_read", "bytes"),
                "requests": _stat(io_sum, "requests_read", "requests"),
                "full_samples": _stat(io, "dataset_samples", "full_samples", default=len(ds)),
                "full_bytes": _stat(io, "dataset_payload", "full_bytes",
                                    default=int(np.asarray(ds.length, dtype=np.int64).sum())),
                "data_wait_s": acc["data_wait_s"], "compute_s": acc["compute_s"], "epoch_s": epoch_s,
                "wall_s": wall_s, "epoch_cpu_s": epoch_cpu_s, "cpu_s": cpu_s, "train_loss": counts["loss_sum"] / max(1, counts["n"]),
                "train_samples": int(counts["n"]), "lr": opt.param_groups[0]["lr"],
                "loss_hist": loss_histogram(acc["losses"] if acc["losses"] else [np.zeros(0)]),
                "io": io_sum,
            }
            sc = getattr(loader, "scores", None)
            if sc is not None and hasattr(sc, "ema") and hasattr(sc, "seen"):
                seen = np.asarray(sc.seen)
                rec["score_hist"] = loss_histogram(np.asarray(sc.ema)[seen])  # scores the epoch was planned from (losses are applied at the next sync)
                rec["score_hist"]["seen_fraction"] = float(seen.mean()) if seen.size else 0.0
            t_eval = time.perf_counter()
            if test_loader is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
                last_eval = evaluate(raw_model, test_loader, device, amp)
                rec.update(last_eval)
            rec["eval_s"] = time.perf_counter() - t_eval
            rec["elapsed_s"] = time.perf_counter() - t_start
            metrics.write(rec)
            if is_main:
                msg = (f"[classify] epoch {epoch}: steps {acc['steps']} loss {rec['train_loss']:.4f} "
                       f"read {rec['samples_read']} samples / {rec['bytes_read']} B in {epoch_s:.1f}s "
                       f"(wait {acc['data_wait_s']:.1f}s)")
                if "test_acc" in rec:
                    msg += f" test_acc {rec['test_acc']:.4f}"
                print(msg, flush=True)
            step_in_epoch = 0
            _save(ck_dir, rank, world_size, raw_model, opt, sched, loader, epoch + 1, 0, global_step, wall_s, cpu_s,
                  None)
    finally:
        stopper.restore()
        if ids_log is not None:
            ids_log.close()

    summary = dict(run=str(out), policy=args.policy, keep=args.keep, seed=args.seed, epochs=args.epochs,
                   stopped=stopped, global_step=global_step, wall_s=wall_s, cpu_s=cpu_s,
                   elapsed_s=time.perf_counter() - t_start, **last_eval)
    if is_main and not stopped:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if distributed:
        dist.barrier()
    return summary


def _save(ck_dir: Path, rank: int, world_size: int, model, opt, sched, loader, epoch: int, step_in_epoch: int,
          global_step: int, wall_s: float, cpu_s: float, partial: dict | None) -> None:
    """Rank 0 writes last.pt (everything); other ranks write their loader state only."""
    state = {"loader": loader.state_dict(), "partial": partial}
    if rank == 0:
        state.update(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step, wall_s=wall_s, cpu_s=cpu_s,
                     world_size=world_size)
        checkpoint.save(state, ck_dir / "last.pt")
    else:
        checkpoint.save(state, ck_dir / f"loader-rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    s = main()
    if s.get("stopped"):
        sys.exit(0)
