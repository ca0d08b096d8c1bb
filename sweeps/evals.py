"""The sweep's evaluation step (spec section ``eval:``): what a finished run still lacks, run it, record failures.

A run is evaluated on every task of the spec at its final step and at each of ``eval.steps``
(checkpoints kept by training). An evaluation counts as done when its summary
(``evals/<task>.step<S>.summary.json``, written last by ``rundir.write_eval_records``) exists with
the spec's shots, seed and ``eval.params``; so re-running a sweep evaluates nothing new, and changing
the shots, the seed or a task's params re-evaluates. Changing only ``items`` does not (delete the run's
evals/ to redo them).

The worker (``sweeps.worker``) evaluates right after training, in the same process (JAX and the
compiled model code are warm), or, for a run finished before, alone. A failed evaluation leaves
the run done (its training is fine) and writes ``evals/failed.json`` (error, tasks, steps); the
index shows the error, the sweep reports it, and only ``--retry-failed`` tries again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rundir import (
    EVALS,
    eval_file,
    eval_summary_file,
    read_json_object,
    read_result,
    write_json_atomic,
)

EVAL_FAILED = "failed.json"  # evals/failed.json: the last failed evaluation of the run


def eval_failure_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / EVALS / EVAL_FAILED


def eval_failure(run_dir: str | Path) -> str | None:
    """The error of the run's last failed evaluation, or None."""
    record = read_json_object(eval_failure_path(run_dir))
    return None if record is None else str(record.get("error"))


def eval_steps(run_dir: str | Path, ev: Any) -> list[int]:
    """Steps to evaluate: the spec's ``eval.steps`` and the run's final step (from result.json)."""
    result = read_result(run_dir) or {}
    steps = {int(s) for s in ev.steps}
    if result.get("step") is not None:
        steps.add(int(result["step"]))
    return sorted(steps)


def _is_current(summary: dict | None, ev: Any, task: str) -> bool:
    """Whether an evaluation summary has the spec's shots, seed and params of ``task``."""
    if summary is None or summary.get("shots") != int(ev.shots) or summary.get("seed") != int(ev.seed):
        return False
    done = summary.get("params") or {}
    return all(done.get(key) == value for key, value in ((ev.params or {}).get(task) or {}).items())


def missing_evals(run_dir: str | Path, ev: Any) -> list[tuple[str, int]]:
    """(task, step) pairs of the spec's evaluation whose summary is absent or has other shots, seed or params."""
    missing = []
    for step in eval_steps(run_dir, ev):
        for task in ev.tasks:
            if not _is_current(read_json_object(eval_summary_file(eval_file(run_dir, task, step))), ev, task):
                missing.append((task, step))
    return missing


def needs_eval(run_dir: str | Path, ev: Any, retry_failed: bool = False) -> bool:
    """Whether a finished run has evaluations to do (a recorded failure only with ``retry_failed``)."""
    if ev is None or not missing_evals(run_dir, ev):
        return False
    return retry_failed or eval_failure(run_dir) is None


def eval_spec_to_json(ev: Any) -> str:
    """The eval section as the worker's ``--eval`` argument."""
    return json.dumps(dataclasses.asdict(ev))


def eval_spec_from_json(data: dict) -> Any:
    """The eval section from its JSON form (the worker's ``--eval``), as a sweeps.spec.EvalSpec."""
    from sweeps.spec import EvalSpec

    return EvalSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def evaluate_run(run_dir: str | Path, ev: Any, log: Callable[[str], None] = print) -> str | None:
    """Run the missing evaluations of a finished run; returns None, or the error (also written to
    evals/failed.json). ``ev``: the spec's EvalSpec."""
    run_dir = Path(run_dir)
    todo = missing_evals(run_dir, ev)
    by_step: dict[int, list[str]] = {}
    for task, step in todo:
        by_step.setdefault(step, []).append(task)
    try:
        from llm.evaluation import evaluate_tasks

        for step, tasks in sorted(by_step.items()):
            params = {t: p for t, p in (ev.params or {}).items() if t in tasks}
            evaluate_tasks(run_dir, tasks, int(ev.shots), step=step, n_items=int(ev.items), seed=int(ev.seed),
                           params=params, batch_size=int(ev.batch_size), log=log)  # fmt: skip
    except Exception as err:  # a failed evaluation is recorded; the run stays done
        traceback.print_exc()
        error = f"{type(err).__name__}: {err}".strip()[:2000]
        write_json_atomic(eval_failure_path(run_dir), {"status": "failed", "error": error, "tasks": list(ev.tasks),
                                                       "steps": sorted(by_step), "failed_at": time.time()})  # fmt: skip
        return error
    try:
        os.remove(eval_failure_path(run_dir))  # an earlier failure, now done
    except FileNotFoundError:
        pass
    return None
