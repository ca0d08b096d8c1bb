"""The sweep index: one row per run (status, error, N, D, C, losses), as index.json and index.csv.

The state of a run is read from disk, never remembered: ``done``/``failed`` from its
result.json, ``running`` when a live process holds its lock, ``interrupted`` when it
has a checkpoint or metrics but no result, else ``pending``. So the index is always
rebuildable by ``chinchax sweep status``.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Iterable

from sweeps.lock import holder, run_lock_path
from sweeps.plan import PlannedRun
from rundir import dumps_json, read_result, write_text_atomic

STATES = ("done", "failed", "running", "interrupted", "pending")
COLUMNS = (
    "name", "status", "error", "budget", "n_params", "n_params_nonembed", "n_params_total",
    "n_params_active", "tokens", "dataset_tokens", "flops", "steps", "step", "final_eval_loss",
    "best_eval_loss", "wall_time_s", "run_dir",
)



def lock_path(sweep_dir: Path, name: str) -> Path:
    """The lock of run ``name``: the same file ``chinchax train --run-dir sweep_dir/name`` takes."""
    return run_lock_path(Path(sweep_dir) / name)


def run_state(sweep_dir: Path, name: str) -> str:
    """One of STATES for the run ``name`` in ``sweep_dir`` (see module docstring)."""
    run_dir = Path(sweep_dir) / name
    result = read_result(run_dir)
    if result is not None and result.get("status") in ("done", "failed"):
        return result["status"]
    if holder(lock_path(sweep_dir, name)) is not None:
        return "running"
    if (run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists():
        return "interrupted"
    return "pending"


def index_row(
    sweep_dir: Path, run: PlannedRun, convention: str, state: str | None = None, error: str | None = None
) -> dict[str, Any]:
    """Index row of one run: planned numbers, overwritten by result.json's where it exists.

    ``flops`` is C under ``convention`` (the spec's); ``n_params`` is N as the recipe counts it.
    """
    run_dir = Path(sweep_dir) / run.name
    result = read_result(run_dir) or {}
    state = state or run_state(sweep_dir, run.name)
    flops = result.get("flops")
    return {
        "name": run.name,
        "status": state,
        "error": error if error is not None else (result.get("error") if state == "failed" else _eval_error(run_dir, state)),
        "budget": run.budget,
        "n_params": run.n_params,
        "n_params_nonembed": result.get("n_params_nonembed"),
        "n_params_total": result.get("n_params_total"),
        "n_params_active": result.get("n_params_active"),
        "tokens": result.get("tokens", run.tokens) if state == "done" else run.tokens,
        "dataset_tokens": run.config.data.dataset_tokens,
        "flops": flops.get(convention, run.flops) if isinstance(flops, dict) and state == "done" else run.flops,
        "steps": run.steps,
        "step": result.get("step"),
        "final_eval_loss": result.get("final_eval_loss"),
        "best_eval_loss": result.get("best_eval_loss"),
        "wall_time_s": result.get("wall_time_s"),
        "run_dir": run.name,
    }


def write_index(sweep_dir: Path, spec_name: str, convention: str, rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Write index.json and index.csv atomically; returns the index dict."""
    rows = list(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATES}
    index = {"sweep": spec_name, "convention": convention, "updated": time.time(), "counts": counts, "runs": rows}
    write_text_atomic(Path(sweep_dir) / "index.json", dumps_json(index, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
    write_text_atomic(Path(sweep_dir) / "index.csv", buf.getvalue())
    return index


def _eval_error(run_dir: Path, state: str) -> str | None:
    """A done run's failed evaluation (sweeps.evals: evals/failed.json), as the index's error."""
    if state != "done":
        return None
    from sweeps.evals import eval_failure

    error = eval_failure(run_dir)
    return None if error is None else f"eval: {error}"
