"""Fault suite, processes (issue 13 item 4): stop signals and kill -9 of the trainer with
reader processes on both backends, readers that outlive neither the trainer nor a stuck
pool.  Real trainer processes, real signals (process groups, SIGKILL), process trees read
from /proc; each test is bounded to seconds.  Decoding faults: tests/test_faults_decode.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pipeline
from pipeline.decode.procs import init_reader_process, reader_processes, stop_pool
from trainers import checkpoint

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["dali", "torch"]


# ============================================================ processes (/proc)

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _survivors(pids, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _ignores(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("SigIgn:"))
    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)


# ============================================================ item 4: the trainer's processes

def _trainer(data: Path, out: Path, backend: str, workers: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainers.classify", "--data", str(data), "--policy", "uniform",
           "--keep", "0.7", "--epochs", "2", "--batch-size", "32", "--width", "8", "--backend",
           backend, "--device", "cpu", "--workers", str(workers), "--threads", "1", "--log-ids",
           "--no-progress", "--out", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(proc: subprocess.Popen, until, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert proc.poll() is None, "the trainer exited early"
        assert time.monotonic() < deadline, "the trainer did not get there in time"
        time.sleep(0.05)


def _steps(out: Path) -> int:
    p = out / "ids-rank0.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


@pytest.fixture
def reaper():
    """Kills what a failed test leaves behind (its own trainer's process group only)."""
    procs: list[subprocess.Popen] = []
    yield procs.append
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_sigterm_checkpoints_and_exits_promptly(cifar_wds, tmp_path, backend, reaper):
    out = tmp_path / "run"
    proc = _trainer(cifar_wds, out, backend, 2)
    reaper(proc)
    _wait(proc, lambda: _steps(out) >= 5)
    kids = _descendants(proc.pid)
    assert len(kids) >= 2, "two reader processes run mid-epoch"
    assert all(_ignores(k, signal.SIGTERM) for k in kids if _alive(k)), "readers ignore SIGTERM"
    os.killpg(proc.pid, signal.SIGTERM)  # kill -TERM -- -PGID: the trainer and its readers
    t0 = time.monotonic()
    rc = proc.wait(timeout=60)
    log = (tmp_path / "run.log").read_text()
    assert rc == 0 and time.monotonic() - t0 < 30, log[-3000:]
    assert "stopped at epoch" in log and "Traceback" not in log, log[-3000:]
    ck = checkpoint.load(out / "ckpt" / "last.pt")  # torch.load(weights_only=True)
    assert ck["global_step"] == _steps(out)
    assert not _survivors(kids), "no reader outlives the trainer"


@pytest.mark.parametrize("backend, when", [("dali", "idle"), ("dali", "mid-epoch"),
                                           ("torch", "mid-epoch")])
def test_kill9_of_the_trainer_leaves_no_reader(cifar_wds, tmp_path, backend, when, reaper):
    out = tmp_path / "run"
    proc = _trainer(cifar_wds, out, backend, 2)
    reaper(proc)
    if when == "idle":  # DALI's readers start with the loader, before the first batch
        _wait(proc, lambda: len(_descendants(proc.pid)) >= 2)
    else:
        _wait(proc, lambda: _steps(out) >= 3)
    kids = _descendants(proc.pid)
    assert len(kids) >= 2
    os.kill(proc.pid, signal.SIGKILL)  # the trainer alone
    proc.wait(10)
    assert not _survivors(kids), f"orphaned readers {kids}"


def test_dali_readers_survive_stop_signals_and_close_is_bounded(cifar_wds):
    before = set(_children().get(os.getpid(), []))
    L = pipeline.Loader(pipeline.open_dataset(cifar_wds), 64, keep=1.0, policy="full",
                        backend="dali", device="cpu", num_workers=2)
    workers = sorted(set(_children().get(os.getpid(), [])) - before)
    assert len(workers) == 2
    it = L.epoch(0)
    got = [next(it) for _ in range(3)]
    for w in workers:  # a cgroup-wide stop (systemd, Slurm) reaches the readers too
        os.kill(w, signal.SIGTERM)
        os.kill(w, signal.SIGINT)
    got += list(it)
    assert len(got) == L.steps_per_epoch(0) and all(map(_alive, workers))
    os.kill(workers[0], signal.SIGKILL)  # one reader dies (OOM, say): DALI's close used to hang
    t0 = time.monotonic()
    L.close()
    assert time.monotonic() - t0 < 10
    assert not _survivors(workers)


def test_torch_readers_survive_sigterm_mid_epoch(cifar_wds):
    L = pipeline.Loader(pipeline.open_dataset(cifar_wds), 64, keep=1.0, policy="full",
                        backend="torch", device="cpu", num_workers=2)
    before = set(_children().get(os.getpid(), []))
    it = L.epoch(0)
    got = [next(it) for _ in range(2)]
    workers = sorted(set(_children().get(os.getpid(), [])) - before)
    assert len(workers) == 2
    for w in workers:
        os.kill(w, signal.SIGTERM)
    got += list(it)  # no "DataLoader worker is killed by signal" in the main process
    assert len(got) == L.steps_per_epoch(0)
    L.close()
    assert not _survivors(workers)


def _stubborn_reader(parent: int) -> None:
    init_reader_process(parent)
    time.sleep(120)


def test_stop_pool_kills_readers_when_the_pool_close_hangs():
    import multiprocessing as mp

    with reader_processes():
        p = mp.get_context("fork").Process(target=_stubborn_reader, args=(os.getpid(),))
        p.start()
    time.sleep(0.3)
    assert _ignores(p.pid, signal.SIGTERM) and _ignores(p.pid, signal.SIGINT)
    t0 = time.monotonic()
    assert stop_pool(p.join, [p.pid], grace_s=1.0), "join returns once the reader is killed"
    assert 0.9 < time.monotonic() - t0 < 5 and p.exitcode == -signal.SIGKILL
    stuck = threading.Event()
    assert not stop_pool(stuck.wait, [], grace_s=0.2), "a close stuck for good is reported"
    stuck.set()


@pytest.mark.parametrize("epoch", [False, True])
def test_a_script_that_never_closes_its_loader_exits(cifar_wds, tmp_path, epoch):
    """No close(), reader processes, and a weakref finalizer made before multiprocessing was
    imported (some library at import time): weakref's exit hook then runs after
    multiprocessing's, which joined DALI's waiting workers forever.  The script exits."""
    script = tmp_path / "s.py"
    script.write_text(
        "import weakref; weakref.finalize(object, print)\n"
        "import pipeline\n"
        f"L = pipeline.Loader(pipeline.open_dataset({str(cifar_wds)!r}), 64, keep=1.0, "
        "policy='full', backend='dali', device='cpu', augment='cifar', num_workers=2)\n"
        + ("n = sum(len(b) for b in L.epoch(0))\nprint('read', n)\n" if epoch else "")
        + "print('done', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the script did not exit: {e.stdout!r}") from e
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]
