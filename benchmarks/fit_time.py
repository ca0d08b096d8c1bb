"""Wall and CPU seconds of a sweep's fit step (what ``chinchax sweep run`` does after its last run), by phase.

    python benchmarks/fit_time.py SWEEP_DIR [--repeats 3] [--serial]

SWEEP_DIR is a finished sweep directory, e.g. the quickstart's (``sweeps_out/quickstart`` after
``chinchax sweep run experiments/quickstart.yaml``). It is never written to: each repeat copies it
to a temporary folder and, in a fresh Python process, calls ``sweeps.runner.run_fit`` with the
spec the sweep was launched with (its ``sweep.yaml``), as the end of ``sweep run`` does. Phases
are timed by wrapping the functions the fit calls; "other" is the rest of the fit (writing
fits.json, the fit's own bookkeeping). CPU seconds count this process only per phase, and every
process (helpers included) in the total. The table gives medians over ``--repeats``; wall
seconds on shared cores are noisy, CPU seconds less so. ``--serial``: no helper process
(``analysis.helper``), everything in one process as on one core. With the helper, its share (the
laws, half the figures) is not in the per-phase rows but in "waiting for the helper", its own CPU
row and the total; on two free cores the wall is about the larger of this process's CPU and the
helper's.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (module, function, phase): the fit's steps; one missing from the code is skipped.
PHASES = (
    ("analysis.api", "load_runs", "load runs"),
    ("analysis.api", "prepare", "prepare points"),
    ("analysis.pipeline", "approach1", "approach 1 (+ bootstrap)"),
    ("analysis.pipeline", "_approach2", "approach 2 (+ bootstrap)"),
    ("analysis.parametric", "bootstrap_parametric", "approach 3: bootstrap"),
    ("analysis.pipeline", "approach3", "approach 3: full-grid fit"),
    ("analysis.pipeline", "fit_laws", "Kaplan laws (+ bootstrap)"),
    ("analysis.pipeline", "extrapolation_check", "extrapolation check"),
    ("concurrent.futures", "Future.result", "waiting for the helper"),
    ("analysis.figures", "draw_all", "figures"),
    ("analysis.api", "write_outputs", "report, table"),
)


def _child(sweep_dir: Path, serial: bool) -> None:
    """Run the fit step once in this process and print the phase times as JSON."""
    wall0, cpu0 = time.perf_counter(), time.process_time()
    sys.path.insert(0, str(ROOT))
    from sweeps.runner import run_fit, sweep_status
    from sweeps.spec import load_spec

    import analysis  # noqa: F401

    times: dict[str, list[float]] = {"imports": [time.perf_counter() - wall0, time.process_time() - cpu0]}
    stack: list[list[float]] = []  # nested phases: a parent's time excludes its timed children

    def timed(fn, phase):
        def wrapper(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            stack.append([0.0, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter() - w, time.process_time() - c
                inner = stack.pop()
                t = times.setdefault(phase, [0.0, 0.0])
                t[0] += dw - inner[0]
                t[1] += dc - inner[1]
                if stack:
                    stack[-1][0] += dw
                    stack[-1][1] += dc

        return wrapper

    if serial:
        import analysis.api

        analysis.api.helper_process = lambda wanted=True: contextlib.nullcontext()
    for mod_name, attr, phase in PHASES:
        owner = importlib.import_module(mod_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        if hasattr(owner, name):
            setattr(owner, name, timed(getattr(owner, name), phase))
    spec = load_spec(sweep_dir / "sweep.yaml")
    rows = sweep_status(spec, sweep_dir)
    w, c = time.perf_counter(), time.process_time()
    status = run_fit(spec, sweep_dir, rows, log=lambda msg: None)
    fit_w, fit_c = time.perf_counter() - w, time.process_time() - c
    if status != "done":
        raise SystemExit(f"fit step: {status}")
    times["other"] = [fit_w - sum(t[0] for k, t in times.items() if k != "imports"),
                      fit_c - sum(t[1] for k, t in times.items() if k != "imports")]  # fmt: skip
    times["this process, all its work (CPU only)"] = [0.0, time.process_time() - cpu0]
    helper = resource.getrusage(resource.RUSAGE_CHILDREN)  # the helper process, reaped when the fit closed it
    times["helper process, all its work (CPU only)"] = [0.0, helper.ru_utime + helper.ru_stime]
    print(json.dumps(times))


def _one(sweep_dir: Path, serial: bool) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / sweep_dir.name
        shutil.copytree(sweep_dir, work, ignore=shutil.ignore_patterns("checkpoints"))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--child", str(work)] + ["--serial"] * serial, capture_output=True, text=True,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})  # fmt: skip
        wall = time.perf_counter() - w
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"fit step failed:\n{proc.stderr[-3000:]}")
        times = json.loads(proc.stdout.strip().splitlines()[-1])
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        times["total (process start to exit)"] = [wall, cpu]
        return times


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path, help="a finished sweep directory (holds sweep.yaml and its runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serial", action="store_true", help="no helper process: the whole fit step in one process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.sweep_dir, args.serial)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if not (args.sweep_dir / "sweep.yaml").is_file():
        ap.error(f"{args.sweep_dir}: no sweep.yaml (not a sweep directory)")
    runs = [_one(args.sweep_dir, args.serial) for _ in range(args.repeats)]
    phases = list(dict.fromkeys(k for r in runs for k in r))
    mode = "one process (--serial)" if args.serial else "with the helper process"
    print(f"fit step of {args.sweep_dir}, {mode}, median of {args.repeats} fresh processes (os.cpu_count() = {os.cpu_count()})")
    print()
    print("| phase | wall s | CPU s (this process) |")
    print("| --- | --- | --- |")
    for k in phases:
        w = statistics.median(r.get(k, [0.0, 0.0])[0] for r in runs)
        c = statistics.median(r.get(k, [0.0, 0.0])[1] for r in runs)
        label = "**total** (CPU: all processes)" if k.startswith("total") else k
        print(f"| {label} | {'-' if 'CPU only' in k else f'{w:.2f}'} | {c:.2f} |")


if __name__ == "__main__":
    main()
