"""Step arithmetic of the learning-rate schedules, in plain Python (no jax: the sweep planner uses it).

Updates are numbered from 0. A run of ``total`` updates warms up over its first
``warmup_steps`` updates; a ``wsd`` run then holds the peak rate until update
``decay_start`` and decays over its last ``decay_steps`` updates, the last one at the
floor. Two wsd runs of different lengths run at the same rate on every update before
the shorter one's ``decay_start`` when they warm up alike: that is what lets a
cooldown branch start from the longer run's checkpoint (``sweeps.plan``).
"""

from __future__ import annotations

from llm.config import OptimConfig


def warmup_steps(cfg: OptimConfig, total: int) -> int:
    """Warmup updates of a ``total``-update run: ``cfg.warmup_steps`` capped at half the run."""
    return min(cfg.warmup_steps, total // 2)


def decay_steps(cfg: OptimConfig, total: int) -> int:
    """Updates of the wsd cooldown after the stable phase (at least 1; 0 for a run with no stable phase)."""
    rest = total - warmup_steps(cfg, total) - 1  # post-warmup updates before the last one
    if rest < 1:
        return 0
    return max(int(round(cfg.decay_fraction * rest)), 1)


def decay_start(cfg: OptimConfig, total: int) -> int:
    """First update of the wsd cooldown (updates before it run at warmup or peak rate).

    A checkpoint after ``decay_start`` updates is where a cooldown branch of this length starts.
    """
    rest = total - warmup_steps(cfg, total) - 1
    if rest < 1:
        return warmup_steps(cfg, total)
    return total - 1 - decay_steps(cfg, total)
