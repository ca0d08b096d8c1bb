"""Populations in a sweep: which queued runs train together, and the worker that trains them.

Runs that differ only in ``llm.config.POPULATION_KEYS`` (seeds, learning rate, weight decay)
have one ``population_signature``; ``launch_units`` splits each such group into populations
of at most ``max_size`` members, no more than fit the memory of one backend slot
(``llm.memory.population_bytes``), and into at least as many populations as there are slots,
so every slot (a GPU, a CPU core) gets work. A group of one, and a population that would
have one member, is a plain single run.

``population_command`` is the command of the worker that trains one population
(``sweeps.population_worker``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from llm.config import Config, population_signature

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
    cmd = [sys.executable, "-m", "sweeps.population_worker", "--population-fn", population_fn]
    for config, run_dir, name, lock in members:
        cmd += ["--member", str(config), str(run_dir), name, str(lock)]
    return cmd + (["--eval", eval_json] if eval_json else [])
