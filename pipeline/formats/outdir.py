"""The output directory of a conversion: its lock, what state it is in, what is ours in it.

One conversion at a time writes into an OUT: ``OUT/.convert.lock`` holds the owner's PID,
host and start time, and the owner keeps an exclusive ``flock`` on it for as long as it
runs. A second writer is refused with the owner named. The kernel drops the flock when its
process dies however it dies (kill -9 included), so a lock file left behind on this host
is stale and is taken over; where the filesystem has no flock, a lock whose PID is dead on
this host is. A lock written on another host is never taken over (its PID cannot be
checked from here): the message says which file to delete.

``pause_point`` is a test hook: ``PIPELINE_CONVERT_PAUSE=<phase>[:<seconds>]`` makes the
converter print ``convert: paused at <phase> (pid N)`` to stderr and sleep there, so that
tests can kill it at a known point (phases: ``locked``, ``check``, ``write``, ``manifest``).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from .errors import ConvertError
from .header import HEADER_NAME
from .manifest import COLUMN_DIR
from .registry import FORMATS

__all__ = ["LOCK_NAME", "STATE_DIR", "OutLock", "prepare_out", "start_state", "pause_point", "owned",
           "check_not_inside"]

LOCK_NAME = ".convert.lock"
STATE_DIR = ".convert"
STARTED = "fingerprint"          # STATE_DIR/fingerprint: written before the image check
PAUSE_ENV = "PIPELINE_CONVERT_PAUSE"


def pause_point(phase: str) -> None:
    """Sleep at ``phase`` when the test hook asks for it (see the module docstring)."""
    want = os.environ.get(PAUSE_ENV, "")
    name, _, seconds = want.partition(":")
    if name == phase:
        print(f"convert: paused at {phase} (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(float(seconds or 60))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # exists, owned by another user
        return True
    return True


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {owner.get('pid')} on host {owner.get('host')}, started {when}"


class OutLock:
    """The advisory lock of one OUT (a context manager; see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict | None = None    # the stale owner this lock was taken from

    def _owner(self, fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return data if isinstance(data, dict) else {}
        except ValueError:                     # killed while writing it: nobody's
            return {}

    def acquire(self) -> OutLock:
        """Take the lock or raise ConvertError naming its owner."""
        host = socket.gethostname()
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flocked = self._flock(fd)
                # the previous owner may have removed the file between our open and flock
                try:
                    current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if not current:
                    os.close(fd)
                    continue
                owner = self._owner(fd)
                if owner.get("pid") not in (None, os.getpid()):
                    self._check_stale(owner, host, flocked)
                    self.took_over = owner
                mine = json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode()
                os.ftruncate(fd, 0)
                os.pwrite(fd, mine, 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self
        raise ConvertError(f"could not lock {self.path}: it keeps being replaced")

    def _flock(self, fd: int) -> bool:
        """Exclusive flock without waiting; False where the filesystem has none."""
        import fcntl
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            owner = self._owner(fd)
            raise ConvertError(f"{self.path.parent} is being written by another conversion "
                               f"({_describe(owner)}): wait for it to finish or stop it") from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise

    def _check_stale(self, owner: dict, host: str, flocked: bool) -> None:
        """Refuse a lock that may still be held; return when it is stale."""
        if owner.get("host") != host:
            raise ConvertError(f"{self.path.parent} is locked by a conversion on another host "
                               f"({_describe(owner)}); if it is no longer running, delete {self.path}")
        if not flocked and isinstance(owner.get("pid"), int) and _pid_alive(owner["pid"]):
            raise ConvertError(f"{self.path.parent} is being written by another conversion "
                               f"({_describe(owner)}): wait for it to finish or stop it")

    def release(self) -> None:
        """Remove the lock file, then drop the flock (in that order: see ``acquire``)."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def owned(name: str) -> bool:
    """True for an entry of OUT that a conversion writes (``--overwrite`` removes only those)."""
    return (name in (HEADER_NAME, COLUMN_DIR, STATE_DIR) or name.startswith(f".{HEADER_NAME}")
            or any(fmt.owns(name) for fmt in FORMATS.values()))


def _fingerprint_in(path: Path, overwrite: bool) -> str | None:
    """The fingerprint recorded in a manifest / state file; a damaged one is refused
    (ConvertError) unless ``overwrite`` (then it is replaced: None)."""
    try:
        text = path.read_text()
        return text.strip() if path.name == STARTED else json.loads(text).get("fingerprint")
    except (ValueError, OSError, AttributeError) as e:
        if overwrite:
            return None
        raise ConvertError(f"{path} is damaged ({e}): use --overwrite to convert again") from e


def _names(paths: list[Path], most: int = 5) -> str:
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in sorted(paths)[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _remove(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def prepare_out(out: Path, fingerprint: str, overwrite: bool) -> str:
    """Return "fresh", "resume" or "done"; refuse a different dataset unless overwrite.

    Only a record this converter wrote (``manifest.json``, or ``STATE_DIR`` with the
    fingerprint) proves that the entries of OUT whose names it uses are its own: without
    one, a ``*-000000.tar`` or ``data.zarr`` is the user's (their own WebDataset shards or
    Zarr store), and OUT is refused whatever ``overwrite`` says, naming those entries. A
    conversion killed before it recorded its fingerprint left at most an empty
    ``STATE_DIR``, which is removed.
    """
    state = out / STATE_DIR
    status, existing = "fresh", None
    for path, st in ((out / HEADER_NAME, "done"), (state / "state.json", "resume"),
                     (state / STARTED, "resume")):
        if path.exists():
            status, existing = st, _fingerprint_in(path, overwrite)
            break
    entries = [p for p in out.iterdir() if p.name != LOCK_NAME]
    if status == "fresh":                   # no record of ours (a damaged one is a record)
        foreign = [p for p in entries if p.name != STATE_DIR]
        if foreign:
            raise ConvertError(
                f"{out} is not empty and holds no conversion (no record of this converter: "
                f"{HEADER_NAME} or {STATE_DIR}/{STARTED}): {_names(foreign)}. Nothing there is "
                "known to be a conversion's, so nothing is removed, with --overwrite either: "
                "choose an empty or new directory, or move those entries away")
        for p in entries:                   # an empty STATE_DIR of a run killed at once
            _remove(p)
        return "fresh"
    if existing == fingerprint and not overwrite:
        return status
    if not overwrite:           # (a damaged record without overwrite was refused above)
        raise ConvertError(f"{out} already holds a different dataset or conversion "
                           f"(fingerprint {existing[:12]}, this one {fingerprint[:12]}): "
                           "use --overwrite to replace it")
    # --overwrite removes only what we write, the record last: a kill part way leaves the
    # record, so that the rerun still finds a conversion here to replace
    ours = [p for p in entries if owned(p.name)]
    record = {HEADER_NAME, STATE_DIR}
    for p in sorted(ours, key=lambda p: p.name in record):
        _remove(p)
    return "fresh"


def check_not_inside(src: Path, out: Path, detect) -> str | None:
    """Refuse an OUT that is the source directory or lies inside an image-folder source: the
    walk would read it (an extra class, every label shifted). Among CIFAR batches, IDX or
    .npz files, which are read by name, it is harmless: return the source kind, detected with
    OUT's entry left out (``detect(name)``), for the conversion to use (a rerun finds OUT
    there); None where OUT is not inside SRC."""
    if not src.is_dir():
        return None
    s, o = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if o != s and s not in o.parents:
        return None
    kind = detect(o.relative_to(s).parts[0]) if o != s else None
    if kind in (None, "imagefolder"):
        raise ConvertError(f"output directory {out} is inside the source {src}: the conversion "
                           "would read its own output (as an extra class of the image folder); "
                           "choose an OUT outside SRC")
    return kind



def start_state(out: Path, fingerprint: str) -> None:
    """Create ``STATE_DIR`` and record what is being converted (before any slow step)."""
    state = out / STATE_DIR
    state.mkdir(exist_ok=True)
    if not (state / STARTED).exists():
        tmp = state / f".{STARTED}.tmp"
        tmp.write_text(fingerprint + "\n")
        os.replace(tmp, state / STARTED)
    for leftover in state.glob(".*.tmp"):   # a journal entry killed half-written
        leftover.unlink()
