"""Runner semantics with a fake train function: skip, resume, retry, failures, locks, index.

The fake ``fake_train`` (this file, loaded by path in each worker process) writes a run
directory per the contract without JAX, so these tests take seconds. Its behaviour is
steered by the run's ``train.seed``: 13 raises, 14 crashes the process (SIGKILL),
15 sleeps until killed; every call appends a line to ``calls.txt`` in the run dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm.config import ConfigError, dump_config, total_steps
from sweeps.index import lock_path
from sweeps.lock import LockHeld, RunLock
from sweeps.plan import expand
from sweeps.runner import run_sweep, sweep_status
from sweeps.spec import spec_from_dict

FAKE = f"{Path(__file__).resolve()}:fake_train"
REPO = Path(__file__).resolve().parent.parent


class _Result:
    def __init__(self, status, error, result):
        self.status, self.error, self.result = status, error, result


def fake_train(cfg, run_dir, *, run_name=None):
    """Stand-in for llm.training.train: writes config.yaml, metrics.jsonl, checkpoints/, result.json."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = (run_dir / "checkpoints" / "step").read_text() if (run_dir / "checkpoints" / "step").exists() else "0"
    with open(run_dir / "calls.txt", "a") as f:
        f.write(f"pid={os.getpid()} resumed_from={resumed_from}\n")
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    seed = cfg.train.seed
    if seed == 13:
        raise RuntimeError("fake failure for seed 13")
    if seed == 14:
        os.kill(os.getpid(), signal.SIGKILL)
    if seed == 15 and not os.environ.get("FAKE_NO_SLEEP"):
        (run_dir / "checkpoints" / "step").write_text("5")
        time.sleep(600)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    steps = total_steps(cfg)
    tokens = steps * cfg.train.batch_size * cfg.model.seq_len
    loss = 2.0 + 1000.0 / (cfg.model.d_model * steps)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": steps, "tokens": tokens, "train_loss": loss}) + "\n")
    result = {
        "status": "done", "error": None, "run_name": run_name, "step": steps, "steps": steps, "tokens": tokens,
        "dataset_tokens": None, "n_params_total": 1, "n_params_nonembed": 1, "n_params_active": 1,
        "n_params_active_nonembed": 1, "flops": {"6N": 6.0 * tokens, "6N+attention": 7.0 * tokens},
        "final_train_loss": loss, "final_eval_loss": loss, "best_eval_loss": loss, "wall_time_s": 0.0,
    }
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, run_dir / "result.json")
    return _Result("done", None, result)


def _spec_data(seeds, name="fake", **extra):
    return {
        "name": name,
        "base": {
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "seq_len": 16},
            "train": {"batch_size": 2, "steps": 3},
        },
        "grid": {"train.seed": list(seeds)},
        **extra,
    }


def _spec(seeds, name="fake", **extra):
    return spec_from_dict(_spec_data(seeds, name, **extra))


def _sweep_script(seeds, out, **kw) -> str:
    """Python source for ``python -c``: run_sweep of ``_spec(seeds)`` into ``out`` with the fake
    trainer and ``kw`` (literals), printing how many runs that launch trained."""
    args = "".join(f", {key}={value!r}" for key, value in kw.items())
    return (
        "import sys, json; sys.path.insert(0, {repo!r}); from sweeps.runner import run_sweep; "
        "from sweeps.spec import spec_from_dict; "
        "r = run_sweep(spec_from_dict(json.loads({data!r})), {out!r}, train_fn={fake!r}, "
        "progress=False, cache_dir=None, log=lambda m: None{args}); print(len(r.trained))"
    ).format(repo=str(REPO), data=json.dumps(_spec_data(seeds)), out=str(out), fake=FAKE, args=args)


def _run(spec, out, **kw):
    kw.setdefault("parallel", 2)
    return run_sweep(spec, out, train_fn=FAKE, progress=False, cache_dir=None, poll_s=0.05, log=lambda m: None, **kw)


def _calls(out, name):
    path = Path(out) / name / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def _lengths_spec():
    """Three runs of one shape, 3, 300 and 30 steps long, in that order."""
    return spec_from_dict({"name": "order", "base": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                                                               "seq_len": 16}, "train": {"batch_size": 2}},
                           "grid": {"train.steps": [3, 300, 30]}})  # fmt: skip


def test_the_longest_runs_start_first_whatever_their_place_in_the_spec(tmp_path):
    # one slot: a run's calls.txt is written when it starts, so their times give the launch order
    spec = _lengths_spec()
    _run(spec, tmp_path, parallel=1, fit=False)
    runs = expand(spec)
    started = sorted(runs, key=lambda r: (tmp_path / r.name / "calls.txt").stat().st_mtime_ns)
    assert [r.steps for r in started] == [300, 30, 3]


