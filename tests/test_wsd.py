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


# --------------------------------------------------------------------------- planning and launching branches


def _grid_spec(**extra):
    from sweeps.spec import spec_from_dict

    data = {
        "name": "wsd",
        "base": {"model": {"seq_len": 16}, "data": {"source": "synthetic:markov"},
                 "optim": {"schedule": "wsd", "warmup_steps": 2, "decay_fraction": 0.25},
                 "train": {"batch_size": 2}},
        "recipe": {"aspect_ratio": 32, "head_dim": 16, "round_to": 8},
        "grid": {"n_params": [3e3, 1.2e4], "train.steps": [10, 20, 40]},
        **extra,
    }  # fmt: skip
    return spec_from_dict(data)


def test_the_plan_makes_one_main_run_per_size_and_branches_at_each_decay_start():
    from sweeps.plan import expand, format_plan

    runs = expand(_grid_spec())
    assert len(runs) == 6
    for size in (runs[:3], runs[3:]):
        main = size[2]  # the 40-step run
        assert main.parent is None and main.branch_step is None
        # decay starts: 10 steps -> 10-1-round(0.25*7)=7, 20 -> 19-round(0.25*17)=15
        assert main.branch_steps == (7, 15)
        assert [(r.parent, r.branch_step) for r in size[:2]] == [(main.name, 7), (main.name, 15)]
        # C of a branch counts its whole length; the sweep trains only its cooldown
        assert size[0].flops == pytest.approx(main.flops / 4)
        assert size[0].trained_flops == pytest.approx(size[0].flops * 3 / 10)
    independent = sum(r.flops for r in runs)
    trained = sum(r.trained_flops for r in runs)
    assert trained == pytest.approx(independent * (40 + 3 + 5) / 70)
    text = format_plan(_grid_spec(), runs)
    assert f"C = {trained:.3g} FLOPs, against {independent:.3g} as independent runs (31% saved)" in text
    assert "main@7,15" in text and "branch@15" in text


def test_runs_that_cannot_share_a_prefix_stay_independent():
    from sweeps.plan import expand

    # warmup 8 is capped at 5 in the 10-step run: its first updates differ from the main run's;
    # the 20-step run decays over round(0.2 * (20 - 8 - 1)) = 2 updates from update 17
    runs = expand(_grid_spec(base={"model": {"seq_len": 16}, "data": {"source": "synthetic:markov"},
                                   "optim": {"schedule": "wsd", "warmup_steps": 8}, "train": {"batch_size": 2}}))  # fmt: skip
    assert [r.branch_step for r in runs[:3]] == [None, 17, None] and runs[2].branch_steps == (17,)
    assert all(r.parent is None for r in expand(_grid_spec(wsd_branches=False)))
    cosine = _grid_spec(base={"model": {"seq_len": 16}, "data": {"source": "synthetic:markov"}, "train": {"batch_size": 2}})
    assert all(r.parent is None and not r.branch_steps for r in expand(cosine))


def test_a_branch_is_launched_only_after_its_main_run():
    from sweeps.runner import to_launch

    parents = {"b1": "main", "b2": "main"}
    status = {"b1": "queued", "b2": "queued", "main": "queued", "other": "queued"}
    assert to_launch(status, 4, parents) == ["main", "other"]
    assert to_launch({**status, "main": "running"}, 4, parents) == ["other"]
    assert to_launch({**status, "main": "done"}, 1, parents) == ["b1"]
    assert to_launch({**status, "main": "failed"}, 4, parents) == ["b1", "b2", "other"]  # then from scratch


def test_a_main_run_is_launched_before_anything_shorter_than_it_and_its_longest_branch():
    from sweeps.plan import expand, launch_priority
    from sweeps.runner import to_launch

    runs = expand(_grid_spec())
    priority = launch_priority(runs)
    est = {r.name: r.est_time_s for r in runs}
    small_main, big_main = runs[2], runs[5]  # 3e3 and 1.2e4 parameters, 40 steps each
    for main, size in ((small_main, runs[:3]), (big_main, runs[3:])):
        assert priority[main.name] == pytest.approx(est[main.name] + max(est[r.name] for r in size[:2]))
        assert all(priority[r.name] == est[r.name] for r in size[:2])  # branches: their own cooldown
    status = {r.name: "queued" for r in runs}
    parents = {r.name: r.parent for r in runs if r.parent}
    assert to_launch(status, 2, parents, priority) == [big_main.name, small_main.name]  # not spec order


def recording_train(cfg, run_dir, *, run_name=None, branch_from=None, branch_steps=()):
    """Stand-in for llm.training.train: records its branch arguments and whether the main run was done."""
    import json
    from pathlib import Path

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    parent_done = branch_from is not None and (Path(branch_from[0]) / "result.json").exists()
    record = {"branch_from": None if branch_from is None else [Path(branch_from[0]).name, branch_from[1]],
              "branch_steps": list(branch_steps), "parent_done": parent_done, "status": "done", "step": 1}  # fmt: skip
    (run_dir / "result.json").write_text(json.dumps(record))

    class Result:
        status, error, result = "done", None, record

    return Result()


def test_the_sweep_trains_main_runs_first_and_passes_the_branch_points(tmp_path):
    import json

    from sweeps.runner import run_sweep

    spec = _grid_spec(grid={"n_params": [3e3], "train.steps": [10, 20, 40]})
    run_sweep(spec, tmp_path, train_fn=f"{__file__}:recording_train", parallel=2, progress=False,
              cache_dir=None, poll_s=0.05, log=lambda m: None, fit=False)  # fmt: skip
    runs = {r.name: r for r in __import__("sweeps.plan", fromlist=["expand"]).expand(spec)}
    seen = {name: json.loads((tmp_path / name / "result.json").read_text()) for name in runs}
    main = next(n for n, r in runs.items() if r.branch_steps)
    assert seen[main]["branch_steps"] == [7, 15] and seen[main]["branch_from"] is None
    for name, run in runs.items():
        if run.parent:
            assert seen[name]["branch_from"] == [main, run.branch_step] and seen[name]["parent_done"]
