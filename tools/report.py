"""Savings report: compare training runs (``metrics.jsonl`` + ``config.json`` per run directory).

    python tools/report.py RUN_DIR [RUN_DIR ...] [--out REPORT_DIR]

A RUN_DIR may also be a folder of runs (searched recursively for ``metrics.jsonl``). Runs are
grouped by (dataset, policy, keep) and by the training settings of their config.json that
change results (lr, epochs, model, batch size, ...; not the seed, run folder, device, threads,
workers, backend or data path spelling): within a (dataset, policy, keep), the settings that
differ extend the row label, ``swdpp{lr=0.2}``. Seeds are aggregated (mean and sample std); a
seed in two runs of one row counts once, from the later run (metrics.jsonl mtime), with a
warning naming both. Prints a
markdown table -- final test accuracy, training wall time, samples/bytes/requests read,
the ratios versus the full-data row of the same dataset (of the same settings where there is
one; report.md says which when it is not plain), and the most epochs in a row a
sample went unread (the worst over the seeds) -- and writes ``report.md``,
``runs.csv`` and PNG plots (accuracy vs wall time, bytes read per epoch, kept fraction per
epoch, distribution of per-sample training losses) into REPORT_DIR.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.paired import one_run_per_seed, paired_differences, paired_table, plot_accuracy_vs_samples  # noqa: E402
from trainers.metrics import read_jsonl  # noqa: E402


def find_runs(paths: Sequence[str]) -> list[Path]:
    """Run directories under ``paths`` (a directory holding metrics.jsonl, or folders of them)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").exists():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(m.parent for m in p.rglob("metrics.jsonl")))
    seen, uniq = set(), []
    for r in out:
        if r.resolve() not in seen:
            seen.add(r.resolve())
            uniq.append(r)
    return uniq


def load_run(run: Path) -> dict[str, Any] | None:
    """One run: config, per-epoch records and derived totals (None when it has no epoch yet)."""
    recs = read_jsonl(run / "metrics.jsonl")
    if not recs:
        return None
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    last = recs[-1]
    accs = [r["test_acc"] for r in recs if r.get("test_acc") is not None]
    name = cfg.get("policy", last.get("policy", "?"))
    keep = 1.0 if name == "full" else float(cfg.get("keep", last.get("keep", 1.0)))
    policy = policy_label(name, cfg.get("policy_kwargs"))

    def tot(k: str) -> float | None:
        vals = [r.get(k) for r in recs]
        return float(sum(v for v in vals if v is not None)) if any(v is not None for v in vals) else None

    return {
        "run": str(run), "dataset": cfg.get("data_name", Path(str(cfg.get("data", "?"))).name),
        "data": str(cfg.get("data", "?")),
        "policy": policy, "policy_name": name, "base_label": policy, "settings": run_settings(cfg), "label_keys": (),
        "keep": keep, "seed": cfg.get("seed", last.get("seed")),
        "epochs_done": len(recs), "epochs": cfg.get("epochs", len(recs)),
        "complete": (run / "summary.json").exists(), "records": recs,
        "test_acc": accs[-1] if accs else None, "wall_s": float(last.get("wall_s", 0.0)),
        "cpu_s": last.get("cpu_s"),
        "elapsed_s": last.get("elapsed_s"), "samples_read": tot("samples_read"), "bytes_read": tot("bytes_read"),
        "requests": tot("requests"), "steps": tot("steps"), "kept": tot("kept"),
        "data_wait_s": tot("data_wait_s"), "compute_s": tot("compute_s"),
        "full_samples_epoch": last.get("full_samples"), "full_bytes_epoch": last.get("full_bytes"),
        "unseen_max": max((r["unseen_max"] for r in recs if r.get("unseen_max") is not None), default=None),
    }


