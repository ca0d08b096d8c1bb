"""Launch a sweep: skip finished runs, resume interrupted ones, keep the index, fit at the end.

Layout of a sweep directory::

    sweep.yaml            the spec as launched (after command-line overrides)
    index.json, index.csv one row per run: status, error, N, D, C, losses (sweeps.index)
    <run name>/           one run directory per run (written by llm.training.train)
    logs/<run name>.log   the run's stdout and stderr
    .configs/, .locks/    each run's resolved config and lock
    fits.json, figures/, report.md   from analysis.fit_path when the spec has ``fit:``
    emergence/            from analysis.emergence_path when the spec has ``fit: {kind: emergence}``

With an ``eval:`` section each run is evaluated by its worker right after training
(``sweeps.evals``); a run finished earlier whose evaluations are missing is given a worker
that only evaluates. A failed evaluation is recorded in the run's evals/failed.json, shown
in the index and the summary, and retried only with ``retry_failed``.

On Ray a run whose worker was lost (its Ray worker process or node died, ``WORKER_LOST``)
is queued again, up to ``max_retries`` times, and resumes from its checkpoint; a run that
fails on its own (its worker exits 1 and result.json says failed) is not retried.

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

from llm.config import ConfigError, dump_config
from sweeps.backends import DEFAULT_MAX_RETRIES, WORKER_LOST, make_backend, worker_command
from sweeps.evals import eval_failure, eval_spec_to_json, needs_eval
from sweeps.index import index_row, lock_path, run_state, write_index
from sweeps.lock import break_lock, holder
from sweeps.plan import PlannedRun, expand, launch_priority
from sweeps.populations import DEFAULT_MAX_SIZE, DEFAULT_POPULATION_FN, launch_units, memory_fits, population_command
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
    eval_failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, error): done, evaluation failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.eval_failed and not self.fit_status.startswith("failed")


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
    if rc == WORKER_LOST:
        return "worker lost (its Ray worker process or node died)"
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


def stale_runs(sweep_dir: Path, names) -> list[str]:
    """Finished run folders in ``sweep_dir`` that are not runs of the spec (``names``).

    They are left by an earlier version of the spec (any change to recipe, base or grid gives
    new run names); the sweep's fit leaves them out unless asked to include them.
    """
    names = set(names)
    if not sweep_dir.is_dir():
        return []
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name not in names and (p / "result.json").exists())


def fit_skip_reason(spec: SweepSpec, rows: list[dict[str, Any]], fit: bool = True) -> str | None:
    """Why the fit step does not run ("not requested", "skipped: ..."), or None when it should."""
    if not fit or spec.fit is None or not spec.fit.enabled:
        return "not requested"
    if not any(r["status"] == "done" for r in rows):
        return "skipped: no finished runs"
    return None


def run_fit(
    spec: SweepSpec, sweep_dir: Path, rows: list[dict[str, Any]], *, include_stale: bool = False,
    log: Callable[[str], None] | None = None,
) -> str:  # fmt: skip
    """``analysis.fit_path`` on the sweep's runs (its index) if the spec asks; returns the fit status.

    Run folders the index does not list are left out, with a warning naming them, unless
    ``include_stale`` (or the spec's ``fit.options.include_stale``). The fit's warnings go to ``log``.
    """
    reason = fit_skip_reason(spec, rows)
    if reason is not None:
        return reason
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        import inspect
        import warnings

        import analysis

        options = dict(spec.fit.options or {})
        options["include_stale"] = bool(include_stale or options.get("include_stale", False))
        if spec.fit.kind != "emergence" and "progress" in inspect.signature(analysis.fit_path).parameters:
            options.setdefault("progress", sys.stderr.isatty())  # no progress bars in log files
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", analysis.AnalysisWarning)
            if spec.fit.kind == "emergence":
                from analysis.emergence_report import emergence_path

                options.pop("progress", None)
                emergence_path(sweep_dir, **options)
            else:
                analysis.fit_path(sweep_dir, **options)
        for w in caught:
            say(f"fit: warning: {w.message}")
    except Exception as err:  # a fit problem must not hide the finished runs
        return f"failed: {type(err).__name__}: {err}"
    return "done"


# --------------------------------------------------------------------------- launch decisions
# Each run's status in a launch is one of: done, failed (final); queued (to start here);
# running (a worker of this launch); waiting (another live launch holds its lock);
# interrupted (this launch was stopped while it ran).


def initial_status(state: str, retry_failed: bool) -> str:
    """What a launch does with a run found in ``state`` on disk (sweeps.index.STATES).

    pending or interrupted runs, and failed ones with ``retry_failed``, are queued; a run
    another live launch is training is waited for; done and failed runs stay as they are.
    """
    if state in ("pending", "interrupted") or (state == "failed" and retry_failed):
        return "queued"
    if state == "running":
        return "waiting"
    return state


def to_launch(status: dict[str, str], free: int, parents: dict[str, str] | None = None,
              priority: dict[str, float] | None = None) -> list[str]:  # fmt: skip
    """The next runs to start: the first ``free`` queued runs, highest ``priority`` first
    (``sweeps.plan.launch_priority``), ties and runs without one in spec order.

    A cooldown branch (``parents``: branch name -> main run name) waits while its main run is
    still to train (queued, running, waiting); once that is done or failed it starts (from the
    main run's checkpoint, or from scratch when there is none).
    """
    parents, priority = parents or {}, priority or {}
    ready = [name for name, st in status.items()
             if st == "queued" and status.get(parents.get(name, ""), "done") not in ("queued", "running", "waiting")]  # fmt: skip
    ready.sort(key=lambda name: -priority.get(name, 0.0))  # stable: spec order among equals
    return ready[: max(0, free)]


def after_exit(rc: int, result: dict | None) -> tuple[str, bool]:
    """Status of a run whose worker exited with ``rc`` (``result``: its result.json or None), and
    whether this launch counts it as trained.

    "waiting": another launch took the lock first; "lost": the worker died without writing
    result.json (the caller records the failure); else "done" or "failed" from result.json. A
    run another launch finished just before our worker started is not counted as ours.
    """
    if rc == EXIT_LOCKED:
        return "waiting", False
    counted = rc != EXIT_ALREADY_DONE
    if result is None:
        return "lost", counted
    return ("done" if result.get("status") == "done" else "failed"), counted


def should_retry(status: str, rc: int, retries: int, max_retries: int) -> bool:
    """Whether a run whose worker exited with ``rc`` (``status`` from ``after_exit``) is queued again.

    Only a lost worker (``WORKER_LOST``: its Ray worker process or node died) that left no
    result.json is, while fewer than ``max_retries`` retries were made; the retry resumes from
    the run's checkpoint. A run's own failure, or a process killed by a signal on a living
    worker (most often out of memory), would fail again: those are recorded, not retried.
    """
    return status == "lost" and rc == WORKER_LOST and retries < max_retries


def after_wait(state: str) -> str:
    """Status of a run held by another launch, given its state on disk now."""
    if state in ("done", "failed"):
        return state
    if state == "running":
        return "waiting"
    return "queued"  # the other launch stopped without finishing it: ours to run


def index_state(status: str, on_disk: Callable[[], str]) -> str:
    """The state the index shows for a run of this launch (``on_disk``: sweeps.index.run_state)."""
    if status in ("done", "failed", "running"):
        return status
    return "running" if status == "waiting" else on_disk()


def status_counts(status: dict[str, str]) -> dict[str, int]:
    """Runs per displayed status; runs held by another launch count as running."""
    counts: dict[str, int] = {}
    for st in status.values():
        key = "running" if st == "waiting" else st
        counts[key] = counts.get(key, 0) + 1
    return counts


class _Launch:
    """The mutable state of one launch: statuses, workers, and the index it keeps on disk."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, runs: list[PlannedRun], env: dict[str, str], train_fn: str,
                 population_fn: str = DEFAULT_POPULATION_FN, max_retries: int = DEFAULT_MAX_RETRIES,
                 say: Callable[[str], None] = print):  # fmt: skip
        self.spec, self.sweep_dir, self.runs, self.env, self.train_fn = spec, sweep_dir, runs, env, train_fn
        self.population_fn = population_fn
        self.max_retries, self.say = max_retries, say
        self.retries: dict[str, int] = {}  # run name -> times its lost worker was replaced
        self.status: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.active: dict[str, int] = {}  # run name -> backend handle (one handle for a population's members)
        self.units: dict[str, list[str]] = {}  # run name -> the members of its population (sweeps.populations)
        self.logs: dict[str, Path] = {}  # run name -> the log of the worker that runs it
        self.trained: list[str] = []
        self.eval_only: set[str] = set()  # finished runs queued for their evaluation alone
        self.written: dict[str, str] | None = None  # statuses as last written to the index

    def write_index(self, force: bool = False) -> None:
        """Write the index when a status changed since the last write (or when forced)."""
        if not force and self.status == self.written:
            return
        rows = [
            index_row(self.sweep_dir, run, self.spec.convention,
                      state=index_state(self.status[run.name], lambda: run_state(self.sweep_dir, run.name)),
                      error=self.errors.get(run.name))
            for run in self.runs
        ]  # fmt: skip
        write_index(self.sweep_dir, str(self.spec.name), self.spec.convention, rows)
        self.written = dict(self.status)

    def start(self, backend) -> None:
        """Start queued runs in the backend's free slots, a population's members together in one;
        a run locked meanwhile is waited for."""
        free = backend.free()
        parents = {r.name: r.parent for r in self.runs if r.parent is not None}  # wsd branches wait for them
        for name in to_launch(self.status, len(self.status), parents, self.priority()):
            if free <= 0:
                break
            members = []
            for member in self.units.get(name, [name]):
                if self.status[member] != "queued":
                    continue  # started, finished or held elsewhere
                if self.lock_holder(backend, member) is not None:
                    self.status[member] = "waiting"
                    continue
                members.append(member)
            if members:
                self._start_unit(backend, members)
                free -= 1

    def priority(self) -> dict[str, float]:
        """Run name -> launch priority: ``launch_priority``'s seconds, a population's summed over its
        members (on CPU they train in turn); a run queued only for its evaluation has none (it trains nothing)."""
        own = {name: 0.0 if name in self.eval_only else t for name, t in launch_priority(self.runs).items()}
        return {name: sum(own[m] for m in self.units.get(name, [name])) for name in own}

    def lock_holder(self, backend, name: str) -> dict | None:
        """The live owner of run ``name``'s lock; a lock left on a node the backend knows dead is removed."""
        path = lock_path(self.sweep_dir, name)
        owner = holder(path)
        if owner is not None and backend.owner_lost(owner):
            if break_lock(path, owner, lambda now: now is None or backend.owner_lost(now)):
                self.say(f"{name}: removed the lock its worker left on dead Ray node {owner.get('ray_node')}")
            owner = holder(path)
        return owner

    def _start_unit(self, backend, members: list[str]) -> None:
        """One worker: a single run, or a population (its log is its first member's; the others point there)."""
        eval_json = eval_spec_to_json(self.spec.eval) if self.spec.eval else None
        args = [(self.sweep_dir / ".configs" / f"{n}.yaml", self.sweep_dir / n, n, lock_path(self.sweep_dir, n)) for n in members]
        log = self.sweep_dir / "logs" / f"{members[0]}.log"
        if len(members) == 1:
            run = next(r for r in self.runs if r.name == members[0])
            branch = None if run.parent is None else (self.sweep_dir / run.parent, run.branch_step)
            cmd = worker_command(*args[0], self.train_fn, eval_json, branch_from=branch, branch_steps=run.branch_steps)
        else:
            cmd = population_command(args, self.population_fn, eval_json)
            log.parent.mkdir(parents=True, exist_ok=True)
            for other in members[1:]:
                with open(self.sweep_dir / "logs" / f"{other}.log", "a") as f:
                    f.write(f"trained in a population of {len(members)}; its log: {log.name}\n")
        handle = backend.start(cmd, self.env, log)
        for name in members:
            self.active[name], self.status[name], self.logs[name] = handle, "running", log
            self.trained.append(name)

    def collect(self, backend, bar: Progress) -> None:
        """Record the runs whose workers exited; a worker that died silently gets a failed result.json."""
        by_handle: dict[int, list[str]] = {}
        for name, handle in self.active.items():
            by_handle.setdefault(handle, []).append(name)
        for handle, names in by_handle.items():
            rc = backend.poll(handle)
            if rc is None:
                continue
            why = getattr(backend, "lost", {}).pop(handle, None)  # what Ray said of a lost or broken task
            for name in names:
                del self.active[name]
                self._exited(name, rc, bar, population=len(names) > 1, why=why)

    def _exited(self, name: str, rc: int, bar: Progress, population: bool, why: str | None = None) -> None:
        """Record one run whose worker exited with ``rc`` (``why``: the backend's account of a lost worker)."""
        result = read_result(self.sweep_dir / name)
        status, counted = after_exit(rc, result)
        if status == "lost" and population and holder(lock_path(self.sweep_dir, name)) is not None:
            status, counted = "waiting", False  # another launch locked this member first
        retry = should_retry(status, rc, self.retries.get(name, 0), self.max_retries)
        if not counted or retry:
            self.trained.remove(name)  # a retry is counted when it starts
        if retry:
            self.retries[name] = self.retries.get(name, 0) + 1
            self.status[name] = "queued"
            self.say(f"{name}: worker lost ({why}); retry {self.retries[name]} of {self.max_retries} "
                     "resumes from its checkpoint")  # fmt: skip
            return
        if status == "lost":
            tail = _log_tail(self.logs.get(name, self.sweep_dir / "logs" / f"{name}.log"))
            reason = _exit_reason(rc) + (f": {why}" if why else "")
            if rc == WORKER_LOST and self.retries.get(name):
                reason += f", after {self.retries[name]} retries (--max-retries {self.max_retries})"
            write_failure(self.sweep_dir / name, name, reason + (f"; log: {tail}" if tail else ""))
            result = read_result(self.sweep_dir / name)
            status = "failed"
        self.status[name] = status
        if status == "failed":
            self.errors[name] = str((result or {}).get("error"))
        if status != "waiting":
            bar.finished(name)

    def recheck_waiting(self, backend=None) -> None:
        """Follow the runs another launch holds: finished there, still running, or left to us (also
        when the backend knows that the lock's node died)."""
        for name, st in self.status.items():
            if st == "waiting":
                if backend is not None:
                    self.lock_holder(backend, name)
                self.status[name] = after_wait(run_state(self.sweep_dir, name))

    def busy(self) -> bool:
        return bool(self.active) or any(st in ("queued", "waiting") for st in self.status.values())


def run_sweep(
    spec: SweepSpec,
    sweep_dir: str | Path | None = None,
    *,
    backend: str = "local",
    parallel: int | None = None,
    gpus_per_run: int = 1,
    address: str | None = None,
    cpus_per_run: float = 1.0,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_failed: bool = False,
    train_fn: str = DEFAULT_TRAIN_FN,
    population: str = "auto",
    max_population: int = DEFAULT_MAX_SIZE,
    population_fn: str = DEFAULT_POPULATION_FN,
    resident: bool = True,
    fit: bool = True,
    include_stale: bool = False,
    progress: bool = True,
    raw_spec: dict | None = None,
    cache_dir: Path | None | str = "default",
    poll_s: float = 0.5,
    log: Callable[[str], None] | None = None,
) -> SweepReport:
    """Train every unfinished run of ``spec`` into ``sweep_dir`` and return the report.

    Raises ConfigError (nothing launched) if the spec is invalid. A run that fails is
    recorded and the sweep goes on. KeyboardInterrupt stops the running runs cleanly
    (they resume on the next launch) and propagates. The fit uses the runs of this spec
    only; finished runs of other specs in ``sweep_dir`` join it only with ``include_stale``.

    ``population="auto"`` trains runs that differ only in seeds, learning rate or weight decay
    together, up to ``max_population`` per process (``sweeps.populations``); ``"off"`` trains
    every run alone. A custom ``train_fn`` trains runs alone unless ``population_fn`` is given too.

    ``backend="ray"`` joins the Ray cluster at ``address`` (or $RAY_ADDRESS; else starts a local
    instance); each run asks for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs or TPU chips, and
    ``sweep_dir`` must be on storage every node sees. A run whose worker was lost is retried up to
    ``max_retries`` times (``should_retry``).
    ``resident`` (local backend): each slot's runs go in turn to one long-lived worker process
    (``sweeps.resident_worker``); False starts a process per run.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if population not in ("auto", "off"):
        raise ConfigError(f"--population {population!r} is not known; choose auto or off")
    if max_population < 1:
        raise ConfigError(f"--max-population must be >= 1, got {max_population}")
    if max_retries < 0:
        raise ConfigError(f"--max-retries must be >= 0, got {max_retries}")
    runs = expand(spec)  # every validation error surfaces here, before anything is written
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else default_sweep_dir(spec)
    sweep_dir = sweep_dir.resolve()
    prepare(spec, sweep_dir, runs, raw_spec)
    env = run_env(jax_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None))
    if train_fn != DEFAULT_TRAIN_FN and population_fn == DEFAULT_POPULATION_FN:
        population = "off"  # a custom train function trains one run; populations would bypass it
    launch = _Launch(spec, sweep_dir, runs, env, _absolute_train_fn(train_fn), _absolute_train_fn(population_fn),
                     max_retries=max_retries, say=say)  # fmt: skip
    for run in runs:
        state = run_state(sweep_dir, run.name)
        launch.status[run.name] = initial_status(state, retry_failed)
        if state == "failed" and launch.status[run.name] == "queued":
            _archive_failure(sweep_dir / run.name)
        if state == "done" and needs_eval(sweep_dir / run.name, spec.eval, retry_failed):
            launch.status[run.name] = "queued"  # its worker only evaluates
            launch.eval_only.add(run.name)
    stale = stale_runs(sweep_dir, launch.status)
    if stale:
        say(f"note: {len(stale)} finished run(s) in {sweep_dir} are not in this spec (e.g. {stale[0]}); "
            + ("the fit includes them (--include-stale)" if include_stale else "the fit leaves them out (--include-stale to include them)"))
    say(_launch_line(spec, sweep_dir, launch.status) + (f" ({len(launch.eval_only)} of them to evaluate only)" if launch.eval_only else ""))

    bar = Progress(str(spec.name), runs, progress)
    launch.write_index(force=True)
    backend_obj = None
    last_wait_check = 0.0
    try:
        while launch.busy():
            if backend_obj is None and {"queued", "waiting"} & set(launch.status.values()):  # waiting: locks to follow
                backend_obj = make_backend(backend, parallel, gpus_per_run, address=address, cpus_per_run=cpus_per_run,
                                           resident=resident)
                if population == "auto":
                    launch.units = _population_units(launch, sweep_dir, backend_obj, parallel, gpus_per_run, max_population)
            if backend_obj is not None:  # collect first: a slot freed since the last look is refilled now
                launch.collect(backend_obj, bar)
                launch.start(backend_obj)
            if time.monotonic() - last_wait_check > 2.0:  # another launch's runs: look now and then
                last_wait_check = time.monotonic()
                launch.recheck_waiting(backend_obj)
            changed = launch.status != launch.written
            launch.write_index()
            remaining = [n for n, s in launch.status.items() if s in ("queued", "running", "waiting")]
            bar.show(status_counts(launch.status), remaining, getattr(backend_obj, "parallel", 1), force=changed)
            if launch.busy():
                if backend_obj is not None:
                    backend_obj.wait(poll_s)  # wakes early when a run ends
                else:
                    time.sleep(poll_s)
    except BaseException:
        bar.close()
        if backend_obj is not None:
            say(f"sweep {spec.name}: stopping {len(launch.active)} running run(s); re-run the same command to resume")
            backend_obj.close()
        for name in launch.active:
            launch.status[name] = "interrupted"
        launch.write_index(force=True)
        raise
    bar.close()
    if backend_obj is not None:
        backend_obj.close()

    rows = [index_row(sweep_dir, r, spec.convention) for r in runs]
    write_index(sweep_dir, str(spec.name), spec.convention, rows)
    failed = [(r["name"], str(r["error"])) for r in rows if r["status"] == "failed"]
    eval_failed = []
    if spec.eval is not None:
        eval_failed = [(r["name"], err) for r in rows
                       if r["status"] == "done" and (err := eval_failure(sweep_dir / r["name"])) is not None]  # fmt: skip
    fit_status = run_fit(spec, sweep_dir, rows, include_stale=include_stale, log=say) if fit else "not requested"
    report = SweepReport(sweep_dir, rows, launch.trained, failed, fit_status, eval_failed)
    say(format_summary(spec, report))
    return report


def _population_units(launch: _Launch, sweep_dir: Path, backend_obj, parallel: int | None, gpus_per_run: int,
                      max_population: int) -> dict[str, list[str]]:  # fmt: skip
    """Run name -> the members of its population, for the queued runs that need training."""
    # wsd main runs and cooldown branches train alone: a population keeps no branch points
    trainable = [(r.name, r.config) for r in launch.runs
                 if launch.status[r.name] == "queued" and run_state(sweep_dir, r.name) != "done"
                 and r.parent is None and not r.branch_steps]  # fmt: skip
    if backend_obj.name == "local":
        slots, fits = backend_obj.parallel, memory_fits(backend_obj.parallel, gpus_per_run)
    else:  # a cluster's slots and memory are not known here; the population checks its memory where it runs
        slots, fits = parallel or 1, None
    units = launch_units(trainable, max_size=max_population, slots=slots, fits=fits)
    return {name: unit for unit in units if len(unit) > 1 for name in unit}


def _launch_line(spec: SweepSpec, sweep_dir: Path, status: dict[str, str]) -> str:
    """The first line of a launch: how many runs are done, to run, elsewhere, failed."""
    count = status_counts(status)
    waiting = sum(s == "waiting" for s in status.values())
    return (
        f"sweep {spec.name}: {len(status)} runs in {sweep_dir} — {count.get('done', 0)} done already, "
        f"{count.get('queued', 0)} to run"
        + (f", {waiting} running in another launch" if waiting else "")
        + (f", {count['failed']} failed (use --retry-failed to retry)" if count.get("failed") else "")
    )


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
    for name, error in report.eval_failed:
        lines.append(f"  EVAL FAILED {name}: {error} (evals/failed.json; --retry-failed to retry)")
    if report.fit_status != "not requested":
        out = "emergence/emergence.md" if spec.fit is not None and spec.fit.kind == "emergence" else "report.md"
        lines.append(f"fit: {report.fit_status}" + (f" -> {report.sweep_dir}/{out}" if report.fit_status == "done" else ""))
    return "\n".join(lines)

