"""Multi-host start-up: ``jax.distributed.initialize()`` when the environment says a run spans processes.

One run over several hosts is one program started once per host (JAX's multi-controller model).
Every process must call ``jax.distributed.initialize()`` before anything touches a device; this
module decides from the environment whether to, and with what, so ``chinchax train`` works
unchanged on a laptop, under ``srun`` and on a TPU pod slice. What each process may write is
``is_main_process``'s job: only process 0 writes the run's files, but every process runs every
step, evaluation and checkpoint save (they are collectives: one process skipping one deadlocks
the others).

The environment, in order of precedence:

- ``CHINCHAX_DISTRIBUTED=0``: never initialise (one process, whatever else is set);
  ``CHINCHAX_DISTRIBUTED=1``: initialise and let JAX detect the cluster (TPU pod slices, Slurm,
  Open MPI, ...).
- ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``: explicit, all three or none. JAX itself reads only the address (and
  ``JAX_LOCAL_DEVICE_IDS``); the other two are this project's.
- Slurm (``chinchax train`` only): a job step of more than one task (``srun``), found from
  ``SLURM_STEP_NUM_TASKS``, or ``SLURM_NTASKS`` when the step's count is absent. A batch script
  itself (one process, though the job has several tasks) is not a multi-process step.
- TPU pods (``chinchax train`` only): ``TPU_WORKER_HOSTNAMES`` (or ``TPU_PROCESS_ADDRESSES``)
  naming more than one host, or ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice).

A sweep worker is one process per run, started by the sweep runner inside whatever allocation
the runner lives in, so it trusts only the explicit variables (``cluster=False``): a Slurm or
TPU-pod environment inherited from a Ray node must not make every worker wait for peers that
never come.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

from llm.typed_yaml import ConfigError

EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How to call ``jax.distributed.initialize``: ``kwargs`` for it (empty: JAX detects the
    cluster) and ``source``, what in the environment asked for it (for messages)."""

    kwargs: dict
    source: str


def launch_from_env(environ: Mapping[str, str], *, cluster: bool = True) -> Launch | None:
    """The multi-process launch the environment asks for, or None for one process (a pure function).

    ``cluster=False`` ignores Slurm and TPU-pod variables (see the module docstring). A partial or
    malformed set of explicit variables is a ConfigError naming them.
    """
    switch = environ.get("CHINCHAX_DISTRIBUTED", "").strip()
    if switch not in ("", "0", "1"):
        raise ConfigError(f"CHINCHAX_DISTRIBUTED={switch!r}: expected 0 (one process) or 1 (initialise jax.distributed)")
    if switch == "0":
        return None
    explicit = _explicit_launch(environ)
    if explicit is not None or switch == "1":
        return explicit or Launch({}, "CHINCHAX_DISTRIBUTED=1")
    if not cluster:
        return None
    tasks = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS", ""))
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and tasks.isdigit() and int(tasks) > 1:
        return Launch({}, f"Slurm job step of {tasks} tasks")
    hosts = [h for h in (environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or "").split(",") if h.strip()]
    if len(hosts) > 1:
        return Launch({}, f"TPU slice of {len(hosts)} hosts")
    if environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return Launch({}, "TPU multislice (MEGASCALE_COORDINATOR_ADDRESS)")
    return None


def _explicit_launch(environ: Mapping[str, str]) -> Launch | None:
    given = [name for name in EXPLICIT_VARS if environ.get(name)]
    if not given:
        return None
    missing = [name for name in EXPLICIT_VARS if name not in given]
    if missing:
        raise ConfigError(f"{', '.join(given)} set but {', '.join(missing)} not: a multi-process run needs all of "
                          f"{', '.join(EXPLICIT_VARS)}")  # fmt: skip
    address, count, index = (environ[name].strip() for name in EXPLICIT_VARS)
    if not (count.isdigit() and int(count) >= 1 and index.isdigit() and int(index) < int(count)):
        raise ConfigError(f"JAX_NUM_PROCESSES={count!r} and JAX_PROCESS_ID={index!r}: expected "
                          "integers with 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES")  # fmt: skip
    if ":" not in address:
        raise ConfigError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port of process 0")
    kwargs = {"coordinator_address": address, "num_processes": int(count), "process_id": int(index)}
    return Launch(kwargs, f"JAX_COORDINATOR_ADDRESS={address}")


def initialize(environ: Mapping[str, str] | None = None, *, cluster: bool = True) -> int:
    """Start ``jax.distributed`` if the environment asks (``launch_from_env``); returns this
    process's index (0 when there is one process). Call it once, before anything touches a device;
    calling it again is harmless."""
    launch = launch_from_env(os.environ if environ is None else environ, cluster=cluster)
    if launch is None:
        return 0
    import jax

    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**launch.kwargs)
        except (RuntimeError, ValueError) as err:
            raise ConfigError(f"cannot start jax.distributed ({launch.source}): {err}") from err
    return jax.process_index()


def is_main_process() -> bool:
    """Whether this process writes the run's files: process 0 (always, with one process)."""
    import jax

    return jax.process_index() == 0