def name_datasets(runs: list[dict]) -> None:
    """Runs of different datasets whose folders share a name (``a/train``, ``b/train``) get
    as many trailing path parts as tell them apart, so their rows never merge."""
    by_name: dict[str, set[str]] = defaultdict(set)
    for r in runs:
        by_name[r["dataset"]].add(r["data"].rstrip("/"))
    for name, paths in by_name.items():
        if len(paths) < 2:
            continue
        parts = {p: p.split("/") for p in paths}
        k = 2
        while len({"/".join(v[-k:]) for v in parts.values()}) < len(paths) and k < max(map(len, parts.values())):
            k += 1
        for r in runs:
            if r["dataset"] == name:
                r["dataset"] = "/".join(parts[r["data"].rstrip("/")][-k:])


# config.json entries that do not change a run's results, or that the row key holds already
NOT_SETTINGS = frozenset((
    "data", "data_name", "dataset_id", "dataset_size", "num_classes", "in_channels", "policy", "keep",
    "policy_kwargs", "seed", "out", "resume", "device", "threads", "workers", "backend", "no_progress",
    "eval_batch_size", "eval_every", "log_ids", "compile", "torch", "python", "machine", "cpu_count",
    "torch_threads", "gpu", "steps_per_epoch", "parameters", "lr_given"))
# settings that belong to the pruning policy (like its options): not compared with full data
POLICY_SETTINGS = ("mixup",)


def run_settings(cfg: dict) -> dict:
    """The options of a run's config.json that change its results (the test set by name,
    mixup as applied: by default on for swdpp and swdpp_v1, as trainers/build.py does)."""
    out = {k: v for k, v in cfg.items() if k not in NOT_SETTINGS}
    if out.get("test_data"):
        out["test_data"] = Path(str(out["test_data"]).rstrip("/")).name
    if "mixup" in out and out["mixup"] is None:
        out["mixup"] = str(cfg.get("policy", "")).startswith("swdpp")
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def label_settings(runs: list[dict]) -> list[dict]:
    """Runs of one (dataset, policy, keep) trained with other settings get those settings in
    their policy label, ``swdpp{lr=0.2}``, ``swdpp{weights=importance}{epochs=60}``, so their
    rows never merge (a setting some runs do not record differs only if the others do)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["dataset"], r["policy"], r["keep"])].append(r)
    for rs in groups.values():
        keys = sorted(k for k in set().union(*(r["settings"] for r in rs))
                      if len({json.dumps(r["settings"][k], sort_keys=True, default=str)
                              for r in rs if k in r["settings"]}) > 1)
        for r in rs if keys else ():
            r["policy"] += "{" + ",".join(f"{k}={r['settings'].get(k)}" for k in keys) + "}"
            r["label_keys"] = tuple(r["label_keys"]) + tuple(keys)
    return runs


def policy_label(policy: str, kwargs: Any) -> str:
    """``swdpp`` or, with policy options (an ablation), ``swdpp{weights=importance}``."""
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs or "{}")
    if not kwargs:
        return policy
    return policy + "{" + ",".join(f"{k}={v}" for k, v in sorted(kwargs.items())) + "}"


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    # one seed has no spread to report (a sample std needs two): None, printed as just the mean
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else None)


def _pm(mean: float | None, std: float | None, spec: str, scale: float = 1.0) -> str:
    """``mean ± std``, just ``mean`` without a spread (one seed), ``-`` without a value."""
    if mean is None:
        return "-"
    return format(mean * scale, spec) + ("" if std is None else " ± " + format(std * scale, spec))


def aggregate(runs: list[dict]) -> list[dict]:
    """Group runs by (dataset, policy, keep) (labels extended by ``label_settings``, one run
    per seed) and add ratios versus the dataset's full-data row of the same settings."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in one_run_per_seed(label_settings(runs)):
        groups[(r["dataset"], r["policy"], r["keep"])].append(r)
    rows = []
    for (dataset, policy, keep), rs in groups.items():
        acc_m, acc_s = _mean_std([r["test_acc"] for r in rs])
        wall_m, wall_s = _mean_std([r["wall_s"] for r in rs])
        cpu_m, cpu_s = _mean_std([r["cpu_s"] for r in rs])
        row = {"dataset": dataset, "policy": policy, "keep": keep, "seeds": len(rs),
               "policy_name": rs[0]["policy_name"], "base_label": rs[0]["base_label"],
               "label_keys": rs[0]["label_keys"],
               "settings": {k: v for k, v in rs[0]["settings"].items() if all(
                   k in r["settings"] and _same(r["settings"][k], v) for r in rs)},
               "seed_list": sorted(r["seed"] for r in rs if r["seed"] is not None),
               "epochs": max(r["epochs_done"] for r in rs), "complete": all(r["complete"] for r in rs),
               "acc_mean": acc_m, "acc_std": acc_s, "wall_mean": wall_m, "wall_std": wall_s,
               "cpu_mean": cpu_m, "cpu_std": cpu_s}
        for k in ("samples_read", "bytes_read", "requests", "steps", "data_wait_s", "compute_s"):
            row[k] = _mean_std([r[k] for r in rs])[0]
        gaps = [r["unseen_max"] for r in rs if r.get("unseen_max") is not None]
        row["unseen_max"] = max(gaps) if gaps else None     # the worst over the seeds
        rows.append(row)
    order = {"full": 0, "swdpp": 1, "uniform": 2, "infobatch": 3, "ucb": 4, "eps_greedy": 5}
    rows.sort(key=lambda r: (r["dataset"], r["keep"] != 1.0 or r["policy_name"] != "full", r["keep"] * -1,
                             order.get(r["policy_name"], 9), r["base_label"],
                             [_sortable(r["settings"].get(k)) for k in r["label_keys"]], r["policy"]))
    for r in rows:
        f, r["vs_full_note"] = _full_row(r, [x for x in rows if x["dataset"] == r["dataset"]
                                             and x["policy_name"] == "full"])
        r["vs_full"] = f["policy"] if f else None
        for k, name in (("wall_mean", "time_ratio"), ("cpu_mean", "cpu_ratio"), ("bytes_read", "bytes_ratio"),
                        ("samples_read", "samples_ratio")):
            r[name] = (r[k] / f[k]) if f and r.get(k) is not None and f.get(k) else None
        r["acc_delta"] = (r["acc_mean"] - f["acc_mean"]) * 100 if f and r["acc_mean"] is not None and \
            f["acc_mean"] is not None else None
    return rows


