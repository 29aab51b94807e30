"""What a classify run trains with: the loaders and the model, optimizer and LR schedule.

Shared by ``python -m trainers.classify`` and benchmarks/bench_train_time.py, so that both
build a policy's run the same way.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

from .models import build_model
from .optim import build_optimizer
from .schedule import make_scheduler


def resolve_augment(name: str | None, ds: Any) -> str | None:
    """``auto``: "cifar" for small RGB images, "imagenet" for larger RGB, none for grayscale."""
    if name in (None, "none", "None", ""):
        return None
    if name == "auto":
        if int(ds.channels or 3) != 3:
            return None
        return "cifar" if (ds.sample_shape or (0, 0))[0] <= 64 and ds.sample_shape else "imagenet"
    return name


def make_loader(ds: Any, args: argparse.Namespace, world_size: int, rank: int, device: str, train: bool):
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
        return pipeline.Loader.for_eval(ds, batch_size=args.eval_batch_size, augment=aug, **kw)
    mixup = args.mixup if args.mixup is not None else args.policy.startswith("swdpp")
    options = pipeline.LoaderOptions.of(world_size=world_size, rank=rank,
                                        policy_kwargs=json.loads(args.policy_kwargs))
    return pipeline.Loader(ds, batch_size=args.batch_size, keep=1.0 if args.policy == "full" else args.keep,
                           policy=args.policy, epochs=args.epochs, augment=aug, mixup=mixup, options=options, **kw)


def build_training(args: argparse.Namespace, ds: Any, loader: Any, device: torch.device, world_size: int = 1):
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
