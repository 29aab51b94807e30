"""Resume faults (issue 13): a resumed epoch's accounting, its ids log, and elastic resume.

Real ``python -m trainers.classify`` processes on a small real Fashion-MNIST subset (640
samples, tiny model, batch 32, torch backend on CPU):

* stopped (``--max-steps``, the SIGTERM path; a real SIGTERM; a kill -9) and resumed, the
  run's ``metrics.jsonl`` ``io`` blocks (steps, samples and bytes read, fractions) and its
  ids log equal an uninterrupted run's: each step once;
* a checkpoint of W ranks resumes on W' ranks mid-epoch (torchrun, gloo): 2 -> 1 and
  1 -> 3; the samples of the interrupted epoch, over every rank's ids log, are exactly its
  plan (rebuilt here from the checkpoint's scores), each once; every pending score update
  is carried over once; the LR schedule ends with the run;
* two nodes simulated on this machine (two torchrun launchers, c10d rendezvous) train,
  stop and resume.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
IO_KEYS = ("steps", "samples_planned", "samples_delivered", "samples_padding", "samples_read",
           "bytes_read", "payload_read", "requests", "samples_fraction", "bytes_fraction")
TIMEOUT = 240


@pytest.fixture(scope="module")
def data(fmnist_dir, tmp_path_factory) -> Path:
    from pipeline.formats import convert

    out = tmp_path_factory.mktemp("fm640") / "train"
    convert(fmnist_dir, out, split="train", format="wds", limit=640, samples_per_shard=160, seed=0,
            progress=False)
    return out


def _cmd(data: Path, out: Path, *extra: str, workers: int = 1) -> list[str]:
    return ["-m", "trainers.classify", "--data", str(data), "--policy", "swdpp", "--keep", "0.7",
            "--epochs", "2", "--batch-size", "32", "--width", "8", "--backend", "torch", "--device", "cpu",
            "--workers", str(workers), "--threads", "1", "--seed", "0", "--log-ids", "--no-progress",
            "--out", str(out), *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _torchrun(nproc: int, args: list[str], *launcher: str) -> list[str]:
    """The arguments of one torchrun launcher (gloo on CPU)."""
    where = list(launcher) or ["--standalone"]
    return ["-m", "torch.distributed.run", *where, "--nproc-per-node", str(nproc), *args]


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(out: Path) -> list[dict]:
    """Every logged step of every rank: {"epoch", "step", "ids", "rank"}."""
    rows = []
    for path in sorted(out.glob("ids-rank*.jsonl")):
        rank = int(path.stem[len("ids-rank"):])
        rows += [dict(json.loads(x), rank=rank) for x in path.read_text().splitlines()]
    return rows


def _epoch_ids(out: Path, epoch: int) -> list[int]:
    return [i for r in _steps(out) if r["epoch"] == epoch for i in r["ids"] if i >= 0]


def _io(rec: dict) -> dict:
    return {k: rec["io"][k] for k in IO_KEYS} | {k: rec[k] for k in ("kept", "steps", "train_samples")}


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    _run(_cmd(data, out))
    return out


def _assert_same_as_full(out: Path, full: Path) -> None:
    got, want = _records(out), _records(full)
    assert [r["epoch"] for r in got] == [0, 1]
    for g, w in zip(got, want):
        assert _io(g) == _io(w), f"epoch {g['epoch']}: the resumed run's io block differs"
    assert (out / "ids-rank0.jsonl").read_text() == (full / "ids-rank0.jsonl").read_text(), \
        "the ids log is the uninterrupted run's: each step once, in order"


def test_max_steps_stop_then_resume_reports_the_whole_epoch(data, full_run, tmp_path):
    """Stopped in the middle of epoch 1 (epoch 0's steps + 4) with batches in flight (one reader
    process): the resumed epoch's io block counts the whole epoch, not the part after the
    stop plus the whole epoch's planned steps."""
    out = tmp_path / "run"
    steps0 = _records(full_run)[0]["steps"]
    _run(_cmd(data, out, "--max-steps", str(steps0 + 4)))
    part = json.loads((out / "ids-rank0.jsonl").read_text().splitlines()[-1])
    assert (part["epoch"], part["step"]) == (1, 4)
    _run(_cmd(data, out, "--resume"))
    _assert_same_as_full(out, full_run)


