"""AdamW and learning-rate schedules over exactly the run's length.

Chinchilla (Hoffmann et al. 2022) showed that a cosine schedule must end at the
run's last step: a schedule set for a longer run under-trains every shorter
checkpoint, which biases the fitted laws. So every schedule here is built from
the run's own step count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llm import schedule
from llm.config import OptimConfig
from llm.layer_stack import unstacked_ndim


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate (per step) for a run of ``total_steps`` optimiser steps.

    - ``cosine``: linear warmup to ``lr``, then cosine to ``min_lr_ratio * lr`` at the last step.
    - ``wsd``: warmup, stable at ``lr``, then a cooldown to ``min_lr_ratio * lr`` over the last
      ``decay_fraction`` of the post-warmup steps (Hu et al. 2024, MiniCPM), shaped by
      ``decay_shape``: ``linear``, ``1-sqrt`` (Hägele et al. 2024: lr scaled by 1 - sqrt(progress))
      or ``cosine`` (a half cosine).
    - ``constant``: warmup, then ``lr``.

    Warmup update ``s`` runs at ``lr * (s + 1) / warmup``: the first update is never
    wasted at lr = 0. Warmup is capped at half the run, so a run shorter than twice
    ``warmup_steps`` still decays to its floor instead of ending mid-ramp. This holds
    down to one step: a 2-step cosine run updates at (lr, floor), a 1-step run at the floor.
    """
    warmup = schedule.warmup_steps(cfg, total_steps)
    floor = cfg.lr * cfg.min_lr_ratio

    def ramp(step):
        return cfg.lr * jnp.minimum((step + 1) / max(warmup, 1), 1.0)

    rest = total_steps - warmup - 1  # decay steps: the last update runs at the floor
    if rest < 1 and cfg.schedule != "constant":
        tail = optax.constant_schedule(floor)  # a 1-2 step run: its one post-warmup update is the last
    elif cfg.schedule == "cosine":
        tail = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "wsd":
        decay = schedule.decay_steps(cfg, total_steps)
        tail = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), _cooldown(cfg.decay_shape, cfg.lr, floor, decay)],
            [rest - decay],
        )
    else:
        tail = optax.constant_schedule(cfg.lr)
    if not warmup:
        return tail
    return optax.join_schedules([ramp, tail], [warmup])


def _cooldown(shape: str, peak: float, floor: float, steps: int) -> optax.Schedule:
    """The wsd cooldown: ``peak`` at its first update, ``floor`` after ``steps`` updates (and on)."""
    if shape == "linear":
        return optax.linear_schedule(peak, floor, steps)

    def cooldown(count):
        progress = jnp.clip(count / steps, 0.0, 1.0)
        if shape == "1-sqrt":
            fraction = 1.0 - jnp.sqrt(progress)
        else:  # cosine
            fraction = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return floor + (peak - floor) * fraction

    return cooldown


def _decay_mask(params):
    # Weight decay on matrices only: decaying norm gains and biases only hurts. A matrix has two
    # axes besides the layer scan's stacking one, so both layouts (llm.layer_stack) decay the same.
    def is_matrix(leaf):
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(unstacked_ndim(leaf) >= 2)
        return jnp.ndim(leaf) >= 2

    return jax.tree.map(is_matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(
    cfg: OptimConfig, total_steps: int, schedule_fn: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Gradient clipping (global norm) then AdamW with the run's schedule, or ``schedule_fn`` (count -> lr)."""
    parts = []
    if cfg.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            learning_rate=schedule_fn or learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
