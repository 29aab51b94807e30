"""Run set-up of ``python -m trainers.classify``: device and process group, the run directory,
config.json and summary.json, and the checkpoints a run saves and resumes from.

Checkpoints: rank 0 writes ``RUN_DIR/ckpt/last.pt`` (model, optimizer, scheduler, its loader
state, the position in the run and the counters of a stopped epoch); every other rank writes
``loader-rank<r>.pt`` with its own loader state and counters, since each rank reads its own
slice of the plan.  A checkpoint of W ranks resumes on W' ranks (elastic): every rank reads
all W loader states (``Loader.load_state_dict`` re-slices the rest of the epoch) and the LR
schedule is laid out again for W' (:func:`rescale_schedule`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.plan.distributed import dist_env
from pipeline.stats import EpochStats

from . import checkpoint
from .models import count_parameters
from .schedule import lr_factor_fn


@dataclass(frozen=True)
class Run:
    """Where this process trains: run directory, device, its rank, mixed precision."""

    out: Path
    device: torch.device
    rank: int
    world_size: int
    amp: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def ck_dir(self) -> Path:
        return self.out / "ckpt"

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()


@dataclass
class Progress:
    """Position in the run: what a checkpoint restores besides the model and the loader."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    wall_s: float = 0.0   # training wall time, summed over the run's processes
    cpu_s: float = 0.0
    partial: dict = field(default_factory=dict)  # counters of a stopped epoch; empty at an epoch boundary


def default_out(args: argparse.Namespace) -> str:
    """``runs/<data>-<policy>-k<keep>-s<seed>`` (keep 1 for the full policy, which reads everything)."""
    name = Path(args.data.rstrip("/")).name
    keep = 1.0 if args.policy == "full" else args.keep
    return str(Path("runs") / f"{name}-{args.policy}-k{keep:g}-s{args.seed}")


def run_dir(args: argparse.Namespace) -> Path:
    """The run directory: ``--out``, else :func:`default_out`."""
    return Path(args.out or default_out(args))


def default_lr(optimizer: str, batch_size: int, world_size: int) -> float:
    """The base LR when ``--lr`` is not given: 2e-3 for adamw, else 0.1 x global batch / 128."""
    return 2e-3 if optimizer == "adamw" else 0.1 * batch_size * world_size / 128


def start_run(args: argparse.Namespace, out: Path | None = None) -> Run:
    """Pick the device (resolving ``args.device="auto"``), join the process group under
    torchrun and create the run directory (``out``, default :func:`run_dir`)."""
    env = dist_env()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device, env.local_rank) if args.device == "cuda" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if env.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = args.amp if args.amp is not None else device.type == "cuda"
    run = Run(Path(out) if out is not None else run_dir(args), device, env.rank, env.world_size, amp)
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
    run.barrier()  # the directory exists before any rank writes into it
    return run


def dataset_id(ds: Any) -> str:
    """A digest of the samples' labels and sizes, in order: the same dataset wherever it
    lies (a moved copy resumes), another one (a reshuffled conversion too) differs."""
    import hashlib
    h = hashlib.sha256(np.asarray(ds.labels, np.int64).tobytes())
    h.update(np.asarray(ds.length, np.int64).tobytes())
    return h.hexdigest()[:16]


