"""How often, and how regularly, a training run read each sample (from its ``--log-ids`` logs).

    python tools/visits.py RUN_DIR [RUN_DIR ...] [--plot visits.png]

Reads every ``ids-rank<r>.jsonl`` of a run written by ``trainers.classify --log-ids`` (all
ranks together) and prints, per run: the epochs, the samples read per epoch, the visits
per sample (min / median / max) and the **worst gap**, the most epochs in a row that a
sample went unread (a gap still open at the end of the run counts too), with how many
samples had a gap of 3 epochs or more. ``--plot`` draws the histogram of visits per
sample, one line per run. The trainer's ``unseen_max`` metric gives the same worst gap
epoch by epoch without logging ids (docs/training.md); this tool also serves older runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Visits:
    """Per-run summary: ``taken`` bool [epochs, samples] and what is derived from it."""
    run: str
    taken: np.ndarray

    @property
    def visits(self) -> np.ndarray:
        return self.taken.sum(0)

    def longest_gaps(self) -> np.ndarray:
        """Per sample, the most epochs in a row it went unread."""
        run = np.zeros(self.taken.shape[1], np.int64)
        worst = np.zeros_like(run)
        for row in self.taken:
            run = np.where(row, 0, run + 1)
            np.maximum(worst, run, out=worst)
        return worst


def load(run_dir: Path, samples: int | None = None) -> Visits:
    """The ids of every step of ``run_dir`` (all ranks; padding ids -1 dropped)."""
    logs = sorted(run_dir.glob("ids-rank*.jsonl"))
    if not logs:
        raise FileNotFoundError(f"{run_dir}: no ids-rank*.jsonl (train with --log-ids)")
    epochs: dict[int, list[np.ndarray]] = {}
    for path in logs:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                rec = json.loads(line)
                epochs.setdefault(int(rec["epoch"]), []).append(np.asarray(rec["ids"], np.int64))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not an ids record ({e})") from None
    if samples is None:
        cfg = run_dir / "metrics.jsonl"
        lines = cfg.read_text().splitlines() if cfg.exists() else []
        first = json.loads(lines[0]) if lines else {}   # none: killed before its first epoch
        conf = run_dir / "config.json"
        size = json.loads(conf.read_text()).get("dataset_size") if conf.exists() else None
        samples = (first.get("full_samples") or size
                   or 1 + max(int(a.max(initial=-1)) for v in epochs.values() for a in v))
    taken = np.zeros((max(epochs) + 1, int(samples)), bool)
    for e, parts in epochs.items():
        ids = np.concatenate(parts)
        ids = ids[ids >= 0]
        if ids.size and ids.max() >= samples:
            raise ValueError(f"{run_dir}: epoch {e} logs sample id {int(ids.max())} of a {samples}-sample dataset")
        taken[e, ids] = True
    return Visits(str(run_dir), taken)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories trained with --log-ids")
    ap.add_argument("--samples", type=int, default=None,
                    help="dataset size (default: full_samples of the run's metrics.jsonl)")
    ap.add_argument("--plot", type=Path, default=None, help="write a histogram of visits per sample here (PNG)")
    a = ap.parse_args(argv)
    results = []
    for r in a.runs:
        try:
            v = load(r, a.samples)
        except (OSError, ValueError) as e:
            print(f"visits: {e}", file=sys.stderr)
            return 1
        gaps, n = v.longest_gaps(), v.visits
        per_epoch = v.taken.sum(1)
        print(f"{r}: {v.taken.shape[0]} epochs, {v.taken.shape[1]:,} samples, read per epoch "
              f"{per_epoch.min():,}-{per_epoch.max():,}; visits per sample min {n.min()} / median "
              f"{int(np.median(n))} / max {n.max()}; worst gap {gaps.max()} epochs "
              f"({int((gaps >= 3).sum()):,} samples unread 3 or more epochs in a row)")
        results.append(v)
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        for v in results:
            counts = np.bincount(v.visits, minlength=v.taken.shape[0] + 1)
            ax.plot(np.arange(counts.size), counts, marker=".", label=Path(v.run).name)
        ax.set_xlabel("epochs in which the sample was read")
        ax.set_ylabel("samples")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
