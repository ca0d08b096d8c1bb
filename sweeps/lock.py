"""Per-run lock files, so that two launches of a sweep never train the same run twice.

A lock is a file created with O_CREAT|O_EXCL (atomic on local and NFSv3+ file systems)
holding the owner's host and pid. While it is held, a heartbeat thread touches the file
every ``HEARTBEAT_S`` seconds. A lock is stale, and is taken over, when

* its owner is on this host and that pid is gone (a crash or kill), or
* its owner is on another host (a Ray node) and the heartbeat stopped more than
  ``stale_after_s`` seconds ago (the node died), or
* it is unreadable (a writer killed mid-write) and older than ``stale_after_s``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # heartbeat silence after which another host's lock is considered dead


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
    """The lock's owner record plus ``age_s`` since its last heartbeat; None if there is no lock."""
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        if not isinstance(owner, dict):
            raise ValueError
    except ValueError:
        owner = {}  # half-written
    owner["age_s"] = age
    return owner


def is_stale(owner: dict | None, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether a lock owner record (from ``read_owner``) belongs to a process that is gone."""
    if owner is None:
        return True
    if "pid" not in owner:  # unreadable or half-written
        return owner["age_s"] > stale_after_s
    if owner.get("host") == socket.gethostname():
        return not _alive(int(owner["pid"]))
    return owner["age_s"] > stale_after_s


def holder(path: Path, stale_after_s: float = STALE_AFTER_S) -> dict | None:
    """The live owner of the lock at ``path``, or None if it is free or stale."""
    owner = read_owner(path)
    return None if is_stale(owner, stale_after_s) else owner


class RunLock:
    """Exclusive lock on one run; use as a context manager or acquire()/release()."""

    def __init__(self, path: str | Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.held = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

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
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name=f"lock-heartbeat-{self.path.name}", daemon=True)
            self._beat.start()
            return self
        raise LockHeld(self.path, read_owner(self.path) or {})

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

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
            now = read_owner(self.path)
            same = now is None or owner is None or {k: v for k, v in now.items() if k != "age_s"} == {
                k: v for k, v in owner.items() if k != "age_s"
            }
            if same and is_stale(now, self.stale_after_s):  # still the dead owner, not a fresh lock
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this process holds it."""
        if self.held:
            self._stop.set()
            owner = read_owner(self.path)
            if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
