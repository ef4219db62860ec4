"""Exclusive advisory file locks shared by the library and the campaign runner.

`exclusive_lock(path)`: wait for the lock (teacher cache, MLflow store creation).
`announced_lock(path)`: a lock whose holder writes who it is into the lock file ("pid 4242 on
node-3 since 2026-12-02 10:41:07"), so that a process that finds it taken can say whom it waits
for (a stage result being trained) or, with `wait=False`, refuse at once naming the holder
(`LockHeldError`: a campaign already being run).

The OS releases a flock when its holder dies, so a crashed process never leaves a stale lock
(its line stays in the file until the next holder overwrites it, and is never read while
nobody holds the lock).
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeldError(RuntimeError):
    """Another live process holds an announced lock; `holder` is its line (or '' if it has
    not written it yet)."""

    def __init__(self, path: str | os.PathLike, holder: str):
        self.path, self.holder = str(path), holder
        super().__init__(f"{self.path} is held by {holder or 'another process'}")

    def __reduce__(self):
        return (type(self), (self.path, self.holder))


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created with its folder if missing), waiting
    for it if another process holds it."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def holder_line(note: str = "") -> str:
    """Who this process is, as an announced lock records it."""
    line = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    return f"{line} ({note})" if note else line


@contextmanager
def announced_lock(lock_path: Path, *, wait: bool = True,
                   on_wait: Callable[[str], None] | None = None, note: str = "") -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` and write `holder_line(note)` into it.

    Held by another process: with `wait`, call `on_wait(its line)` once and wait for it;
    without, raise `LockHeldError` naming it.
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            if not wait:
                raise LockHeldError(lock_path, holder) from None
            if on_wait is not None:
                on_wait(holder or "another process")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(0)
            f.truncate()
            f.write(holder_line(note))
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
