"""Train one population of a sweep in this process: take the members' locks, train, evaluate, record failures.

``python -m sweeps.population_worker --member CONFIG RUN_DIR NAME LOCK [--member ...] [--eval JSON]``

Each member's lock is taken as ``sweeps.worker`` takes a single run's (a member locked
elsewhere is left to that launch, one found done is only evaluated); the rest train
together through the population function (``llm.population:train_population``, or
``--population-fn`` with the same signature; the tests use a fake one). With ``--eval``
the members that finish are evaluated. Every member left without a result gets a failed
result.json naming why. Exit codes: 0 every member is done, 1 some member failed, 75 no
member's lock was free.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Sequence

from rundir import interrupt_on_sigterm
from sweeps.lock import LockHeld, RunLock
from sweeps.populations import DEFAULT_POPULATION_FN
from sweeps.run_result import EXIT_LOCKED, read_result, write_failure


def run_population(members: Sequence[tuple[Path, Path, str, Path]], population_fn: str,
                   eval_spec: dict | None = None) -> int:  # fmt: skip
    """Train the members whose locks are free as one population, then evaluate; the exit code."""
    from llm.config import load_config
    from sweeps.worker import _evaluate, load_train_fn

    locks, todo = [], []
    try:
        for config, run_dir, name, lock_path in members:
            try:
                locks.append(RunLock(lock_path).acquire())
            except LockHeld as held:
                print(f"sweeps.population_worker: {held}; not starting {name}", file=sys.stderr)
                continue
            previous = read_result(run_dir)
            if previous is not None and previous.get("status") == "done":
                _evaluate(run_dir, eval_spec)  # finished meanwhile by another launch
                continue
            todo.append((config, run_dir, name))
        if not locks:
            return EXIT_LOCKED
        if not todo:
            return 0
        try:
            cfgs = [load_config(config) for config, _, _ in todo]
            results = load_train_fn(population_fn)(cfgs, [d for _, d, _ in todo], run_names=[n for _, _, n in todo])
            errors = {str(r.run_dir): getattr(r, "error", None) for r in results}
        except Exception as err:  # the population's failure is every unfinished member's failure
            traceback.print_exc()
            message = f"{type(err).__name__}: {err}".strip()
            if "RESOURCE_EXHAUSTED" in message or isinstance(err, MemoryError):
                message = "out of memory: " + message
            errors = {str(d): message[:2000] for _, d, _ in todo}
        ok = True
        for _, run_dir, name in todo:
            result = read_result(run_dir)
            if result is not None and result.get("status") == "done":
                _evaluate(run_dir, eval_spec)
                continue
            ok = False
            if result is None or result.get("status") != "failed":
                write_failure(run_dir, name, errors.get(str(run_dir)) or "population ended without a result for this run")
        return 0 if ok else 1
    finally:
        for lock in locks:
            lock.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.population_worker", description=__doc__.splitlines()[0])
    p.add_argument("--member", nargs=4, action="append", required=True, metavar=("CONFIG", "RUN_DIR", "NAME", "LOCK"))
    p.add_argument("--population-fn", default=DEFAULT_POPULATION_FN)
    p.add_argument("--eval", default=None, help="the spec's eval section as JSON: evaluate the finished runs")
    args = p.parse_args(argv)
    interrupt_on_sigterm()  # the sweep stops runs with SIGTERM: unwind like Ctrl-C, checkpoints and locks closed
    members = [(Path(c), Path(d), n, Path(lk)) for c, d, n, lk in args.member]
    eval_spec = json.loads(args.eval) if args.eval else None
    return run_population(members, args.population_fn, eval_spec)


if __name__ == "__main__":
    sys.exit(main())
