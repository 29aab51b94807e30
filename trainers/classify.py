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
import inspect
import json
import math
import numbers
import sys
import time
from typing import Sequence

from pipeline.decode import BACKENDS
from pipeline.plan.distributed import dist_env
from pipeline.plan.policies import POLICIES

from .build import build_training, check_test_set, make_loader, resolve_augment
from .epoch_loop import EpochLoop, cpu_seconds, evaluate, train_step
from .models import MODELS
from .optim import OPTIMIZERS
from .run_setup import (Progress, check_resume_config, finish_run, finished_summary, inherit_options,
                        read_checkpoint, resume, run_dir, saved_config, start_run, write_config)
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


def given_options(argv: Sequence[str] | None) -> set[str]:
    """The options given on the command line (their ``dest``), whatever their value: what a
    ``--resume`` does not take from the saved run."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


_KINDS = {"float": "a number", "int": "a number", "bool": "true or false", "str": "a string", "None": "null"}


def _accepts(kind: str, value: object) -> bool:
    if kind in ("float", "int"):
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    return kind == "None" and value is None


def check_policy_kwargs(parser: argparse.ArgumentParser, args: argparse.Namespace, kwargs: dict) -> None:
    """Build the policy as the loader will (same keep and epochs), before anything is written:
    an unknown option, a value of the wrong kind (a number option given a string or a
    boolean: its constructor's annotation or default says which) or one the policy refuses
    is a ``parser.error`` naming ``--policy-kwargs``, the option and the value."""
    from pipeline.plan.policies import POLICIES, get_policy

    cls = POLICIES[args.policy]
    params = {k: q for k, q in inspect.signature(cls.__init__).parameters.items()
              if k not in ("self", "keep", "epochs") and q.kind is not q.VAR_KEYWORD}
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        parser.error(f"argument --policy-kwargs: policy {args.policy!r} has no option(s) "
                     f"{', '.join(map(repr, unknown))}; its options: {', '.join(params) or 'none'}")
    for key, value in kwargs.items():
        q = params[key]
        ann = q.annotation
        if ann is not q.empty:   # "float | None" (postponed annotations) or the type itself
            ann = ann if isinstance(ann, str) else ann.__name__ if isinstance(ann, type) else str(ann)
            kinds = [t.strip() for t in ann.split("|")]
        elif q.default is not q.empty and q.default is not None:
            kinds = [type(q.default).__name__]
        else:
            continue
        if not all(k in _KINDS for k in kinds):
            continue  # a type this check does not know: the policy judges the value
        if not any(_accepts(k, value) for k in kinds):
            want = " or ".join(dict.fromkeys(_KINDS[k] for k in kinds))
            parser.error(f"argument --policy-kwargs: option {key!r} of policy {args.policy!r} takes "
                         f"{want}, got {json.dumps(value)}")
    try:
        get_policy(args.policy, keep=1.0 if args.policy == "full" else args.keep, epochs=args.epochs, **kwargs)
    except (TypeError, ValueError) as e:
        if not kwargs:
            parser.error(f"argument --policy: {e}")
        parser.error(f"argument --policy-kwargs: {e} (options {json.dumps(kwargs)})")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str] | None = None,
               saved: dict | None = None) -> None:
    """Refuse values that would fail (or train garbage) later, before anything starts:
    ``parser.error`` (exit status 2) naming the option and the value.

    ``given``: the options on the command line (None: all count as given); ``saved``: the
    config.json of the run that ``--resume`` continues (its values are not refused again)."""
    def bad(opt: str, value: object, want: str) -> None:
        parser.error(f"argument {opt}: {want}, got {value!r}")

    finite = math.isfinite
    for opt, value, lo in (("--batch-size", args.batch_size, 1), ("--eval-batch-size", args.eval_batch_size, 1),
                           ("--epochs", args.epochs, 1), ("--eval-every", args.eval_every, 1),
                           ("--width", args.width, 1), ("--workers", args.workers, 0),
                           ("--threads", args.threads, 1), ("--max-steps", args.max_steps, 1),
                           ("--seed", args.seed, 0)):
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
    if args.warmup_epochs >= args.epochs:  # the LR would rise until the last step, never decay
        same = saved is not None and (saved.get("warmup_epochs"), saved.get("epochs")) == (args.warmup_epochs,
                                                                                            args.epochs)
        if (given is None or "warmup_epochs" in given) and not same:
            bad("--warmup-epochs", args.warmup_epochs, f"must be smaller than --epochs ({args.epochs}): a warm-up "
                "that long covers the whole run, which never reaches the base LR")
        if saved is None and dist_env().rank == 0:
            print(f"[classify] warning: the default --warmup-epochs {args.warmup_epochs:g} covers the whole "
                  f"{args.epochs}-epoch run (the LR rises until the last step); give --warmup-epochs 0 or a "
                  "fraction of an epoch", file=sys.stderr, flush=True)
    try:
        kwargs = json.loads(args.policy_kwargs)
    except ValueError as e:
        parser.error(f"argument --policy-kwargs: not valid JSON ({e}): {args.policy_kwargs!r}")
    if not isinstance(kwargs, dict):
        bad("--policy-kwargs", args.policy_kwargs, "must be a JSON object, e.g. '{\"temperature\": 2}'")
    check_policy_kwargs(parser, args, kwargs)


def warn_padding(args: argparse.Namespace, loader, world_size: int, is_main: bool) -> None:
    """Warn once where ``--batch-size`` is larger than the samples an epoch reads per rank:
    such an epoch is a single step made mostly of padding rows (weight 0)."""
    if not is_main or loader.policy is None:
        return
    per_rank = [(-(-int(loader.policy.num_selected(loader.n, e)) // world_size), e) for e in range(args.epochs)]
    least, epoch = min(per_rank)
    if args.batch_size > least:
        print(f"[classify] warning: --batch-size {args.batch_size} is larger than the {least} samples "
              f"epoch {epoch} reads per rank: such an epoch is one step whose other "
              f"{args.batch_size - least} rows are padding (weight 0, computed for nothing); "
              f"use a --batch-size of at most {least}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    """Train; return the summary dict (also written to RUN_DIR/summary.json on rank 0)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_options(argv)
    is_main = dist_env().rank == 0
    if args.policy == "full" and args.keep != 1.0:  # full reads every sample: recorded as keep 1
        args.keep = 1.0
    out = run_dir(args)
    saved = ck = None
    if args.resume:
        saved = saved_config(out)
        if (out / "ckpt" / "last.pt").exists():
            ck = read_checkpoint(out / "ckpt" / "last.pt")
        if saved is not None:
            taken = inherit_options(args, saved, given, ck)
            if args.policy == "full":
                args.keep = 1.0
            if taken and is_main:
                print(f"[classify] --resume: as the run before: {', '.join(taken)}", flush=True)
    check_args(parser, args, given, saved)
    import pipeline

    t_start = time.perf_counter()
    run = start_run(args, out)
    ds = pipeline.open_dataset(args.data)
    args.augment = resolve_augment(args.augment, ds)  # the test set is normalised like the training set
    test_ds = pipeline.open_dataset(args.test_data) if args.test_data else None
    if test_ds is not None:  # every rank: one that exits alone would leave the others waiting
        try:
            check_test_set(ds, test_ds, args.augment, args.data, args.test_data)
        except ValueError as e:
            parser.error(str(e))
    if ck is not None:
        check_resume_config(run, args, ds, ck)
        done = finished_summary(run, args, ck)
        if done is not None:
            return done
    elif args.resume and run.is_main:
        print(f"[classify] --resume: no checkpoint in {run.ck_dir}, starting fresh", flush=True)
    loader = make_loader(ds, args, run.world_size, run.rank, args.device, train=True)
    warn_padding(args, loader, run.world_size, run.is_main)
    test_loader = None
    if test_ds is not None and run.is_main:
        test_loader = make_loader(test_ds, args, 1, 0, args.device, train=False)
    model, raw_model, opt, sched, steps, lr = build_training(args, ds, loader, run.device, run.world_size)
    progress = resume(run, args, raw_model, opt, sched, loader, ck) if ck is not None else Progress()
    lr = float(opt.param_groups[0].get("initial_lr", lr))  # after a resume: the checkpoint's
    write_config(run, args, ds, raw_model, lr, steps)
    loop = EpochLoop(args, run, progress, loader, test_loader, model, raw_model, opt, sched, steps, t_start)
    stopped = loop.train()
    return finish_run(run, args, progress, stopped, loop.last_eval, t_start)


if __name__ == "__main__":
    s = main()
    if s.get("stopped"):
        sys.exit(0)
