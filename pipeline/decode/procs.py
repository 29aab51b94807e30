"""Reader processes that neither outlive the process they read for nor act on its stop signals.

Both backends run their reads in child processes (DALI's parallel ``external_source``
workers, torch ``DataLoader`` workers).  Three rules keep a run's processes under the
main process's control, however it stops (Linux; elsewhere these are no-ops):

* **Stop signals go to the main process only.**  ``kill -TERM -- -PGID``, Ctrl-C or a
  cgroup-wide SIGTERM (systemd, Slurm) reaches every reader too.  A reader killed that
  way can die holding a lock or counted as a sleeper on one of DALI's shared queues, so
  closing the pool later waits forever; and torch's SIGCHLD handler turns a dead worker
  into an exception wherever the main process happens to be (``backward()``, say),
  before it can checkpoint.  So readers are born with SIGTERM/SIGINT blocked
  (:func:`reader_processes` around the fork) and ignore them from their first
  instruction (:func:`init_reader_process`); the main process alone handles a stop and
  then ends its readers.
* **Readers die with the main process** (``PR_SET_PDEATHSIG`` = SIGKILL): a ``kill -9``
  of the trainer leaves no orphan holding memory and shared queues.  The kernel sends it
  when the *thread* that forked the reader exits, so it is armed only for readers forked
  by the main thread (a loader built in a short-lived thread would otherwise lose its
  readers when that thread ends).
* **Closing a pool is bounded** (:func:`stop_pool`): the pool's own orderly shutdown
  gets a grace period; readers still alive after it are killed with SIGKILL (SIGTERM is
  ignored by design).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Callable, Iterable, Iterator

__all__ = ["reader_processes", "init_reader_process", "ignore_stop_signals",
           "die_with_parent_default", "stop_pool",
           "kill_children", "STOP_SIGNALS"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1
_LINUX = sys.platform.startswith("linux")
_armed: tuple[int, bool] | None = None   # (parent pid, die with it) while readers are forked
_initialised: int | None = None          # pid of this process once it is set up as a reader


def _after_fork_in_child() -> None:
    global _armed
    armed, _armed = _armed, None  # grandchildren are not readers of this loader
    if armed is not None:
        init_reader_process(*armed)


if hasattr(os, "register_at_fork"):
    # forked readers are set up before they run any code of the pool; spawned ones (DALI
    # with CUDA already up) in their first callback (init_reader_process)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def die_with_parent_default() -> bool:
    """Whether readers created from the calling thread may die with it (see module doc)."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def reader_processes() -> Iterator[None]:
    """Wrap the creation of reader processes: they start with the stop signals blocked
    (a signal sent meanwhile reaches the main process once the block ends) and, when
    forked, are set up by :func:`init_reader_process` before the pool's code runs."""
    global _armed
    can_mask = _LINUX and hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if can_mask else None
    _armed = (os.getpid(), die_with_parent_default())
    try:
        yield
    finally:
        _armed = None
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def init_reader_process(parent_pid: int, die_with_parent: bool = True) -> None:
    """Set up the calling process as a reader of ``parent_pid`` (once per process; a no-op
    in the parent itself, where ``num_workers=0`` runs the same callbacks): ignore the
    stop signals and, where asked, die with the parent."""
    global _initialised
    pid = os.getpid()
    if pid == parent_pid or _initialised == pid:
        return
    _initialised = pid
    ignore_stop_signals()
    if die_with_parent and _LINUX:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: the pool's own close still ends us
            return
        if os.getppid() != parent_pid:  # the parent died before the request took effect
            os.kill(pid, signal.SIGKILL)


def ignore_stop_signals() -> None:
    """Ignore SIGTERM/SIGINT in this (reader) process; again after a library that installs
    its own handlers (torch's DataLoader worker dies on SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; the inherited block still holds
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if _LINUX and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # ignored from now on


def _is_child(pid: int) -> bool:
    """True when ``pid`` is an unreaped child of this process (never signal a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    except (OSError, ValueError, IndexError):
        return False


def kill_children(pids: Iterable[int]) -> list[int]:
    """SIGKILL those of ``pids`` that are still children of this process; returns them."""
    killed = []
    for pid in pids:
        if pid and _is_child(int(pid)):
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except ProcessLookupError:
                pass
    return killed


def stop_pool(close: Callable[[], None], pids: Iterable[int], grace_s: float = 2.0) -> bool:
    """Run a pool's orderly ``close`` for at most ``grace_s`` seconds; then SIGKILL its
    readers ``pids`` that are still alive and give ``close`` as long again.  Returns True
    when ``close`` finished (False: it is stuck for good, e.g. on a lock a dead reader held;
    its daemon thread is left behind and the caller must not call it again)."""
    pids = list(pids)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            close()
        except BaseException as e:  # noqa: BLE001 - reported below, in the caller's thread
            errors.append(e)

    t = threading.Thread(target=run, name="reader-pool-close", daemon=True)
    t.start()
    t.join(grace_s)
    if t.is_alive():
        kill_children(pids)
        t.join(grace_s)
    if errors:
        raise errors[0]
    return not t.is_alive()
