"""Run one sweep run in its own process: take the run's lock, train, evaluate, record failures.

``python -m sweeps.worker --config C.yaml --run-dir DIR --lock L [--train-fn M:F] [--eval JSON]``

Exit codes: 0 the run is done, 1 it failed (result.json says why), 3 another
launch had already finished it, 75 another process holds the run's lock (for 3 and
75 nothing was trained). With ``--eval`` (the spec's eval section as JSON) a run done
here, or found done, is then evaluated on what it lacks (``sweeps.evals``); a failed
evaluation is recorded in its evals/failed.json and does not change the exit code.
The train function defaults to ``llm.training:train``; ``--train-fn`` takes ``module:function`` or
``path/to/file.py:function`` with the same signature (the tests use a fake one).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from rundir import interrupt_on_sigterm
from sweeps.lock import LockHeld, RunLock
from sweeps.run_result import EXIT_ALREADY_DONE, EXIT_LOCKED, read_result, write_failure


def load_train_fn(target: str) -> Callable[..., Any]:
    """Resolve ``module:function`` or ``file.py:function`` to the callable."""
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"train function {target!r} is not of the form module:function")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot import {module_name}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def run_one(config_path: Path, run_dir: Path, run_name: str, lock_path: Path, train_target: str,
            eval_spec: dict | None = None, branch: dict[str, Any] | None = None) -> int:  # fmt: skip
    """Train one run under its lock, then evaluate it if ``eval_spec``; returns the process exit code.

    ``branch`` holds the wsd cooldown-branch keyword arguments of the train function
    (``branch_from``, ``branch_steps``), passed only when set.
    """
    from llm import distributed
    from llm.config import ConfigError, load_config

    # One process per run unless the launcher set the JAX_* variables (llm.distributed); then only
    # process 0 takes the lock and records failures, and every process trains.
    # Evaluation (sweeps.evals) runs on process 0's devices alone.
    try:
        main_process = distributed.initialize(cluster=False) == 0
    except ConfigError as err:  # the launcher's JAX_* variables are wrong: nothing was trained
        print(f"sweeps.worker: {err}", file=sys.stderr)
        write_failure(run_dir, run_name, str(err))
        return 1
    try:
        lock = RunLock(lock_path).acquire() if main_process else None
    except LockHeld as held:
        print(f"sweeps.worker: {held}; not starting {run_name}", file=sys.stderr)
        return EXIT_LOCKED
    try:
        previous = read_result(run_dir)
        if previous is not None and previous.get("status") == "done":
            # Finished before (by an earlier launch, or by another one since our check): evaluate only.
            if main_process:
                _evaluate(run_dir, eval_spec)
            return EXIT_ALREADY_DONE
        try:
            cfg = load_config(config_path)
            result = load_train_fn(train_target)(cfg, run_dir, run_name=run_name, **(branch or {}))
        except Exception as err:  # one run's failure must not take down the sweep
            traceback.print_exc()
            message = f"{type(err).__name__}: {err}".strip()
            if "RESOURCE_EXHAUSTED" in message or isinstance(err, MemoryError):
                message = "out of memory: " + message
            if main_process:
                write_failure(run_dir, run_name, message[:2000])
            return 1
        status = getattr(result, "status", None)
        if main_process and status != "done" and (read_result(run_dir) or {}).get("status") != "failed":
            write_failure(run_dir, run_name, getattr(result, "error", None) or f"train returned status {status!r}")
        if status == "done" and main_process:
            _evaluate(run_dir, eval_spec)
        return 0 if status == "done" else 1
    finally:
        if lock is not None:
            lock.release()


def _evaluate(run_dir: Path, eval_spec: dict | None) -> None:
    """The missing evaluations of a finished run (sweeps.evals); failures are written to evals/failed.json."""
    if not eval_spec:
        return
    from sweeps.evals import eval_spec_from_json, evaluate_run, missing_evals

    ev = eval_spec_from_json(eval_spec)
    if missing_evals(run_dir, ev):
        error = evaluate_run(run_dir, ev, log=lambda msg: print(f"eval: {msg}", flush=True))
        if error is not None:
            print(f"sweeps.worker: evaluation failed: {error}", file=sys.stderr, flush=True)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.worker", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--run-name", required=True)
    p.add_argument("--lock", type=Path, required=True)
    p.add_argument("--train-fn", default="llm.training:train")
    p.add_argument("--eval", default=None, help="the spec's eval section as JSON: evaluate the finished run")
    p.add_argument("--branch-from", type=Path, default=None, help="wsd cooldown branch: the main run's directory")
    p.add_argument("--branch-step", type=int, default=None, help="wsd cooldown branch: the main run's step to start from")
    p.add_argument("--branch-steps", default="", help="comma-separated steps at which to keep checkpoints for branches")
    args = p.parse_args(argv)
    # The sweep stops runs with SIGTERM: unwind like Ctrl-C so the lock and checkpoints close cleanly.
    interrupt_on_sigterm()
    eval_spec = json.loads(args.eval) if args.eval else None
    branch: dict[str, Any] = {}
    if args.branch_from is not None:
        branch["branch_from"] = (args.branch_from, args.branch_step)
    if args.branch_steps:
        branch["branch_steps"] = tuple(int(s) for s in args.branch_steps.split(","))
    return run_one(args.config, args.run_dir, args.run_name, args.lock, args.train_fn, eval_spec, branch)


if __name__ == "__main__":
    sys.exit(main())
