"""The Ray backend on a local Ray instance: every run a Ray task, failures recorded, no reruns."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sweeps.plan import expand
from sweeps.runner import run_sweep

# The fake train function and helpers of the runner tests (loaded by path: any pytest import mode).
_loader = importlib.util.spec_from_file_location("sweep_runner_tests", Path(__file__).with_name("test_sweep_runner.py"))
_runner_tests = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(_runner_tests)
FAKE, _calls, _spec = _runner_tests.FAKE, _runner_tests._calls, _runner_tests._spec

ray = pytest.importorskip("ray")


@pytest.mark.slow
def test_ray_backend_runs_each_run_once(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        spec = _spec([1, 2, 13])
        report = run_sweep(spec, tmp_path, backend="ray", train_fn=FAKE, progress=False, cache_dir=None,
                           poll_s=0.05, log=lambda m: None)
        names = [r.name for r in expand(spec)]
        assert [r["status"] for r in report.rows] == ["done", "done", "failed"]
        assert "fake failure for seed 13" in dict(report.failed)[names[2]]
        assert json.loads((tmp_path / names[0] / "result.json").read_text())["status"] == "done"
        again = run_sweep(spec, tmp_path, backend="ray", train_fn=FAKE, progress=False, cache_dir=None,
                          poll_s=0.05, log=lambda m: None)
        assert again.trained == []
        assert all(len(_calls(tmp_path, n)) == 1 for n in names)
    finally:
        ray.shutdown()