def write_config(run: Run, args: argparse.Namespace, ds: Any, raw_model: nn.Module, lr: float,
                 steps: list[int]) -> dict:
    """The run's options, dataset, model and machine; written to config.json by rank 0."""
    # what the run does: mixup resolved (None: by policy), lr the base LR in use (after a
    # resume: the checkpoint's), lr_given whether it came from --lr or the default rule
    config = dict(vars(args), mixup=resolved_mixup(args.mixup, args.policy), world_size=run.world_size,
                  lr=lr, lr_given=args.lr is not None, steps_per_epoch=steps, dataset_size=len(ds),
                  num_classes=len(ds.classes), in_channels=int(ds.channels or 3),
                  parameters=count_parameters(raw_model), amp=run.amp, torch=torch.__version__,
                  python=platform.python_version(), machine=platform.machine(), cpu_count=os.cpu_count(),
                  torch_threads=torch.get_num_threads(),
                  gpu=torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else None,
                  data_name=Path(args.data.rstrip("/")).name, dataset_id=dataset_id(ds))
    if run.is_main:
        (run.out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    return config


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path`` (rank 0's ``last.pt``); SystemExit naming it when unreadable."""
    try:
        ck = checkpoint.load(path)
        int(ck["world_size"]), int(ck["epoch"]), int(ck["step_in_epoch"])
    except Exception as e:  # noqa: BLE001 - empty, cut, foreign or garbage: all unusable
        raise SystemExit(f"--resume: {path} is not a readable checkpoint of this trainer "
                         f"({type(e).__name__}: {e}); move it away to start afresh, or resume "
                         "from a copy") from None
    return ck


def resume(run: Run, args: argparse.Namespace, raw_model: nn.Module, opt: Any, sched: Any, loader: Any,
           ck: dict | None = None) -> Progress:
    """With ``--resume`` and a checkpoint: restore model, optimizer, schedule and loader, and
    return where the run stopped (mid-epoch included); otherwise a fresh start.

    ``ck``: the checkpoint already read (:func:`read_checkpoint`); None reads ``last.pt``.
    The options are checked against the run's config.json before (:func:`check_resume_config`,
    called by ``classify.main``)."""
    last = run.ck_dir / "last.pt"
    if not args.resume:
        return Progress()
    if ck is None:
        if not last.exists():
            if run.is_main:
                print(f"[classify] --resume: no checkpoint in {run.ck_dir}, starting fresh", flush=True)
            return Progress()
        ck = read_checkpoint(last)
    old_w = int(ck["world_size"])
    raw_model.load_state_dict(ck["model"])
    if old_w == run.world_size:
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        mine = ck if run.rank == 0 else _load_rank(run.ck_dir, run.rank)
        loader.load_state_dict(mine["loader"])
        partial = mine.get("partial", {}) or {}
    else:  # elastic: the new world size's steps per epoch and base LR (before loading)
        steps = [int(loader.steps_per_epoch(e)) for e in range(args.epochs)]
        base_lrs = [g["initial_lr"] for g in opt.param_groups]
        opt.load_state_dict(ck["optimizer"])
        states = [ck] + [_load_rank(run.ck_dir, r) for r in range(1, old_w)]
        loader.load_state_dict([st["loader"] for st in states])
        partial = combine_partials([st.get("partial") or {} for r, st in enumerate(states)
                                    if r % run.world_size == run.rank])
        epoch = int(ck["epoch"])
        left = int(loader.steps_per_epoch(epoch)) - int(ck["step_in_epoch"]) if epoch < args.epochs else 0
        rescale_schedule(sched, steps, base_lrs, epoch, left, args.warmup_epochs, args.schedule)
    p = Progress(ck["epoch"], ck["step_in_epoch"], ck["global_step"], ck["wall_s"], ck.get("cpu_s", 0.0), partial)
    if run.is_main:
        resized = f" (written by {old_w} ranks, resumed on {run.world_size})" if old_w != run.world_size else ""
        print(f"[classify] resumed from {last}{resized}: epoch {p.epoch} step {p.step_in_epoch}", flush=True)
    return p


# Options that shape the plan of every epoch, the model or its optimizer: a resumed run
# must keep them (the checkpoint's scores, position, weights and optimizer state are theirs)
RESUME_FIXED = ("policy", "keep", "policy_kwargs", "seed", "epochs", "batch_size", "mixup",
                "model", "width", "optimizer", "momentum", "weight_decay", "label_smoothing",
                "scale_decay", "warmup_epochs", "schedule")

# Options that a ``--resume`` takes from the run's config.json when they are not given
# anew (an omitted option means "as before"), besides --lr (:func:`inherit_options`).
# Not inherited: --data (required; a moved copy resumes), and what belongs to the machine
# or this process (--device, --workers, --threads, --amp, --compile, --max-steps, --out).
RESUME_INHERITED = RESUME_FIXED + ("test_data", "backend", "augment", "eval_batch_size", "eval_every", "log_ids")


def saved_config(out: Path) -> dict | None:
    """The run's config.json (None when absent or unreadable)."""
    path = Path(out) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def resolved_mixup(mixup: bool | None, policy: str) -> bool:
    """``--mixup`` as the run applies it: the flag, or by default on for swdpp and swdpp_v1."""
    return bool(mixup) if mixup is not None else str(policy).startswith("swdpp")


def resolved_policy_kwargs(kwargs: Any, policy: str) -> dict:
    """The policy's options as it runs with them: the given ones over the defaults of its
    constructor (``{"mixup": 0.0}`` and ``{}`` are the same swdpp)."""
    import inspect

    from pipeline.plan.policies import POLICIES
    given = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs or {})
    cls = POLICIES.get(policy)
    if cls is None:
        return given
    params = inspect.signature(cls.__init__).parameters
    out = {k: q.default for k, q in params.items()
           if k not in ("self", "keep", "epochs") and q.default is not q.empty}
    out.update(given)
    return out


def resolved_option(key: str, value: Any, cfg: dict) -> Any:
    """An option's value as the run with options ``cfg`` uses it (for comparisons)."""
    policy = cfg.get("policy")
    if key == "mixup":
        return resolved_mixup(value, policy)
    if key == "policy_kwargs":
        return resolved_policy_kwargs(value, policy)
    if key == "keep":
        return 1.0 if policy == "full" else float(value)
    return value


def saved_lr(old: dict | None, ck: dict | None) -> float | None:
    """The base LR the saved run uses: its checkpoint's (the optimizer's ``initial_lr``), else
    its config.json's ``lr``."""
    try:
        return float(ck["optimizer"]["param_groups"][0]["initial_lr"])
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return float(old["lr"]) if old and old.get("lr") is not None else None


def inherit_options(args: argparse.Namespace, old: dict, given: set[str], ck: dict | None = None) -> list[str]:
    """``--resume``: every option of :data:`RESUME_INHERITED` not given anew takes the saved
    run's value (config.json), and so does ``--lr`` where the run's LR was chosen (``--lr``)
    rather than the default rule (which scales with the global batch, also on another world
    size). Returns ``--name value`` for each option whose value this changed."""
    import math
    taken = []
    for k in RESUME_INHERITED:
        if k in given or k not in old:
            continue
        v = old[k]
        if k == "test_data" and v is not None and not Path(str(v)).exists():
            print(f"[classify] warning: --resume: the run's test set {v} is absent; "
                  "continuing without evaluation (give --test-data)", file=sys.stderr, flush=True)
            v = None
        if getattr(args, k, None) != v:
            name = k.replace("_", "-")
            shown = f"--{name}" if v is True else f"--no-{name}" if v is False else f"--{name} {v}"
            taken.append(f"--{name} none" if v is None else shown)
            setattr(args, k, v)
    lr = saved_lr(old, ck)
    if "lr" not in given and lr is not None:
        chosen = old.get("lr_given")
        if chosen is None:  # config.json of an older version: chosen if it is not the default
            rule = default_lr(old.get("optimizer", args.optimizer), int(old.get("batch_size", args.batch_size)),
                              int(old.get("world_size", 1)))
            chosen = not math.isclose(lr, rule, rel_tol=1e-9)
        if chosen:
            args.lr = lr
            taken.append(f"--lr {lr:g}")
    return taken


def check_resume_config(run: Run, args: argparse.Namespace, ds: Any = None, ck: dict | None = None) -> None:
    """Refuse ``--resume`` with options that change the plan, the model or the optimizer, or
    with another dataset (the run's config.json holds the old values). Values are compared
    as the run uses them (``--mixup`` resolved by policy, policy options over their
    defaults, keep 1 for full); an equivalent one given anew takes the saved form, so that
    the loader's state matches. ``ck``: the checkpoint, whose LR is the one in use."""
    import math
    path = run.out / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = vars(args)
    changed = []
    for k in RESUME_FIXED:
        if k not in old:
            continue
        a, b = resolved_option(k, old[k], old), resolved_option(k, new[k], new)
        if a != b:
            shown = (a, b) if k == "mixup" else (old[k], new[k])
            changed.append(f"--{k.replace('_', '-')} {shown[0]!r} -> {shown[1]!r}")
        elif k in ("policy_kwargs", "mixup"):
            setattr(args, k, old[k])
    lr = saved_lr(old, ck if ck is not None and int(ck.get("world_size", -1)) == run.world_size else None)
    if args.lr is not None and lr is not None and not math.isclose(lr, float(args.lr), rel_tol=1e-9):
        changed.append(f"--lr {lr!r} -> {args.lr!r}")
    if ds is not None and old.get("dataset_id") not in (None, dataset_id(ds)):
        changed.append(f"--data {old.get('data')!r} -> {args.data!r} (another dataset: its "
                       "samples' labels or sizes differ)")
    if changed:
        raise SystemExit(f"--resume: {path} was written with other options ({'; '.join(changed)}); the "
                         "checkpoint's plan, scores and schedule depend on them: resume with the old "
                         "values, or start a new run (another --out)")


def finished_summary(run: Run, args: argparse.Namespace, ck: dict) -> dict | None:
    """``--resume`` of a run whose checkpoint is past its last epoch: nothing to train. Says
    so and returns its summary.json, every file left as it was; where summary.json is
    missing (stopped between the last checkpoint and the summary), writes it from the
    checkpoint and the last metrics record. None when the run is not complete."""
    if int(ck["epoch"]) < args.epochs:
        return None
    path = run.out / "summary.json"
    if run.is_main:
        print(f"[classify] run {run.out} is complete (epoch {int(ck['epoch'])} of {args.epochs}); "
              "nothing to do", flush=True)
    summary = None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    if summary is None:
        from .metrics import read_jsonl
        recs = read_jsonl(run.out / "metrics.jsonl")
        last = recs[-1] if recs else {}
        evals = [r for r in recs if r.get("test_acc") is not None]
        summary = dict(run=str(run.out), policy=args.policy, keep=args.keep, seed=args.seed, epochs=args.epochs,
                       stopped=False, global_step=int(ck["global_step"]), wall_s=float(ck["wall_s"]),
                       cpu_s=float(ck.get("cpu_s", 0.0)), elapsed_s=last.get("elapsed_s"),
                       **({k: evals[-1][k] for k in ("test_acc", "test_loss", "test_n") if k in evals[-1]}
                          if evals else {}))
        if run.is_main:
            path.write_text(json.dumps(summary, indent=1))
            print(f"[classify] wrote the missing {path}", flush=True)
    run.barrier()
    return summary


def _load_rank(ck_dir: Path, rank: int) -> dict:
    """The checkpoint file of a rank other than 0 (a clear error when it is missing)."""
    path = ck_dir / f"loader-rank{rank}.pt"
    if not path.exists():
        raise SystemExit(f"--resume: {path} is missing (the checkpoint of rank {rank}); "
                         "it cannot resume without every rank's loader state")
    return checkpoint.load(path)


def combine_partials(partials: list[dict]) -> dict:
    """The counters of a stopped epoch for a rank that takes over several old ranks' parts
    (an epoch resumed on fewer ranks): counts and times summed, the step count and wall
    time of one rank (all stopped at the same step), the losses joined, the io summed."""
    parts = [q for q in partials if q]
    if len(parts) <= 1:
        return dict(parts[0]) if parts else {}
    out = dict(parts[0])
    for k in ("loss_sum", "n", "data_wait_s", "compute_s", "prior_cpu_s"):
        out[k] = sum(q.get(k, 0) for q in parts)
    for k in ("steps", "prior_s"):
        out[k] = max(q.get(k, 0) for q in parts)
    out["losses"] = np.concatenate([np.asarray(q.get("losses", np.zeros(0)), np.float32) for q in parts])
    ios = [EpochStats.from_json(q["prior_io"]) for q in parts if q.get("prior_io")]
    out["prior_io"] = EpochStats.total(ios).to_json() if ios else {}
    return out


def rescale_schedule(sched: Any, steps: list[int], base_lrs: list[float], epoch: int, left: int,
                     warmup_epochs: float, kind: str) -> None:
    """Lay the LR schedule out again after a world-size change (docs/reliability.md).

    ``steps``: the new world size's steps per epoch, as a fresh run on it would have them;
    ``left``: the steps the interrupted ``epoch`` still takes. The schedule continues at the
    same fraction of training, counted in samples: the position is where ``left`` steps
    before the end of ``epoch`` lie on the new grid, so the schedule ends with the run. The
    base LR is the new run's (the default LR scales with the global batch).
    """
    f = lr_factor_fn(steps, warmup_epochs, kind)
    pos = sum(steps[:epoch]) + (max(0, steps[epoch] - left) if epoch < len(steps) else 0)
    sched.lr_lambdas = [f] * len(sched.optimizer.param_groups)
    sched.base_lrs = list(base_lrs)
    sched.last_epoch = pos
    for g, base in zip(sched.optimizer.param_groups, base_lrs):
        g["initial_lr"] = base
        g["lr"] = base * f(pos)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]


