"""DDP on CPU: two gloo processes under torchrun train on a small real subset (Fashion-MNIST).

* their plans match and their slices are disjoint (checked from the logged step ids);
* a run stopped mid-epoch (``--max-steps``, the SIGTERM path) and resumed reads the same
  remaining samples and ends with the same number of steps as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
BS = 50


@pytest.fixture(scope="module")
def data(fmnist_wds, fmnist_test_wds) -> tuple[Path, Path]:
    """(train: the shared 2000-sample Fashion-MNIST fixture, test: 1000 test-split samples)."""
    pytest.importorskip("pipeline.loader")
    return Path(fmnist_wds), Path(fmnist_test_wds)


def _torchrun(data: tuple[Path, Path], out: Path, *extra: str, backend: str = "torch") -> subprocess.CompletedProcess:
    train, test = data
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainers.classify", "--data", str(train), "--test-data", str(test), "--policy", "swdpp",
           "--keep", "0.7", "--epochs", str(EPOCHS), "--batch-size", str(BS), "--width", "8", "--backend", backend,
           "--device", "cpu", "--workers", "0", "--threads", "1", "--seed", "1", "--log-ids", "--no-progress",
           "--out", str(out), *extra]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _ids(out: Path, rank: int) -> dict[int, list[list[int]]]:
    """epoch -> list of per-step id lists (in order) of one rank."""
    per: dict[int, list[list[int]]] = defaultdict(list)
    for line in (out / f"ids-rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        per[r["epoch"]].append(r["ids"])
    return per


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "full"
    _torchrun(data, out)
    return out


def test_ddp_ranks_disjoint_and_plans_match(full_run: Path) -> None:
    recs = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == list(range(EPOCHS))
    # it learns: after 2 epochs of 14 steps a rank, the test accuracy is still mostly
    # BatchNorm-statistics noise (0.18-0.36 across seeds and swdpp weight options), while
    # the training loss falls by 32-40% in every such run
    assert recs[-1]["train_loss"] < 0.8 * recs[0]["train_loss"]
    assert recs[-1]["test_acc"] > 0.12  # chance: 0.10
    # rank 0 scores the whole test set, not the half torchrun's environment would give it
    assert json.loads((full_run / "summary.json").read_text())["test_n"] == 1000
    r0, r1 = _ids(full_run, 0), _ids(full_run, 1)
    for e in range(EPOCHS):
        a = [i for step in r0[e] for i in step if i >= 0]
        b = [i for step in r1[e] for i in step if i >= 0]
        assert len(r0[e]) == len(r1[e]), "both ranks take the same number of steps"
        assert a and b and not set(a) & set(b), "rank slices are disjoint"
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        # together the ranks cover exactly the planned samples (the plan is shared)
        assert len(a) + len(b) == recs[e]["kept"]
        digests = recs[e]["io"].get("plan_digests") if isinstance(recs[e].get("io"), dict) else None
        if digests:
            assert len(set(digests)) == 1


def test_ddp_resume_mid_epoch_reads_same_remaining(data, full_run: Path, tmp_path: Path) -> None:
    steps_full = {r: sum(len(v) for v in _ids(full_run, r).values()) for r in (0, 1)}
    first_epoch_steps = len(_ids(full_run, 0)[0])
    stop_at = first_epoch_steps + max(1, len(_ids(full_run, 0)[1]) // 2)   # in the middle of epoch 1
    out = tmp_path / "resumed"
    _torchrun(data, out, "--max-steps", str(stop_at))
    assert not (out / "summary.json").exists(), "stopped run must not look finished"
    for r in (0, 1):
        assert sum(len(v) for v in _ids(out, r).values()) == stop_at
    _torchrun(data, out, "--resume")
    assert (out / "summary.json").exists()
    for r in (0, 1):
        got, want = _ids(out, r), _ids(full_run, r)
        assert sum(len(v) for v in got.values()) == steps_full[r], "same number of steps as the uninterrupted run"
        for e in range(EPOCHS):
            assert got[e] == want[e], f"rank {r} epoch {e}: the resumed run reads the same samples in the same order"
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == list(range(EPOCHS))


def test_ddp_with_the_dali_backend_reads_the_same_slices(data, full_run: Path, tmp_path: Path) -> None:
    """The same DDP run through DALI pipelines (one per rank): disjoint slices covering the
    plan, and in epoch 0 (whose plan does not depend on the losses)
    exactly the ids, in the same order, that the torch backend delivered on each rank."""
    out = tmp_path / "dali"
    _torchrun(data, out, backend="dali")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == list(range(EPOCHS))
    # 28 steps of a width-8 model: it learns (chance is 0.1), but so short a run ends noisily
    # (0.278 measured once with this backend and the carry-over swdpp)
    assert recs[-1]["test_acc"] > 0.2
    for e in range(EPOCHS):
        a = [i for step in _ids(out, 0)[e] for i in step if i >= 0]
        b = [i for step in _ids(out, 1)[e] for i in step if i >= 0]
        assert a and b and not set(a) & set(b) and len(a) + len(b) == recs[e]["kept"]
    for r in (0, 1):
        assert _ids(out, r)[0] == _ids(full_run, r)[0], f"rank {r}: DALI and torch backends differ in epoch 0"
