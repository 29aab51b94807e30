"""The trainer's command line (``python -m trainers.classify``) on a tiny real dataset:
resuming (a complete run, options not given anew, equivalent values), arguments refused
before anything is written (policy options, seed, warm-up), what a run records (keep of
the full policy, the padding warning) and the ``unseen_max`` metric against
``tools/visits.py``.

Real runs: 256 Fashion-MNIST training samples (two shards), 128 test samples, the tiny
model at width 8, batch 32, torch backend on CPU, one thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fm(fmnist_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(train: 256 samples, test: 128 samples), WebDataset."""
    pytest.importorskip("pipeline.loader")
    from pipeline.formats import convert

    root = tmp_path_factory.mktemp("fm256")
    convert(fmnist_dir, root / "train", split="train", format="wds", limit=256, samples_per_shard=128, seed=0,
            progress=False)
    convert(fmnist_dir, root / "test", split="test", format="wds", limit=128, seed=0, progress=False)
    return root / "train", root / "test"


def _argv(fm, out: Path, *extra: str, test: bool = True) -> list[str]:
    train, test_set = fm
    return ["--data", str(train), *(["--test-data", str(test_set)] if test else []), "--out", str(out),
            "--backend", "torch", "--device", "cpu", "--workers", "0", "--threads", "1", "--width", "8",
            "--batch-size", "32", "--no-progress", *extra]


def _train(fm, out: Path, *extra: str, test: bool = True) -> dict:
    from trainers.classify import main
    return main(_argv(fm, out, *extra, test=test))


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _refused(fm, out: Path, *extra: str) -> str:
    """Run the command line expecting an argument error (exit 2); its message."""
    with pytest.raises(SystemExit) as e:
        _train(fm, out, *extra)
    assert e.value.code == 2, e.value.code
    return str(e.value)


# ---------------------------------------------------------------- resume

