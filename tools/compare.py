"""Run several pruning policies x seeds on one dataset, then write the savings report.

    python tools/compare.py --data OUT --test-data OUT_TEST --keep 0.7 --seeds 0 1 2 \\
        --policies full swdpp uniform infobatch --epochs 8 --runs runs/fmnist -- --batch-size 128

A policy is a registered name or ``NAME:JSON`` (options for the policy, e.g.
``'swdpp:{"weights":"importance"}'``: an ablation), labelled ``NAME{key=value,...}`` in the
report. Seeds are paired: the same seed gives the same initial weights and the same
augmentation stream under every policy, so the report's paired differences compare like
with like. Each run is ``python -m trainers.classify`` in its own process (sequentially, so
wall times are comparable; ``--jobs N`` runs N at a time, e.g. small models sharing one GPU,
each then writing its output to ``RUN/train.log``), written to ``RUNS/<policy>-k<keep>-s<seed>``. Finished runs (with
``summary.json``) are skipped, interrupted ones are resumed, so the command can be re-run
after a kill. Arguments after ``--`` go to every training run. Runs are interleaved by seed
(all policies of seed 0, then seed 1, ...) so a partial sweep still compares policies.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_policy(spec: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:JSON`` -> (name, options); a clear error for bad JSON."""
    name, _, opts = spec.partition(":")
    if not opts:
        return name, {}
    try:
        kw = json.loads(opts)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--policies {spec!r}: the options after ':' are not JSON ({e})")
    if not isinstance(kw, dict):
        raise SystemExit(f"--policies {spec!r}: the options after ':' must be a JSON object")
    return name, kw


def policy_tag(name: str, kw: dict) -> str:
    """A file-name-safe tag of a policy spec: ``swdpp``, ``swdpp-weights_importance``."""
    parts = [name] + [f"{k}_{v}" for k, v in sorted(kw.items())]
    return re.sub(r"[^A-Za-z0-9_.-]+", "", "-".join(parts))


def run_dir(runs: Path, policy: str, keep: float, seed: int) -> Path:
    return runs / f"{policy}-k{1.0 if policy == 'full' else keep:g}-s{seed}"


def split_trainer_args(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(own arguments, arguments after ``--`` that go to every training run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    argv, extra = split_trainer_args(argv)
    p = argparse.ArgumentParser(description="Train full/swdpp/uniform/infobatch (or any policies) at the same keep "
                                            "ratio for several seeds, then write the savings report.")
    p.add_argument("--data", required=True, help="training dataset (tools/shard.py output)")
    p.add_argument("--test-data", default=None, help="test dataset")
    p.add_argument("--policies", nargs="+", default=["full", "swdpp", "uniform", "infobatch"])
    p.add_argument("--keep", type=float, nargs="+", default=[0.7], help="keep ratio(s) for the pruning policies")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--runs", default="runs/compare", help="folder for the run directories and the report")
    p.add_argument("--python", default=sys.executable, help="interpreter for the training runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings at a time (wall times are then not comparable across runs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    a = p.parse_args(argv)

    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    jobs = []
    specs = [parse_policy(spec) for spec in a.policies]
    for seed in a.seeds:
        for policy, kw in specs:
            for keep in ([1.0] if policy == "full" else a.keep):
                jobs.append((policy, kw, keep, seed))
    if a.jobs < 1:
        raise SystemExit(f"--jobs {a.jobs}: must be at least 1")
    # run where the user runs us, so relative paths mean what they meant here; the
    # trainer is found through PYTHONPATH
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    running: list[tuple[subprocess.Popen, Path, float]] = []

    def wait_one() -> None:
        while True:
            for k, (proc, d, t0) in enumerate(running):
                rc = proc.poll()
                if rc is not None:
                    del running[k]
                    _finished(d, rc, t0)
                    return
            time.sleep(0.5)

    for n, (policy, kw, keep, seed) in enumerate(jobs, 1):
        d = run_dir(runs, policy_tag(policy, kw), keep, seed)
        if (d / "summary.json").exists():
            print(f"[compare] {n}/{len(jobs)} {d.name}: done, skipped", flush=True)
            continue
        cmd = [a.python, "-m", "trainers.classify", "--data", a.data, "--policy", policy, "--keep", str(keep),
               "--seed", str(seed), "--epochs", str(a.epochs), "--out", str(d), "--no-progress"]
        if a.test_data:
            cmd += ["--test-data", a.test_data]
        if kw:
            cmd += ["--policy-kwargs", json.dumps(kw, sort_keys=True)]
        if (d / "ckpt" / "last.pt").exists():
            cmd.append("--resume")
        cmd += extra
        print(f"[compare] {n}/{len(jobs)} {' '.join(cmd)}", flush=True)
        if a.dry_run:
            continue
        t0 = time.perf_counter()
        if a.jobs == 1:
            _finished(d, subprocess.call(cmd, env=env), t0)
            continue
        while len(running) >= a.jobs:
            wait_one()
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "train.log", "ab") as log:  # the child keeps its own handle
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), d, t0))
    while running:
        wait_one()
    if not a.dry_run:
        from tools.report import write_report

        write_report([str(runs)], runs / "report")
    return 0


def _finished(d: Path, rc: int, t0: float) -> None:
    print(f"[compare] {d.name}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
    if rc != 0:
        print(f"[compare] {d.name} failed; continuing", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