def test_a_run_queued_only_for_its_evaluation_starts_after_the_runs_that_train(tmp_path):
    from sweeps.runner import _Launch, to_launch

    spec = _lengths_spec()
    runs = expand(spec)
    launch = _Launch(spec, tmp_path, runs, {}, FAKE)
    launch.eval_only.add(next(r.name for r in runs if r.steps == 300))  # trained already: it only evaluates
    order = to_launch({r.name: "queued" for r in runs}, 3, None, launch.priority())
    assert [next(r.steps for r in runs if r.name == name) for name in order] == [30, 3, 300]


def test_skip_done_and_failure_isolation_and_retry(tmp_path):
    spec = _spec([1, 13, 2, 14])
    names = [r.name for r in expand(spec)]
    report = _run(spec, tmp_path)
    status = {r["name"]: r["status"] for r in report.rows}
    assert [status[n] for n in names] == ["done", "failed", "done", "failed"]
    errors = dict(report.failed)
    assert "fake failure for seed 13" in errors[names[1]]
    assert "SIGKILL" in errors[names[3]]
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["counts"]["done"] == 2 and index["counts"]["failed"] == 2
    assert (tmp_path / "index.csv").read_text().count("\n") == 5
    assert (tmp_path / "sweep.yaml").exists() and (tmp_path / "logs" / f"{names[1]}.log").exists()
    assert not report.ok

    # Second launch: nothing trains (done skipped, failed not retried).
    again = _run(spec, tmp_path)
    assert again.trained == []
    assert all(len(_calls(tmp_path, n)) == 1 for n in names)

    # --retry-failed retries exactly the failed ones.
    retried = _run(spec, tmp_path, retry_failed=True)
    assert sorted(retried.trained) == sorted([names[1], names[3]])
    assert [len(_calls(tmp_path, n)) for n in names] == [1, 2, 1, 2]
    assert (tmp_path / names[1] / "result.failed.json").exists()


def test_resume_interrupted_run(tmp_path):
    spec = _spec([1, 2])
    first, second = [r.name for r in expand(spec)]
    # A run killed mid-way: checkpoints but no result.json, and a stale lock of a dead process.
    (tmp_path / first / "checkpoints").mkdir(parents=True)
    (tmp_path / first / "checkpoints" / "step").write_text("7")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = lock_path(tmp_path, first)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "time": 0}))
    assert [r["status"] for r in sweep_status(spec, tmp_path)] == ["interrupted", "pending"]
    report = _run(spec, tmp_path)
    assert [r["status"] for r in report.rows] == ["done", "done"]
    assert _calls(tmp_path, first) == [_calls(tmp_path, first)[0]]
    assert "resumed_from=7" in _calls(tmp_path, first)[0]
    assert not lock.exists()


def test_lock_prevents_double_run(tmp_path):
    spec = _spec([1, 2])
    first, second = [r.name for r in expand(spec)]
    held = RunLock(lock_path(tmp_path, first)).acquire()
    with pytest.raises(LockHeld):
        RunLock(lock_path(tmp_path, first)).acquire()

    # While this process holds the lock, the sweep trains the other run and waits for this one.
    import threading

    def finish_elsewhere():
        time.sleep(1.0)
        fake_train(expand(spec)[0].config, tmp_path / first, run_name=first)
        held.release()

    t = threading.Thread(target=finish_elsewhere)
    t.start()
    report = _run(spec, tmp_path)
    t.join()
    assert report.trained == [second]
    assert [r["status"] for r in report.rows] == ["done", "done"]
    assert len(_calls(tmp_path, first)) == 1  # trained once, by the "other launch"


def test_a_freed_slot_is_refilled_when_its_run_ends_not_at_the_next_poll(tmp_path):
    # poll_s=600: a runner that only looked every poll_s would need 10 minutes per run on one slot
    script = _sweep_script([1, 2, 3], tmp_path, parallel=1, fit=False, poll_s=600)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "3"


def test_two_launches_never_train_a_run_twice(tmp_path):
    spec = _spec([1, 2, 3, 4])
    script = _sweep_script([1, 2, 3, 4], tmp_path, parallel=2, poll_s=0.05)
    env = {**os.environ, "FAKE_SLEEP": "0.3"}  # runs overlap, so the launches do race for them
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert all(len(_calls(tmp_path, r.name)) == 1 for r in expand(spec))
    assert sum(int(out.split()[-1]) for out in outs) == 4  # each run counted as trained by one launch only