def test_resume_of_a_complete_run_says_so_and_changes_nothing(fm, tmp_path):
    """Was: summary.json rewritten without test_acc/test_loss/test_n, elapsed_s replaced."""
    run = tmp_path / "run"
    summary = _train(fm, run, "--epochs", "2", "--warmup-epochs", "0.5")
    assert not summary["stopped"] and "test_acc" in summary
    before = _files(run)
    assert {"config.json", "metrics.jsonl", "summary.json", "ckpt/last.pt"} <= set(before)
    again = _argv(fm, run, "--epochs", "2", "--warmup-epochs", "0.5", "--resume")   # the same command
    r = subprocess.run([sys.executable, "-m", "trainers.classify", *again], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"run {run} is complete (epoch 2 of 2); nothing to do" in r.stdout
    assert _files(run) == before, "every file of the run is left as it was"
    assert json.loads((run / "summary.json").read_text())["test_acc"] == summary["test_acc"]
    assert _train(fm, run, "--resume")["test_acc"] == summary["test_acc"]      # options omitted: as before
    assert _files(run) == before
    # killed between the last checkpoint and summary.json: the summary is written from them
    (run / "summary.json").unlink()
    again = _train(fm, run, "--resume")
    assert json.loads((run / "summary.json").read_text()) == again
    assert (again["test_acc"], again["test_n"], again["global_step"]) == (summary["test_acc"], 128,
                                                                          summary["global_step"])


def test_resume_without_lr_keeps_and_records_the_runs_lr(fm, tmp_path):
    """Was: config.json rewritten with the default LR (0.025 at batch 32) while the run went
    on at 0.2 from its checkpoint, and a later --resume --lr 0.2 refused ('0.025 -> 0.2');
    --epochs not given again was refused too ('--epochs 3 -> 10')."""
    from trainers import checkpoint

    run = tmp_path / "run"
    assert _train(fm, run, "--epochs", "3", "--lr", "0.2", "--max-steps", "5")["stopped"]
    assert _config(run)["lr"] == 0.2
    assert _train(fm, run, "--resume", "--max-steps", "12")["stopped"]     # no --lr, no --epochs
    cfg = _config(run)
    assert cfg["lr"] == 0.2 and cfg["epochs"] == 3
    ck = checkpoint.load(run / "ckpt" / "last.pt")
    assert ck["optimizer"]["param_groups"][0]["initial_lr"] == 0.2, "the run trains at 0.2"
    done = _train(fm, run, "--resume", "--lr", "0.2")                      # the right LR is accepted
    assert not done["stopped"] and done["epochs"] == 3
    assert _config(run)["lr"] == 0.2
    assert [r["epoch"] for r in _records(run)] == [0, 1, 2]
    msg = _train_refused_resume(fm, run, "--lr", "0.1")
    assert "--lr 0.2 -> 0.1" in msg


def _train_refused_resume(fm, run: Path, *extra: str) -> str:
    with pytest.raises(SystemExit, match="config.json was written with other options") as e:
        _train(fm, run, "--resume", *extra)
    return str(e.value)


def test_resume_compares_mixup_and_policy_options_as_the_run_uses_them(fm, tmp_path):
    """Was: '--mixup True -> None' refused (swdpp mixes by default), and the reverse;
    policy options {"mixup": 0.0} against {} refused."""
    run = tmp_path / "on"
    assert _train(fm, run, "--epochs", "2", "--mixup", "--max-steps", "2")["stopped"]
    assert _config(run)["mixup"] is True
    assert _train(fm, run, "--epochs", "2", "--resume", "--max-steps", "4")["stopped"]  # omitted: as before
    assert _train(fm, run, "--resume", "--policy-kwargs", '{"mixup": 0.0}', "--max-steps", "6")["stopped"]
    assert "--mixup True -> False" in _train_refused_resume(fm, run, "--no-mixup")
    assert not _train(fm, run, "--resume", "--mixup", "--policy-kwargs", "{}")["stopped"]
    assert [r["epoch"] for r in _records(run)] == [0, 1]
    run = tmp_path / "default"                                # the reverse: default on, given on resume
    assert _train(fm, run, "--epochs", "2", "--policy-kwargs", '{"mixup": 0}', "--max-steps", "2")["stopped"]
    assert not _train(fm, run, "--resume", "--mixup", "--policy-kwargs", "{}")["stopped"]
    assert json.loads(_config(run)["policy_kwargs"]) == {"mixup": 0}, "the run's own options stay recorded"


# ---------------------------------------------------------------- arguments refused up front

@pytest.mark.parametrize("kwargs, said", [
    ('{"floor": "high"}', ["'floor'", "a number", '"high"']),
    ('{"anneal": "yes"}', ["'anneal'", "a number", '"yes"']),
    ('{"floor": true}', ["'floor'", "a number", "true"]),
    ('{"nope": 1}', ["'nope'", "has no option"]),
    ('{"floor": 2}', ["floor", "got 2"]),
])
def test_bad_policy_options_are_argument_errors_before_anything_is_written(fm, tmp_path, capsys, kwargs, said):
    """Was: a TypeError traceback that did not name the option (or a ValueError traceback,
    exit 1), after creating an empty run directory."""
    run = tmp_path / "run"
    _refused(fm, run, "--epochs", "2", "--policy-kwargs", kwargs)
    err = capsys.readouterr().err
    assert "argument --policy-kwargs" in err and "Traceback" not in err
    for s in said:
        assert s in err, (s, err)
    assert not run.exists()


def test_negative_seed_is_refused_before_anything_is_written(fm, tmp_path, capsys):
    """Was: numpy's 'expected non-negative integer' after config.json and metrics.jsonl."""
    run = tmp_path / "run"
    _refused(fm, run, "--seed", "-1", "--epochs", "1")
    assert "argument --seed: must be an integer >= 0, got -1" in capsys.readouterr().err
    assert not run.exists()


def test_warmup_covering_the_whole_run_is_refused(fm, tmp_path, capsys):
    """Was: --warmup-epochs 5 with --epochs 2 warmed up over the whole run, silently."""
    run = tmp_path / "run"
    _refused(fm, run, "--epochs", "2", "--warmup-epochs", "5", "--max-steps", "1")
    assert "argument --warmup-epochs: must be smaller than --epochs (2)" in capsys.readouterr().err
    assert not run.exists()
    _refused(fm, run, "--epochs", "2", "--warmup-epochs", "2", "--max-steps", "1")
    assert _train(fm, run, "--epochs", "2", "--warmup-epochs", "1.5", "--max-steps", "1")["stopped"]


# ---------------------------------------------------------------- what a run records

def test_full_policy_records_keep_1(fm, tmp_path):
    """Was: --policy full --keep 0.5 recorded keep 0.5 (folder name, metrics, summary)
    though full reads every sample."""
    from trainers.classify import build_parser
    from trainers.run_setup import default_out

    run = tmp_path / "run"
    s = _train(fm, run, "--policy", "full", "--keep", "0.5", "--epochs", "1", "--warmup-epochs", "0", test=False)
    assert s["keep"] == 1.0
    assert _config(run)["keep"] == 1.0 and json.loads((run / "summary.json").read_text())["keep"] == 1.0
    rec = _records(run)[0]
    assert rec["keep"] == 1.0 and rec["kept"] == rec["full_samples"] == 256
    args = build_parser().parse_args(["--data", "data/fm/", "--policy", "full", "--keep", "0.5"])
    assert default_out(args) == str(Path("runs") / "fm-full-k1-s0")


def test_batch_larger_than_an_epoch_warns_once(fm, tmp_path, capsys):
    """Was: no word that every epoch is one step made mostly of padding rows."""
    run = tmp_path / "run"
    # uniform at keep 0.25: 64 samples per epoch, a batch of 200 rows
    _train(fm, run, "--policy", "uniform", "--keep", "0.25", "--epochs", "2", "--batch-size", "200",
           "--warmup-epochs", "0", test=False)
    err = capsys.readouterr().err
    assert err.count("--batch-size 200 is larger than the 64 samples") == 1, err
    assert "136 rows are padding" in err
    assert [r["steps"] for r in _records(run)] == [1, 1]
    _train(fm, tmp_path / "fits", "--policy", "uniform", "--keep", "0.25", "--epochs", "1", "--batch-size", "64",
           "--warmup-epochs", "0", "--max-steps", "1", test=False)
    assert "is larger than the" not in capsys.readouterr().err


# ---------------------------------------------------------------- unseen_max

@pytest.mark.parametrize("policy, epochs", [("uniform", 1), ("uniform", 3), ("swdpp", 3), ("full", 2)])
def test_unseen_max_is_the_worst_gap_of_tools_visits(fm, tmp_path, policy, epochs):
    """The largest unseen_max of a run is visits.py's worst gap, gaps still open at the end
    included. Was: the last epoch's reads and the gaps open after it were never counted
    (1 epoch at keep 0.7: unseen_max 0, worst gap 1)."""
    from tools.visits import load

    run = tmp_path / "run"
    _train(fm, run, "--policy", policy, "--epochs", str(epochs), "--warmup-epochs", "0", "--log-ids", test=False)
    recs = _records(run)
    gaps = load(run).longest_gaps()
    assert max(r["unseen_max"] for r in recs) == int(gaps.max())
    if policy == "full":
        assert gaps.max() == 0
    else:   # keep 0.7: some samples go unread in every epoch
        assert gaps.max() >= 1
    if epochs == 1 and policy != "full":
        assert recs[-1]["unseen_max"] == 1, "the samples the only epoch did not read"
