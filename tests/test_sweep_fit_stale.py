"""A sweep's fit uses exactly the runs of its index; other finished run folders (left by an
earlier version of the spec) are left out with a warning naming them, unless asked for.

``law_train`` (loaded by path in each worker) writes a done run whose loss follows a known
Chinchilla law, with N from d_model and D from the step count, so the fit runs for real in
well under a second without JAX.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import pytest

# Workers load this file for law_train: project imports live in the tests, so each worker
# starts in a fraction of a second instead of importing pandas and matplotlib.

LAW = f"{Path(__file__).resolve()}:law_train"
# The cheapest fits that use every run (Approach 3 would take ~20 s of L-BFGS starts here).
FIT = {"approaches": ["1"], "laws": ["kaplan_C"], "n_bootstrap": 0, "figures_": False, "extrapolation": False,
       "progress": False}  # fmt: skip
CLI_FIT = ["--approach", "1", "--law", "kaplan_C", "--bootstrap", "0", "--no-figures", "--no-extrapolation", "--quiet"]


class _Result:
    status, error = "done", None


def law_train(cfg, run_dir, *, run_name=None):
    """Stand-in for llm.training.train: a done run with L = E + A/N^alpha + B/D^beta."""
    n = 1000 * cfg.model.d_model
    d = 10_000 * cfg.train.steps + 100 * cfg.model.d_model  # distinct D for every (d_model, steps)
    loss = 1.69 + 406.4 / n**0.34 + 410.7 / d**0.28  # Hoffmann et al. 2022; inline: workers skip pandas
    result = {
        "status": "done", "error": None, "run_name": run_name, "step": cfg.train.steps, "steps": cfg.train.steps,
        "tokens": d, "n_params_total": n, "n_params_nonembed": n, "n_params_active": n,
        "n_params_active_nonembed": n, "flops": {"6N": 6.0 * n * d, "6N+attention": 6.3 * n * d},
        "final_eval_loss": loss, "best_eval_loss": loss, "final_train_loss": loss,
    }  # fmt: skip
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "result.json").write_text(json.dumps(result))
    return _Result()


def _spec(**extra):
    from sweeps.spec import spec_from_dict

    return spec_from_dict({
        "name": "stale",
        "base": {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "seq_len": 16},
                 "train": {"batch_size": 2}},
        "grid": {"model.d_model": [32, 64], "train.steps": [2, 4]},
        "fit": {"options": FIT},
        **extra,
    })  # fmt: skip


@pytest.fixture(scope="module")
def sweep_with_stale_run(tmp_path_factory):
    """A finished 4-run sweep plus one done run folder an earlier spec (another lr) left behind."""
    from sweeps.runner import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    law_train(_old_config(), out / "old-lr-deadbeef", run_name="old-lr-deadbeef")
    logs: list[str] = []
    report = run_sweep(_spec(), out, train_fn=LAW, parallel=2, progress=False, cache_dir=None, poll_s=0.05,
                       log=logs.append)  # fmt: skip
    return out, report, logs


def _old_config():
    """A run of an earlier version of the spec: another width and learning rate."""
    from sweeps.plan import expand

    cfg = expand(_spec())[0].config
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-2),
                               model=dataclasses.replace(cfg.model, d_model=48))  # fmt: skip


def test_sweep_fit_leaves_out_runs_not_in_its_index(sweep_with_stale_run):
    out, report, logs = sweep_with_stale_run
    assert report.fit_status == "done"
    fitted = json.loads((out / "fits.json").read_text())["runs"]
    assert sorted(fitted) == sorted(r["name"] for r in report.rows) and len(fitted) == 4
    warned = [line for line in logs if "old-lr-deadbeef" in line and "fit: warning" in line]
    assert warned and "--include-stale" in warned[0]


def test_sweep_fit_takes_stale_runs_when_asked(sweep_with_stale_run):
    from sweeps.runner import run_fit

    out, report, logs = sweep_with_stale_run
    assert run_fit(_spec(), out, report.rows, include_stale=True, log=logs.append) == "done"
    assert "old-lr-deadbeef" in json.loads((out / "fits.json").read_text())["runs"]
    assert run_fit(_spec(), out, report.rows, log=logs.append) == "done"
    assert "old-lr-deadbeef" not in json.loads((out / "fits.json").read_text())["runs"]


def test_cli_fit_of_a_sweep_dir_leaves_out_stale_runs_unless_asked(sweep_with_stale_run, capsys, tmp_path):
    from sweeps.cli import main

    out, _, _ = sweep_with_stale_run
    assert main(["fit", str(out), *CLI_FIT, "--out-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "old-lr-deadbeef" in err and "--include-stale" in err
    assert "old-lr-deadbeef" not in json.loads((tmp_path / "a" / "fits.json").read_text())["runs"]
    assert main(["fit", str(out), *CLI_FIT, "--out-dir", str(tmp_path / "b"), "--include-stale"]) == 0
    assert "old-lr-deadbeef" not in capsys.readouterr().err
    assert "old-lr-deadbeef" in json.loads((tmp_path / "b" / "fits.json").read_text())["runs"]


def test_load_runs_reads_the_index_of_a_sweep_dir(tmp_path):
    from analysis import AnalysisWarning, load_runs
    from analysis.synthetic import isoflop_sweep, write_sweep

    runs, curves = isoflop_sweep(budgets=(1e18, 1e19), n_sizes=3)
    write_sweep(tmp_path, runs, curves)
    members = runs["run"].tolist()[:-1]
    (tmp_path / "index.json").write_text(json.dumps({"runs": [{"name": n, "run_dir": n} for n in members]}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AnalysisWarning)
        loaded, _ = load_runs(tmp_path)
    assert sorted(loaded["run"]) == sorted(members)
    assert [runs["run"].iloc[-1] in str(w.message) for w in caught] == [True]
    assert len(load_runs(tmp_path, include_stale=True)[0]) == len(runs)
    os.remove(tmp_path / "index.json")  # no index: a plain folder of runs, all of them count
    assert len(load_runs(tmp_path)[0]) == len(runs)
