"""Populations in a sweep: which queued runs train together, and the worker that trains them.

Runs that differ only in ``llm.config.POPULATION_KEYS`` (seeds, learning rate, weight decay)
have one ``population_signature``; ``launch_units`` splits each such group into populations
of at most ``max_size`` members, no more than fit the memory of one backend slot
(``llm.memory.population_bytes``), and into at least as many populations as there are slots,
so every slot (a GPU, a CPU core) gets work. A group of one, and a population that would
have one member, is a plain single run.

``python -m sweeps.populations --member CONFIG RUN_DIR NAME LOCK [--member ...] [--eval JSON]``
trains one population in this process (``llm.population.train_population``): it takes each
member's lock (a member locked elsewhere is left to that launch), trains, evaluates what
finished (with ``--eval``), and records a failure for every member that has no result.
Exit codes: 0 every member is done, 1 some member failed, 75 no member's lock was free.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from llm.config import Config, population_signature
from rundir import interrupt_on_sigterm
from sweeps.lock import LockHeld, RunLock
from sweeps.run_result import EXIT_LOCKED, read_result, write_failure

MODES = ("auto", "off")
DEFAULT_MAX_SIZE = 16
DEFAULT_POPULATION_FN = "llm.population:train_population"
# An estimate is a floor (llm.memory): leave the rest of the slot for what it leaves out.
MEMORY_HEADROOM = 0.5


def launch_units(
    runs: Sequence[tuple[str, Config]], *, max_size: int, slots: int, fits: Callable[[Config], int] | None = None
) -> list[list[str]]:
    """Split runs (name, config), in spec order, into launch units: populations and single runs.

    Runs with one ``population_signature`` form a group; a group of n is cut into
    k = max(ceil(n / cap), min(slots, n // 2)) populations of near-equal size, with
    cap = min(max_size, fits(config)) (``fits``: how many members the memory of a slot holds;
    None: no limit). A unit of one member is a single run. Units come in the order of
    their first run.
    """
    groups: dict[str, list[tuple[str, Config]]] = {}
    for name, cfg in runs:
        groups.setdefault(population_signature(cfg), []).append((name, cfg))
    units: list[list[str]] = []
    for group in groups.values():
        cap = max(1, min(max_size, fits(group[0][1]) if fits is not None else max_size))
        n = len(group)
        k = max(math.ceil(n / cap), min(max(slots, 1), n // 2), 1)
        sizes = [n // k + (i < n % k) for i in range(k)]
        start = 0
        for size in sizes:
            units.append([name for name, _ in group[start : start + size]])
            start += size
    order = {name: i for i, (name, _) in enumerate(runs)}
    return sorted(units, key=lambda unit: order[unit[0]])


def memory_fits(parallel: int, gpus_per_run: int = 1) -> Callable[[Config], int]:
    """``fits`` for ``launch_units``: members of a config one backend slot holds, by the estimate.

    With GPUs (vmapped populations) the slot is its GPUs' memory times the share JAX takes
    (0.75, or 0.9 split between runs sharing a GPU; sweeps.backends); without, the host's
    RAM split between ``parallel`` slots (members in turn). Found without importing JAX, so
    the sweep process never claims a GPU. Half of it is left for what the estimate leaves out.
    """
    from llm.memory import population_bytes

    gpus = _gpu_memory_bytes()
    if gpus:
        groups = max(1, len(gpus) // gpus_per_run)
        shares = math.ceil(parallel / groups)
        slot, mode = min(gpus) * gpus_per_run * (0.75 if shares == 1 else 0.9 / shares), "vmap"
    else:
        slot, mode = _host_bytes() / max(1, parallel), "loop"

    def fits(cfg: Config) -> int:
        budget = slot * MEMORY_HEADROOM
        size = 1
        while size < 4096 and population_bytes(cfg, size + 1, mode) <= budget:
            size += 1
        return size

    return fits


def _gpu_memory_bytes() -> list[int]:
    """Total memory of each visible GPU in bytes (nvidia-smi); [] without GPUs."""
    from sweeps.backends import visible_gpus

    gpus = visible_gpus()
    if not gpus or shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout  # fmt: skip
        mib = {i.strip(): int(m) for i, m in (line.split(",") for line in out.splitlines() if "," in line)}
    except (OSError, subprocess.SubprocessError, ValueError):
        return []
    return [mib[g] * 2**20 for g in gpus if g in mib]


def _host_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30  # unknown: assume a small laptop


def population_command(members: Sequence[tuple[Path, Path, str, Path]], population_fn: str,
                       eval_json: str | None = None) -> list[str]:  # fmt: skip
    """The command that trains one population: ``members`` are (config, run dir, run name, lock)."""
    cmd = [sys.executable, "-m", "sweeps.populations", "--population-fn", population_fn]
    for config, run_dir, name, lock in members:
        cmd += ["--member", str(config), str(run_dir), name, str(lock)]
    return cmd + (["--eval", eval_json] if eval_json else [])


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
                print(f"sweeps.populations: {held}; not starting {name}", file=sys.stderr)
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
    p = argparse.ArgumentParser(prog="python -m sweeps.populations", description=__doc__.splitlines()[0])
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
