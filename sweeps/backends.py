"""Where sweep runs execute: local subprocesses (default) or Ray tasks (clusters).

Both run the same command, ``python -m sweeps.worker ...``, so a run behaves the same
everywhere: it takes its own lock, trains, and records its own failure. A backend only
starts commands, reports exit codes, and stops commands on interrupt.

Local: K processes at a time. With several GPUs each run gets its own
``gpus_per_run`` devices through CUDA_VISIBLE_DEVICES (the run sees exactly those, and its
mesh spans them) and K = n_gpus / gpus_per_run. On a TPU host (found from /dev/accel*,
/dev/vfio or TPU_VISIBLE_CHIPS, without importing JAX) one run at a time gets all of the
host's chips: a TPU chip serves one process. On CPU each run is pinned to its share of the
cores (sched_setaffinity, which XLA's thread pool follows) and K defaults to one run per
core, at most 4. Children are in their own session and die with the sweep
(PR_SET_PDEATHSIG on Linux), so a killed sweep leaves no orphan training. By default each slot keeps one
resident worker process (``sweeps.resident_worker``) that runs the slot's worker commands
one after another, so imports, the corpus and compiled programs are paid once per slot
instead of once per run; exit codes, logs and failures stay per run, and a run that kills
its process costs only a fresh process for the next one (``resident=False``: a process per run).

Ray: each run is a Ray task with its resource request (``num_cpus``, and ``num_gpus`` or
``TPU`` chips); Ray sets CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS for the task. Run
directories, logs and locks are on the sweep directory, which every node must see (shared
storage). A task whose Ray worker process or node died reports ``WORKER_LOST`` (the runner
retries the run from its checkpoint); a run that fails on its own reports its exit code 1.
``ray`` is an optional extra, imported lazily.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llm.config import ConfigError
from sweeps.lock import RAY_NODE_ENV, LOST_AFTER_S
from sweeps.resident_worker import ResidentWorker, servable, terminate


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``; [] on CPU."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def usable_cores() -> list[int]:
    """CPU cores this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def tpu_chips(dev: Path = Path("/dev")) -> list[str]:
    """TPU chips of this host, found without importing JAX; [] elsewhere.

    TPU_VISIBLE_CHIPS when set (Ray and multi-process launches set it), else the chips'
    device files under ``dev``: accel<i> (TPU v2-v5) or vfio/<i> (v6e and later).
    """
    env = os.environ.get("TPU_VISIBLE_CHIPS")
    if env is not None:
        return [c.strip() for c in env.split(",") if c.strip()]
    accel = [p.name[len("accel") :] for p in dev.glob("accel*")]
    chips = [c for c in accel if c.isdigit()] or [p.name for p in (dev / "vfio").glob("*") if p.name.isdigit()]
    return sorted(chips, key=int)


