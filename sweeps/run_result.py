"""A run's result.json as the sweep sees it: read it, or record a failure in it.

Kept apart from ``sweeps.worker`` so that the runner and the index can use these
without importing the worker module, which runs as ``python -m sweeps.worker``.
"""

from __future__ import annotations

import time
from pathlib import Path

from rundir import read_result, write_json_atomic  # noqa: F401  (read_result re-exported)

EXIT_LOCKED = 75  # worker exit code: another process holds the run's lock (EX_TEMPFAIL)
EXIT_ALREADY_DONE = 3  # worker exit code: another launch finished the run before we took its lock



def write_failure(run_dir: Path, run_name: str, error: str) -> None:
    """Record a failure that happened outside train's own bookkeeping (exception, crash)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / "result.json",
        {"status": "failed", "error": error, "run_name": run_name, "failed_at": time.time()},
    )
