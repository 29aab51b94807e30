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


def check_test_set(train: Any, test: Any, augment: str | None, data: str, test_data: str) -> None:
    """Raise ValueError, naming both datasets, where the test set cannot be scored by a model
    trained on ``train``: a label that names another class than in the training set (the
    test set may hold the first classes only: a split without the last class, or integer
    labels whose largest value is smaller), another number of channels, or, under the
    "cifar" preset (which evaluates at the stored size), images of another size."""
    def names(c: list) -> str:
        return ", ".join(map(str, c[:6])) + (f", ... ({len(c)} classes)" if len(c) > 6 else "")
    a, b = list(train.classes), list(test.classes)
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    if bad:
        raise ValueError(f"label {bad[0]} means {b[bad[0]]!r} in the test set {test_data} and "
                         f"{a[bad[0]]!r} in the training set {data} (classes [{names(b)}] "
                         f"against [{names(a)}]); convert both with the same class folders")
    if len(b) > len(a):
        raise ValueError(f"the test set {test_data} has {len(b)} classes [{names(b)}], the "
                         f"training set {data} {len(a)} [{names(a)}]: the model has no output "
                         f"for {names(b[len(a):])}")
    if int(train.channels or 3) != int(test.channels or 3):
        raise ValueError(f"the test set {test_data} has {test.channels} channel(s) per image, the "
                         f"training set {data} {train.channels}: convert both alike")
    if augment == "cifar" and tuple(test.sample_shape or ()) != tuple(train.sample_shape or ()):
        got = "x".join(map(str, test.sample_shape[:2])) if test.sample_shape else "of varied sizes"
        want = "x".join(map(str, train.sample_shape[:2]))
        raise ValueError(f"the test set {test_data} holds images {got}, the training set {data} "
                         f"{want}: the cifar preset evaluates at the stored size; convert the "
                         f"test set with --resize {want}, or train with --augment imagenet")


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
        # the ranks given (the trainer: 1, 0 on rank 0), not torchrun's from the environment,
        # which would score half the test set under two processes
        return pipeline.Loader.for_eval(ds, batch_size=args.eval_batch_size, augment=aug, **kw,
                                        options=pipeline.LoaderOptions.of(world_size=world_size, rank=rank))
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
