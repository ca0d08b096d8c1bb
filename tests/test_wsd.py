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


# --------------------------------------------------------------------------- a branch ends as an independent run

BRANCH_TINY = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "model.seq_len=16",
    "model.vocab_size=32", "model.compute_dtype=float32", "data.source=synthetic:markov",
    "train.batch_size=4", "train.log_every=4", "train.eval_every=8", "train.eval_tokens=256",
    "train.checkpoint_every=1000", "train.progress=false", "train.tensorboard=false",
    "optim.schedule=wsd", "optim.decay_shape=1-sqrt", "optim.decay_fraction=0.25", "optim.warmup_steps=3",
]  # fmt: skip


def _final_state(run_dir, cfg):
    import jax.numpy as jnp
    from flax import nnx

    from llm.checkpoint import Checkpoints
    from llm.config import total_steps
    from llm.model import Transformer
    from llm.optim import make_optimizer

    _, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
    like = {"params": params, "opt_state": make_optimizer(cfg.optim, total_steps(cfg)).init(params),
            "step": jnp.zeros((), jnp.int32)}  # fmt: skip
    with Checkpoints(run_dir / "checkpoints", keep=2) as ckpt:
        return ckpt.restore(ckpt.latest_step(), like)[0]


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    """A 30-step wsd parent, a 20-step branch off its step-15 checkpoint, and the same 20 steps from scratch."""
    from llm.training import train

    root = tmp_path_factory.mktemp("wsd")
    cache = f"data.cache_dir={root / 'cache'}"
    parent_cfg = load_config(None, BRANCH_TINY + [cache, "train.steps=30"])
    cfg = load_config(None, BRANCH_TINY + [cache, "train.steps=20"])
    step = decay_start(cfg.optim, 20)
    parent = train(parent_cfg, root / "parent", branch_steps=(step,))
    branch = train(cfg, root / "branch", branch_from=(root / "parent", step))
    alone = train(cfg, root / "alone")
    return step, cfg, parent, branch, alone


def test_a_branch_ends_with_the_parameters_and_loss_of_an_independent_run(branched):
    import jax
    import numpy as np

    step, cfg, parent, branch, alone = branched
    assert step == 15  # 3 warmup updates, rest = 20 - 3 - 1 = 16, 4 of them cooldown: update 15 begins it
    assert parent.status == branch.status == alone.status == "done"
    assert branch.result["branch"] == {"parent": "parent", "step": 15} and alone.result["branch"] is None
    a, b = _final_state(branch.run_dir, cfg), _final_state(alone.run_dir, cfg)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b))
    assert max(diffs) <= 1e-6, max(diffs)
    assert branch.result["final_eval_loss"] == pytest.approx(alone.result["final_eval_loss"], abs=1e-6)
    assert branch.result["final_train_loss"] == pytest.approx(alone.result["final_train_loss"], abs=1e-6)
    # C counts the prefix it stands on: the same tokens and FLOPs as the independent run
    assert branch.result["tokens"] == alone.result["tokens"] == 20 * 4 * 16
    assert branch.result["flops"] == alone.result["flops"]


def test_a_branch_inherits_the_parents_curve_up_to_its_step(branched):
    import json

    step, _, parent, branch, _ = branched
    lines = [json.loads(x) for x in (branch.run_dir / "metrics.jsonl").read_text().splitlines()]
    parent_lines = [json.loads(x) for x in (parent.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in lines if r["step"] <= step] == [r for r in parent_lines if r["step"] <= step]
    assert lines[-1]["step"] == 20
    assert (parent.run_dir / "branch_points" / str(step)).is_dir()
