"""The environment of a subprocess that sees N fake CPU devices (imported by the tests that need one).

``--xla_force_host_platform_device_count`` must be set before JAX starts, so tests of meshes,
expert parallelism and multi-process runs launch a fresh Python with it.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_devices_env(devices: int, *, xla_flags: str = "", drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """``os.environ`` with JAX on ``devices`` CPU devices and this checkout first on PYTHONPATH.

    The inherited XLA flags stay (the suite's compile level from conftest.py, a user's own),
    except an earlier device count; ``xla_flags`` are appended. Variables whose names start
    with a prefix in ``drop`` are left out (e.g. a scheduler's, so a run does not think it is
    one of a cluster's processes); ``extra`` variables are set last.
    """
    env = {k: v for k, v in os.environ.items() if not (drop and k.startswith(drop))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags += [f"--xla_force_host_platform_device_count={devices}", *xla_flags.split()]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])), **extra)  # fmt: skip
    return env
