"""What a run logs: the metrics.jsonl lines, TensorBoard events, eval steps and MFU.

Evaluations are log-spaced early (steps 1, 2, 4, 8, ...) and regular later, because
the analysis fits curves and the early part of a curve carries the most shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llm.typed_yaml import flatten
from rundir import METRICS, WriteError, dumps_json, write_text_atomic

# Dense bf16 peak FLOP/s per chip by device kind (vendor datasheets, no sparsity).
# Unknown devices get MFU = null: a made-up peak would be worse than none.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None when the kind is not in the table."""
    for name, peak in PEAK_BF16_FLOPS.items():
        if name.lower() in device_kind.lower():
            return peak
    return None


def is_eval_step(step: int, total_steps: int, eval_every: int) -> bool:
    """Whether the held-out loss is measured after optimiser step ``step`` (1-based).

    Powers of two below ``eval_every``, every ``eval_every`` steps, and the last step.
    """
    power_of_two = step & (step - 1) == 0
    return step == total_steps or step % eval_every == 0 or (step < eval_every and power_of_two)


def eval_steps(total_steps: int, eval_every: int) -> set[int]:
    """All steps of a ``total_steps`` run at which ``is_eval_step`` holds."""
    return {s for s in range(1, total_steps + 1) if is_eval_step(s, total_steps, eval_every)}


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (and TensorBoard if asked)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # optional: metrics.jsonl is the contract
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line; WriteError naming the file if the disk refuses."""
        try:
            self._file.write(dumps_json(record, indent=None) + "\n")
        except OSError as err:
            raise WriteError(f"cannot write {self.path}: {err.strerror or err}") from err
        if self._tb is not None:
            step = record["step"]
            for key, value in flatten(record, sep="/").items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop lines logged after ``last_step`` (a run killed after its last checkpoint).

    Rewritten through a temporary file and a rename, so a crash here loses nothing.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by the kill
    write_text_atomic(path, "".join(line + "\n" for line in kept))


