"""Which devices a run gets: GPU groups through CUDA_VISIBLE_DEVICES, a TPU host's chips to one
run at a time, Ray resource requests; and what the runner does when a backend loses a worker.
Device lists are faked (no accelerator needed); the retry tests use the runner tests' fake train."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import time
import types
from pathlib import Path

import pytest

import sweeps.backends as backends
from llm.config import ConfigError
from sweeps.backends import WORKER_LOST, LocalBackend, default_parallel, ray_resources, tpu_chips
from sweeps.index import lock_path
from sweeps.lock import LOST_AFTER_S
from sweeps.plan import expand
from sweeps.runner import run_sweep, should_retry

_loader = importlib.util.spec_from_file_location("sweep_runner_tests", Path(__file__).with_name("test_sweep_runner.py"))
_runner_tests = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(_runner_tests)
FAKE, _calls, _spec = _runner_tests.FAKE, _runner_tests._calls, _runner_tests._spec


@pytest.fixture
def no_gpus(monkeypatch):
    monkeypatch.setattr(backends, "visible_gpus", lambda: [])


def test_a_run_process_sees_exactly_its_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    local = LocalBackend(gpus_per_run=2)
    assert local.parallel == 2
    cmd = [sys.executable, "-c", "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ.get('XLA_FLAGS'))"]
    handles = [local.start(cmd, {}, tmp_path / f"{i}.log") for i in range(2)]
    for h in handles:
        while local.poll(h) is None:
            time.sleep(0.01)
    seen = sorted((tmp_path / f"{i}.log").read_text().split()[0] for i in range(2))
    assert seen == ["4,5", "6,7"]  # two devices each: the run's mesh spans both, none idle or shared


@pytest.mark.parametrize("layout, chips", [(["accel0", "accel1", "accel2", "accel3"], ["0", "1", "2", "3"]),
                                           (["vfio/0", "vfio/1", "vfio/vfio"], ["0", "1"]),
                                           (["accelerometer", "null"], [])])  # fmt: skip
def test_tpu_chips_from_device_files(monkeypatch, tmp_path, layout, chips):
    monkeypatch.delenv("TPU_VISIBLE_CHIPS", raising=False)
    for name in layout:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    assert tpu_chips(tmp_path) == chips
    monkeypatch.setenv("TPU_VISIBLE_CHIPS", "2,3")
    assert tpu_chips(tmp_path) == ["2", "3"]


def test_a_tpu_host_gives_all_its_chips_to_one_run(monkeypatch, no_gpus):
    monkeypatch.setattr(backends, "tpu_chips", lambda: ["0", "1", "2", "3"])
    monkeypatch.setattr(backends, "usable_cores", lambda: list(range(8)))
    assert default_parallel() == 1
    (slot,) = LocalBackend().slots
    assert slot == {"env": {}, "cores": None}  # not the CPU path: no pinning, no thread or XLA CPU limits
    with pytest.raises(ConfigError, match="--parallel 2 on a TPU host: its 4 chip"):
        LocalBackend(parallel=2)
    with pytest.raises(ConfigError, match="--gpus-per-run 2 on a TPU host"):
        LocalBackend(gpus_per_run=2)
    assert len(LocalBackend(gpus_per_run=4).slots) == 1
    monkeypatch.setattr(backends, "tpu_chips", lambda: [])
    assert default_parallel() == 4 and LocalBackend().slots[0]["cores"] == [0, 1]  # a CPU host: pinned


def test_ray_resource_requests():
    gpu_nodes = [{"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 8}]
    assert ray_resources({"CPU": 32, "GPU": 16}, gpu_nodes, 4, 2) == {"num_cpus": 2, "num_gpus": 4.0}
    tpu_nodes = [{"CPU": 96, "TPU": 4}]
    assert ray_resources({"CPU": 96, "TPU": 4}, tpu_nodes, 4, 1) == {"num_cpus": 1, "resources": {"TPU": 4.0}}
    assert ray_resources({"CPU": 4}, [{"CPU": 2}, {"CPU": 2}], 1, 2) == {"num_cpus": 2}  # CPU-only: no GPU ask
    with pytest.raises(ConfigError, match=r"asks for 1 CPU, 16 GPU .*largest node has 16 CPU, 8 GPU"):
        ray_resources({"CPU": 32, "GPU": 16}, gpu_nodes, 16, 1)
    with pytest.raises(ConfigError, match="--cpus-per-run must be > 0"):
        ray_resources({"CPU": 4}, [{"CPU": 4}], 1, 0)


def test_only_a_lost_worker_is_retried():
    assert should_retry("lost", WORKER_LOST, 0, 3) and should_retry("lost", WORKER_LOST, 2, 3)
    assert not should_retry("lost", WORKER_LOST, 3, 3)  # retries used up
    assert not should_retry("lost", -9, 0, 3)  # killed on a living worker (out of memory?): recorded
    assert not should_retry("failed", 1, 0, 3)  # its own failure
    assert not should_retry("done", WORKER_LOST, 0, 3)  # finished before its node went


class _LosingBackend(LocalBackend):
    """A local backend whose first ``lose`` starts lose their worker before it runs (as a node death would)."""

    def __init__(self, lose: int, dead_nodes=()):
        super().__init__(parallel=2)
        self.lose, self.dead_nodes, self.lost, self.n = lose, set(dead_nodes), {}, 0

    def start(self, cmd, env, log_path):
        self.n += 1
        if self.n <= self.lose:
            handle = -self.n
            self.lost[handle] = "NodeDiedError: node n1 died"
            return handle
        return super().start(cmd, env, log_path)

    def poll(self, handle):
        return WORKER_LOST if handle < 0 else super().poll(handle)

    def owner_lost(self, owner):
        return owner.get("ray_node") in self.dead_nodes and owner["age_s"] > LOST_AFTER_S


def _run(spec, out, backend, **kw):
    messages = []
    report = run_sweep(spec, out, train_fn=FAKE, progress=False, cache_dir=None, poll_s=0.02, population="off",
                       log=messages.append, **kw)  # fmt: skip
    return report, messages


def test_a_lost_worker_is_retried_until_max_retries(monkeypatch, tmp_path):
    spec = _spec([1])
    (name,) = [r.name for r in expand(spec)]
    monkeypatch.setattr("sweeps.runner.make_backend", lambda *a, **kw: _LosingBackend(lose=2))
    report, messages = _run(spec, tmp_path / "a", None, max_retries=2)
    assert report.ok and report.trained == [name] and len(_calls(tmp_path / "a", name)) == 1
    assert [m.split(";")[1].strip() for m in messages if "worker lost" in m] == [
        "retry 1 of 2 resumes from its checkpoint", "retry 2 of 2 resumes from its checkpoint"]  # fmt: skip

    monkeypatch.setattr("sweeps.runner.make_backend", lambda *a, **kw: _LosingBackend(lose=3))
    report, _ = _run(spec, tmp_path / "b", None, max_retries=2)
    (error,) = [e for _, e in report.failed]
    assert error.startswith("worker lost (its Ray worker process or node died): NodeDiedError: node n1 died, after 2 retries")
    assert json.loads((tmp_path / "b" / name / "result.json").read_text())["status"] == "failed"
    with pytest.raises(ConfigError, match="--max-retries must be >= 0"):
        _run(spec, tmp_path / "c", None, max_retries=-1)


def test_a_lock_left_on_a_dead_node_is_removed(monkeypatch, tmp_path):
    spec = _spec([1])
    (name,) = [r.name for r in expand(spec)]
    lock = lock_path(tmp_path, name)
    lock.parent.mkdir(parents=True)
    # Another machine's worker, on a Ray node the cluster says died, silent past LOST_AFTER_S
    # (its heartbeat would make others wait STALE_AFTER_S = 300 s).
    lock.write_text(json.dumps({"host": "node-b", "pid": 1, "start": "b:1", "ray_node": "n1", "time": 0}))
    then = time.time() - LOST_AFTER_S - 5
    os.utime(lock, (then, then))
    monkeypatch.setattr("sweeps.runner.make_backend", lambda *a, **kw: _LosingBackend(lose=0, dead_nodes={"n1"}))
    report, messages = _run(spec, tmp_path, None)
    assert report.ok and report.trained == [name]
    assert f"{name}: removed the lock its worker left on dead Ray node n1" in messages


def test_ray_backend_knows_a_dead_nodes_lock(monkeypatch):
    nodes = [{"NodeID": "n1", "Alive": False, "Resources": {}}, {"NodeID": "n2", "Alive": True, "Resources": {"CPU": 2.0}}]
    fake = types.SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {"CPU": 2.0},
                                 nodes=lambda: nodes, remote=lambda fn: types.SimpleNamespace(options=lambda **kw: fn))  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray", fake)
    ray_backend = backends.RayBackend()
    old = LOST_AFTER_S + 1
    assert ray_backend.owner_lost({"ray_node": "n1", "age_s": old})
    assert not ray_backend.owner_lost({"ray_node": "n1", "age_s": 1.0})  # its heartbeat is fresh: not yet
    assert not ray_backend.owner_lost({"ray_node": "n2", "age_s": old})  # alive: its heartbeat decides
    assert not ray_backend.owner_lost({"host": socket.gethostname(), "age_s": old})  # not a Ray worker's lock
    assert ray_backend.env["OMP_NUM_THREADS"] == "1"  # a CPU cluster: threads match the run's CPUs


def test_cli_passes_the_cluster_options(monkeypatch, tmp_path, capsys):
    from sweeps.cli import main

    seen = {}

    def fake_run_sweep(spec, out, **kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(ok=True)

    monkeypatch.setattr("sweeps.runner.run_sweep", fake_run_sweep)
    monkeypatch.setattr("sweeps.cli.interrupt_on_sigterm", lambda: None)
    spec = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"
    args = ["sweep", "run", str(spec), "--out", str(tmp_path / "s"), "--backend", "ray", "--address", "10.0.0.5:6379",
            "--cpus-per-run", "2", "--gpus-per-run", "4", "--max-retries", "0"]  # fmt: skip
    assert main(args) == 0
    assert (seen["backend"], seen["address"], seen["cpus_per_run"], seen["gpus_per_run"], seen["max_retries"]) == (
        "ray", "10.0.0.5:6379", 2.0, 4, 0)  # fmt: skip
    assert main(args[:5]) == 0 and seen["max_retries"] == 3 and seen["address"] is None
    for bad, message in ((["--max-retries", "-1"], "--max-retries"), (["--cpus-per-run", "0"], "--cpus-per-run")):
        with pytest.raises(SystemExit):
            main(args[:5] + bad)
        assert message in capsys.readouterr().err
