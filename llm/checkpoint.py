"""Orbax checkpoints of the train state, restorable by step.

A checkpoint holds the parameters, the optimiser state, the step and the data
position. The data position is the step itself (batch i is a pure function of
(seed, i)), so nothing else is needed to resume exactly.

Sharded: each process writes the shards its devices hold (Orbax, one folder per step on storage
every process sees) and every process must enter ``save`` and ``restore`` (they synchronise).
A checkpoint is not tied to the mesh that wrote it: ``restore`` reads into the shardings of the
targets it is given, so a run saved on 8 devices as FSDP resumes on 4 as data x tensor parallel
when the targets are laid out for the current mesh (llm.sharding.state_shardings).

Asynchronous saves (``asynchronous=True``, the training loop's default, ``train.async_checkpoint``):
``save`` returns once the arrays are captured on the host and the files are written by a background
thread; the next ``save``, ``wait`` and ``close`` wait for that write, and a failure of it is a
CheckpointError naming its own step. The caller may donate the saved state to its next step at once:
orbax copies every array to the host inside ``save`` (all arrays are its "prioritized" transfers when
no transfer-byte limit is set), and on CPU, where that host copy is a view of the device buffer, XLA
does not donate a buffer a view still references (it computes into a fresh one instead). Had either
not held, the write would read a deleted array and fail loudly, never write later values
(tests/test_checkpoint_async.py saves, donates, restores and compares). A device-side copy before
the save would not depend on either, but it costs a copy of the state in device memory for as long
as the write runs and more time blocked (benchmarks/checkpoint_save.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# A step folder ("8") or what orbax leaves while writing one ("8.orbax-checkpoint-tmp-1712...").
_STEP_ENTRY = re.compile(r"^(\d+)(\..*)?$")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read or was never completed; never silently restart."""


