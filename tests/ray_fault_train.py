"""Train function of the Ray fault tests (loaded by path by each sweep worker; not a test module).

``llm.training.train``, except that a run's first attempt holds still right after its first
checkpoint until the test creates ``<sweep>/.gate/release``: the test then knows the run is
mid-way with a checkpoint on disk, and kills its worker or removes its node without racing
the training. ``<sweep>/.gate/<run>.paused`` holds the paused process's pid; every attempt
appends ``<pid> <step it resumes from>`` to ``<sweep>/.gate/<run>.attempts``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def pausing_train(cfg, run_dir, *, run_name=None, **kwargs):
    from llm import checkpoint
    from llm.training import train

    gate = Path(run_dir).resolve().parent / ".gate"
    gate.mkdir(exist_ok=True)
    attempts = gate / f"{run_name}.attempts"
    first = not attempts.exists()
    done = [int(p.name) for p in (Path(run_dir) / "checkpoints").glob("*") if p.name.isdigit()]
    with open(attempts, "a") as f:
        f.write(f"{os.getpid()} {max(done, default=0)}\n")
    if first:
        save = checkpoint.Checkpoints.save

        def save_then_hold(self, step, state, meta):
            save(self, step, state, meta)
            self.wait()  # on disk, not still being written in the background, before the test may kill us
            checkpoint.Checkpoints.save = save  # hold once
            (gate / f"{run_name}.paused").write_text(str(os.getpid()))
            while not (gate / "release").exists():
                time.sleep(0.05)

        checkpoint.Checkpoints.save = save_then_hold
    return train(cfg, run_dir, run_name=run_name, **kwargs)
