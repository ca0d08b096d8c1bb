"""Population training (llm.population): members match single runs, own their run dirs, fail alone, resume."""

import json
import shutil

import numpy as np
import pytest

from llm.config import ConfigError, POPULATION_KEYS, load_config, population_signature
from llm.memory import population_bytes, training_bytes
from llm.population import check_population_fits, population_mode, train_population
from llm.training import train

TINY = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "model.seq_len=16",
    "model.compute_dtype=float32", "data.source=builtin:kjv", "train.batch_size=4", "train.steps=12",
    "train.log_every=3", "train.eval_every=6", "train.eval_tokens=256", "train.checkpoint_every=6",
    "train.progress=false", "train.tensorboard=false", "optim.warmup_steps=2",
]  # fmt: skip
MEMBERS = [
    ["train.seed=1", "optim.lr=3e-3"],
    ["train.seed=2", "optim.lr=1e-2", "data.seed=5", "optim.weight_decay=0.0"],
    ["train.seed=3", "optim.lr=1e30"],  # diverges: its loss goes non-finite within a few steps
]


def _cfg(cache, *extra):
    return load_config(None, TINY + [f"data.cache_dir={cache}", *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir, key="train_loss"):
    return np.array([r[key] for r in _metrics(run_dir) if r.get(key) is not None])


def _result(run_dir):
    return json.loads((run_dir / "result.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One population per mode (3 members, one diverging) and member 1 alone."""
    root = tmp_path_factory.mktemp("population")
    cache = root / "cache"
    cfgs = [_cfg(cache, *m) for m in MEMBERS]
    out = {"root": root, "cache": cache, "cfgs": cfgs}
    for mode in ("loop", "vmap"):
        out[mode] = train_population(cfgs, [root / mode / f"m{i}" for i in range(3)], mode=mode)
    out["single"] = train(cfgs[1], root / "single")
    return out


# A looped member runs the single run's loop of steps (llm.training.steps_in_loop), with its lr and
# weight decay as arguments: bit for bit the same losses. A vmapped one: equal to float32 rounding.
@pytest.mark.parametrize("mode, rtol", [("loop", 0), ("vmap", 2e-5)])
def test_a_member_has_the_losses_of_the_same_run_trained_alone(trained, mode, rtol):
    member, alone = trained["root"] / mode / "m1", trained["root"] / "single"
    assert [r["step"] for r in _metrics(member)] == [r["step"] for r in _metrics(alone)]
    for key in ("train_loss", "eval_loss", "grad_norm", "lr"):
        np.testing.assert_allclose(_curve(member, key), _curve(alone, key), rtol=rtol, atol=0, err_msg=key)
    assert _result(member)["final_eval_loss"] == pytest.approx(_result(alone)["final_eval_loss"], rel=rtol or 1e-12)
    # and the other member trained something else (its own seed, lr, data order)
    assert not np.allclose(_curve(trained["root"] / mode / "m0"), _curve(alone))


def test_the_two_modes_agree_on_every_member_that_finished(trained):
    for i in (0, 1):
        np.testing.assert_allclose(_curve(trained["root"] / "vmap" / f"m{i}"), _curve(trained["root"] / "loop" / f"m{i}"), rtol=2e-5)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_a_diverging_member_is_failed_and_the_others_finish(trained, mode):
    results = trained[mode]
    assert [r.status for r in results] == ["done", "done", "failed"]
    failed = _result(trained["root"] / mode / "m2")
    assert failed["status"] == "failed" and "non-finite" in failed["error"]
    assert failed["step"] < 12 and _metrics(trained["root"] / mode / "m2")[-1]["step"] == failed["step"]
    assert all(_result(trained["root"] / mode / f"m{i}")["step"] == 12 for i in (0, 1))


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_each_member_writes_its_own_run_directory(trained, mode):
    for i, cfg in enumerate(trained["cfgs"][:2]):
        run_dir = trained["root"] / mode / f"m{i}"
        assert load_config(run_dir / "config.yaml") == cfg
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "6"]
        result = _result(run_dir)
        assert result["run_name"] == f"m{i}" and result["tokens"] == 12 * 4 * 16
        assert result["flops"]["6N"] == 6 * result["n_params_nonembed"] * result["tokens"]  # Kaplan: non-embedding N
        pop = result["population"]
        assert pop["mode"] == mode and pop["size"] == 3 and pop["index"] == i and pop["members"] == ["m0", "m1", "m2"]
        assert pop["varies"] == ["train.seed", "data.seed", "optim.lr", "optim.weight_decay"]
        assert pop["tokens_per_s"] > 0


def test_a_member_checkpoint_resumes_as_a_single_run(trained, tmp_path):
    """Kill after step 6 (drop the later checkpoint and the result): train() finishes the member alone."""
    run_dir = tmp_path / "m1"
    shutil.copytree(trained["root"] / "loop" / "m1", run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "12")
    (run_dir / "result.json").unlink()
    result = train(trained["cfgs"][1], run_dir)
    assert result.status == "done"
    np.testing.assert_array_equal(_curve(run_dir), _curve(trained["root"] / "single"))


def test_a_vmapped_population_resumes_members_at_different_steps(trained, tmp_path):
    """Member 1 resumes from its step-6 checkpoint while member 0 starts over: one vmapped step, masked."""
    cfgs = trained["cfgs"][:2]
    shutil.copytree(trained["root"] / "vmap" / "m1", tmp_path / "m1")
    shutil.rmtree(tmp_path / "m1" / "checkpoints" / "12")
    (tmp_path / "m1" / "result.json").unlink()
    results = train_population(cfgs, [tmp_path / "m0", tmp_path / "m1"], mode="vmap")
    assert [r.status for r in results] == ["done", "done"]
    for i in (0, 1):
        np.testing.assert_allclose(_curve(tmp_path / f"m{i}"), _curve(trained["root"] / "vmap" / f"m{i}"), rtol=2e-5)
    assert [r["step"] for r in _metrics(tmp_path / "m1")] == [r["step"] for r in _metrics(trained["root"] / "single")]
    # done members are not trained again
    again = train_population(cfgs, [tmp_path / "m0", tmp_path / "m1"], mode="vmap")
    assert [r.result["wall_time_s"] for r in again] == [r.result["wall_time_s"] for r in results]


def test_a_member_resuming_after_the_others_failed_still_finishes(trained, tmp_path):
    """The diverging member fails within its first steps; member 1 resumes at step 6, after that.
    (The loop over calls is the same for both modes; CPU's loop mode keeps the test short.)"""
    cfgs = [trained["cfgs"][2], trained["cfgs"][1]]
    shutil.copytree(trained["root"] / "loop" / "m1", tmp_path / "m1")
    shutil.rmtree(tmp_path / "m1" / "checkpoints" / "12")
    (tmp_path / "m1" / "result.json").unlink()
    results = train_population(cfgs, [tmp_path / "m2", tmp_path / "m1"], mode="loop")
    assert [r.status for r in results] == ["failed", "done"]
    assert _result(tmp_path / "m2")["step"] < 6 and _result(tmp_path / "m1")["step"] == 12
    np.testing.assert_array_equal(_curve(tmp_path / "m1"), _curve(trained["root"] / "single"))


def test_members_that_differ_in_more_than_population_keys_are_refused(tmp_path):
    a, b = _cfg(tmp_path / "cache"), _cfg(tmp_path / "cache", "model.d_model=32", "train.seed=4")
    with pytest.raises(ConfigError, match="member 1 differs from member 0 in model.d_model"):
        train_population([a, b], [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert population_signature(a) == population_signature(_cfg(tmp_path / "cache", *MEMBERS[1]))
    assert set(POPULATION_KEYS) == {"train.seed", "data.seed", "optim.lr", "optim.weight_decay"}


def test_population_memory_is_p_times_a_run_when_vmapped_and_p_times_its_state_in_turn():
    cfg = load_config(None, ["model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.d_ff=128"])
    one = training_bytes(cfg)
    assert population_bytes(cfg, 8, "vmap") == 8 * one["total"]
    assert population_bytes(cfg, 8, "loop") == 8 * (one["params"] + one["adam"]) + one["grads"] + one["activations"] + one["logits"]
    assert population_bytes(cfg, 1, "loop") == one["total"]
    assert check_population_fits(cfg, 8, "vmap", (8 * one["total"], "test")) == 8 * one["total"]
    with pytest.raises(ConfigError, match="9 members"):
        check_population_fits(cfg, 9, "vmap", (8 * one["total"], "test"))


def test_the_mode_is_picked_per_device():
    assert population_mode("auto", "cpu") == "loop"
    assert population_mode("auto", "gpu") == "vmap" and population_mode("auto", "tpu") == "vmap"
    assert population_mode("vmap", "cpu") == "vmap"
    with pytest.raises(ConfigError, match="choose one of auto, vmap, loop"):
        population_mode("parallel")


@pytest.mark.parametrize("source", ["builtin:kjv", "synthetic:markov"])
def test_each_member_samples_the_batches_of_its_own_data_seed(tmp_path, source):
    """One load per pool: a text corpus is the same for every data.seed; a synthetic pool is drawn from it."""
    from llm.data import load_dataset
    from llm.population import member_datasets

    extra = [f"data.source={source}"] + (["model.vocab_size=32", "data.dataset_tokens=4096"] if source.startswith("synthetic") else [])
    cfgs = [_cfg(tmp_path / "cache", *extra, f"data.seed={s}", f"train.seed={i}") for i, s in enumerate([0, 7, 0])]
    views = member_datasets(cfgs)
    assert views[0] is views[2] and views[1] is not views[0]
    for cfg, view in zip(cfgs, views):
        alone = load_dataset(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=16, eval_tokens=256, progress=False)
        np.testing.assert_array_equal(view.train_batch(3, 4), alone.train_batch(3, 4))
    assert not np.array_equal(views[0].train_batch(3, 4), views[1].train_batch(3, 4))
