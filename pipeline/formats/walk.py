"""Walking an image-folder class directory: symlinks followed, no directory entered twice.

``os.walk(followlinks=True)`` alone enters a symlink loop (a class directory holding a link
to itself) again and again, multiplying the data; here a directory whose (device, inode)
was seen already is skipped and reported, and so are broken links. File names need not be
valid UTF-8: they never reach the output (members are named by sample id), and messages
show them with ``display``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["display", "walk_images", "WalkReport"]


def display(path: str) -> str:
    """``path`` printable and JSON-safe: bytes that are not UTF-8 as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class WalkReport:
    """What a walk skipped: directories already visited (by device and inode) and broken
    links, as ``{"path", "reason"}`` dicts (paths through ``display``)."""

    def __init__(self) -> None:
        self.visited: dict[tuple[int, int], str] = {}
        self.skipped: list[dict[str, str]] = []

    def enter(self, path: str) -> bool:
        """True the first time the directory ``path`` (after links) is seen."""
        try:
            st = os.stat(path)
        except OSError as e:
            self.skipped.append({"path": display(path), "reason": f"unreadable directory: {e.strerror}"})
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.visited:
            self.skipped.append({"path": display(path),
                                 "reason": f"directory already walked as {display(self.visited[key])}"})
            return False
        self.visited[key] = path
        return True


def walk_images(top: Path, extensions: set[str], report: WalkReport) -> list[str]:
    """Image files under ``top`` (sorted per directory, hidden entries left out), following
    symlinks but never into a directory ``report`` has seen; skips go to ``report``."""
    top = str(top)
    if not report.enter(top):
        return []
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames[:] = [d for d in sorted(dirnames)
                       if not d.startswith(".") and report.enter(os.path.join(dirpath, d))]
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in extensions:
                continue
            full = os.path.join(dirpath, name)
            if not os.path.exists(full):
                report.skipped.append({"path": display(full), "reason": "broken symbolic link"})
                continue
            paths.append(full)
    return paths
