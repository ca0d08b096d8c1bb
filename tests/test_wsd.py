"""Warmup-stable-decay: cooldown shapes, cooldown branches planned off one run, and their exactness."""

import math

import pytest

from llm.config import ConfigError, load_config
from llm.optim import learning_rate_schedule
from llm.schedule import decay_start, decay_steps


def _wsd(*extra):
    return load_config(None, ["optim.schedule=wsd", "optim.lr=1.0", "optim.min_lr_ratio=0.0", *extra]).optim


@pytest.mark.parametrize(
    "shape, quarter, half",
    [("linear", 0.75, 0.5), ("1-sqrt", 0.5, 1 - math.sqrt(0.5)), ("cosine", 0.5 * (1 + math.cos(math.pi / 4)), 0.5)],
)
def test_cooldown_shapes_run_from_peak_to_floor(shape, quarter, half):
    cfg = _wsd("optim.warmup_steps=0", "optim.decay_fraction=0.2", f"optim.decay_shape={shape}")
    lr = learning_rate_schedule(cfg, 101)  # 80 stable updates, then 20 decaying, the last at the floor
    assert decay_steps(cfg, 101) == 20 and decay_start(cfg, 101) == 80
    assert float(lr(0)) == float(lr(79)) == float(lr(80)) == 1.0
    assert float(lr(85)) == pytest.approx(quarter, abs=1e-6)
    assert float(lr(90)) == pytest.approx(half, abs=1e-6)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)
    assert all(float(lr(s)) > float(lr(s + 1)) for s in range(80, 100))


def test_decay_start_follows_warmup_and_fraction():
    cfg = _wsd("optim.warmup_steps=10", "optim.decay_fraction=0.25")
    # 110 updates: 10 warmup, rest = 99 post-warmup updates before the last, 25 of them decay
    assert decay_steps(cfg, 110) == 25 and decay_start(cfg, 110) == 84
    lr = learning_rate_schedule(cfg, 110)
    assert float(lr(83)) == 1.0 and float(lr(85)) < 1.0


def test_unknown_decay_shape_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match=r"optim.decay_shape='sqrt'.*did you mean '1-sqrt'"):
        load_config(None, ["optim.schedule=wsd", "optim.decay_shape=sqrt"])
