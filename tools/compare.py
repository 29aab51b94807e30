"""Run several pruning policies x seeds on one dataset, then write the savings report.

    python tools/compare.py --data OUT --test-data OUT_TEST --keep 0.7 --seeds 0 1 2 \\
        --policies full swdpp uniform infobatch --epochs 8 --runs runs/fmnist -- --batch-size 128

A policy is a registered name or ``NAME:JSON`` (options for the policy, e.g.
``'swdpp:{"weights":"importance"}'``: an ablation), labelled ``NAME{key=value,...}`` in the
report. Seeds are paired: the same seed gives the same initial weights and the same
augmentation stream under every policy, so the report's paired differences compare like
with like. Each run is ``python -m trainers.classify`` in its own process (sequentially, so
wall times are comparable; ``--jobs N`` runs N at a time, e.g. small models sharing one GPU,
each then writing its output to ``RUN/train.log``), written to ``RUNS/<policy>-k<keep>-s<seed>``. Each run's
trainer command is recorded in ``RUN/compare.json`` before it starts; a finished run (with
``summary.json``) is skipped and an interrupted one resumed only when it was started with
the same trainer options (the interpreter and ``--out`` aside), so the command can be re-run
after a kill; a run of other options (``--epochs``, data, policy options, arguments after
``--``, ...) is refused, naming the run and the first options that differ (runs without
``compare.json`` are checked against their ``config.json``). Arguments after ``--`` go to
every training run. Runs are interleaved by seed
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


def trainer_command(a: argparse.Namespace, policy: str, kw: dict, keep: float, seed: int, d: Path,
                    extra: list[str]) -> list[str]:
    """The trainer command of one run, without ``--resume``; data paths made absolute."""
    cmd = [a.python, "-m", "trainers.classify", "--data", _abs(a.data), "--policy", policy, "--keep", str(keep),
           "--seed", str(seed), "--epochs", str(a.epochs), "--out", str(d), "--no-progress"]
    if a.test_data:
        cmd += ["--test-data", _abs(a.test_data)]
    if kw:
        cmd += ["--policy-kwargs", json.dumps(kw, sort_keys=True)]
    return cmd + extra


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _options(cmd: Sequence[str]) -> dict[str, list[str]]:
    """``--option`` -> its values (the interpreter, ``-m trainers.classify``, ``--out`` and
    ``--resume`` aside: they do not change what a run trains)."""
    opts: dict[str, list[str]] = {}
    cur = ""
    for tok in cmd[3:]:
        if tok.startswith("--"):
            cur = tok
            opts[cur] = []
        else:
            opts.setdefault(cur, []).append(tok)
    for k in ("--out", "--resume"):
        opts.pop(k, None)
    return opts


def _say(opt: str, vals: list[str] | None) -> str:
    return f"no {opt}" if vals is None else " ".join([opt] + vals)


# what a run's config.json records of the options that change its results (older run
# folders have no compare.json)
CONFIG_KEYS = ("data", "test_data", "policy", "policy_kwargs", "keep", "seed", "epochs", "batch_size", "mixup",
               "model", "width", "optimizer", "momentum", "weight_decay", "label_smoothing", "scale_decay",
               "warmup_epochs", "schedule", "max_steps")


def _config_diffs(cfg: dict, cmd: list[str]) -> list[tuple[str, str]]:
    """(what config.json records, what ``cmd`` asks) for each option that differs."""
    from trainers.classify import build_parser

    args = vars(build_parser().parse_args(cmd[3:]))
    keys = CONFIG_KEYS + (("lr",) if args["lr"] is not None else ()) + \
        (("augment",) if args["augment"] != "auto" else ())

    def norm(k: str, v, policy: str):
        if k == "mixup" and v is None:  # the trainer's default: on for swdpp and swdpp_v1
            return str(policy).startswith("swdpp")
        if k == "keep" and policy == "full":  # full reads every sample, whatever its --keep
            return 1.0
        if k == "policy_kwargs" and isinstance(v, str):
            return json.loads(v or "{}")
        if k in ("data", "test_data") and v is not None and "://" not in str(v):
            return str(Path(v).resolve())
        return v

    def say(k: str, v) -> str:
        opt = "--" + k.replace("_", "-")
        return f"no {opt}" if v is None else f"{opt} {json.dumps(v) if isinstance(v, dict) else v}"

    old = {k: norm(k, cfg[k], cfg.get("policy")) for k in keys if k in cfg}
    new = {k: norm(k, args[k], args["policy"]) for k in old}
    return [(say(k, old[k]), say(k, new[k])) for k in old if old[k] != new[k]]


def run_state(d: Path, cmd: list[str]) -> str:
    """``new``, ``skip`` (finished with the same options), ``resume`` (interrupted, same
    options); SystemExit naming the first differing options for a run of other options."""
    done, started = (d / "summary.json").exists(), (d / "ckpt" / "last.pt").exists()
    if not (done or started):
        return "new"
    if (d / "compare.json").exists():
        old, new = _options(json.loads((d / "compare.json").read_text())["command"]), _options(cmd)
        diffs = [(_say(k, old.get(k)), _say(k, new.get(k))) for k in list(new) + [k for k in old if k not in new]
                 if old.get(k) != new.get(k)]
    elif (d / "config.json").exists():
        diffs = _config_diffs(json.loads((d / "config.json").read_text()), cmd)
    else:
        diffs = []
    if diffs:
        raise SystemExit(f"{d} was trained with {', '.join(o for o, _ in diffs[:3])}, this sweep asks for "
                         f"{', '.join(n for _, n in diffs[:3])}: use another --runs folder or remove that run")
    return "skip" if done else "resume"


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

    # every run's options are checked before the first one starts
    planned = []
    for policy, kw, keep, seed in jobs:
        d = run_dir(runs, policy_tag(policy, kw), keep, seed)
        cmd = trainer_command(a, policy, kw, keep, seed, d, extra)
        planned.append((d, cmd, run_state(d, cmd)))
    for n, (d, cmd, state) in enumerate(planned, 1):
        if state == "skip":
            print(f"[compare] {n}/{len(jobs)} {d.name}: done, skipped", flush=True)
            continue
        print(f"[compare] {n}/{len(jobs)} {' '.join(cmd + ['--resume'] * (state == 'resume'))}", flush=True)
        if a.dry_run:
            continue
        d.mkdir(parents=True, exist_ok=True)
        (d / "compare.json").write_text(json.dumps({"command": cmd}, indent=1) + "\n")
        cmd = cmd + ["--resume"] * (state == "resume")
        t0 = time.perf_counter()
        if a.jobs == 1:
            _finished(d, subprocess.call(cmd, env=env), t0)
            continue
        while len(running) >= a.jobs:
            wait_one()
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
