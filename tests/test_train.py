"""The training loop: run-directory contract, learning, resume, failures, bad input."""

import json
import numpy as np
import pytest

from llm.config import ConfigError, load_config
from llm.metrics import eval_steps
from llm.optim import learning_rate_schedule
from sweeps.cli import main as cli_main

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=64",
    "model.seq_len=32",
    "train.batch_size=8",
    "train.log_every=5",
    "train.eval_every=20",
    "train.eval_tokens=2048",
    "train.progress=false",
    "train.tensorboard=false",
    "optim.warmup_steps=5",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token_cache"))


def tiny(cache_dir, *extra):
    return load_config(None, TINY + [f"data.cache_dir={cache_dir}", *extra])


# --------------------------------------------------------------------------- pure pieces


def test_cosine_schedule_warms_up_and_ends_at_floor_on_the_last_step():
    cfg = load_config(None, ["optim.lr=1e-2", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"]).optim
    lr = learning_rate_schedule(cfg, 111)  # updates 0..110: 10 warmup, 100 cosine, the last at the floor
    assert float(lr(0)) == pytest.approx(1e-3)  # the first update already moves
    assert float(lr(4)) == pytest.approx(5e-3)
    assert float(lr(9)) == pytest.approx(1e-2)
    assert float(lr(10)) == pytest.approx(1e-2)
    assert float(lr(60)) == pytest.approx(1e-3 + 0.5 * 9e-3, rel=1e-5)  # half-way down the cosine
    assert float(lr(110)) == pytest.approx(1e-3, rel=1e-5)


def test_warmup_longer_than_the_run_is_capped_at_half_so_the_run_still_decays():
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=50", "optim.min_lr_ratio=0.1"]).optim
    lr = learning_rate_schedule(cfg, 30)  # 15 warmup updates, 15 cosine updates
    assert float(lr(0)) == pytest.approx(1 / 15)
    assert float(lr(14)) == pytest.approx(1.0)
    assert float(lr(29)) == pytest.approx(0.1, rel=1e-5)
    assert max(float(lr(s)) for s in range(30)) == pytest.approx(1.0)


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = load_config(None, ["optim.schedule=wsd", "optim.lr=1.0", "optim.warmup_steps=0",
                             "optim.decay_fraction=0.25", "optim.min_lr_ratio=0.0"]).optim
    lr = learning_rate_schedule(cfg, 101)  # 75 stable updates, then 25 decaying to the last
    assert float(lr(0)) == pytest.approx(1.0)
    assert float(lr(75)) == pytest.approx(1.0)
    assert float(lr(75 + 12.5)) == pytest.approx(0.5, abs=1e-6)
    assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_runs_of_one_to_three_steps_follow_the_documented_schedule(schedule):
    # warmup = min(50, steps // 2); warmup update s runs at lr * (s + 1) / warmup; the last at the floor 0.1
    cfg = load_config(None, [f"optim.schedule={schedule}", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]).optim
    expected = {1: [0.1], 2: [1.0, 0.1], 3: [1.0, 1.0, 0.1]}
    for steps, lrs in expected.items():
        lr = learning_rate_schedule(cfg, steps)
        assert [float(lr(s)) for s in range(steps)] == pytest.approx(lrs, rel=1e-6), steps
    no_warmup = load_config(None, [f"optim.schedule={schedule}", "optim.lr=1.0", "optim.warmup_steps=0"]).optim
    assert [float(learning_rate_schedule(no_warmup, 2)(s)) for s in range(2)] == pytest.approx([1.0, 0.1])
    assert float(learning_rate_schedule(no_warmup, 1)(0)) == pytest.approx(0.1)


def test_eval_steps_are_log_spaced_early_then_regular():
    assert eval_steps(100, 20) == {1, 2, 4, 8, 16, 20, 40, 60, 80, 100}
    assert eval_steps(5, 100) == {1, 2, 4, 5}


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir):
    from llm.training import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = tiny(cache_dir, "train.steps=150", "optim.lr=1e-2", "train.checkpoint_every=50")
    return cfg, train(cfg, run_dir)


def test_run_directory_follows_the_contract(finished_run):
    cfg, result = finished_run
    run_dir = result.run_dir
    assert result.status == "done"
    assert {"config.yaml", "metrics.jsonl", "result.json", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert load_config(run_dir / "config.yaml") == cfg
    res = json.loads((run_dir / "result.json").read_text())
    tokens = 150 * 8 * 32
    assert res["status"] == "done" and res["tokens"] == tokens and res["step"] == 150
    for key in ("n_params_total", "n_params_nonembed", "n_params_active", "final_eval_loss", "best_eval_loss"):
        assert res[key] is not None
    assert res["flops"]["6N"] == pytest.approx(6 * res["n_params_active_nonembed"] * tokens)
    assert res["flops"]["6N+attention"] > res["flops"]["6N"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [line["step"] for line in lines if "eval_loss" in line]
    assert evals == sorted(eval_steps(150, 20))
    assert all(line["tokens"] == line["step"] * 8 * 32 for line in lines)
    assert lines[-1]["step"] == 150 and lines[-1]["lr"] == pytest.approx(1e-3, rel=1e-3)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["100", "150"]


def test_loss_falls_well_below_the_unigram_entropy(finished_run, cache_dir):
    from llm.data import load_dataset

    cfg, result = finished_run
    data = load_dataset(cfg.data, vocab_size=256, seq_len=32, eval_tokens=2048, progress=False)
    eval_tokens = np.concatenate(list(data.eval_batches(8)))[:, 1:].ravel()
    counts = np.bincount(eval_tokens, minlength=256).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(p * np.log(p)).sum())  # nats/token: the best context-free model
    first = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["eval_loss"] > unigram_entropy  # starts near log(256)
    assert result.result["final_eval_loss"] < unigram_entropy - 0.3


def test_rerunning_a_finished_run_does_nothing(finished_run):
    from llm.training import train

    cfg, result = finished_run
    before = (result.run_dir / "result.json").read_text()
    again = train(cfg, result.run_dir)
    assert again.status == "done" and (result.run_dir / "result.json").read_text() == before


@pytest.mark.parametrize(
    "stop, checkpoint_steps",
    [(RuntimeError, [4, 8]), (KeyboardInterrupt, [8, 10])],  # Ctrl-C / SIGTERM also saves the steps done
)
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, cache_dir, monkeypatch, checkpoint_writes,
                                                          stop, checkpoint_steps):
    """Checkpoints are written in the background, slowly: the crash or interrupt and the end of the
    run each wait for the last write, and result.json comes after it."""
    from llm import training

    cfg = tiny(cache_dir, "train.steps=12", "train.checkpoint_every=4", "train.log_every=2")
    straight = training.train(cfg, tmp_path / "straight")
    checkpoint_writes.delay, checkpoint_writes.seen = 0.2, []
    checkpoint_writes.probe = lambda: (tmp_path / "resumed" / "result.json").exists()

    real_load = training.load_dataset

    def crashing_load(*args, **kwargs):
        data = real_load(*args, **kwargs)
        real_batch = data.train_batch

        def batch(step, size, *rows):
            if step == 10:  # die building steps 11-12 (one call of the train program), after steps 9-10 ran
                raise stop("simulated kill")
            return real_batch(step, size, *rows)

        data.train_batch = batch
        return data

    monkeypatch.setattr(training, "load_dataset", crashing_load)
    with pytest.raises(stop, match="simulated kill"):
        training.train(cfg, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "result.json").exists()
    saved = sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == checkpoint_steps
    logged = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == 10  # steps 9-10 logged their line; an interrupt writes it before saving them
    monkeypatch.setattr(training, "load_dataset", real_load)
    resumed = training.train(cfg, tmp_path / "resumed")

    for key in ("final_eval_loss", "final_train_loss", "best_eval_loss"):
        assert resumed.result[key] == straight.result[key], key
    assert (tmp_path / "resumed" / "checkpoints" / "12").is_dir()  # complete when train() returns
    saves = len({4, *checkpoint_steps}) + 1  # the crashed attempt's, then step 12's
    assert checkpoint_writes.seen == [(True, False)] * saves  # each off the main thread, none after result.json
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "metrics logged after the last checkpoint must not repeat"


def test_killed_after_the_last_checkpoint_keeps_its_losses(tmp_path, cache_dir):
    from llm.training import train

    cfg = tiny(cache_dir, "train.steps=8", "train.checkpoint_every=4")
    first = train(cfg, tmp_path / "run")
    (tmp_path / "run" / "result.json").unlink()  # killed between the final checkpoint and result.json
    again = train(cfg, tmp_path / "run")
    for key in ("final_eval_loss", "final_train_loss", "best_eval_loss", "tokens", "step"):
        assert again.result[key] == first.result[key], key
    assert again.result["wall_time_s"] >= first.result["wall_time_s"] * 0.5  # carried over, not reset to ~0


def test_diverging_run_fails_with_the_reason(tmp_path, cache_dir):
    from llm.training import train

    cfg = tiny(cache_dir, "train.steps=30", "optim.lr=1e12", "optim.grad_clip=null", "optim.warmup_steps=0",
               "model.compute_dtype=float32")
    result = train(cfg, tmp_path / "nan")
    res = json.loads((tmp_path / "nan" / "result.json").read_text())
    assert result.status == "failed" and res["status"] == "failed"
    assert "non-finite" in res["error"]


def test_unreadable_checkpoint_is_an_error_naming_it(tmp_path, cache_dir):
    from llm.checkpoint import CheckpointError
    from llm.training import train

    cfg = tiny(cache_dir, "train.steps=8", "train.checkpoint_every=4")
    run_dir = tmp_path / "corrupt"
    train(cfg, run_dir)
    (run_dir / "result.json").unlink()  # pretend it was killed after the step-8 checkpoint
    for f in (run_dir / "checkpoints" / "8").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(run_dir / "checkpoints" / "8")):
        train(cfg, run_dir)


