"""The run-directory contract, shared by every layer: file names, FLOP conventions,
atomic writes, JSON cleaning, the evals/ record writer, durations and the SIGTERM handler.

Standard library only, and imports nothing else of the project: ``llm``, ``sweeps``
and ``analysis`` all import it without breaking the layering (llm and analysis never
import each other; this module is the one place both may share).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any, Sequence

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RESULT = "result.json"
CHECKPOINTS = "checkpoints"
BRANCH_POINTS = "branch_points"  # checkpoints kept where cooldown branches start (wsd sweeps)
EVALS = "evals"
# evals/<task>.step<S>.jsonl (one record per item) and <task>.step<S>.summary.json beside it.
EVAL_RECORDS_RE = re.compile(r"^(?P<task>.+)\.step(?P<step>\d+)\.jsonl$")

# How training compute C is counted: 6 N D (Kaplan's 6N per token) or 6 N D plus the
# attention-score FLOPs (Hoffmann et al. 2022, Appendix F). Never mixed in one fit.
FLOP_CONVENTIONS = ("6N", "6N+attention")

# Files are shared by everyone who can read the sweep folder: 0644 before the umask,
# as open() would create them (mkstemp alone gives 0600).
FILE_MODE = 0o666


class WriteError(OSError):
    """A file could not be written (disk full, no permission, not a folder): one line, path named."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see the old file or the new one, never half of one. On any failure (full
    disk included) the temporary file is removed and ``WriteError`` names the path.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise WriteError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE & ~_umask())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(f"cannot write {path}: {err.strerror or err}") from err
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """``write_bytes_atomic`` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def clean_json(obj: Any) -> Any:
    """JSON-safe copy: NaN and +-inf become null; numpy scalars and arrays become Python values.

    Null, not a huge finite number, so that nobody averages a sentinel by mistake.
    """
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy/jax arrays and scalars
        return clean_json(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """JSON text of ``clean_json(obj)`` (strict: no NaN or Infinity tokens)."""
    return json.dumps(clean_json(obj), indent=indent, allow_nan=False)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as cleaned JSON to ``path`` atomically."""
    write_text_atomic(path, dumps_json(obj) + "\n")


def eval_file(run_dir: str | Path, task: str, step: int) -> Path:
    """Path of the records of ``task`` evaluated at training step ``step``: evals/<task>.step<S>.jsonl."""
    return Path(run_dir) / EVALS / f"{task}.step{int(step)}.jsonl"


def eval_summary_file(records_path: str | Path) -> Path:
    """The summary beside a records file: <task>.step<S>.summary.json."""
    records_path = Path(records_path)
    return records_path.with_name(records_path.name[: -len(".jsonl")] + ".summary.json")


def write_eval_records(run_dir: str | Path, task: str, step: int, records: list[dict], shots: int = 0,
                       baseline: dict | None = None, memorisation: bool = False,
                       **extra: Any) -> tuple[Path, Path]:  # fmt: skip
    """Write one evaluation's records (JSON lines) and its summary atomically; records first, since
    the summary marks them complete.

    The summary holds task, step, shots, n_items, baseline ({metric: random-guess value}) and
    memorisation, plus ``extra`` (e.g. the task's params, the eval seed). Records and extra are
    JSON-cleaned (numpy values become Python ones, NaN becomes null).
    """
    path = eval_file(run_dir, task, step)
    write_text_atomic(path, "".join(json.dumps(clean_json(r), allow_nan=False) + "\n" for r in records))
    summary = {"task": task, "step": int(step), "shots": int(shots), "n_items": len(records),
               "baseline": dict(baseline or {}), "memorisation": bool(memorisation), **extra}  # fmt: skip
    summary_path = eval_summary_file(path)
    write_json_atomic(summary_path, summary)
    return path, summary_path


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None if the file is absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_result(run_dir: str | Path) -> dict | None:
    """A run's result.json, or None if absent, cut short by a kill, or not a JSON object."""
    return read_json_object(Path(run_dir) / RESULT)


def not_a_folder(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as a folder (it, or the nearest existing parent, is a file), or None.

    Checked before any work, so that a bad output path fails at once and writes nothing.
    """
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else f"{p} is a file, not a folder"
    return None


def format_duration(seconds: float) -> str:
    """Short human duration: 42s, 3m07s, 2h05m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def did_you_mean(key: str, allowed: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest allowed name, or '' when none is close."""
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, so ``kill`` checkpoints and stops like Ctrl-C."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
