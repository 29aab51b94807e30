"""Paired comparisons of training runs: per-seed accuracy differences between policies.

The same seed gives the same initial weights and augmentation stream under every policy
(trainers.classify), so the difference of two policies' accuracies at one seed removes most
of the seed-to-seed noise; its mean over seeds, with the standard error of that mean, says
whether one policy is ahead of another. Used by tools/report.py.
"""
from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["one_run_per_seed", "paired_differences", "paired_table", "plot_accuracy_vs_samples"]


def _mtime(r: dict) -> float:
    try:
        return os.stat(os.path.join(r["run"], "metrics.jsonl")).st_mtime
    except OSError:
        return 0.0


def one_run_per_seed(runs: list[dict], key=lambda r: (r["dataset"], r["policy"], r["keep"])) -> list[dict]:
    """``runs`` with one run per seed of each group (``key``): of runs repeating a seed, the
    later one by its metrics.jsonl mtime counts (the one listed last on a tie), and a warning
    on stderr names them all; runs without a seed are all kept."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if r.get("seed") is not None:
            by[(key(r), r["seed"])].append(r)
    drop = set()
    for (k, seed), rs in by.items():
        if len(rs) > 1:
            last = max(enumerate(rs), key=lambda ir: (_mtime(ir[1]), ir[0]))[1]
            drop.update(id(r) for r in rs if r is not last)
            print(f"[report] {rs[0]['policy']} keep {rs[0]['keep']:g} ({rs[0]['dataset']}): seed {seed} is in "
                  f"{len(rs)} runs ({', '.join(r['run'] for r in rs)}); counted once, from the latest: "
                  f"{last['run']}", file=sys.stderr)
    return [r for r in runs if id(r) not in drop]


def _groups(runs: list[dict]) -> dict[tuple, dict[Any, float]]:
    """(dataset, epochs, policy, keep) -> {seed: final test accuracy} of the complete runs
    (a seed in two runs of a group: the later, with a warning)."""
    out: dict[tuple, dict[Any, float]] = defaultdict(dict)
    done = [r for r in runs if r.get("complete") and r.get("test_acc") is not None]
    for r in one_run_per_seed(done, key=lambda r: (r["dataset"], r["epochs"], r["policy"], r["keep"])):
        if r.get("seed") is not None:
            out[(r["dataset"], r["epochs"], r["policy"], r["keep"])][r["seed"]] = float(r["test_acc"])
    return out


def paired_differences(runs: list[dict]) -> list[dict]:
    """Every ordered pair of groups of one dataset and run length, over their common seeds:
    mean difference of test accuracy (points), its standard error, and mean / SE."""
    groups = _groups(runs)
    rows = []
    for a, b in permutations(sorted(groups, key=str), 2):
        if a[:2] != b[:2]:
            continue
        seeds = sorted(set(groups[a]) & set(groups[b]))
        if len(seeds) < 2:
            continue
        d = np.array([groups[a][s] - groups[b][s] for s in seeds]) * 100
        se = float(d.std(ddof=1) / math.sqrt(d.size))
        rows.append({"dataset": a[0], "epochs": a[1], "policy": a[2], "keep": a[3], "vs_policy": b[2],
                     "vs_keep": b[3], "seeds": len(seeds), "diff": float(d.mean()), "se": se,
                     "z": float(d.mean() / se) if se > 0 else math.copysign(math.inf, d.mean() or 1.0),
                     "wins": int((d > 0).sum())})
    return rows


def paired_table(rows: list[dict], focus: tuple[str, ...] = ()) -> str:
    """Markdown: one line per ordered pair (only those whose first policy is in `focus`, if given)."""
    head = "| dataset | epochs | policy | keep | vs | keep | seeds | Δ acc (pts, paired mean) | SE | Δ/SE | wins |"
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        if focus and r["policy"] not in focus:
            continue
        lines.append(f"| {r['dataset']} | {r['epochs']} | {r['policy']} | {r['keep']:g} | {r['vs_policy']} "
                     f"| {r['vs_keep']:g} | {r['seeds']} | {r['diff']:+.2f} | {r['se']:.2f} | {r['z']:+.1f} "
                     f"| {r['wins']}/{r['seeds']} |")
    return "\n".join(lines)


def plot_accuracy_vs_samples(runs: list[dict], out: Path) -> list[Path]:
    """Per dataset: test accuracy against cumulative samples read, the mean over seeds of
    each (policy, keep) at its evaluation epochs; returns the PNG paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset in sorted({r["dataset"] for r in runs}):
        curves: dict[tuple, list[list[tuple[float, float]]]] = defaultdict(list)
        for r in runs:
            if r["dataset"] != dataset:
                continue
            pts, total = [], 0.0
            for rec in r["records"]:
                total += float(rec.get("samples_read") or 0)
                if rec.get("test_acc") is not None:
                    pts.append((total, rec["test_acc"] * 100))
            if pts:
                curves[(r["policy"], r["keep"])].append(pts)
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        for (policy, keep), per_seed in sorted(curves.items(), key=str):
            m = min(len(p) for p in per_seed)
            xs = np.mean([[x for x, _ in p[:m]] for p in per_seed], axis=0)
            ys = np.mean([[y for _, y in p[:m]] for p in per_seed], axis=0)
            ax.plot(xs / 1e3, ys, "-o", ms=3, label=f"{policy} keep={keep:g} ({len(per_seed)} seeds)")
        ax.set_xlabel("samples read (thousands, cumulative)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}: accuracy vs samples read (mean over seeds)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{dataset.replace('/', '_')}-accuracy_vs_samples.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
