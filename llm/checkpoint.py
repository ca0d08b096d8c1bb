"""Orbax checkpoints of the train state, restorable by step.

A checkpoint holds the parameters, the optimiser state, the step and the data
position. The data position is the step itself (batch i is a pure function of
(seed, i)), so nothing else is needed to resume exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be read; never silently restart from scratch."""


class Checkpoints:
    """Save every ``every`` steps and at the end, keep the last ``keep``."""

    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Write ``state`` (a pytree of arrays) and JSON ``meta`` for ``step``; blocks until done."""
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the state shaped like ``like`` and its meta; CheckpointError if unreadable."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
            )
        except Exception as err:  # orbax raises many types; all mean "cannot read"
            path = self.directory / str(step)
            raise CheckpointError(
                f"checkpoint {path} exists but cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            ) from err
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()
