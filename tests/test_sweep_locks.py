"""Run locks must be provably alive: a same-host lock whose pid now belongs to another process
is stale; and `chinchax train` takes the same lock as the sweep workers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types

import pytest

from sweeps.index import lock_path
from sweeps.lock import (RAY_NODE_ENV, STALE_AFTER_S, LockHeld, RunLock, break_lock, holder, process_start, read_owner,
                         run_lock_path)  # fmt: skip

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="start times come from /proc")


def _write_lock(path, pid, start, age_s=0.0, **fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start": start, "time": 0, **fields}))
    then = time.time() - age_s
    os.utime(path, (then, then))


def test_process_start_tells_processes_apart():
    mine = process_start(os.getpid())
    assert mine and mine == process_start(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert process_start(child.pid) not in (None, mine)
    finally:
        child.kill()
        child.wait()
    assert process_start(child.pid) is None


def test_a_lock_whose_pid_was_reused_is_stale(tmp_path):
    path = tmp_path / "run.lock"
    # The pid is alive (it is ours) but the lock was written by a process that started at another
    # time since this boot, i.e. an owner that died and whose pid the kernel gave to us: not held.
    boot = process_start(os.getpid()).rpartition(":")[0]
    _write_lock(path, os.getpid(), f"{boot}:12345")
    assert holder(path) is None
    lock = RunLock(path).acquire()
    assert json.loads(path.read_text())["start"] == process_start(os.getpid())
    lock.release()
    # The same pid with its true start time is a live owner.
    _write_lock(path, os.getpid(), process_start(os.getpid()))
    with pytest.raises(LockHeld):
        RunLock(path).acquire()


def test_a_lock_without_start_time_falls_back_to_its_heartbeat(tmp_path):
    path = tmp_path / "run.lock"
    _write_lock(path, os.getpid(), None)  # written by an older version: live pid, fresh heartbeat
    assert holder(path) is not None
    _write_lock(path, os.getpid(), None, age_s=3600)  # heartbeat silent for an hour
    assert holder(path) is None


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_pid_taken_elsewhere_is_judged_by_the_heartbeat_only(tmp_path):
    """A Ray node, or a container, with our host name but another boot or pid namespace: its pid
    means nothing here, so a dead-looking pid with a fresh heartbeat is a live owner."""
    path = tmp_path / "run.lock"
    pid = _dead_pid()
    boot = process_start(os.getpid()).rpartition(":")[0]
    _write_lock(path, pid, f"{boot}:1")  # this machine, pid gone: stale at once
    assert holder(path) is None
    elsewhere = [dict(start="another-boot:1"), dict(start=f"{boot}:1", pidns="pid:[1]"),
                 dict(start=f"{boot}:1", host="node-b")]  # fmt: skip
    for fields in elsewhere:
        owner = {"start": fields.pop("start"), **fields}
        _write_lock(path, pid, **owner)
        assert holder(path) is not None, owner
        with pytest.raises(LockHeld, match="held by pid"):
            RunLock(path).acquire()
        _write_lock(path, pid, **owner, age_s=STALE_AFTER_S + 60)  # its heartbeat stopped: the owner died
        assert holder(path) is None, owner


def test_a_lock_records_where_its_pid_means_something(tmp_path, monkeypatch):
    monkeypatch.setenv(RAY_NODE_ENV, "node-1")
    lock = RunLock(tmp_path / "run.lock").acquire()
    try:
        record = json.loads((tmp_path / "run.lock").read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["pidns"] == os.readlink("/proc/self/ns/pid") and record["ray_node"] == "node-1"
    finally:
        lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_break_lock_removes_only_the_owner_it_was_given(tmp_path):
    path = tmp_path / "run.lock"
    _write_lock(path, 1, "b:1", host="node-b", ray_node="dead")
    owner = read_owner(path)
    _write_lock(path, 2, "b:2", host="node-c", ray_node="alive")  # retaken meanwhile
    assert break_lock(path, owner, lambda now: True) is False and path.exists()
    owner = read_owner(path)
    assert break_lock(path, owner, lambda now: False) is False and path.exists()  # not dead after all
    assert break_lock(path, owner, lambda now: True) is True and not path.exists()
    assert not path.with_name("run.lock.takeover").exists()


def test_sweep_and_train_lock_the_same_file(tmp_path):
    assert lock_path(tmp_path, "run1") == run_lock_path(tmp_path / "run1") == tmp_path.resolve() / ".locks" / "run1.lock"


def test_chinchax_train_refuses_a_run_dir_another_process_trains(tmp_path, monkeypatch, capsys):
    from sweeps.cli import main

    calls = []

    def fake_train(cfg, run_dir):
        calls.append(holder(run_lock_path(run_dir)))  # train runs under the lock
        return types.SimpleNamespace(status="done")

    monkeypatch.setitem(sys.modules, "llm.training", types.SimpleNamespace(train=fake_train))
    monkeypatch.setattr("sweeps.cli.interrupt_on_sigterm", lambda: None)
    run_dir = tmp_path / "run"
    held = RunLock(run_lock_path(run_dir)).acquire()
    try:
        assert main(["train", "--run-dir", str(run_dir), "train.steps=1"]) == 2
    finally:
        held.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and "is being trained" in err[0]
    assert calls == []
    assert main(["train", "--run-dir", str(run_dir), "train.steps=1"]) == 0
    assert calls and calls[0]["pid"] == os.getpid()
    assert holder(run_lock_path(run_dir)) is None  # released afterwards


def test_two_chinchax_train_launches_on_one_run_dir(tmp_path):
    """The second of two real launches exits 2 naming the first one's pid, before any training."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sweeps.lock import RunLock, run_lock_path; "
         f"RunLock(run_lock_path({str(run_dir)!r})).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert first.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "sweeps.cli", "train", "--run-dir", str(run_dir), "train.steps=1"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()
