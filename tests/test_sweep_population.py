"""Populations in sweeps: which runs train together, the population worker, and one real population sweep.

``fake_population`` (this file, loaded by path in the worker process) stands in for
llm.population.train_population without JAX: it records its pid in each member's
calls.txt; a member with train.seed 13 fails, one with 14 gets no result at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llm.config import ConfigError, load_config, total_steps
from llm.memory import population_bytes
from sweeps import populations
from sweeps.cli import main as cli_main
from sweeps.plan import expand
from sweeps.populations import launch_units, memory_fits
from sweeps.runner import run_sweep
from sweeps.spec import spec_from_dict

HERE = Path(__file__).resolve()
FAKE_POPULATION = f"{HERE}:fake_population"
FAKE_TRAIN = f"{HERE.parent / 'test_sweep_runner.py'}:fake_train"


class _Result:
    def __init__(self, status, error, run_dir):
        self.status, self.error, self.run_dir = status, error, Path(run_dir)


def fake_population(cfgs, run_dirs, *, run_names):
    out = []
    for cfg, run_dir, name in zip(cfgs, run_dirs, run_names):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "calls.txt", "a") as f:
            f.write(f"pid={os.getpid()} members={len(cfgs)}\n")
        if cfg.train.seed == 14:
            out.append(_Result("failed", None, run_dir))
            continue
        steps = total_steps(cfg)
        tokens = steps * cfg.train.batch_size * cfg.model.seq_len
        failed = cfg.train.seed == 13
        result = {
            "status": "failed" if failed else "done", "error": "non-finite training loss (nan) at step 2" if failed else None,
            "run_name": name, "step": steps, "steps": steps, "tokens": tokens, "dataset_tokens": None,
            "n_params_total": 1, "n_params_nonembed": 1, "n_params_active": 1, "n_params_active_nonembed": 1,
            "flops": {"6N": 6.0 * tokens, "6N+attention": 7.0 * tokens}, "final_train_loss": 2.0,
            "final_eval_loss": 2.0, "best_eval_loss": 2.0, "wall_time_s": 0.0,
            "population": {"size": len(cfgs), "mode": "loop", "members": list(run_names)},
        }  # fmt: skip
        (run_dir / "result.json").write_text(json.dumps(result))
        out.append(_Result(result["status"], result["error"], run_dir))
    return out


def _spec(seeds, **base_train):
    return spec_from_dict({
        "name": "pop",
        "base": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "seq_len": 16},
                 "train": {"batch_size": 2, "steps": 3, **base_train}},
        "grid": {"train.seed": list(seeds)},
    })  # fmt: skip


def _runs(seeds_or_cfgs):
    return [(f"r{i}", c) for i, c in enumerate(seeds_or_cfgs)]


def _cfg(*overrides):
    return load_config(None, ["model.d_model=32", "model.n_heads=2", "train.steps=3", *overrides])


# --------------------------------------------------------------------------- which runs train together


def test_runs_differing_only_in_population_keys_are_cut_into_one_population_per_slot():
    runs = _runs([_cfg(f"train.seed={s}", f"optim.lr={lr}") for s in range(4) for lr in (1e-3, 3e-3)])
    assert launch_units(runs, max_size=16, slots=2) == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"]]
    assert launch_units(runs, max_size=16, slots=1) == [[f"r{i}" for i in range(8)]]
    assert launch_units(runs, max_size=3, slots=1) == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6", "r7"]]
    assert launch_units(runs, max_size=16, slots=1, fits=lambda cfg: 2) == [["r0", "r1"], ["r2", "r3"], ["r4", "r5"], ["r6", "r7"]]
    # more slots than pairs: populations of two, never of one
    assert launch_units(runs[:3], max_size=16, slots=8) == [["r0", "r1", "r2"]]


def test_runs_of_other_shapes_or_lengths_stay_single_and_keep_spec_order():
    runs = _runs([_cfg("train.seed=0"), _cfg("model.d_model=64", "model.n_heads=2"), _cfg("train.seed=1"),
                  _cfg("train.steps=4"), _cfg("data.seed=3")])  # fmt: skip
    assert launch_units(runs, max_size=16, slots=1) == [["r0", "r2", "r4"], ["r1"], ["r3"]]
    assert launch_units(runs, max_size=1, slots=1) == [["r0"], ["r1"], ["r2"], ["r3"], ["r4"]]


def test_memory_caps_a_population_at_what_half_a_gpu_slot_holds(monkeypatch):
    cfg = _cfg("model.d_model=256", "model.n_layers=4", "model.d_ff=1024", "train.batch_size=64", "model.seq_len=256")
    gpu = 8 * 2**30
    monkeypatch.setattr(populations, "_gpu_memory_bytes", lambda: [gpu])
    budget = gpu * 0.75 * 0.5  # JAX's share of one GPU, half of it kept for what the estimate leaves out
    size = memory_fits(parallel=1)(cfg)
    assert population_bytes(cfg, size, "vmap") <= budget < population_bytes(cfg, size + 1, "vmap")
    assert memory_fits(parallel=2)(cfg) < size  # two runs share the GPU: 0.9/2 each instead of 0.75
    monkeypatch.setattr(populations, "_gpu_memory_bytes", lambda: [])
    monkeypatch.setattr(populations, "_host_bytes", lambda: 64 * 2**30)
    host = memory_fits(parallel=2)(cfg)  # CPU: members in turn hold only params and AdamW moments each
    assert population_bytes(cfg, host, "loop") <= 16 * 2**30 < population_bytes(cfg, host + 1, "loop")


# --------------------------------------------------------------------------- the runner (fake trainer)


def _run(spec, out, **kw):
    kw.setdefault("parallel", 1)
    return run_sweep(spec, out, train_fn=FAKE_TRAIN, population_fn=FAKE_POPULATION, progress=False, cache_dir=None,
                     poll_s=0.05, log=lambda m: None, **kw)  # fmt: skip


def _pids(out, names):
    return [(Path(out) / n / "calls.txt").read_text().split()[0] for n in names]


def test_the_runner_trains_a_population_in_one_worker_and_records_each_member(tmp_path):
    spec = _spec([1, 13, 2, 14])
    names = [r.name for r in expand(spec)]
    report = _run(spec, tmp_path)
    status = {r["name"]: r["status"] for r in report.rows}
    assert [status[n] for n in names] == ["done", "failed", "done", "failed"]
    assert len(set(_pids(tmp_path, names))) == 1  # one process for the four
    errors = dict(report.failed)
    assert "non-finite" in errors[names[1]]
    assert "without a result" in errors[names[3]]
    assert (tmp_path / "logs" / f"{names[0]}.log").exists()
    assert names[0] in (tmp_path / "logs" / f"{names[2]}.log").read_text()  # the others point to its log
    assert sorted(report.trained) == sorted(names)
    # Again: nothing to train; --retry-failed retries the two failed ones together, alone
    assert _run(spec, tmp_path).trained == []
    retried = _run(spec, tmp_path, retry_failed=True)
    assert sorted(retried.trained) == sorted([names[1], names[3]])
    assert "members=2" in (tmp_path / names[1] / "calls.txt").read_text().splitlines()[-1]


def test_population_off_trains_every_run_in_its_own_worker(tmp_path):
    spec = _spec([1, 2, 3])
    names = [r.name for r in expand(spec)]
    report = _run(spec, tmp_path, population="off")
    assert [r["status"] for r in report.rows] == ["done"] * 3
    # each by the single-run train function (its calls.txt line), in turn in the slot's resident worker
    assert all("resumed_from=" in (tmp_path / n / "calls.txt").read_text() for n in names)
    assert len(set(_pids(tmp_path, names))) == 1
    _run(spec, tmp_path / "ppr", population="off", resident=False)  # --process-per-run
    assert len(set(_pids(tmp_path / "ppr", names))) == 3
    with pytest.raises(ConfigError, match="choose auto or off"):
        _run(spec, tmp_path / "x", population="on")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- a real population sweep


def test_a_real_population_sweep_from_the_command_line(tmp_path):
    spec = tmp_path / "seeds.yaml"
    spec.write_text(
        "name: seeds\n"
        "base:\n"
        "  model: {d_model: 16, n_layers: 1, n_heads: 2, d_ff: 32, seq_len: 16, compute_dtype: float32}\n"
        f"  data: {{source: 'builtin:kjv', cache_dir: '{tmp_path / 'cache'}'}}\n"
        "  optim: {warmup_steps: 2}\n"
        "  train: {batch_size: 4, steps: 6, eval_every: 3, eval_tokens: 256, log_every: 3, tensorboard: false}\n"
        "grid: {train.seed: [0, 1], optim.lr: [3.0e-3]}\n"
    )
    rc = cli_main(["sweep", "run", str(spec), "--out", str(tmp_path / "out"), "--parallel", "1", "--no-compile-cache"])
    assert rc == 0
    rows = json.loads((tmp_path / "out" / "index.json").read_text())["runs"]
    assert [r["status"] for r in rows] == ["done", "done"]
    results = [json.loads((tmp_path / "out" / r["name"] / "result.json").read_text()) for r in rows]
    assert [r["population"]["index"] for r in results] == [0, 1]
    assert all(r["population"]["mode"] == "loop" and r["population"]["size"] == 2 for r in results)
    assert results[0]["final_train_loss"] != results[1]["final_train_loss"]
