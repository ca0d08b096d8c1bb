"""Resident workers (sweeps.resident_worker): a slot's runs train in turn in one process.

The fake train function of test_sweep_runner.py records its pid in each run's calls.txt:
seed 13 raises, seed 14 kills its own process with SIGKILL.
"""

from __future__ import annotations

import json
from pathlib import Path

from sweeps.cli import main as cli_main
from sweeps.plan import expand
from sweeps.runner import run_sweep
from sweeps.spec import spec_from_dict

FAKE = f"{Path(__file__).resolve().parent / 'test_sweep_runner.py'}:fake_train"


def _fake_spec(seeds):
    return spec_from_dict({
        "name": "fake",
        "base": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "seq_len": 16},
                 "train": {"batch_size": 2, "steps": 3}},
        "grid": {"train.seed": list(seeds)},
    })  # fmt: skip


def _run_fake(spec, out):
    """One launch with one slot: every run goes to the same resident worker while it lives."""
    return run_sweep(spec, out, train_fn=FAKE, parallel=1, progress=False, cache_dir=None, poll_s=0.05, log=lambda m: None)


def _pid(out: Path, name: str) -> str:
    lines = (out / name / "calls.txt").read_text().splitlines()
    assert len(lines) == 1, lines
    return lines[0].split()[0]


def test_one_process_trains_a_slots_runs_in_turn_and_each_keeps_its_own_outcome(tmp_path):
    spec = _fake_spec([1, 13, 2, 14, 3])
    names = [r.name for r in expand(spec)]
    report = _run_fake(spec, tmp_path)
    assert [r["status"] for r in report.rows] == ["done", "failed", "done", "failed", "done"]
    errors = dict(report.failed)
    assert "fake failure for seed 13" in errors[names[1]]
    assert "SIGKILL" in errors[names[3]]  # the run that killed the process, and only it
    pids = [_pid(tmp_path, n) for n in names]
    assert len(set(pids[:4])) == 1  # one process until the kill, a raised failure included
    assert pids[4] != pids[0]  # a fresh process after it
    # Each run's output went to its own log.
    logs = {n: (tmp_path / "logs" / f"{n}.log").read_text() for n in names}
    assert "fake failure for seed 13" in logs[names[1]]
    assert not any("fake failure" in logs[n] for n in names if n != names[1])
    # Locks released (but the killed run's: stale, taken over by the next launch); a second launch trains nothing.
    assert sorted(p.stem for p in (tmp_path / ".locks").glob("*.lock")) == [names[3]]
    assert _run_fake(spec, tmp_path).trained == []


def test_a_resident_worker_is_replaced_after_its_quota_of_jobs(tmp_path, monkeypatch):
    from sweeps.backends import LocalBackend

    monkeypatch.setattr(LocalBackend, "resident_max_jobs", 2)
    spec = _fake_spec([1, 2, 3])
    report = _run_fake(spec, tmp_path)
    assert [r["status"] for r in report.rows] == ["done"] * 3
    pids = [_pid(tmp_path, r.name) for r in expand(spec)]
    assert pids[0] == pids[1] != pids[2]


def test_runs_in_one_resident_worker_match_runs_in_their_own_processes(tmp_path, monkeypatch):
    # One shape at two lengths: not a population, so two single runs; in one process the second
    # reuses the first's imports, data and programs.
    spec = tmp_path / "lengths.yaml"
    spec.write_text(
        "name: lengths\n"
        "base:\n"
        "  model: {d_model: 16, n_layers: 1, n_heads: 2, d_ff: 32, seq_len: 16, compute_dtype: float32}\n"
        f"  data: {{source: 'builtin:kjv', cache_dir: '{tmp_path / 'cache'}'}}\n"
        "  optim: {warmup_steps: 2}\n"
        "  train: {batch_size: 4, eval_every: 3, eval_tokens: 256, log_every: 3, checkpoint_every: 4, tensorboard: false}\n"
        "grid: {train.steps: [6, 9]}\n"
    )

    def losses(out):
        rows = json.loads((out / "index.json").read_text())["runs"]
        assert [r["status"] for r in rows] == ["done", "done"]
        return [[(m["step"], m["train_loss"], m.get("eval_loss")) for m in map(json.loads, (out / r["name"] / "metrics.jsonl").read_text().splitlines())]
                for r in rows]  # fmt: skip

    monkeypatch.setenv("CHINCHAX_CACHE", str(tmp_path / "cache"))  # the second launch compiles nothing
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    common = ["--parallel", "1"]
    assert cli_main(["sweep", "run", str(spec), "--out", str(tmp_path / "resident"), *common]) == 0
    assert cli_main(["sweep", "run", str(spec), "--out", str(tmp_path / "separate"), "--process-per-run", *common]) == 0
    resident, separate = losses(tmp_path / "resident"), losses(tmp_path / "separate")
    assert 0 < len(resident[0]) < len(resident[1])
    assert resident == separate
