"""Train an image classifier on a pruned stream: ``python -m trainers.classify --data OUT ...``.

Each epoch reads only the samples that the policy's plan selects (``pipeline.Loader``),
weights their losses, reports per-sample losses back, and writes one JSON line of metrics
(``RUN_DIR/metrics.jsonl``). The LR schedule is laid out over the loader's known steps per
epoch. The same command under ``torchrun --nproc-per-node N`` trains with DDP (gloo on CPU,
NCCL on GPU); every rank reads its own slice of the same plan. Checkpoints (model,
optimizer, scheduler, loader/planner state, partial-epoch counters) are written at the end
of every epoch and on SIGTERM; ``--resume`` continues mid-epoch with the same remaining
samples. See docs/training.md.

This module is the command line; trainers/run_setup.py sets the run up (device, process
group, resume, checkpoints, config.json), trainers/build.py builds the loaders, model and
schedule, trainers/epoch_loop.py trains, evaluates and records the epochs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Sequence

from pipeline.decode import BACKENDS
from pipeline.plan.policies import POLICIES

from .build import build_training, check_test_set, make_loader, resolve_augment
from .epoch_loop import EpochLoop, cpu_seconds, evaluate, train_step
from .models import MODELS
from .optim import OPTIMIZERS
from .run_setup import finish_run, resume, start_run, write_config
from .schedule import SCHEDULES

# what other code (benchmarks, tests) imports from here
_make_loader = make_loader
__all__ = ["POLICIES", "build_parser", "check_args", "main", "build_training", "make_loader", "resolve_augment", "train_step",
           "evaluate", "cpu_seconds"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m trainers.classify``."""
    p = argparse.ArgumentParser(
        prog="python -m trainers.classify",
        description="Train a classifier with per-epoch data pruning on a streaming dataset "
                    "(WebDataset/Zarr written by tools/shard.py). Writes RUN_DIR/metrics.jsonl, "
                    "config.json, summary.json and checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="training dataset directory (tools/shard.py output)")
    d.add_argument("--test-data", default=None, help="test dataset directory (evaluated on every sample)")
    d.add_argument("--backend", default="dali", choices=BACKENDS,
                   help="decode/augment backend (torch: DataLoader + torchvision fallback)")
    d.add_argument("--augment", default="auto", choices=("auto", "cifar", "imagenet", "none"),
                   help="augmentation preset (auto: cifar for RGB images up to 64 px, imagenet for larger, none for grey)")
    d.add_argument("--workers", type=int, default=None, help="loader workers (default: the loader's)")
    d.add_argument("--batch-size", type=int, default=128, help="per-rank batch size")
    d.add_argument("--eval-batch-size", type=int, default=512)
    pr = p.add_argument_group("pruning")
    pr.add_argument("--policy", default="swdpp", choices=POLICIES)
    pr.add_argument("--keep", type=float, default=0.7, help="fraction of the data read per epoch")
    pr.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=None,
                    help="apply the policy's probabilistic mixup (default: on for swdpp and swdpp_v1, off otherwise; swdpp's mixup option is 0 by default)")
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
    o.add_argument("--scale-decay", action=argparse.BooleanOptionalAction, default=False,
                   help="scale each step's weight decay by the batch's mean loss weight, so that the "
                        "policy's loss weights act as step sizes (docs/algorithm.md)")
    o.add_argument("--warmup-epochs", type=float, default=1.0)
    o.add_argument("--schedule", default="cosine", choices=SCHEDULES)
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


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values that would fail (or train garbage) later, before anything starts:
    ``parser.error`` (exit status 2) naming the option and the value."""
    def bad(opt: str, value: object, want: str) -> None:
        parser.error(f"argument {opt}: {want}, got {value!r}")

    finite = math.isfinite
    for opt, value, lo in (("--batch-size", args.batch_size, 1), ("--eval-batch-size", args.eval_batch_size, 1),
                           ("--epochs", args.epochs, 1), ("--eval-every", args.eval_every, 1),
                           ("--width", args.width, 1), ("--workers", args.workers, 0),
                           ("--threads", args.threads, 1), ("--max-steps", args.max_steps, 1)):
        if value is not None and value < lo:
            bad(opt, value, f"must be an integer >= {lo}")
    if not (finite(args.keep) and 0.0 < args.keep <= 1.0):
        bad("--keep", args.keep, "must be in (0, 1]")
    if args.lr is not None and not (finite(args.lr) and args.lr > 0):
        bad("--lr", args.lr, "must be a finite number > 0")
    for opt, value, ok, want in (
            ("--momentum", args.momentum, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
            ("--weight-decay", args.weight_decay, lambda v: v >= 0.0, "must be a finite number >= 0"),
            ("--label-smoothing", args.label_smoothing, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
            ("--warmup-epochs", args.warmup_epochs, lambda v: v >= 0.0, "must be a finite number >= 0")):
        if not (finite(value) and ok(value)):
            bad(opt, value, want)
    try:
        kwargs = json.loads(args.policy_kwargs)
    except ValueError as e:
        parser.error(f"argument --policy-kwargs: not valid JSON ({e}): {args.policy_kwargs!r}")
    if not isinstance(kwargs, dict):
        bad("--policy-kwargs", args.policy_kwargs, "must be a JSON object, e.g. '{\"temperature\": 2}'")


def main(argv: Sequence[str] | None = None) -> dict:
    """Train; return the summary dict (also written to RUN_DIR/summary.json on rank 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    import pipeline

    t_start = time.perf_counter()
    run = start_run(args)
    ds = pipeline.open_dataset(args.data)
    args.augment = resolve_augment(args.augment, ds)  # the test set is normalised like the training set
    test_ds = pipeline.open_dataset(args.test_data) if args.test_data else None
    if test_ds is not None:  # every rank: one that exits alone would leave the others waiting
        try:
            check_test_set(ds, test_ds, args.augment, args.data, args.test_data)
        except ValueError as e:
            parser.error(str(e))
    loader = make_loader(ds, args, run.world_size, run.rank, args.device, train=True)
    test_loader = None
    if test_ds is not None and run.is_main:
        test_loader = make_loader(test_ds, args, 1, 0, args.device, train=False)
    model, raw_model, opt, sched, steps, lr = build_training(args, ds, loader, run.device, run.world_size)
    progress = resume(run, args, raw_model, opt, sched, loader)
    write_config(run, args, ds, raw_model, lr, steps)
    loop = EpochLoop(args, run, progress, loader, test_loader, model, raw_model, opt, sched, steps, t_start)
    stopped = loop.train()
    return finish_run(run, args, progress, stopped, loop.last_eval, t_start)


if __name__ == "__main__":
    s = main()
    if s.get("stopped"):
        sys.exit(0)