def _wait_for_steps(proc: subprocess.Popen, log: Path, n: int) -> None:
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or hung before logging {n} steps")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_then_resume_equals_uninterrupted(data, full_run, tmp_path, sig):
    """A real SIGTERM mid-epoch 1 (checkpoint at that step) or kill -9 (the last checkpoint
    is epoch 0's end, so epoch 1 is replayed): resumed, metrics io and ids log equal the
    uninterrupted run's; the replayed steps are not logged twice."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, *_cmd(data, out)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(proc, out / "ids-rank0.jsonl", 22)
        proc.send_signal(sig)
        log, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and "stopped at epoch 1" in log, log[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL
        assert len((out / "ids-rank0.jsonl").read_text().splitlines()) > 20, "steps of epoch 1 were logged"
    _run(_cmd(data, out, "--resume"))
    _assert_same_as_full(out, full_run)


# ---------------------------------------------------------------- elastic resume, in one process

def _plan(k: int, world: int):
    from pipeline.plan.planner import Plan, _rows, _slots

    flat, per_rank = _slots(k, world, pad=True)
    flat[:k] = np.random.default_rng(k).permutation(1000)[:k]
    ids, w, m = _rows(flat, k, world, per_rank, np.linspace(0.5, 2, 1000), 0.25)
    return Plan(0, k, ids, w, m)


@pytest.mark.parametrize("k,layout,world", [(203, [(2, 3)], 1), (203, [(1, 3)], 3),
                                            (203, [(3, 1), (2, 2)], 4), (5, [(4, 1)], 2)])
def test_remaining_plan_is_the_rest_once(k, layout, world):
    """Consumed parts + the re-sliced rest = the plan, each sample once, in its order, with
    its weight; the new rows are equal (padding at the end only)."""
    from pipeline.plan.planner import remaining_plan, reslice

    bs, plan = 8, _plan(k, 2)
    seen, cur = [], plan
    for ranks, steps in layout:
        cur = reslice(cur, 0, ranks)
        seen += [i for r in range(ranks) for i in cur.ids[r, :steps * bs] if i >= 0]
        cur = reslice(cur, steps * bs, ranks)
    rest = remaining_plan(plan, layout, bs, world)
    left = [i for i in rest.ids.reshape(-1) if i >= 0]
    assert rest.world_size == world and rest.per_rank == -(-len(left) // world)
    assert sorted(seen + left) == sorted(plan.ids[plan.ids >= 0].tolist())
    assert len(set(seen + left)) == k
    order = [i for i in plan.ids.reshape(-1) if i >= 0]
    assert left == [i for i in order if i not in set(seen)], "the rest keeps the plan's order"
    w = dict(zip(plan.ids.reshape(-1).tolist(), plan.weights.reshape(-1).tolist()))
    assert all(w[i] == x for i, x in zip(rest.ids.reshape(-1).tolist(), rest.weights.reshape(-1).tolist())
               if i >= 0)
    assert (rest.weights[rest.ids < 0] == 0).all() and (rest.mixup[rest.ids < 0] == 0).all()


def test_loader_state_resumes_on_another_world_size(data):
    """Two loaders (ranks 0, 1 of 2) consume 3 batches of epoch 0 and report losses; three
    loaders resume from both states: together the five read epoch 0's plan once each, and
    every reported loss is pending on exactly one new rank."""
    import pipeline
    from pipeline.options import LoaderOptions

    ds = pipeline.open_dataset(data)
    kw = dict(keep=0.7, policy="uniform", epochs=2, seed=5, backend="torch", device="cpu", augment=None,
              num_workers=0)

    def loader(rank, world):
        return pipeline.Loader(ds, 32, options=LoaderOptions.of(world_size=world, rank=rank), **kw)

    seen, states, full = [], [], None
    for r in range(2):
        with loader(r, 2) as L:
            full = L.planner.plan(0)
            for i, b in enumerate(L.epoch(0)):
                seen += b.ids[b.ids >= 0].tolist()
                L.update(b.ids, torch.ones(len(b)))
                if i == 2:
                    states.append(L.state_dict())
                    break
    with pytest.raises(ValueError, match="pass every rank's state"):
        loader(0, 3).load_state_dict(states[0])
    pending, steps = [], []
    for r in range(3):
        with loader(r, 3) as L:
            L.load_state_dict(states)
            assert L.steps_per_epoch(0) == 3 + len(L.batch_plan(0).ids)
            pending += np.asarray(L.state_dict()["scores"]["pending_ids"]).tolist()
            n = 0
            for b in L.epoch(0):
                n += 1
                assert b.step >= 3
                seen += b.ids[b.ids >= 0].tolist()
            steps.append(n)
    assert len(set(steps)) == 1, "every new rank takes the same number of steps"
    planned = sorted(full.ids[full.ids >= 0].tolist())
    assert len(seen) == len(set(seen)) and sorted(seen) == planned
    assert sorted(pending) == sorted(seen[:2 * 3 * 32]), "the old ranks' losses, each once"


# ---------------------------------------------------------------- elastic resume (torchrun, gloo)

def _planned(data: Path, ckpt: Path, epoch: int) -> list[int]:
    """The ids of ``epoch``'s global plan, rebuilt from a mid-epoch checkpoint's committed scores."""
    import pipeline
    from pipeline.plan.planner import EpochPlanner
    from pipeline.plan.policies import get_policy
    from pipeline.plan.scores import Scores
    from trainers import checkpoint

    ds = pipeline.open_dataset(data)
    loader_state = checkpoint.load(ckpt)["loader"]
    sd = dict(loader_state["scores"])
    for k in ("pending_ids", "pending_losses", "pending_weights"):
        sd[k] = np.asarray(sd[k])[:0]
    scores = Scores(len(ds))
    scores.load_state_dict(sd)
    policy = get_policy("swdpp", keep=0.7, epochs=2)
    policy.load_state_dict(loader_state["policy"])        # the run's carry-over credits
    planner = EpochPlanner(policy, scores, ds.file, ds.offset, 0, world_size=1, window=4, order=ds.byte_order)
    ids = planner.plan(epoch).ids
    return sorted(ids[ids >= 0].tolist())


def _pending(out: Path) -> list[int]:
    """The pending (not yet synced) score updates held by every rank of the final checkpoint."""
    from trainers import checkpoint

    ck = out / "ckpt"
    world = int(checkpoint.load(ck / "last.pt")["world_size"])
    files = [ck / "last.pt"] + [ck / f"loader-rank{r}.pt" for r in range(1, world)]
    return sorted(i for f in files for i in np.asarray(checkpoint.load(f)["loader"]["scores"]["pending_ids"]).tolist())


def _check_elastic(data: Path, out: Path, saved: Path, stopped_at: int, new_world: int) -> None:
    recs = _records(out)
    assert [r["epoch"] for r in recs] == [0, 1] and (out / "summary.json").exists()
    seen = _epoch_ids(out, 1)
    plan = _planned(data, saved, 1)
    assert max(Counter(seen).values()) == 1, "a sample of the resized epoch was read twice"
    assert sorted(seen) == plan, "the resized epoch's samples are exactly its plan"
    assert recs[1]["kept"] == len(plan) == recs[1]["io"]["samples_delivered"]
    steps = _steps(out)
    before = {r["rank"] for r in steps if r["epoch"] == 1 and r["step"] <= stopped_at}
    after = {r["rank"] for r in steps if r["epoch"] == 1 and r["step"] > stopped_at}
    assert after == set(range(new_world)), "every new rank read part of the rest of the epoch"
    assert before and len({r["step"] for r in steps if r["epoch"] == 1 and r["rank"] == 0}) == \
        len([r for r in steps if r["epoch"] == 1 and r["rank"] == 0]), "steps numbered once per rank"
    # epoch 1's losses are still pending at the end: every one of them, on some rank, once
    assert _pending(out) == sorted(seen)
    assert recs[1]["lr"] == pytest.approx(0.0, abs=1e-9), "the cosine schedule ends with the run"


def test_elastic_resume_two_ranks_to_one(data, tmp_path):
    out = tmp_path / "run"
    # 2 ranks: K = 448 in every epoch (swdpp), 7 steps per rank; stop after 2 steps of epoch 1
    _run(_torchrun(2, _cmd(data, out, "--max-steps", "9", workers=0)))
    saved = tmp_path / "stopped.pt"
    shutil.copy(out / "ckpt" / "last.pt", saved)
    r = _run(_cmd(data, out, "--resume", workers=0))
    assert "written by 2 ranks, resumed on 1" in r.stdout
    _check_elastic(data, out, saved, 2, 1)


def test_elastic_resume_one_rank_to_three(data, tmp_path):
    out = tmp_path / "run"
    # 1 rank: 14 steps per epoch; stop after 3 steps of epoch 1
    _run(_cmd(data, out, "--max-steps", "17", workers=0))
    saved = tmp_path / "stopped.pt"
    shutil.copy(out / "ckpt" / "last.pt", saved)
    r = _run(_torchrun(3, _cmd(data, out, "--resume", workers=0)))
    assert "written by 1 ranks, resumed on 3" in r.stdout
    _check_elastic(data, out, saved, 3, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(args: list[str]) -> None:
    """Two torchrun launchers (nodes 0 and 1, two processes each) meeting at one c10d endpoint."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *_torchrun(
        2, args, "--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"two-nodes-{port}")],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def test_two_nodes_train_stop_resume(data, tmp_path):
    """4 ranks on 2 simulated nodes: epoch 0 has 5 steps, epoch 1 2; stopped after 6 steps
    (one step into epoch 1) and resumed on the same two nodes: every epoch's samples, over
    the four ranks' logs, are read once each and add up to the planned count."""
    out = tmp_path / "run"
    _two_nodes(_cmd(data, out, "--max-steps", "6", workers=0))
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "ckpt").glob("loader-rank*.pt")) == [
        f"loader-rank{r}.pt" for r in (1, 2, 3)]
    _two_nodes(_cmd(data, out, "--resume", workers=0))
    recs = _records(out)
    assert [r["epoch"] for r in recs] == [0, 1] and (out / "summary.json").exists()
    for e, rec in enumerate(recs):
        seen = _epoch_ids(out, e)
        assert len(seen) == len(set(seen)) == rec["kept"]
        assert {r["rank"] for r in _steps(out) if r["epoch"] == e} == {0, 1, 2, 3}
        assert rec["steps"] == len([r for r in _steps(out) if r["epoch"] == e and r["rank"] == 0])
