"""Fault suite, data side (issue 13 item 3 and the data/CLI weaker spots): huge finite
losses, file names that are not UTF-8, damaged manifests, bad trainer arguments, resume with
changed options, NaN losses in stats and metrics. Real files and real trainer runs; every
test is bounded to seconds. Concurrent conversions, kills, symlinks and 16-bit PNGs are in
tests/test_faults_convert.py."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline
from pipeline.formats import convert, verify
from pipeline.formats.manifest import ManifestError
from pipeline.plan.planner import EpochPlanner
from pipeline.plan.policies import POLICIES, get_policy
from pipeline.plan.scores import SCORE_LIMIT, Scores

BIG = (1e20, 1e30, 3e38)


# ============================================================ item 3: huge finite losses

def _poisoned_scores(n: int, big: float, epochs: int = 3) -> Scores:
    """Scores after `epochs` epochs in which five losses per batch of 50 are `big`."""
    rng = np.random.default_rng(0)
    s = Scores(n)
    for _ in range(epochs):
        losses = rng.lognormal(-1.0, 1.0, n)
        losses.reshape(-1, 50)[:, :5] = big
        s.update(np.arange(n), losses)
        s.sync()
    return s


@pytest.mark.parametrize("big", BIG)
def test_scores_stay_finite_for_huge_finite_losses(big):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no "overflow encountered in cast"
        s = _poisoned_scores(500, big)
        s.update(np.arange(5), np.full(5, -big))  # and the other sign
        s.sync()
    assert np.isfinite(s.ema).all() and np.isfinite(s.var).all()
    assert np.abs(s.ema).max() <= SCORE_LIMIT and s.var.max() <= np.float32(SCORE_LIMIT ** 2)
    assert s.ema.max() == pytest.approx(SCORE_LIMIT, rel=1e-6)   # clipped, not lost


@pytest.mark.parametrize("big", BIG)
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_plans_on_huge_finite_losses(name, big):
    n = 1000
    s = _poisoned_scores(n, big)
    planner = EpochPlanner(get_policy(name, keep=0.7, epochs=10), s, np.repeat(np.arange(4), n // 4),
                           np.tile(np.arange(n // 4) * 1000, 4), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for epoch in range(10):     # in order: rs2 and swdpp carry credits from epoch to epoch
            plan = planner.plan(epoch)
            out = planner.policy_output(epoch)
            assert np.isfinite(out.p).all() and np.isfinite(out.weight).all() and np.isfinite(out.mixup).all()
            ids = plan.ids[plan.ids >= 0]
            assert len(ids) == planner.policy.num_selected(n, epoch) and len(set(ids.tolist())) == len(ids)


def test_checkpoint_after_huge_losses_resumes_and_plans(tmp_path):
    n = 600
    s = _poisoned_scores(n, 3e38)
    s.update(np.arange(10), np.full(10, 1e30))         # pending losses travel too
    torch.save({"scores": s.state_dict()}, tmp_path / "ck.pt")
    r = Scores(n)
    r.load_state_dict(torch.load(tmp_path / "ck.pt", weights_only=True)["scores"])
    r.sync()
    planner = EpochPlanner(get_policy("swdpp", keep=0.5, epochs=6), r, np.zeros(n, np.int64),
                           np.arange(n) * 100, seed=1)
    assert (planner.plan(3).ids >= 0).sum() == planner.policy.num_selected(n, 3)
    # a checkpoint written before the fix holds var = inf and NaN scores: it loads, the NaN
    # samples count as unseen (and a warning says so), and it plans
    sd = s.state_dict()
    sd["var"][:7] = float("inf")
    sd["ema"][7:9] = float("nan")
    old = Scores(n)
    with pytest.warns(RuntimeWarning, match="2 sample"):
        old.load_state_dict(sd)
    assert np.isfinite(old.var).all() and not old.seen[7:9].any()
    planner.scores = old
    assert (planner.plan(3).ids >= 0).sum() == planner.policy.num_selected(n, 3)


def _png(path: Path, value: int, size=(8, 8)) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


# ============================================================ weaker spot: file names

def test_file_name_not_utf8_converts_and_is_named_when_bad(tmp_path):
    src = tmp_path / "src"
    for c in ("a", "b"):
        for j in range(4):
            _png(src / c / f"{j}.png", 20 * j)
    os.rename(src / "a" / "0.png", os.fsdecode(os.fsencode(src / "a") + b"/caf\xe9.png"))  # Latin-1
    Path(os.fsdecode(os.fsencode(src / "b") + b"/bad\xff.png")).write_bytes(b"not a png")
    s = convert(src, tmp_path / "out", progress=False)
    assert s["num_samples"] == 8 and s["skipped_samples"] == 1
    assert s["skipped"][0]["path"].endswith("bad\\xff.png")             # named, printable
    verify(tmp_path / "out")
    with pytest.raises(pipeline.formats.ConvertError, match=r"bad\\xff\.png"):
        convert(src, tmp_path / "strict", strict=True, progress=False)
    os.rename(src / "b", os.fsdecode(os.fsencode(src) + b"/cl\xe4ss"))
    with pytest.raises(pipeline.formats.SourceError, match=r"class directory name is not valid UTF-8: .*cl\\xe4ss"):
        convert(src, tmp_path / "o3", progress=False)


# ============================================================ weaker spot: damaged manifests

@pytest.fixture
def small_ds(tmp_path) -> Path:
    src = tmp_path / "src"
    for c in ("a", "b", "c"):
        for j in range(5):
            _png(src / c / f"{j}.png", 15 * j)
    out = tmp_path / "ds"
    convert(src, out, samples_per_shard=5, progress=False)
    return out


def _edit_header(root: Path, fn) -> None:
    h = json.loads((root / "manifest.json").read_text())
    fn(h)
    (root / "manifest.json").write_text(json.dumps(h))


@pytest.mark.parametrize("case, match", [
    ("files_cut", r"point at data file 2, but 'files' lists only 2"),
    ("classes_cut", r"label 2 is outside the 2 classes"),
    ("unknown_format", r"unknown format 'parquet'"),
    ("bad_json", r"not valid JSON"),
    ("index_cut", r"2 index files for 3 data files"),
    ("size_small", r"sample \d+ ends at byte \d+, past the end of shard-000001.tar"),
    ("label_column", r"label 7 is outside the 3 classes"),
])
def test_damaged_manifest_is_refused_at_open_naming_the_file(small_ds, case, match):
    edits = {
        "files_cut": lambda h: h.update(files=h["files"][:2], index_files=h["index_files"][:2]),
        "classes_cut": lambda h: h.update(classes=h["classes"][:2]),
        "unknown_format": lambda h: h.update(format="parquet"),
        "index_cut": lambda h: h.update(index_files=h["index_files"][:2]),
        "size_small": lambda h: h["files"][1].update(size=600),
    }
    if case == "bad_json":
        text = (small_ds / "manifest.json").read_text()
        (small_ds / "manifest.json").write_text(text[: len(text) // 2])
    elif case == "label_column":
        lab = np.load(small_ds / "manifest" / "label.npy")
        lab[4] = 7
        np.save(small_ds / "manifest" / "label.npy", lab)
    else:
        _edit_header(small_ds, edits[case])
    with pytest.raises(ManifestError, match=match) as e:
        pipeline.open_dataset(small_ds)
    assert str(small_ds / "manifest.json") in str(e.value)


# ============================================================ weaker spots: trainer CLI

@pytest.mark.parametrize("argv, msg", [
    (["--eval-every", "0"], "--eval-every: must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    (["--lr", "-0.1"], "--lr: must be a finite number > 0"),
    (["--lr", "inf"], "--lr: must be a finite number > 0"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
    (["--keep", "1.5"], r"--keep: must be in (0, 1]"),
    (["--keep", "nan"], r"--keep: must be in (0, 1]"),
    (["--momentum", "1.0"], "--momentum: must be in [0, 1)"),
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs: must be a finite number >= 0"),
    (["--label-smoothing", "1"], "--label-smoothing: must be in [0, 1)"),
    (["--workers", "-1"], "--workers: must be an integer >= 0"),
    (["--max-steps", "0"], "--max-steps: must be an integer >= 1"),
    (["--policy-kwargs", "{bad"], "--policy-kwargs: not valid JSON"),
    (["--policy-kwargs", "[1]"], "--policy-kwargs: must be a JSON object"),
])
def test_bad_trainer_arguments_are_refused_up_front(argv, msg, capsys, tmp_path):
    from trainers.classify import main
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path / "never-opened"), *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


# ============================================================ trainer runs on a tiny real set

@pytest.fixture(scope="module")
def fmnist_tiny(fmnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fm") / "ds"
    convert(fmnist_dir, out, limit=256, samples_per_shard=128, progress=False)
    return out


def _train(data: Path, out: Path, *extra: str) -> dict:
    from trainers.classify import main
    return main(["--data", str(data), "--out", str(out), "--policy", "uniform", "--keep", "0.7",
                 "--epochs", "2", "--batch-size", "64", "--width", "4", "--workers", "0",
                 "--backend", "torch", "--device", "cpu", "--threads", "1", "--no-progress", *extra])


@pytest.fixture(scope="module")
def stopped_run(fmnist_tiny, tmp_path_factory) -> Path:
    """A run stopped after 2 steps (checkpoint and config.json written)."""
    run = tmp_path_factory.mktemp("run")
    assert _train(fmnist_tiny, run, "--max-steps", "2")["stopped"]
    return run


@pytest.mark.parametrize("change, said", [
    (["--keep", "0.5"], "--keep 0.7 -> 0.5"),
    (["--batch-size", "32"], "--batch-size 64 -> 32"),
    (["--policy", "swdpp"], "--policy 'uniform' -> 'swdpp'"),
    (["--seed", "3"], "--seed 0 -> 3"),
    (["--epochs", "3"], "--epochs 2 -> 3"),
    (["--width", "8"], "--width 4 -> 8"),                 # the weights would not load
    (["--optimizer", "adamw"], "--optimizer 'sgd' -> 'adamw'"),
    (["--lr", "0.2"], "--lr 0.05 -> 0.2"),                # ignored before (the schedule's own)
])
def test_resume_with_changed_plan_options_is_refused(fmnist_tiny, stopped_run, change, said):
    # the same command with --resume and one option changed (argparse keeps the last value)
    with pytest.raises(SystemExit, match="--resume: .*config.json was written with other options") as e:
        _train(fmnist_tiny, stopped_run, "--resume", *change)
    assert said in str(e.value)


def test_resume_on_another_dataset_or_a_damaged_checkpoint_is_refused(fmnist_tiny, fmnist_dir,
                                                                     stopped_run, tmp_path):
    other = tmp_path / "other"        # the same source and size, shuffled with another seed
    convert(fmnist_dir, other, limit=256, samples_per_shard=128, seed=1, progress=False)
    with pytest.raises(SystemExit, match=r"--data .* -> .*other.* \(another dataset"):
        _train(other, stopped_run, "--resume")
    moved = tmp_path / "moved"        # the same dataset elsewhere resumes
    shutil.copytree(fmnist_tiny, moved)
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    for damage in (b"", b"\x00garbage" * 50):
        (run / "ckpt" / "last.pt").write_bytes(damage)
        with pytest.raises(SystemExit, match=r"last.pt is not a readable checkpoint of this trainer"):
            _train(moved, run, "--resume")
    shutil.copy(stopped_run / "ckpt" / "last.pt", run / "ckpt" / "last.pt")
    assert not _train(moved, run, "--resume")["stopped"]


def test_resume_with_the_same_options_is_accepted(fmnist_tiny, tmp_path):
    assert _train(fmnist_tiny, tmp_path, "--max-steps", "2", "--policy-kwargs", '{"r": 0.5}',
                  "--policy", "infobatch")["stopped"]
    done = _train(fmnist_tiny, tmp_path, "--resume", "--policy-kwargs", '{ "r":0.5 }', "--policy", "infobatch")
    assert not done["stopped"] and (tmp_path / "summary.json").exists()


def test_nan_losses_are_counted_in_stats_and_metrics_with_a_warning(fmnist_tiny, tmp_path, capsys):
    # an absurd (finite) LR makes the model diverge after its first step: NaN losses
    with pytest.warns(RuntimeWarning, match=r"(all \d+ losses of the batch|\d+ of the batch's \d+ losses) are NaN/inf"):
        _train(fmnist_tiny, tmp_path / "run", "--lr", "1e30", "--warmup-epochs", "0")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["num_nonfinite"] > 0 and recs[0]["io"]["num_nonfinite"] == recs[0]["num_nonfinite"]
    assert recs[1]["num_nonfinite"] == recs[1]["train_samples"]        # all of epoch 1
    assert "epoch 1: all" in capsys.readouterr().err


def test_loader_stats_count_nonfinite_losses(fmnist_tiny):
    ds = pipeline.open_dataset(fmnist_tiny)
    L = pipeline.Loader(ds, 50, keep=1.0, policy="full", backend="torch", device="cpu",
                        augment=None, num_workers=0)
    with pytest.warns(RuntimeWarning) as caught:   # the first of the epoch warns, once
        for b in L.epoch(0):
            losses = torch.ones(len(b.ids))
            if b.step == 0:
                losses[:3] = float("nan")
            elif b.step == 1:
                losses[:] = float("inf")
            L.update(b.ids, losses)
    said = [str(w.message) for w in caught if "NaN/inf" in str(w.message)]
    assert len(said) == 1 and "epoch 0 step 0: 3 of the batch's 50 losses are NaN/inf" in said[0]
    assert L.stats(0).num_nonfinite == 3 + 50
    assert L.stats(0).as_dict()["num_nonfinite"] == 53
    L.close()