def test_kill_sweep_then_rerun_finishes_only_what_was_left(tmp_path):
    spec_data = _spec_data([1, 15])
    script = (
        # Ctrl-C as a terminal sends it: a child inherits an ignored or blocked SIGINT, and a test run before
        # this one in the same pytest process (seen under xdist) may have left it so: restore and unblock it.
        "import faulthandler, signal; faulthandler.register(signal.SIGUSR1, all_threads=True); "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}}); "
        "import sys, json; sys.path.insert(0, {repo!r}); from sweeps.runner import run_sweep; "
        "from sweeps.spec import spec_from_dict; "
        "run_sweep(spec_from_dict(json.loads({data!r})), {out!r}, train_fn={fake!r}, parallel=2, "
        "progress=False, cache_dir=None, poll_s=0.05)"
    ).format(repo=str(REPO), data=json.dumps(spec_data), out=str(tmp_path), fake=FAKE)
    sweep = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True)
    spec = spec_from_dict(spec_data)
    done_name, slow_name = [r.name for r in expand(spec)]
    deadline = time.time() + 120  # generous: CI runs two test workers on two cores
    while not (tmp_path / slow_name / "checkpoints" / "step").exists() or not (tmp_path / done_name / "result.json").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    sweep.send_signal(signal.SIGINT)
    try:
        rc = sweep.wait(60)
    except subprocess.TimeoutExpired:
        sweep.send_signal(signal.SIGUSR1)
        time.sleep(2)
        sweep.kill()
        out = sweep.communicate()[1]
        raise AssertionError("sweep did not stop: " + str(out)[-6000:]) from None
    assert rc != 0
    assert [r["status"] for r in sweep_status(spec, tmp_path)] == ["done", "interrupted"]
    # The slow run now behaves (seed 15 only sleeps on its first call): re-run finishes it alone.
    fixed = spec_from_dict({**spec_data, "grid": {"train.seed": [1, 15]}})
    os.environ["FAKE_NO_SLEEP"] = "1"
    try:
        report = _run(fixed, tmp_path)
    finally:
        del os.environ["FAKE_NO_SLEEP"]
    assert report.trained == [slow_name]
    assert [r["status"] for r in report.rows] == ["done", "done"]
    assert "resumed_from=5" in _calls(tmp_path, slow_name)[-1]


def test_invalid_spec_launches_nothing(tmp_path):
    with pytest.raises(ConfigError, match="duplicate runs"):
        _run(_spec([1, 2, 1]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_backend_pins_runs_to_devices(monkeypatch):
    from sweeps.backends import LocalBackend, default_parallel

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert default_parallel() == 4 and default_parallel(gpus_per_run=2) == 2
    pairs = LocalBackend(gpus_per_run=2)
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in pairs.slots] == ["0,1", "2,3"]
    shared = LocalBackend(parallel=8)  # two runs per GPU: each gets its share of the memory
    assert [s["env"]["CUDA_VISIBLE_DEVICES"] for s in shared.slots[:5]] == ["0", "1", "2", "3", "0"]
    assert shared.slots[0]["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.45"
    with pytest.raises(ConfigError, match="only 4 GPU"):
        LocalBackend(gpus_per_run=8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu = LocalBackend(parallel=1)
    assert cpu.slots[0]["env"]["OMP_NUM_THREADS"] == str(len(cpu.slots[0]["cores"]))


def test_lock_staleness_rules(tmp_path):
    path = tmp_path / "run.lock"
    # Another host's lock is respected while its heartbeat is fresh, taken over once it is silent.
    path.write_text(json.dumps({"host": "some-other-node", "pid": 1, "time": 0}))
    with pytest.raises(LockHeld, match="some-other-node"):
        RunLock(path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = RunLock(path, heartbeat_s=0.05).acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    # The heartbeat keeps the file fresh while held.
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 5
    lock.release()
    assert not path.exists()
    # A half-written lock is left alone until it is old.
    path.write_text("")
    with pytest.raises(LockHeld):
        RunLock(path).acquire()
    os.utime(path, (old, old))
    RunLock(path).acquire().release()


def test_worker_leaves_a_run_another_launch_finished_and_says_so(tmp_path):
    from sweeps.run_result import EXIT_ALREADY_DONE
    from sweeps.worker import run_one

    run = expand(_spec([1]))[0]
    config = tmp_path / "config.yaml"
    config.write_text(dump_config(run.config))
    fake_train(run.config, tmp_path / run.name, run_name=run.name)  # "the other launch"
    before = (tmp_path / run.name / "result.json").read_text()
    rc = run_one(config, tmp_path / run.name, run.name, tmp_path / "run.lock", FAKE)
    assert rc == EXIT_ALREADY_DONE  # the runner then does not count it as trained by this launch
    assert len(_calls(tmp_path, run.name)) == 1
    assert (tmp_path / run.name / "result.json").read_text() == before
