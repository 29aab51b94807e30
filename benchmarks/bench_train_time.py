"""Training time of pruning policies measured side by side: their epochs alternate in one process.

    python benchmarks/bench_train_time.py --data data/fmnist25k-train --policies full swdpp uniform \\
        --keep 0.7 --epochs 6 --out /tmp/train-time.json -- --backend dali --device cpu

Why: on a shared machine the speed drifts by tens of percent over minutes, so comparing the
wall times of runs made one after another (tools/compare.py) carries that drift into the
ratio. Here every policy has its own loader, model, optimizer and schedule (built exactly as
``python -m trainers.classify`` builds them, with the same training step), and epoch ``e`` of
every policy runs before epoch ``e + 1`` of any, in an order that rotates each epoch, so a
slow minute falls on all of them alike. What it prints is training time only (data wait +
compute, no evaluation): per policy the total wall and CPU seconds, samples, steps and the
ratios to the first policy. Accuracy is not measured here (run the trainer for that); the
models are trained for real so that score-driven policies see real losses. Options after ``--`` go to every policy's trainer options
(``python -m trainers.classify --help``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> int:
    from tools.compare import split_trainer_args

    argv, extra = split_trainer_args(argv)
    p = argparse.ArgumentParser(description="Side-by-side training time of pruning policies (epochs interleaved).")
    p.add_argument("--data", required=True, help="training dataset (tools/shard.py output)")
    p.add_argument("--policies", nargs="+", default=["full", "swdpp", "uniform"],
                   help="the first one is the reference of the ratios")
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the per-epoch figures as JSON here")
    a = p.parse_args(argv)

    import torch

    import pipeline
    from trainers.build import build_training, make_loader
    from trainers.classify import build_parser
    from trainers.epoch_loop import cpu_seconds, train_step

    ds = pipeline.open_dataset(a.data)
    runs = []
    for policy in a.policies:
        args = build_parser().parse_args(["--data", a.data, "--policy", policy, "--keep", str(a.keep),
                                          "--epochs", str(a.epochs), "--seed", str(a.seed), *extra])
        if args.device == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(args.device)
        loader = make_loader(ds, args, 1, 0, args.device, train=True)
        model, _, opt, sched, steps, _ = build_training(args, ds, loader, device)
        amp = args.amp if args.amp is not None else device.type == "cuda"
        runs.append(dict(policy=policy, args=args, device=device, amp=amp, loader=loader, model=model, opt=opt,
                         sched=sched, steps=steps, wall=[], cpu=[], samples=[]))

    n = len(runs)
    for epoch in range(a.epochs):
        order = [runs[(epoch + j) % n] for j in range(n)]       # rotate: no policy always goes first
        for r in order:
            r["model"].train()
            t0, c0, k = time.perf_counter(), cpu_seconds(), 0
            for batch in r["loader"].epoch(epoch):
                _, w = train_step(r["model"], batch, r["opt"], r["sched"], r["loader"], r["device"], r["amp"],
                                  r["args"].label_smoothing, r["args"].scale_decay)
                k += int((w > 0).sum())
            r["wall"].append(time.perf_counter() - t0)
            r["cpu"].append(cpu_seconds() - c0)
            r["samples"].append(k)
        print(f"[bench_train_time] epoch {epoch}: "
              + "  ".join(f"{r['policy']} {r['wall'][-1]:.1f}s/{r['samples'][-1]}" for r in runs), flush=True)

    ref = runs[0]
    rows = []
    print(f"\nTraining time, epochs interleaved ({a.epochs} epochs, keep {a.keep:g}, data {a.data}); "
          f"ratios to {ref['policy']}")
    print(f"{'policy':<11}{'samples':>10}{'steps':>8}{'wall s':>9}{'x wall':>8}{'CPU s':>9}{'x CPU':>8}")
    for r in runs:
        wall, cpu = sum(r["wall"]), sum(r["cpu"])
        row = dict(policy=r["policy"], samples=int(sum(r["samples"])), steps=int(sum(r["steps"])), wall_s=wall,
                   cpu_s=cpu, wall_ratio=wall / sum(ref["wall"]), cpu_ratio=cpu / sum(ref["cpu"]),
                   epoch_wall_s=r["wall"], epoch_cpu_s=r["cpu"],
                   epoch_samples=r["samples"])
        rows.append(row)
        print(f"{r['policy']:<11}{row['samples']:>10,}{row['steps']:>8}{wall:>9.1f}{row['wall_ratio']:>7.2f}x"
              f"{cpu:>9.1f}{row['cpu_ratio']:>7.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(dict(data=a.data, keep=a.keep, epochs=a.epochs, seed=a.seed,
                                               trainer_args=extra, runs=rows), indent=1))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
