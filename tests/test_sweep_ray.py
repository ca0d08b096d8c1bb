"""The Ray backend on a Ray cluster of several nodes on this machine (ray.cluster_utils.Cluster):
each run a Ray task, failures recorded and not rerun; a run whose Ray worker process was
killed, or whose node was removed, is retried from its checkpoint and ends as if never
interrupted. One cluster serves the module (a head that runs nothing, plus one 1-CPU node);
runs hold still after their first checkpoint (tests/ray_fault_train.py) so the faults land
mid-run without racing the training."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from sweeps.plan import expand
from sweeps.runner import run_sweep
from sweeps.spec import spec_from_dict

# The fake train function and helpers of the runner tests (loaded by path: any pytest import mode).
_loader = importlib.util.spec_from_file_location("sweep_runner_tests", Path(__file__).with_name("test_sweep_runner.py"))
_runner_tests = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(_runner_tests)
FAKE, _calls, _spec = _runner_tests.FAKE, _runner_tests._calls, _runner_tests._spec
PAUSING = f"{Path(__file__).with_name('ray_fault_train.py')}:pausing_train"

ray = pytest.importorskip("ray")
# Adding a node forks Ray's processes from this one (JAX warns about forks; they exec at once).
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")]
TIMEOUT_S = 300.0  # a bound for a wait that normally takes seconds, not a timing


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head node that runs nothing (the driver's) and one node with 1 CPU; yields (cluster, its node id)."""
    from ray.cluster_utils import Cluster

    from sweeps.backends import ray_local_only

    ray_local_only()
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, connect=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})  # fmt: skip
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster, node.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("ray_corpus")
    words = "the of and to in a is that for it as was with be by on not he this are".split()
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choices(words, k=12)) for _ in range(2000)))
    return root


def _tiny_spec(corpus: Path, seeds: list[int]):
    """The tiniest real runs that checkpoint: 12 steps, checkpoints at 4, 8 and 12."""
    return spec_from_dict({
        "name": "ray_faults",
        "base": {
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "seq_len": 32},
            "train": {"batch_size": 4, "steps": 12, "checkpoint_every": 4, "log_every": 4, "eval_every": 12,
                      "eval_tokens": 256, "progress": False, "tensorboard": False},
            "optim": {"warmup_steps": 2},
            "data": {"source": f"text:{corpus / 'corpus.txt'}", "cache_dir": str(corpus / "cache"), "eval_fraction": 0.1},
        },
        "grid": {"train.seed": seeds},
    })  # fmt: skip