def _sortable(v: Any) -> tuple:
    """Setting values in numeric order where they are numbers (lr 0.2 before 0.28)."""
    return (0, float(v), "") if isinstance(v, (int, float)) else (1, 0.0, json.dumps(v, default=str))


def _full_row(r: dict, fulls: list[dict]) -> tuple[dict | None, str | None]:
    """The full-data row that ``r`` is compared with -- the one with the same values of the
    settings in either label, else the one sharing the most settings -- and a note when that
    is not plain (several to choose from, or settings that differ)."""
    if r["policy_name"] == "full" or not fulls:
        return (r if r["policy_name"] == "full" else None), None
    same = lambda f, k: _same(r["settings"].get(k), f["settings"].get(k))  # noqa: E731
    keys = lambda f, ks: (set(ks(r)) | set(ks(f))) - set(POLICY_SETTINGS)  # noqa: E731
    match = [f for f in fulls if all(same(f, k) for k in keys(f, lambda x: x["label_keys"]))]
    f = max(match or fulls, key=lambda f: sum(same(f, k) for k in keys(f, lambda x: x["settings"])))
    differ = sorted(k for k in keys(f, lambda x: x["settings"]) if not same(f, k))
    if not differ and (len(match) == 1 or len(fulls) == 1):
        return f, None
    note = f"{r['policy']} keep {r['keep']:g} ({r['dataset']}): vs `{f['policy']}`"
    if len(fulls) > 1:
        note += f" (of {len(fulls)} full-data rows)"
    if differ:
        note += "; settings that differ: " + ", ".join(
            f"{k} {r['settings'].get(k)} vs {f['settings'].get(k)}" for k in differ)
    return f, note


