"""Launch a sweep: skip finished runs, resume interrupted ones, keep the index, fit at the end.

Layout of a sweep directory::

    sweep.yaml            the spec as launched (after command-line overrides)
    index.json, index.csv one row per run: status, error, N, D, C, losses (sweeps.index)
    <run name>/           one run directory per run (written by llm.training.train)
    logs/<run name>.log   the run's stdout and stderr
    .configs/, .locks/    each run's resolved config and lock
    fits.json, figures/, report.md   from analysis.fit_path when the spec has ``fit:``

Re-running the same command is always safe: done runs are skipped, interrupted runs
resume from their checkpoints (train does that), failed runs are retried only with
``retry_failed``, and runs locked by another live launch are waited for, never run twice.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from llm.config import dump_config
from sweeps.backends import make_backend, worker_command
from sweeps.index import index_row, lock_path, run_state, write_index
from sweeps.lock import holder
from sweeps.plan import PlannedRun, expand
from sweeps.spec import SweepSpec
from sweeps.run_result import EXIT_ALREADY_DONE, EXIT_LOCKED, write_failure
from rundir import format_duration, read_result, write_text_atomic

DEFAULT_TRAIN_FN = "llm.training:train"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclasses.dataclass
class SweepReport:
    """Outcome of a launch: the final index rows, what failed, and the fit step."""

    sweep_dir: Path
    rows: list[dict[str, Any]]
    trained: list[str]  # runs this launch started
    failed: list[tuple[str, str]]  # (name, error)
    fit_status: str  # "done", "failed: ...", "skipped: ..." or "not requested"

    @property
    def ok(self) -> bool:
        return not self.failed and not self.fit_status.startswith("failed")


def default_sweep_dir(spec: SweepSpec) -> Path:
    """``sweeps_out/<spec name>`` under the current directory."""
    return Path("sweeps_out") / str(spec.name)


def jax_cache_dir() -> Path:
    """Shared persistent XLA compilation cache: $CHINCHAX_CACHE/jax or ~/.cache/chinchax/jax."""
    root = os.environ.get("CHINCHAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "chinchax")
    return Path(root) / "jax"


def run_env(cache_dir: Path | None) -> dict[str, str]:
    """Environment of every run: importable packages and the persistent compilation cache."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")) if p)}
    if cache_dir is not None and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        # Cache every program, even the sub-second compiles of tiny models.
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env