# --------------------------------------------------------------------------- bad input via the CLI


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_model=33"], "not divisible by model.n_heads"),
        (["model.dmodel=30"], "did you mean 'd_model'"),
        (["data.source=text:/no/such/file.txt"], "/no/such/file.txt"),
        (["data.source=text:{empty}"], "empty"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, cache_dir, capsys, overrides, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    run_dir = tmp_path / "run"
    overrides = [o.replace("{empty}", str(empty)) for o in overrides]
    code = cli_main(["train", *TINY, f"data.cache_dir={cache_dir}", *overrides, "--run-dir", str(run_dir)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1
    assert not run_dir.exists()


def test_run_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a run")
    assert cli_main(["train", *TINY, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(run_dir) in err and "not a" in err and len(err.splitlines()) == 1
    assert run_dir.read_text() == "not a run"


def test_seq_len_longer_than_the_data_is_an_error(tmp_path, cache_dir):
    from llm.training import train

    small = tmp_path / "small.txt"
    small.write_text("a short document.\n" * 3)
    cfg = tiny(cache_dir, f"data.source=text:{small}", "train.steps=2")
    with pytest.raises(ConfigError):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_gradient_accumulation_matches_one_big_batch():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llm.model import Transformer
    from llm.optim import make_optimizer
    from llm.training import make_train_step

    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (8, 33), dtype=np.int32)
    params_after, grad_norms = [], []
    for accum in (1, 4):
        cfg = load_config(None, TINY + ["model.compute_dtype=float32", "train.steps=3", f"train.grad_accum={accum}"])
        graphdef, params = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
        optimizer = make_optimizer(cfg.optim, 3)
        state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
        step = make_train_step(graphdef, optimizer, cfg)
        for _ in range(2):
            state, metrics = step(state, batch)
        params_after.append(jax.tree.leaves(state["params"]))
        grad_norms.append(float(metrics["grad_norm"]))  # Adam is scale-free; the norm is not
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)
    for a, b in zip(*params_after):
        # Adam turns tiny float differences in near-zero gradients into up to ~lr-sized steps;
        # 3e-5 is a hundredth of one step at lr=3e-3, so a wrong accumulation still fails.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=3e-5)