def _fmt(x: Any, spec: str = ".3f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def table(rows: list[dict]) -> str:
    """Markdown table of the aggregated rows."""
    head = ("| dataset | policy | keep | seeds | epochs | test acc % (mean ± std) | Δ vs full (pts) | "
            "train wall s | time vs full | train CPU s | CPU vs full | samples read | bytes read | bytes vs full | requests | "
            "longest unread (epochs) |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['policy']} | {r['keep']:g} | {r['seeds']} | {r['epochs']}{'' if r['complete'] else '*'} "
            f"| {_pm(r['acc_mean'], r['acc_std'], '.2f', 100)} | {_fmt(r['acc_delta'], '+.2f')} "
            f"| {_pm(r['wall_mean'], r['wall_std'], '.1f')} "
            f"| {_fmt(r['time_ratio'], '.2f')}x | {_pm(r['cpu_mean'], r['cpu_std'], '.1f')} "
            f"| {_fmt(r['cpu_ratio'], '.2f')}x | {_fmt(r['samples_read'], ',.0f')} | {_human(r['bytes_read'])} "
            f"| {_fmt(r['bytes_ratio'], '.2f')}x | {_fmt(r['requests'], ',.0f')} | {_fmt(r['unseen_max'], 'd')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def _colors(runs: list[dict]) -> dict:
    import matplotlib.pyplot as plt

    keys = sorted({(r["policy"], r["keep"]) for r in runs}, key=lambda k: (k[0] != "full", k))
    cmap = plt.get_cmap("tab10")
    return {k: cmap(i % 10) for i, k in enumerate(keys)}


def plots(runs: list[dict], out: Path) -> list[Path]:
    """Write the four PNG plots per dataset; return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for dataset in sorted({r["dataset"] for r in runs}):
        rs = [r for r in runs if r["dataset"] == dataset]
        col = _colors(rs)
        tag = dataset.replace("/", "_")

        def label(r: dict, seen: set) -> str | None:
            k = (r["policy"], r["keep"])
            if k in seen:
                return None
            seen.add(k)
            return f"{r['policy']} keep={r['keep']:g}"

        def lines(ax, point) -> None:
            """One line per run of ``point(record) -> (x, y) | None``; legend once per group."""
            seen: set = set()
            for r in rs:
                pts = [p for p in map(point, r["records"]) if p is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, "-o", ms=3, color=col[(r["policy"], r["keep"])], alpha=0.8,
                            label=label(r, seen))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)

        # accuracy vs wall time and vs CPU time (CPU time is less sensitive to other jobs)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
        for ax, key, xlabel in ((axes[0], "wall_s", "training wall time (s)"),
                                (axes[1], "cpu_s", "training CPU time, trainer + loader workers (s)")):
            lines(ax, lambda x, key=key: (x[key], x["test_acc"] * 100)
                  if x.get("test_acc") is not None and x.get(key) is not None else None)
            ax.set_xlabel(xlabel)
        axes[0].set_ylabel("test accuracy (%)")
        fig.suptitle(f"{dataset}: accuracy vs training time")
        written.append(_save(fig, out / f"{tag}-accuracy_vs_time.png"))

        # bytes read per epoch
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        fb = rs[0].get("full_bytes_epoch")
        if fb:
            ax.axhline(fb / 1e6, ls="--", color="gray", lw=1, label="full dataset payload")
        lines(ax, lambda x: (x["epoch"], x["bytes_read"] / 1e6)
              if x.get("bytes_read") is not None else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("MB read")
        ax.set_title(f"{dataset}: bytes read per epoch")
        written.append(_save(fig, out / f"{tag}-bytes_per_epoch.png"))

        # kept fraction per epoch
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        lines(ax, lambda x: (x["epoch"], x["kept"] / x["full_samples"])
              if x.get("kept") is not None and x.get("full_samples") else None)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("epoch")
        ax.set_ylabel("kept fraction of the dataset")
        ax.set_title(f"{dataset}: kept fraction per epoch")
        written.append(_save(fig, out / f"{tag}-kept_fraction.png"))

        # score (per-sample training loss) distribution at the last epoch, first seed of each group
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        seen = set()
        for r in rs:
            h = r["records"][-1].get("score_hist") or r["records"][-1].get("loss_hist")
            k = (r["policy"], r["keep"])
            if not h or k in seen or not h.get("n"):
                continue
            edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"], dtype=float)
            centers = (edges[:-1] + edges[1:]) / 2
            ax.plot(centers, counts / max(1.0, counts.sum()), "-", color=col[k], label=label(r, seen))
        ax.set_yscale("log")
        ax.set_xlabel("per-sample score: EMA of the training loss (after the last epoch)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{dataset}: score distribution")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        written.append(_save(fig, out / f"{tag}-score_distribution.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- CLI

def write_report(paths: Sequence[str], out: str | Path | None = None, quiet: bool = False) -> dict:
    """Build the report for ``paths``; return {"rows", "runs", "table", "files"}."""
    for p in paths:
        if not Path(p).exists():
            print(f"[report] {p}: no such file or directory, left out", file=sys.stderr)
    run_dirs = find_runs(paths)
    runs = []
    for p in run_dirs:
        r = load_run(p)
        if r is None:
            print(f"[report] {p}: no finished epoch yet, left out", file=sys.stderr)
        else:
            runs.append(r)
    if not runs:
        raise SystemExit(f"no runs with metrics.jsonl under {list(paths)}")
    name_datasets(runs)
    counted = one_run_per_seed(label_settings(runs))
    if out:
        outp = Path(out)
    elif len(paths) == 1 and not (Path(paths[0]) / "metrics.jsonl").exists():
        outp = Path(paths[0]) / "report"
    else:
        outp = Path(run_dirs[0]).parent / "report"
    outp.mkdir(parents=True, exist_ok=True)
    rows = aggregate(counted)
    tab = table(rows)
    notes = [r["vs_full_note"] for r in rows if r.get("vs_full_note")]
    files = plots(counted, outp) + plot_accuracy_vs_samples(counted, outp)
    pairs = paired_differences(counted)
    ptab = paired_table(pairs)
    with open(outp / "runs.csv", "w", newline="") as f:
        keys = ["dataset", "policy", "keep", "seed", "epochs_done", "complete", "test_acc", "wall_s", "cpu_s", "elapsed_s",
                "samples_read", "bytes_read", "requests", "steps", "kept", "data_wait_s", "compute_s", "run"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(r)
    md = ["# Savings report", "",
          "Final test accuracy (mean ± sample std over seeds), training wall time (data wait + compute,",
          "evaluation excluded), training CPU time (the trainer and its loader workers; less sensitive to",
          "other jobs on the machine than wall time), totals read over the run, and ratios versus the",
          "full-data row of the same dataset and settings. `*` = some run of the group is incomplete.",
          "", tab, ""]
    if notes:
        md += ["Compared with a full-data row of other settings, or one of several:", ""] + \
            [f"- {n}" for n in notes] + [""]
    md += ["## Paired differences", "",
           "Per-seed test-accuracy difference of each policy against each other (same seeds: same initial",
           "weights and augmentation stream), mean over the common seeds, its standard error, and how",
           "many seeds the first policy won.", "", ptab, ""]
    md += [f"![{p.stem}]({p.name})" for p in files]
    (outp / "report.md").write_text("\n".join(md) + "\n")
    (outp / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    (outp / "paired.json").write_text(json.dumps(pairs, indent=1, default=str))
    if not quiet:
        print(tab)
        for n in notes:
            print(f"vs full: {n}")
        print(f"\nreport: {outp / 'report.md'} ({len(files)} plots)")
    return {"rows": rows, "runs": runs, "table": tab, "files": files, "out": outp, "pairs": pairs}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Compare training runs: accuracy, wall time, samples/bytes read, "
                                            "savings versus the full-data run; writes report.md and PNG plots.")
    p.add_argument("runs", nargs="+", help="run directories (or folders of them)")
    p.add_argument("--out", default=None, help="report directory (default: <runs parent>/report)")
    a = p.parse_args(argv)
    write_report(a.runs, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
