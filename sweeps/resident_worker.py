"""A long-lived local worker process that runs sweep workers in turn, paying start-up once.

``python -m sweeps.resident_worker --reply-fd FD`` reads one job per line on stdin, a JSON
object ``{"module": "sweeps.worker", "argv": [...], "log": PATH}``, runs
``module.main(argv)`` with stdout and stderr sent to the job's log, and writes the exit
code it returns as a JSON line ``{"rc": N}`` to file descriptor FD. It exits on end of input.

Why: a tiny run spends seconds importing JAX, loading data and compiling; one process that
trains the runs of its slot one after another imports once, keeps the memory-mapped corpus
and JAX's in-process caches, and compiles each program once. Each job is still
``sweeps.worker`` (or ``sweeps.population_worker``) with its own arguments, so a run takes
its own lock, writes its own run directory and result.json, records its own failure and
returns its own exit code, exactly as in a process of its own. A job that kills the process
(a crash, SIGKILL, out of memory) ends only that job: ``ResidentWorker`` reports the signal as
its exit code, and the backend starts a fresh process for the next job.

``ResidentWorker`` is the parent's handle on one such process (``sweeps.backends.LocalBackend``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

# Modules whose ``main(argv) -> int`` may run in a resident worker: the ones the runner launches.
SERVABLE = ("sweeps.worker", "sweeps.population_worker")


def servable(cmd: list[str]) -> tuple[str, list[str]] | None:
    """(module, argv) when ``cmd`` is ``python -m <a SERVABLE module> ...`` of this interpreter, else None."""
    if len(cmd) >= 3 and cmd[0] == sys.executable and cmd[1] == "-m" and cmd[2] in SERVABLE:
        return cmd[2], list(cmd[3:])
    return None


# --------------------------------------------------------------------------- the worker process


def run_job(module: str, argv: list[str], log_path: str) -> int:
    """``module.main(argv)`` with fds 1 and 2 appended to ``log_path``; its exit code.

    An exception that escapes ``main`` is printed to the log and exits 1, as the interpreter
    would. KeyboardInterrupt (Ctrl-C, or SIGTERM through ``rundir.interrupt_on_sigterm``)
    propagates: the backend is stopping this process.
    """
    if module not in SERVABLE:
        raise ValueError(f"module {module!r} is not one a resident worker runs ({', '.join(SERVABLE)})")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        try:
            code = importlib.import_module(module).main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except Exception:
            traceback.print_exc()
            code = 1
        return int(code or 0)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)


def serve(jobs, reply: Callable[[int], None]) -> None:
    """Run each job (a JSON line of ``jobs``) in turn and ``reply`` its exit code."""
    for line in jobs:
        if not line.strip():
            continue
        job = json.loads(line)
        reply(run_job(job["module"], job["argv"], job["log"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.resident_worker", description=__doc__.splitlines()[0])
    p.add_argument("--reply-fd", type=int, required=True, help="file descriptor that receives each job's exit code")
    args = p.parse_args(argv)
    from rundir import interrupt_on_sigterm

    interrupt_on_sigterm()  # stopped while idle: exit quietly like Ctrl-C
    with os.fdopen(args.reply_fd, "w", buffering=1) as out:
        try:
            serve(sys.stdin, lambda rc: print(json.dumps({"rc": rc}), file=out, flush=True))
        except KeyboardInterrupt:
            return 130
    return 0


# --------------------------------------------------------------------------- the parent's handle


def terminate(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM ``proc`` if it still runs (a training job saves a checkpoint and frees its lock),
    SIGKILL it after ``grace_s`` seconds, and reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()



class ResidentWorker:
    """One resident worker process: ``submit`` a job, ``poll`` its exit code, ``stop`` or ``close`` it.

    ``popen_kwargs`` (env, preexec_fn, ...) go to ``subprocess.Popen``; the process's own output
    before its first job goes to that job's log (so an import error shows there).
    """

    def __init__(self, env: dict[str, str], log_path: Path, **popen_kwargs):
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self.env = env
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                # -c, not -m: the sweeps package imports this module, and runpy would warn of a second copy
                [sys.executable, "-c", "import sys; from sweeps.resident_worker import main; sys.exit(main())",
                 "--reply-fd", str(write_fd)],
                env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
                start_new_session=True, **popen_kwargs,
            )  # fmt: skip
        os.close(write_fd)
        self._replies, self._buffer, self.busy = read_fd, b"", False
        self.jobs = 0  # submitted so far

    def alive(self) -> bool:
        return self.proc.poll() is None

    def reply_fd(self) -> int | None:
        """The pipe the job's exit code arrives on (readable once the job ended or the process died), to select on."""
        return self._replies

    def submit(self, module: str, argv: list[str], log_path: Path) -> None:
        """Hand the process one job; it must be idle."""
        assert not self.busy, "a resident worker runs one job at a time"
        self.busy = True
        self.jobs += 1
        line = json.dumps({"module": module, "argv": argv, "log": str(log_path)}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # died since it was last idle: poll reports its exit code
            pass

    def poll(self) -> int | None:
        """The running job's exit code once it has ended, else None. A process that died during
        the job gives its own exit code (negative: the signal that killed it), as a process of
        the job's own would."""
        try:
            self._buffer += os.read(self._replies, 4096)
        except BlockingIOError:
            pass
        if b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self.busy = False
            return int(json.loads(line)["rc"])
        rc = self.proc.poll()
        if rc is None:
            return None
        try:  # the reply may have arrived just before the process ended
            self._buffer += os.read(self._replies, 4096)
        except (BlockingIOError, OSError):
            pass
        if b"\n" in self._buffer:
            return self.poll()
        self.busy = False
        return rc

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM (a running job saves a checkpoint and frees its lock), then SIGKILL."""
        terminate(self.proc, grace_s)
        self._close_pipes()

    def close(self, grace_s: float = 15.0) -> None:
        """End an idle process: end of input, then stop it if it lingers."""
        if self.alive():
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.stop(grace_s)
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self._replies is not None:
            os.close(self._replies)
            self._replies = None
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass


if __name__ == "__main__":
    sys.exit(main())
