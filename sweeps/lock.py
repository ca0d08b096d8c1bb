"""Per-run lock files, so that two launches of a sweep never train the same run twice.

A lock is a file created with O_CREAT|O_EXCL (atomic on local and NFSv3+ file systems)
holding the owner's host, pid and process start time (boot id and /proc/<pid>/stat start
ticks on Linux). While it is held, a heartbeat thread touches the file every
``HEARTBEAT_S`` seconds. A lock is stale, and is taken over, when

* its owner is on this host and that pid is gone (a crash or kill), or
* its owner is on this host and that pid now belongs to another process (its start time
  differs: the pid was reused after a crash), or
* its owner is on this host, the start time cannot be compared (no /proc, or a lock of an
  older version), and the heartbeat stopped more than ``stale_after_s`` seconds ago, or
* its owner is on another host (a Ray node) and the heartbeat stopped more than
  ``stale_after_s`` seconds ago (the node died), or
* it is unreadable (a writer killed mid-write) and older than ``stale_after_s``.

``chinchax train`` and the sweep workers lock a run directory at the same path
(``run_lock_path``), so no two processes ever train one run directory at once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from rundir import FILE_MODE  # the umask decides, as for every other file of a sweep

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # heartbeat silence after which another host's lock is considered dead


class LockHeld(RuntimeError):
    """The run is locked by a live process; ``owner`` describes it."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner
        super().__init__(f"{path} is held by pid {owner.get('pid')} on {owner.get('host')}")


def run_lock_path(run_dir: str | Path) -> Path:
    """The lock of a run directory: ``<parent>/.locks/<name>.lock`` (the sweep's layout)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / ".locks" / f"{run_dir.name}.lock"


def process_start(pid: int) -> str | None:
    """An id of the process ``pid`` that a reused pid does not share: boot id + start ticks.

    Field 22 of /proc/<pid>/stat is the start time in clock ticks since boot; the boot id
    tells boots apart. None where /proc is missing (macOS) or the process is gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None  # field 22 = index 19 after field 2


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
        pid = int(owner["pid"])
        if not _alive(pid):
            return True
        now = process_start(pid)
        if owner.get("start") and now is not None:
            return owner["start"] != now  # same pid, another process: the owner is gone
        return owner["age_s"] > stale_after_s  # cannot tell the processes apart: trust the heartbeat
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
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
            except FileExistsError:
                owner = read_owner(self.path)
                if not is_stale(owner, self.stale_after_s):
                    raise LockHeld(self.path, owner or {}) from None
                self._remove_stale(owner)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
                           "time": time.time()}, f)  # fmt: skip
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
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
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