class Progress:
    """Live one-line status on stderr: done / running / failed / queued, elapsed, ETA."""

    def __init__(self, name: str, runs: list[PlannedRun], enabled: bool, stream=None):
        self.name, self.enabled = name, enabled
        self.stream = stream or sys.stderr
        self.est = {r.name: r.est_time_s for r in runs}
        self.total = len(runs)
        self.started = time.monotonic()
        self.est_finished = 0.0  # estimated seconds of the runs finished by this launch
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last = ""
        self.last_print = 0.0

    def finished(self, name: str) -> None:
        self.est_finished += self.est.get(name, 0.0)

    def show(self, counts: dict[str, int], remaining: list[str], parallel: int, force: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        left = sum(self.est.get(n, 0.0) for n in remaining)
        if self.est_finished > 0 and elapsed > 0:
            eta = left / (self.est_finished / elapsed)
        else:
            eta = left / max(1, min(parallel, len(remaining) or 1))
        line = (
            f"[sweep {self.name}] {counts.get('done', 0)}/{self.total} done, {counts.get('running', 0)} running, "
            f"{counts.get('failed', 0)} failed, {counts.get('queued', 0)} queued | {format_duration(elapsed)} elapsed"
            + (f", ETA {format_duration(eta)}" if remaining else "")
        )
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.stream.flush()
        elif force or line.split(" | ")[0] != self.last.split(" | ")[0] or time.monotonic() - self.last_print > 30:
            print(line, file=self.stream, flush=True)  # a log file gets changes and a 30 s heartbeat
            self.last_print = time.monotonic()
        self.last = line

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _exit_reason(rc: int) -> str:
    if rc < 0:
        try:
            sig = signal.Signals(-rc).name
        except ValueError:
            sig = f"signal {-rc}"
        hint = " (out of memory?)" if -rc == signal.SIGKILL else ""
        return f"worker killed by {sig}{hint}"
    return f"worker exited with code {rc} without writing result.json"


def _log_tail(path: Path, n: int = 3) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return ""
    return " | ".join(lines[-n:])[-500:]


def prepare(spec: SweepSpec, sweep_dir: Path, runs: list[PlannedRun], raw_spec: dict | None) -> None:
    """Write sweep.yaml and each run's resolved config (idempotent)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(raw_spec if raw_spec is not None else dataclasses.asdict(spec), sort_keys=False)
    write_text_atomic(sweep_dir / "sweep.yaml", text)
    for run in runs:
        path = sweep_dir / ".configs" / f"{run.name}.yaml"
        text = dump_config(run.config)
        if not path.exists() or path.read_text() != text:
            write_text_atomic(path, text)


def sweep_status(spec: SweepSpec, sweep_dir: Path) -> list[dict[str, Any]]:
    """Rebuild and write the index from disk; returns its rows (no training)."""
    runs = expand(spec)
    rows = [index_row(sweep_dir, r, spec.convention) for r in runs]
    if sweep_dir.exists():
        write_index(sweep_dir, str(spec.name), spec.convention, rows)
    return rows


def run_fit(spec: SweepSpec, sweep_dir: Path, rows: list[dict[str, Any]]) -> str:
    """``analysis.fit_path`` on the sweep directory if the spec asks; returns the fit status."""
    if spec.fit is None or not spec.fit.enabled:
        return "not requested"
    if not any(r["status"] == "done" for r in rows):
        return "skipped: no finished runs"
    try:
        import inspect

        import analysis

        options = dict(spec.fit.options or {})
        if "progress" in inspect.signature(analysis.fit_path).parameters:
            options.setdefault("progress", sys.stderr.isatty())  # no progress bars in log files
        analysis.fit_path(sweep_dir, **options)
    except Exception as err:  # a fit problem must not hide the finished runs
        return f"failed: {type(err).__name__}: {err}"
    return "done"


def run_sweep(
    spec: SweepSpec,
    sweep_dir: str | Path | None = None,
    *,
    backend: str = "local",
    parallel: int | None = None,
    gpus_per_run: int = 1,
    retry_failed: bool = False,
    train_fn: str = DEFAULT_TRAIN_FN,
    fit: bool = True,
    progress: bool = True,
    raw_spec: dict | None = None,
    cache_dir: Path | None | str = "default",
    poll_s: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> SweepReport:
    """Train every unfinished run of ``spec`` into ``sweep_dir`` and return the report.

    Raises ConfigError (nothing launched) if the spec is invalid. A run that fails is
    recorded and the sweep goes on. KeyboardInterrupt stops the running runs cleanly
    (they resume on the next launch) and propagates.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    runs = expand(spec)  # every validation error surfaces here, before anything is written
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir(spec)
    sweep_dir = sweep_dir.resolve()
    prepare(spec, sweep_dir, runs, raw_spec)
    env = run_env(jax_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None))
    train_fn = _absolute_train_fn(train_fn)

    status: dict[str, str] = {}
    errors: dict[str, str] = {}
    queue: list[str] = []
    waiting: list[str] = []  # locked by another live launch: polled until they finish
    for run in runs:
        state = run_state(sweep_dir, run.name)
        status[run.name] = state
        if state == "failed" and retry_failed:
            _archive_failure(sweep_dir / run.name)
            status[run.name] = "queued"
            queue.append(run.name)
        elif state in ("pending", "interrupted"):
            status[run.name] = "queued"
            queue.append(run.name)
        elif state == "running":
            waiting.append(run.name)
    strangers = sorted(
        p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name not in status and (p / "result.json").exists()
    )
    if strangers:
        say(f"note: {len(strangers)} run(s) in {sweep_dir} are not in this spec (e.g. {strangers[0]}); fits include them")
    skipped = sum(s == "done" for s in status.values())
    say(
        f"sweep {spec.name}: {len(runs)} runs in {sweep_dir} — {skipped} done already, {len(queue)} to run"
        + (f", {len(waiting)} running in another launch" if waiting else "")
        + (f", {sum(s == 'failed' for s in status.values())} failed (use --retry-failed to retry)"
           if any(s == "failed" for s in status.values()) else "")
    )

    def write() -> None:
        rows = []
        for run in runs:
            st = status[run.name]
            shown = st if st in ("done", "failed", "running") else ("running" if st == "waiting" else run_state(sweep_dir, run.name))
            rows.append(index_row(sweep_dir, run, spec.convention, state=shown, error=errors.get(run.name)))
        write_index(sweep_dir, str(spec.name), spec.convention, rows)

    def counts() -> dict[str, int]:
        c: dict[str, int] = {}
        for st in status.values():
            key = "running" if st in ("running", "waiting") else st
            c[key] = c.get(key, 0) + 1
        return c

    trained: list[str] = []
    bar = Progress(str(spec.name), runs, progress)
    write()
    backend_obj = make_backend(backend, parallel, gpus_per_run) if queue else None
    active: dict[str, int] = {}
    last_wait_check = 0.0
    try:
        while queue or active or waiting:
            changed = False
            while queue and backend_obj is not None and backend_obj.free() > 0:
                name = queue.pop(0)
                if holder(lock_path(sweep_dir, name)) is not None:
                    status[name] = "waiting"
                    waiting.append(name)
                    continue
                cmd = worker_command(sweep_dir / ".configs" / f"{name}.yaml", sweep_dir / name, name, lock_path(sweep_dir, name), train_fn)
                active[name] = backend_obj.start(cmd, env, sweep_dir / "logs" / f"{name}.log")
                status[name] = "running"
                trained.append(name)
                changed = True
            for name, handle in list(active.items()):
                rc = backend_obj.poll(handle)
                if rc is None:
                    continue
                del active[name]
                changed = True
                if rc == EXIT_LOCKED:  # another launch took it between our check and the worker's lock
                    trained.remove(name)
                    status[name] = "waiting"
                    waiting.append(name)
                    continue
                if rc == EXIT_ALREADY_DONE:  # another launch finished it just before our worker started
                    trained.remove(name)
                result = read_result(sweep_dir / name)
                if result is None:
                    reason = _exit_reason(rc)
                    tail = _log_tail(sweep_dir / "logs" / f"{name}.log")
                    write_failure(sweep_dir / name, name, reason + (f"; log: {tail}" if tail else ""))
                    result = read_result(sweep_dir / name)
                status[name] = "done" if result.get("status") == "done" else "failed"
                if status[name] == "failed":
                    errors[name] = str(result.get("error"))
                bar.finished(name)
            if waiting and time.monotonic() - last_wait_check > 2.0:
                last_wait_check = time.monotonic()
                for name in list(waiting):
                    state = run_state(sweep_dir, name)
                    if state in ("done", "failed"):
                        waiting.remove(name)
                        status[name] = state
                        changed = True
                    elif state != "running":  # the other launch stopped without finishing it
                        waiting.remove(name)
                        status[name] = "queued"
                        queue.append(name)
                        changed = True
            if queue and backend_obj is None:
                backend_obj = make_backend(backend, parallel, gpus_per_run)
            if changed:
                write()
            remaining = [n for n, s in status.items() if s in ("queued", "running", "waiting")]
            bar.show({**counts(), "queued": sum(s == "queued" for s in status.values())}, remaining,
                     getattr(backend_obj, "parallel", 1), force=changed)
            if queue or active or waiting:
                time.sleep(poll_s)
    except BaseException:
        bar.close()
        if backend_obj is not None:
            say(f"sweep {spec.name}: stopping {len(active)} running run(s); re-run the same command to resume")
            backend_obj.close()
        for name in active:
            status[name] = "interrupted"
        write()
        raise
    bar.close()
    if backend_obj is not None:
        backend_obj.close()

    rows = [index_row(sweep_dir, r, spec.convention) for r in runs]
    write_index(sweep_dir, str(spec.name), spec.convention, rows)
    failed = [(r["name"], str(r["error"])) for r in rows if r["status"] == "failed"]
    fit_status = run_fit(spec, sweep_dir, rows) if fit else "not requested"
    report = SweepReport(sweep_dir, rows, trained, failed, fit_status)
    say(format_summary(spec, report))
    return report


def _absolute_train_fn(target: str) -> str:
    """Make a ``file.py:function`` target absolute (runs may start in another directory)."""
    module, _, attr = target.rpartition(":")
    if module.endswith(".py"):
        return f"{Path(module).resolve()}:{attr}"
    return target


def _archive_failure(run_dir: Path) -> None:
    """Keep a failed attempt's result.json as result.failed.json before a retry."""
    path = run_dir / "result.json"
    if path.exists():
        os.replace(path, run_dir / "result.failed.json")


def format_summary(spec: SweepSpec, report: SweepReport) -> str:
    """End-of-sweep summary: counts, where things are, and every failure with its error."""
    counts: dict[str, int] = {}
    for row in report.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [
        f"sweep {spec.name}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f" ({len(report.trained)} trained by this launch); index: {report.sweep_dir / 'index.csv'}"
    ]
    for name, error in report.failed:
        lines.append(f"  FAILED {name}: {error}")
    if report.fit_status != "not requested":
        lines.append(f"fit: {report.fit_status}" + (f" -> {report.sweep_dir}/report.md" if report.fit_status == "done" else ""))
    return "\n".join(lines)

