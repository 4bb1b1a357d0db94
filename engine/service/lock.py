"""One writer per data directory: an exclusive ``flock`` on ``<data_dir>/veilface.lock``.

``veilface serve`` holds the lock for as long as it runs; the offline commands that write
(``purge``, ``decommission``) take it for the length of their work. So a second server on the
same ``--data-dir`` refuses to start, and an offline write refuses while a server runs (its
in-memory galleries would otherwise go on matching what the command deleted). Read-only
commands (``audit verify | show``, ``report``) never take it.

The kernel drops a ``flock`` when its holder exits, SIGKILL included: a stale lock file (a
crashed server) never blocks anyone. The file holds the holder's pid, command and target, for
the refusal message only -- the lock itself is the ``flock``, not the file's existence.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from .status import PreconditionFailed

LOCK_NAME = "veilface.lock"


class DataDirLocked(PreconditionFailed):
    """Another process holds the data directory (a running ``veilface serve``)."""
    reason = "DATA_DIR_LOCKED"


class DataDirLock:
    """An exclusive, non-blocking lock on a data directory. ``acquire`` raises
    :class:`DataDirLocked` naming the holder; ``release`` (or process exit) frees it."""

    def __init__(self, data_dir: str | os.PathLike, what: str = "veilface serve") -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, **info) -> DataDirLock:
        """Take the lock; ``info`` (e.g. ``target``) is written into the lock file for others to read."""
        if self._fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataDirLocked(self._refusal(holder(self.dir))) from None
        self._fd = fd
        self.update(**info)
        return self

    def update(self, **info) -> None:
        """Rewrite the holder record (e.g. once the server knows its port)."""
        if self._fd is None:
            return
        record = json.dumps({"pid": os.getpid(), "command": self.what, **info}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, record, 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)            # closing the descriptor drops the flock

    def _refusal(self, who: dict) -> str:
        by = who.get("command") or "another process"
        pid = f" (pid {who['pid']}" + (f", {who['target']}" if who.get("target") else "") + ")" if who.get("pid") else ""
        return f"data dir {self.dir} is in use by {by}{pid}"

    def __enter__(self) -> DataDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(data_dir: str | os.PathLike) -> dict:
    """What the lock file of ``data_dir`` says about its holder ({} when unreadable or empty)."""
    try:
        return json.loads((Path(data_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def check_unlocked(data_dir: str | os.PathLike, what: str = "veilface serve") -> None:
    """Raise :class:`DataDirLocked` now if another process holds ``data_dir`` (before doing
    anything there, e.g. writing tokens; the real lock is taken later)."""
    if is_locked(data_dir):
        DataDirLock(data_dir, what).acquire().release()


def is_locked(data_dir: str | os.PathLike) -> bool:
    """Whether some process holds the lock of ``data_dir`` right now."""
    path = Path(data_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
