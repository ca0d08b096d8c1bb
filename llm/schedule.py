"""Step arithmetic of the learning-rate schedules, in plain Python (no jax: the sweep planner uses it).

Updates are numbered from 0. A run of ``total`` updates warms up over its first
``warmup_steps`` updates; a ``wsd`` run then holds the peak rate until update
``decay_start`` and decays over its last ``decay_steps`` updates, the last one at the
floor. Two wsd runs of different lengths run at the same rate on every update before
the shorter one's ``decay_start`` when they warm up alike: that is what lets a
cooldown branch start from the longer run's checkpoint (``sweeps.plan``).
"""

from __future__ import annotations

from llm.config import Config, OptimConfig, total_steps, without_execution_keys
from llm.typed_yaml import to_dict


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


def branch_mismatch(parent: Config, branch: Config, step: int) -> str | None:
    """Why ``branch`` cannot start from ``parent``'s state after ``step`` updates, or None when it can.

    It can when both are wsd runs of the same model, data, optimiser and seeds (only the
    length differs), both warm up alike, and ``step`` comes before either's cooldown: then
    updates 0..step-1 are the same in both, so the branch ends exactly as an independent run.
    """
    def rest(cfg: Config) -> dict:
        data = without_execution_keys(to_dict(cfg))
        data["train"].pop("steps"), data["train"].pop("tokens")
        return data

    if parent.optim.schedule != "wsd" or branch.optim.schedule != "wsd":
        return "cooldown branches need optim.schedule=wsd in both runs"
    if rest(parent) != rest(branch):
        return "the runs differ in more than their length (train.steps / train.tokens)"
    p_total, b_total = total_steps(parent), total_steps(branch)
    if warmup_steps(parent.optim, p_total) != warmup_steps(branch.optim, b_total):
        return (f"their warmups differ ({warmup_steps(parent.optim, p_total)} vs "
                f"{warmup_steps(branch.optim, b_total)} updates: warmup is capped at half a run)")
    if not 0 < step <= min(decay_start(parent.optim, p_total), decay_start(branch.optim, b_total)):
        return f"step {step} is not before both cooldowns"
    return None
