"""Per-run lock files, so that two launches of a sweep never train the same run twice.

A lock is a file created with O_CREAT|O_EXCL (atomic on local and NFSv3+ file systems)
holding the owner's host, pid and start time. A lock whose owner is on this host and no
longer alive is stale and is taken over; a lock from another host is respected (its
owner cannot be checked from here), unless older than ``stale_after_s`` when given.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


class LockHeld(RuntimeError):
    """The run is locked by a live process; ``owner`` describes it."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner
        super().__init__(f"{path} is held by pid {owner.get('pid')} on {owner.get('host')}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_owner(path: Path) -> dict | None:
    """The lock's owner record, or None if there is no lock (or it is being written)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return {}


def is_stale(owner: dict | None, stale_after_s: float | None = None) -> bool:
    """Whether a lock owner record belongs to a process that is gone."""
    if owner is None:
        return True
    if not owner:  # unreadable or half-written: only stale once old enough
        return False
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner.get("pid", -1)))
    return stale_after_s is not None and time.time() - float(owner.get("time", 0)) > stale_after_s


def holder(path: Path, stale_after_s: float | None = None) -> dict | None:
    """The live owner of the lock at ``path``, or None if it is free or stale."""
    owner = read_owner(path)
    return None if is_stale(owner, stale_after_s) else owner


class RunLock:
    """Exclusive lock on one run; use as a context manager or acquire()/release()."""

    def __init__(self, path: str | Path, stale_after_s: float | None = None):
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.held = False

    def acquire(self) -> "RunLock":
        """Take the lock or raise LockHeld; stale locks are removed first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(self.path)
                if not is_stale(owner, self.stale_after_s):
                    raise LockHeld(self.path, owner or {}) from None
                self._remove_stale(owner)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
            self.held = True
            return self
        raise LockHeld(self.path, read_owner(self.path) or {})

    def _remove_stale(self, owner: dict | None) -> None:
        """Delete a dead owner's lock; a second O_EXCL file makes sure only one process does."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a taker that died mid-takeover leaves its guard behind
                if time.time() - guard.stat().st_mtime > 10:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        os.close(fd)
        try:
            if read_owner(self.path) == owner:  # still the same dead owner, not a fresh lock
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held:
            owner = read_owner(self.path)
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