class Checkpoints:
    """Orbax checkpoints of one run, keeping the last ``keep``; a context manager that closes them."""

    def __init__(self, directory: Path, keep: int | None, *, asynchronous: bool = False):
        self.directory = Path(directory).absolute()
        self.asynchronous = asynchronous
        self._writing: int | None = None  # step of the save whose background write may not have finished
        with _quiet_orbax():  # it reads every step's metadata; an unreadable one is restore's error
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            )

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """Step of the newest checkpoint, or None; with an asynchronous save in flight, its step
        (complete once ``wait`` returns without error; a fresh Checkpoints sees complete ones only)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint kept, ascending."""
        with _quiet_orbax():
            return sorted(int(s) for s in self._manager.all_steps())

    def resume_step(self) -> int:
        """Step to resume from: the newest complete checkpoint, 0 if there is none.

        Orbax skips a checkpoint that lacks its completion marker (on a local disk: a folder
        still named ``<step>.orbax-checkpoint-tmp-*``). Skipping a newer one than we resume
        from would silently restart the run when none is complete, so that is a CheckpointError
        naming the folder; with an older complete one (a kill while saving) we resume from it,
        losing at most checkpoint_every steps, and say so on stderr.
        """
        with _quiet_orbax():  # an unreadable metadata file is logged here, and reported by restore
            latest = self.latest_step() or 0
            complete = set(self._manager.all_steps())
        incomplete = sorted(
            (int(match.group(1)), entry)
            for entry in (self.directory.iterdir() if self.directory.is_dir() else ())
            if (match := _STEP_ENTRY.match(entry.name)) and entry.is_dir() and int(match.group(1)) not in complete
        )
        newer = [entry for step, entry in incomplete if step > latest]
        if newer and not latest:
            raise CheckpointError(
                f"checkpoint {newer[-1]} was never completed (killed while saving?) and no complete one exists; "
                "delete it to start the run from scratch"
            )
        if newer:  # a kill during a save: the previous checkpoint is at most checkpoint_every steps behind
            print(f"warning: checkpoint {newer[-1]} was never completed (killed while saving?); "
                  f"resuming from step {latest}", file=sys.stderr)
        return latest

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write ``state`` (a pytree of arrays) and JSON ``meta`` for ``step``.

        Synchronous: returns when the checkpoint is complete. Asynchronous: waits for the previous
        save's write (its failure raised first, naming its step), captures ``state`` on the host and
        returns while the files are written; ``state`` may be donated right after.
        On failure (a full disk) orbax's half-written folder is removed, so the next attempt
        resumes from the previous checkpoint, and CheckpointError names the step's folder.
        """
        self.wait()
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            )
        except Exception as err:
            raise self._write_failed(step, err) from err
        self._writing = step
        if not self.asynchronous:
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight, if any, is complete on disk.

        A failed background write is a CheckpointError naming its step's folder (raised once);
        its half-written folder is removed and the checkpoints before it are kept, so a rerun
        resumes from the previous one.
        """
        step, self._writing = self._writing, None
        if step is None:
            return
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._write_failed(step, err) from err

    def _write_failed(self, step: int, err: Exception) -> CheckpointError:
        """The error of a failed write of ``step``, its half-written folder removed."""
        for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)
        return CheckpointError(f"cannot write checkpoint {self.directory / str(step)}: {_first_line(err)}")

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the state shaped like ``like`` and its meta; CheckpointError if unreadable.

        ``like`` holds arrays or ``jax.ShapeDtypeStruct`` s (no state need be built first); each
        leaf's shape, dtype and sharding is what is restored, whatever mesh saved the checkpoint.
        """
        abstract = jax.tree.map(_restore_target, like)
        _drop_orbax_read_echoes()
        try:
            with _quiet_orbax():
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
                )
        except Exception as err:  # orbax raises many types; all mean "cannot read"
            path = self.directory / str(step)
            raise CheckpointError(f"checkpoint {path} exists but cannot be read ({_first_line(err)})") from err
        return restored["state"], dict(restored["meta"])

    def saved_tree(self, step: int) -> dict[str, Any]:
        """The nested dict of the state saved at ``step`` (orbax's metadata: keys as saved, array
        metadata as leaves), read without reading any array; CheckpointError if unreadable."""
        try:  # the item's own handler: the manager knows it only after a save or restore in this process
            with _quiet_orbax():
                tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree
        except Exception as err:
            raise CheckpointError(f"checkpoint {self.directory / str(step)} exists but cannot be read ({_first_line(err)})") from err
        return dict(tree)

    def close(self) -> None:
        """Wait for the save in flight (CheckpointError if its write failed), then release orbax."""
        try:
            self.wait()
        finally:
            self._manager.close()


def _restore_target(leaf: Any) -> jax.ShapeDtypeStruct:
    """What ``restore`` reads a leaf into: its shape, dtype and sharding on the current devices.

    Built here rather than by orbax.utils.to_shape_dtype_struct, which in some orbax versions
    checks the sharding against the topology that saved the checkpoint (8 devices) and refuses
    the current one (4).
    """
    return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=getattr(leaf, "sharding", None))


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs (through absl) every unreadable file it meets; our one CheckpointError says it."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


_echoes_dropped = False


def _drop_orbax_read_echoes() -> None:
    """Silence the echoes of one failed restore, and nothing else.

    Orbax reads arrays concurrently inside ``asyncio.run``; when one read fails the loop
    closes while the others are in flight, and each of those later reports one of
    "Event loop is closed" (an unraisable exception from tensorstore's callback thread),
    "... exception was never retrieved" (asyncio's logger, when the future is collected)
    or "coroutine ... was never awaited" (a RuntimeWarning, when a read that never started
    is collected), long after our CheckpointError has said what is wrong. All can fire at
    any time until the process exits, so the filters stay installed (once).
    """
    global _echoes_dropped
    if _echoes_dropped:
        return
    _echoes_dropped = True
    previous = sys.unraisablehook

    def unraisable(info):
        if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"):
            previous(info)

    sys.unraisablehook = unraisable
    warnings.filterwarnings(
        "ignore", message=r"coroutine 'Store\._get_array_metadatas' was never awaited", category=RuntimeWarning
    )
    logging.getLogger("asyncio").addFilter(  # "Future exception was never retrieved\nfuture: <...>"
        lambda record: not str(record.msg).partition("\n")[0].endswith("exception was never retrieved")
    )