class _Sweep:
    """run_sweep on the Ray backend in a thread, so the test can hurt its runs meanwhile."""

    def __init__(self, spec, out: Path, cache: Path):
        self.out, self.messages, self.report, self.error = out, [], None, None
        self.names = [r.name for r in expand(spec)]

        def launch():
            try:
                self.report = run_sweep(spec, out, backend="ray", train_fn=PAUSING, population="off", fit=False,
                                        progress=False, cache_dir=cache, poll_s=0.05, log=self.messages.append)  # fmt: skip
            except BaseException as err:  # noqa: BLE001 (reported by join)
                self.error = err

        self.thread = threading.Thread(target=launch, daemon=True)
        self.thread.start()

    def wait_for(self, what: str, found):
        """``found()``'s first truthy value, polled; fails when the sweep stopped or after TIMEOUT_S."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            value = found()
            if value:
                return value
            if not self.thread.is_alive():
                raise AssertionError(f"the sweep ended before {what}: {self.error!r}; {self.messages}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; {self.messages}")

    def paused_pid(self, name: str) -> int:
        path = self.out / ".gate" / f"{name}.paused"
        return int(self.wait_for(f"{name} to checkpoint", lambda: path.exists() and path.read_text()))

    def release(self) -> None:
        (self.out / ".gate").mkdir(parents=True, exist_ok=True)
        (self.out / ".gate" / "release").touch()

    def join(self):
        self.release()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), f"the sweep did not finish; {self.messages}"
        if self.error is not None:
            raise self.error
        return self.report

    def attempts(self, name: str) -> list[int]:
        """The checkpoint step each attempt of ``name`` started from."""
        return [int(line.split()[1]) for line in (self.out / ".gate" / f"{name}.attempts").read_text().splitlines()]

    def nodes(self, name: str) -> list[str]:
        """The Ray node of each attempt of ``name``, from its log."""
        log = (self.out / "logs" / f"{name}.log").read_text()
        return [line.split()[3] for line in log.splitlines() if line.startswith("[chinchax] ray node ")]


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "result.json").read_text())


def test_ray_backend_runs_each_run_once(cluster, tmp_path):
    spec = _spec([1, 2, 13])
    report = run_sweep(spec, tmp_path, backend="ray", train_fn=FAKE, progress=False, cache_dir=None,
                       poll_s=0.05, log=lambda m: None)  # fmt: skip
    names = [r.name for r in expand(spec)]
    assert [r["status"] for r in report.rows] == ["done", "done", "failed"]
    assert "fake failure for seed 13" in dict(report.failed)[names[2]]  # its own failure: not retried
    assert _result(tmp_path / names[0])["status"] == "done"
    again = run_sweep(spec, tmp_path, backend="ray", train_fn=FAKE, progress=False, cache_dir=None,
                      poll_s=0.05, log=lambda m: None)  # fmt: skip
    assert again.trained == []
    assert all(len(_calls(tmp_path, n)) == 1 for n in names)


def test_a_killed_worker_is_retried_and_resumes_to_the_same_loss(cluster, corpus, tmp_path):
    from llm.config import load_config
    from llm.training import train

    _, node = cluster
    sweep = _Sweep(_tiny_spec(corpus, [0]), tmp_path / "sweep", corpus / "jax")
    (name,) = sweep.names
    try:
        pid = sweep.paused_pid(name)
        stat = Path(f"/proc/{pid}/stat").read_text()
        ray_worker = int(stat[stat.rfind(")") + 2 :].split()[1])  # the Ray worker process running the task
        assert f"ray worker pid {ray_worker}" in (sweep.out / "logs" / f"{name}.log").read_text()
        os.kill(pid, signal.SIGSTOP)  # so that it cannot act on losing its parent: both die at once
        os.kill(ray_worker, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        sweep.release()
        cfg = load_config(sweep.out / ".configs" / f"{name}.yaml")
        uninterrupted = train(cfg, tmp_path / "uninterrupted", run_name=name).result  # while the sweep retries
    finally:
        report = sweep.join()
    assert report.ok and report.trained == [name], report.failed
    assert sweep.attempts(name) == [0, 4]  # the retry resumed from the checkpoint of step 4
    assert sweep.nodes(name) == [node, node]
    assert any(m.startswith(f"{name}: worker lost (") and "retry 1 of 3" in m for m in sweep.messages), sweep.messages
    index = json.loads((sweep.out / "index.json").read_text())
    assert index["counts"]["done"] == 1 and sum(index["counts"].values()) == 1

    retried = _result(sweep.out / name)
    print(f"\nfinal losses, retried vs uninterrupted: train {retried['final_train_loss']!r} vs "
          f"{uninterrupted['final_train_loss']!r}, eval {retried['final_eval_loss']!r} vs {uninterrupted['final_eval_loss']!r}")
    for key in ("final_train_loss", "final_eval_loss"):
        assert retried[key] == pytest.approx(uninterrupted[key], rel=1e-6, abs=1e-7), key
    assert retried["step"] == uninterrupted["step"] == 12


def test_a_removed_nodes_runs_finish_on_the_remaining_nodes(cluster, corpus, tmp_path):
    ray_cluster, kept = cluster
    doomed = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    sweep = _Sweep(_tiny_spec(corpus, [1, 2]), tmp_path / "sweep", corpus / "jax")
    try:
        for name in sweep.names:  # one run on each node, both mid-way
            sweep.paused_pid(name)
        on = {name: sweep.nodes(name)[0] for name in sweep.names}
        assert sorted(on.values()) == sorted([kept, doomed.node_id])
        ray_cluster.remove_node(doomed)
    finally:
        report = sweep.join()
    lost = next(name for name in sweep.names if on[name] == doomed.node_id)
    other = next(name for name in sweep.names if name != lost)
    print(f"\nnodes per attempt: {lost}: {sweep.nodes(lost)}, {other}: {sweep.nodes(other)} (removed {doomed.node_id})")
    assert report.ok and sorted(report.trained) == sorted(sweep.names), report.failed
    assert sweep.nodes(lost) == [doomed.node_id, kept] and sweep.nodes(other) == [kept]
    assert sweep.attempts(lost) == [0, 4] and sweep.attempts(other) == [0]
    assert any(m.startswith(f"{lost}: worker lost (") and "retry 1 of 3" in m for m in sweep.messages), sweep.messages
    assert all(_result(sweep.out / n)["status"] == "done" and _result(sweep.out / n)["step"] == 12 for n in sweep.names)
