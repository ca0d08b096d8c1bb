"""Per-run lock files, so that two launches of a sweep never train the same run twice.

A lock is a file created with O_CREAT|O_EXCL (atomic on local and NFSv3+ file systems)
holding the owner's host name, pid, process start time (boot id and /proc/<pid>/stat start
ticks on Linux) and pid namespace, and on a Ray cluster its Ray node id. While it is held, a
heartbeat thread touches the file every ``HEARTBEAT_S`` seconds.

A pid means something only where it was taken: on the same machine (host name and boot id)
and in the same pid namespace (containers). Such an owner is checked directly; any other
owner -- another node of a cluster, another container with the same host name -- only by
its heartbeat on the shared storage. A lock is stale, and is taken over, when

* its owner's pid can be checked here and that pid is gone (a crash or kill), or
* its owner's pid can be checked here and now belongs to another process (its start time
  differs: the pid was reused after a crash), or
* its owner's pid can be checked here, the start time cannot be compared (no /proc, or a
  lock of an older version), and the heartbeat stopped more than ``stale_after_s`` ago, or
* its owner is elsewhere and the heartbeat stopped more than ``stale_after_s`` seconds ago
  (that process or node died), or
* it is unreadable (a writer killed mid-write) and older than ``stale_after_s``.

A sweep on Ray knows sooner that a node died: ``break_lock`` lets it remove such a lock
once the heartbeat has been silent for ``LOST_AFTER_S`` (sweeps.runner).

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
from typing import Callable

from rundir import FILE_MODE  # the umask decides, as for every other file of a sweep

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # heartbeat silence after which another host's lock is considered dead
LOST_AFTER_S = 2.5 * HEARTBEAT_S  # heartbeat silence after which the lock of a node Ray knows dead is removed
RAY_NODE_ENV = "CHINCHAX_RAY_NODE_ID"  # set by the Ray backend: the node a worker runs on, kept in its lock


class LockHeld(RuntimeError):
    """The run is locked by a live process; ``owner`` describes it."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner
        super().__init__(f"{path} is held by pid {owner.get('pid')} on {owner.get('host')}")


def run_lock_path(run_dir: str | Path) -> Path:
    """The lock of a run directory: ``<parent>/.locks/<name>.lock`` (the sweep's layout)."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / ".locks" / f"{run_dir.name}.lock"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[inode]``): containers on one kernel differ here."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """An id of the process ``pid`` that a reused pid does not share: boot id + start ticks.

    Field 22 of /proc/<pid>/stat is the start time in clock ticks since boot; the boot id
    tells boots apart. None where /proc is missing (macOS) or the process is gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    boot = _boot_id()
    if boot is None:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None  # field 22 = index 19 after field 2


def owner_record() -> dict:
    """What a lock says of its owner: this process, and where its pid means something."""
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid()),
              "pidns": _pid_namespace(), "time": time.time()}  # fmt: skip
    if os.environ.get(RAY_NODE_ENV):
        record["ray_node"] = os.environ[RAY_NODE_ENV]
    return record


def pid_checkable(owner: dict) -> bool:
    """Whether the owner's pid can be looked up here: same host name, boot and pid namespace.

    Fields a lock lacks (older versions, no /proc) are taken as equal, as before they existed.
    """
    if owner.get("host") != socket.gethostname():
        return False
    start = owner.get("start")
    boot, here = (start.rpartition(":")[0] if isinstance(start, str) else None), _boot_id()
    if boot and here and boot != here:  # another machine of the same name, or a reboot: both elsewhere
        return False
    pidns, ours = owner.get("pidns"), _pid_namespace()
    return not (pidns and ours and pidns != ours)


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
    if pid_checkable(owner):
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
                json.dump(owner_record(), f)
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
        """Delete a dead owner's lock (``break_lock``), or wait a moment while another process does."""
        if break_lock(self.path, owner, lambda now: is_stale(now, self.stale_after_s)) is None:
            time.sleep(0.05)

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


def break_lock(path: Path, owner: dict | None, dead: Callable[[dict | None], bool]) -> bool | None:
    """Remove the lock at ``path`` if it still holds ``owner`` (from ``read_owner``) and ``dead(owner
    as read now)``; True if removed, False if not, None if another process is doing the same.

    A second O_EXCL file (``.takeover``) makes sure only one process removes it, and the
    owner is read again under it, so a fresh lock taken meanwhile is never removed.
    """
    path = Path(path)
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
    except FileExistsError:
        try:  # a taker that died mid-takeover leaves its guard behind
            if time.time() - guard.stat().st_mtime > 10:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return None
    os.close(fd)
    try:
        now = read_owner(path)
        same = now is None or owner is None or {k: v for k, v in now.items() if k != "age_s"} == {
            k: v for k, v in owner.items() if k != "age_s"
        }
        if same and dead(now):  # still the dead owner, not a fresh lock
            path.unlink(missing_ok=True)
            return True
        return False
    finally:
        guard.unlink(missing_ok=True)