def default_parallel(gpus_per_run: int = 1) -> int:
    """Runs at a time that fit this machine: one per GPU group; one on a TPU host; on CPU one
    per core, at most 4.

    Small CPU models scale poorly over threads (one single-threaded run per core trained
    about 1.8x the tokens/s of one run on two cores in our measurements), while past
    four runs the memory of each JAX process starts to matter more than the threads.
    """
    gpus = visible_gpus()
    if gpus:
        return max(1, len(gpus) // gpus_per_run)
    if tpu_chips():
        return 1
    return max(1, min(len(usable_cores()), 4))


def _child_setup(cores: list[int] | None) -> None:
    """Runs in the child before exec: pin to cores, die with the parent (Linux)."""
    if cores:
        try:
            os.sched_setaffinity(0, cores)
        except (AttributeError, OSError):
            pass
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def thread_env(n_threads: int) -> dict[str, str]:
    """Thread settings so K runs share the cores instead of oversubscribing them."""
    env = {k: str(n_threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if n_threads == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
    return env


class LocalBackend:
    """K subprocesses at a time on this machine, each pinned to its own devices or cores."""

    name = "local"
    # Jobs after which a resident worker is replaced by a fresh one: JAX keeps every program a
    # process compiled, so a long sweep of many shapes would otherwise grow one process without end.
    resident_max_jobs = 32

    def __init__(self, parallel: int | None = None, gpus_per_run: int = 1, resident: bool = True):
        if gpus_per_run < 1:
            raise ConfigError(f"--gpus-per-run must be >= 1, got {gpus_per_run}")
        gpus = visible_gpus()
        self.parallel = parallel or default_parallel(gpus_per_run)
        if self.parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {self.parallel}")
        self.slots: list[dict[str, Any]] = []
        if gpus:
            groups = [gpus[i * gpus_per_run : (i + 1) * gpus_per_run] for i in range(len(gpus) // gpus_per_run)]
            if not groups:
                raise ConfigError(f"--gpus-per-run={gpus_per_run} but only {len(gpus)} GPU(s) are visible")
            shares = -(-self.parallel // len(groups))  # runs sharing one device group
            for i in range(self.parallel):
                env = {"CUDA_VISIBLE_DEVICES": ",".join(groups[i % len(groups)])}
                if shares > 1:  # JAX preallocates 75% of a GPU: split it between the runs instead
                    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / shares:.2f}"
                self.slots.append({"env": env, "cores": None})
        elif chips := tpu_chips():
            if self.parallel > 1 or gpus_per_run not in (1, len(chips)):  # 1: the default
                asked = f"--parallel {self.parallel}" if self.parallel > 1 else f"--gpus-per-run {gpus_per_run}"
                raise ConfigError(
                    f"{asked} on a TPU host: its {len(chips)} chip(s) serve one process, so runs take turns "
                    "using all of them; for runs side by side use --backend ray (1, 2 or 4 chips per run)"
                )
            self.slots.append({"env": {}, "cores": None})  # all chips, all cores: no CPU thread limits
        else:
            cores = usable_cores()
            per_run = max(1, len(cores) // self.parallel)
            for i in range(self.parallel):
                mine = [cores[(i * per_run + j) % len(cores)] for j in range(per_run)]
                self.slots.append({"env": thread_env(per_run), "cores": mine})
        self.busy: dict[int, subprocess.Popen | ResidentWorker] = {}
        self.resident = resident
        self.residents: dict[int, ResidentWorker] = {}  # slot -> its resident worker, idle or busy

    def free(self) -> int:
        """How many more runs can start now."""
        return self.parallel - len(self.busy)

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        """Start ``cmd`` in a free slot; returns a handle for poll/stop. A worker command goes to
        the slot's resident worker (started, or restarted if it died or the env changed)."""
        slot = next(i for i in range(self.parallel) if i not in self.busy)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        job = servable(cmd) if self.resident else None
        if job is not None:
            self.busy[slot] = self._resident(slot, env, log_path)
            self.busy[slot].submit(*job, log_path)
            return slot
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                env={**os.environ, **env, **self.slots[slot]["env"]},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the sweep, which stops its runs cleanly
                preexec_fn=lambda: _child_setup(self.slots[slot]["cores"]),
            )
        self.busy[slot] = proc
        return slot

    def _resident(self, slot: int, env: dict[str, str], log_path: Path) -> ResidentWorker:
        """The slot's idle resident worker for ``env``, started anew when there is none alive."""
        full_env = {**os.environ, **env, **self.slots[slot]["env"]}
        worker = self.residents.get(slot)
        if worker is not None and (not worker.alive() or worker.env != full_env or worker.jobs >= self.resident_max_jobs):
            worker.close()
            worker = None
        if worker is None:
            cores = self.slots[slot]["cores"]
            worker = ResidentWorker(full_env, log_path, preexec_fn=lambda: _child_setup(cores))
            self.residents[slot] = worker
        return worker

    def poll(self, handle: int) -> int | None:
        """Exit code of a finished run (negative: killed by that signal), or None while running."""
        rc = self.busy[handle].poll()
        if rc is not None:
            del self.busy[handle]
        return rc

    def wait(self, timeout_s: float) -> None:
        """Return once a resident worker's job has ended (or its process died), or after ``timeout_s``:
        the runner refills a slot as soon as it frees instead of at its next poll. A run in a process
        of its own is noticed at the timeout."""
        fds = [fd for w in self.busy.values() if isinstance(w, ResidentWorker) and (fd := w.reply_fd()) is not None]
        if fds:
            select.select(fds, [], [], timeout_s)
        else:
            time.sleep(timeout_s)

    def stop(self, handle: int, grace_s: float = 15.0) -> None:
        """SIGTERM (the worker saves nothing half-done and frees its lock), then SIGKILL."""
        proc = self.busy.pop(handle, None)
        if isinstance(proc, ResidentWorker):
            self.residents.pop(handle, None)
            proc.stop(grace_s)
            return
        if proc is not None:
            terminate(proc, grace_s)

    def owner_lost(self, owner: dict) -> bool:
        """Never: a lock taken on this machine is checked by its pid (sweeps.lock)."""
        return False

    def close(self) -> None:
        for handle in list(self.busy):
            self.stop(handle)
        for worker in self.residents.values():  # idle ones: end of input
            worker.close()
        self.residents.clear()


WORKER_LOST = 1000  # poll's answer for a run whose Ray worker process or node died (no exit code; > 255)
DEFAULT_MAX_RETRIES = 3  # times the runner starts a run again after its worker was lost


def _ray_run_command(cmd: list[str], env: dict[str, str], log_path: str) -> int:
    """Body of the Ray task: run the worker command on whichever node Ray chose.

    The log says which node ran each attempt; the worker's lock records the node too
    (RAY_NODE_ENV), so a sweep can tell a lock left by a dead node.
    """
    import ray

    node = ray.get_runtime_context().get_node_id()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"[chinchax] ray node {node} on {socket.gethostname()}, ray worker pid {os.getpid()}\n".encode())
        log.flush()
        # preexec: the run dies with the Ray worker when the task is cancelled or the worker is killed.
        return subprocess.run(
            cmd, env={**os.environ, **env, RAY_NODE_ENV: node}, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: _child_setup(None),
        ).returncode


def ray_resources(cluster: dict[str, float], nodes: list[dict[str, float]], accelerators_per_run: int,
                  cpus_per_run: float) -> dict[str, Any]:  # fmt: skip
    """Ray task options of one run: ``num_cpus``, and ``num_gpus`` or ``resources={"TPU": k}``.

    ``cluster``: ``ray.cluster_resources()``; ``nodes``: each live node's resources. On a
    cluster with GPUs a run asks for ``accelerators_per_run`` GPUs, with TPUs for that many
    chips, else for CPUs only. A request no node can meet is an error now, not a run queued
    forever.
    """
    if cpus_per_run <= 0:
        raise ConfigError(f"--cpus-per-run must be > 0, got {cpus_per_run}")
    options: dict[str, Any] = {"num_cpus": cpus_per_run}
    kind = next((k for k in ("GPU", "TPU") if cluster.get(k, 0) > 0), None)
    if kind == "GPU":
        options["num_gpus"] = float(accelerators_per_run)
    elif kind == "TPU":
        options["resources"] = {"TPU": float(accelerators_per_run)}
    need = {"CPU": cpus_per_run, **({kind: float(accelerators_per_run)} if kind else {})}
    if nodes and not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in nodes):
        largest = max(nodes, key=lambda node: tuple(node.get(k, 0) for k in need))
        have = ", ".join(f"{largest.get(k, 0):g} {k}" for k in need)
        raise ConfigError(
            "no node of the Ray cluster can run a run: each asks for "
            + ", ".join(f"{v:g} {k}" for k, v in need.items())
            + f" (--cpus-per-run, --gpus-per-run); the largest node has {have}"
        )
    return options


# Ray's switch for a single-machine instance (its default on macOS and Windows): the node
# address is the loopback one, so every Ray service binds 127.0.0.1 instead of the machine's
# network address. Read when ray is imported. (ray.init(_node_ip_address="127.0.0.1") does
# not do it: Ray replaces a loopback node address by the network one.)
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ray_local_only() -> None:
    """Make a local Ray instance listen on the loopback interface only (unless the user set the switch)."""
    if os.environ.setdefault(RAY_LOCAL_ONLY_ENV, "0") != "0":
        return
    constants = sys.modules.get("ray._private.ray_constants")  # ray imported already: the value it read
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """Arguments of ``ray.init``: join the cluster at ``address``, else start a local instance
    (with ``ray_local_only``: by default Ray would bind the machine's network address, so anyone
    on the network could reach a laptop's sweep)."""
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs["dashboard_host"] = "127.0.0.1"
    return kwargs


class RayBackend:
    """Each run a Ray task with its resource request; Ray packs them onto the cluster's nodes."""

    name = "ray"

    def __init__(self, parallel: int | None = None, cpus_per_run: float = 1.0, gpus_per_run: int = 1,
                 address: str | None = None):  # fmt: skip
        address = address or os.environ.get("RAY_ADDRESS")
        try:
            import ray
        except ImportError:
            raise ConfigError("--backend ray needs Ray: pip install 'chinchax[ray]' (or pip install ray)") from None
        self.ray = ray
        if not ray.is_initialized():
            if not address:
                ray_local_only()
            ray.init(**ray_init_kwargs(address))
        cluster = ray.cluster_resources()
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")] if hasattr(ray, "nodes") else []
        options = ray_resources(cluster, nodes, gpus_per_run, cpus_per_run)
        # On CPU nodes a run's threads match its CPUs, as the local backend's do.
        on_cpu = "num_gpus" not in options and "resources" not in options
        self.env = thread_env(max(1, int(cpus_per_run))) if on_cpu else {}
        self.parallel = parallel or 1_000_000  # Ray queues tasks by their resource request
        # Ray retries nothing itself: the runner decides (a run's own failure is final, a lost worker is retried).
        self.task = ray.remote(_ray_run_command).options(max_retries=0, **options)
        self.busy: dict[int, Any] = {}
        self.lost: dict[int, str] = {}  # handle -> why its worker was lost
        self._next = 0

    def free(self) -> int:
        return self.parallel - len(self.busy)

    def start(self, cmd: list[str], env: dict[str, str], log_path: Path) -> int:
        self._next += 1
        self.busy[self._next] = self.task.remote(cmd, {**env, **self.env}, str(log_path))
        return self._next

    def wait(self, timeout_s: float) -> None:
        """Return once a run's task has ended, or after ``timeout_s``."""
        if self.busy:
            self.ray.wait(list(self.busy.values()), num_returns=1, timeout=timeout_s)
        else:
            time.sleep(timeout_s)

    def poll(self, handle: int) -> int | None:
        """The worker's exit code; WORKER_LOST if its Ray worker or node died (``lost[handle]`` says how)."""
        ref = self.busy[handle]
        ready, _ = self.ray.wait([ref], timeout=0)
        if not ready:
            return None
        del self.busy[handle]
        try:
            return int(self.ray.get(ref))
        except self.ray.exceptions.RayTaskError as err:  # the task body raised: ours to fix, not a lost worker
            self.lost[handle] = f"{type(err.cause).__name__}: {err.cause}"
            return 1
        except self.ray.exceptions.RayError as err:  # worker crashed, node died, out of memory, ...
            self.lost[handle] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            return WORKER_LOST

    def owner_lost(self, owner: dict) -> bool:
        """Whether a lock's owner ran on a Ray node that Ray declared dead and its heartbeat has stopped."""
        node = owner.get("ray_node")
        if not node or owner.get("age_s", 0.0) <= LOST_AFTER_S:
            return False
        return any(n.get("NodeID") == node and not n.get("Alive") for n in self.ray.nodes())

    def stop(self, handle: int, grace_s: float = 15.0) -> None:
        ref = self.busy.pop(handle, None)
        if ref is not None:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        for handle in list(self.busy):
            self.stop(handle)


def make_backend(name: str, parallel: int | None = None, gpus_per_run: int = 1, *, address: str | None = None,
                 cpus_per_run: float = 1.0, resident: bool = True) -> LocalBackend | RayBackend:  # fmt: skip
    """Backend by name: 'local' or 'ray' (``address``: the Ray cluster to join; ``cpus_per_run``: Ray's request;
    ``resident``: LocalBackend's resident workers)."""
    if name == "local":
        return LocalBackend(parallel, gpus_per_run, resident)
    if name == "ray":
        return RayBackend(parallel, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, address=address)
    raise ConfigError(f"--backend {name!r} is not known; choose local or ray")


def worker_command(config: Path, run_dir: Path, run_name: str, lock: Path, train_fn: str,
                   eval_json: str | None = None, branch_from: tuple[Path, int] | None = None,
                   branch_steps: tuple[int, ...] = ()) -> list[str]:  # fmt: skip
    """The command that trains one run (``python -m sweeps.worker ...``); with ``eval_json`` (the
    spec's eval section as JSON) it also evaluates the finished run. ``branch_from`` (main run dir,
    step) and ``branch_steps`` are the wsd cooldown-branch arguments of ``llm.training.train``."""
    return [
        sys.executable, "-m", "sweeps.worker", "--config", str(config), "--run-dir", str(run_dir),
        "--run-name", run_name, "--lock", str(lock), "--train-fn", train_fn,
    ] + (["--eval", eval_json] if eval_json else []) + (
        ["--branch-from", str(branch_from[0]), "--branch-step", str(branch_from[1])] if branch_from else []
    ) + (["--branch-steps", ",".join(str(s) for s in branch_steps)] if branch_steps else [])
