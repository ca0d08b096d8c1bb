"""A second process for the fit step's independent work, so that a fit uses two cores.

The fits and figures are CPU-bound Python, NumPy and matplotlib; threads would share one
interpreter lock, so work that does not depend on the rest (the Kaplan laws with their
bootstrap, half the figures) goes to one helper process, which runs the functions it is sent
in order. It is a fresh interpreter (``python -c``) rather than a multiprocessing worker:
"fork" can deadlock in the process ``chinchax sweep run`` fits in (JAX's threads are loaded
there), and "spawn" re-runs the caller's main script, which breaks a user's script that calls
``fit_path`` without an ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Iterator

_CHILD = "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); from analysis.helper import serve; serve(*map(int, sys.argv[2:]))"


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the OS says, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def serve(read_fd: int, write_fd: int) -> None:
    """The helper's loop: run each (function, args, kwargs) received, send back ("ok", result, "")
    or ("error", exception, traceback); return when the parent closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops this process
    jobs, results = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    while True:
        try:
            fn, args, kwargs = jobs.recv()
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args, **kwargs), "")
        except Exception as err:  # the parent raises it
            reply = ("error", err, traceback.format_exc())
        try:
            results.send(reply)
        except BrokenPipeError:  # the parent is gone
            return


class Helper:
    """One helper process; ``submit`` returns a concurrent.futures.Future, results come in order."""

    def __init__(self) -> None:
        job_r, self._job_w = os.pipe()
        self._result_r, result_w = os.pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps([p for p in sys.path if p]), str(job_r), str(result_w)],
            stdin=subprocess.DEVNULL, pass_fds=(job_r, result_w),
        )  # fmt: skip
        os.close(job_r)
        os.close(result_w)
        self._jobs = Connection(self._job_w, readable=False)
        self._results = Connection(self._result_r, writable=False)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # one thread sends each job and waits for its result, so this process never blocks on the pipes
        self._thread = threading.Thread(target=self._run, name="analysis-helper", daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args, kwargs = item
            try:
                self._jobs.send((fn, args, kwargs))
                status, value, child_tb = self._results.recv()
            except (EOFError, OSError) as err:
                future.set_exception(RuntimeError(f"the fit's helper process stopped ({err!r}); fit_path(parallel=False) "
                                                  "fits in one process"))  # fmt: skip
                continue
            if status == "ok":
                future.set_result(value)
            else:
                value.add_note(f"(raised in the fit's helper process)\n{child_tb}")
                future.set_exception(value)

    def close(self, failed: bool = False) -> None:
        """Finish the submitted work and stop the helper; after a failure, stop it at once."""
        if failed:
            self._proc.kill()
        self._queue.put(None)
        self._thread.join()
        self._jobs.close()  # the helper sees the end of its input and returns
        self._results.close()
        self._proc.wait()


def _warm_up() -> None:
    import analysis.figures  # noqa: F401  (matplotlib's import, about a second, while the parent fits)


@contextlib.contextmanager
def helper_process(wanted: bool = True) -> Iterator[Helper | None]:
    """A helper process, already importing the analysis, closed on exit (at once if the block
    raised); None if not ``wanted``, on one core, where pipes cannot be passed to a child, or
    with $CHINCHAX_FIT_HELPER=0 (when other processes fill the cores already, e.g. a test session)."""
    if not wanted or usable_cores() < 2 or os.name != "posix" or os.environ.get("CHINCHAX_FIT_HELPER") == "0":
        yield None
        return
    helper = Helper()
    helper.submit(_warm_up)
    try:
        yield helper
    except BaseException:
        helper.close(failed=True)
        raise
    helper.close()