def save_checkpoint(run: Run, raw_model: nn.Module, opt: Any, sched: Any, loader: Any, p: Progress,
                    partial: dict | None) -> None:
    """Rank 0 writes last.pt (everything); other ranks write their loader state only.

    ``partial``: the counters of the epoch stopped at ``p``, None at an epoch boundary.
    """
    state: dict[str, Any] = {"loader": loader.state_dict(), "partial": partial}
    if run.rank == 0:
        state.update(model=raw_model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                     epoch=p.epoch, step_in_epoch=p.step_in_epoch, global_step=p.global_step, wall_s=p.wall_s,
                     cpu_s=p.cpu_s, world_size=run.world_size)
        checkpoint.save(state, run.ck_dir / "last.pt")
    else:
        checkpoint.save(state, run.ck_dir / f"loader-rank{run.rank}.pt")
    if dist.is_initialized():
        dist.barrier()  # no rank goes on (or exits) before every rank's state is on disk


def finish_run(run: Run, args: argparse.Namespace, p: Progress, stopped: bool, last_eval: dict,
               t_start: float) -> dict:
    """The run's summary; rank 0 writes summary.json when the run completed (not when stopped)."""
    summary = dict(run=str(run.out), policy=args.policy, keep=args.keep, seed=args.seed, epochs=args.epochs,
                   stopped=stopped, global_step=p.global_step, wall_s=p.wall_s, cpu_s=p.cpu_s,
                   elapsed_s=time.perf_counter() - t_start, **last_eval)
    if run.is_main and not stopped:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=1))
    run.barrier()
    return summary
