"""Config loading: defaults, overrides, and one-line errors that name the key."""

import pytest

from llm.config import (
    Config,
    ConfigError,
    dump_config,
    load_config,
    total_steps,
)


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert isinstance(cfg, Config)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_overrides_parse_yaml_scalars_and_nested_sections():
    cfg = load_config(None, ["model.d_model=64", "optim.lr=1e-3", "model.moe.n_experts=4", "model.tie_embeddings=true"])
    assert cfg.model.d_model == 64
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.moe is not None and cfg.model.moe.n_experts == 4
    assert cfg.model.tie_embeddings is True


def test_steps_override_switches_tokens_off():
    cfg = load_config(None, ["train.steps=7"])
    assert cfg.train.tokens is None and total_steps(cfg) == 7


def test_tokens_give_ceil_steps():
    cfg = load_config(None, ["train.tokens=1000", "train.batch_size=4", "model.seq_len=64"])
    assert total_steps(cfg) == 4  # ceil(1000 / 256)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["model.d_modle=64"], "did you mean 'd_model'"),
        (["modle.d_model=64"], "did you mean 'model'"),
        (["model.d_model=abc"], "model.d_model: expected an integer"),
        (["model.n_heads=3"], "not divisible by model.n_heads=3"),
        (["optim.schedule=cosin"], "did you mean 'cosine'"),
        (["train.steps=10", "train.tokens=100"], "exactly one of train.steps and train.tokens"),
        (["train.batch_size=6", "train.grad_accum=4"], "not divisible by train.grad_accum"),
        (["model.vocab_size=300"], "bytes needs model.vocab_size=256"),
        (["data.source=kjv"], "needs a scheme"),
        (["model.moe.top_k=9"], "top_k=9"),
        (["model.moe.n_exprts=4"], "unknown config key 'model.moe.n_exprts' (did you mean 'n_experts'?)"),
        (["model.moe.top_k=x"], "model.moe.top_k: expected an integer"),
        (["model.n_kv_heads=x"], "model.n_kv_heads: expected an integer"),
        (["d_model"], "not of the form key=value"),
        (["data.source=synthetic:markov", "data.tokenizer=bpe"], "does not apply to synthetic:markov"),
    ],
)
def test_errors_name_the_problem(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


# --------------------------------------------------------------------------- numeric ranges


def _numeric_keys() -> list[str]:
    """Every int/float leaf of the run config (Optional ones included), as dotted keys."""
    import dataclasses
    import typing

    keys = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if any(dataclasses.is_dataclass(a) for a in args):
                walk(args[0], f"{prefix}{f.name}.")
            elif any(a in (int, float) for a in args):
                keys.append(f"{prefix}{f.name}")

    walk(Config, "")
    return keys


def test_numeric_keys_cover_every_section():
    keys = _numeric_keys()
    for key in ("model.rope_theta", "model.moe.capacity_factor", "data.seed", "optim.b2", "train.keep_checkpoints"):
        assert key in keys
    assert len(keys) > 40


@pytest.mark.parametrize("key", _numeric_keys())
@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf", "-1"])
def test_every_numeric_field_has_a_range(key, value):
    # A new numeric field without a range in validate() fails here: no field of the
    # run config means anything by NaN, infinity or a negative number (except a mesh
    # size's -1, "the rest of the devices": -2 stands in for it there).
    if key.startswith("mesh.") and value == "-1":
        value = "-2"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["optim.b1=1.5"], "optim.b1 must be in [0, 1), got 1.5"),
        (["optim.b2=1"], "optim.b2 must be in [0, 1), got 1.0"),
        (["optim.lr=nan"], "optim.lr: expected a finite number, got nan"),
        (["optim.lr=0"], "optim.lr must be > 0, got 0.0"),
        (["optim.grad_clip=nan"], "optim.grad_clip: expected a finite number"),
        (["optim.eps=0"], "optim.eps must be > 0"),
        (["model.rope_theta=0"], "model.rope_theta must be > 0, got 0.0"),
        (["model.norm_eps=0"], "model.norm_eps must be > 0"),
        (["model.init_std=0"], "model.init_std must be > 0"),
        (["model.moe.capacity_factor=0"], "model.moe.capacity_factor must be > 0"),
        (["model.moe.n_experts=0"], "model.moe.n_experts must be > 0"),
        (["data.markov_support=1"], "data.markov_support must be >= 2, got 1"),
        (["data.eval_fraction=1"], "data.eval_fraction must be in (0, 1), got 1.0"),
        (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio must be in [0, 1], got 1.5"),
        (["train.seed=-1"], "train.seed must be in [0, 2**63), got -1"),
        (["data.seed=9223372036854775808"], "data.seed must be in [0, 2**63)"),
        (["model.n_heads=0"], "model.n_heads must be > 0, got 0"),
    ],
)
def test_ranges_name_the_key_and_the_bound(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value)


def test_edges_of_ranges_are_allowed():
    cfg = load_config(None, ["optim.b1=0", "optim.weight_decay=0", "optim.warmup_steps=0", "optim.min_lr_ratio=1",
                             "model.moe.n_shared=0", "model.moe.load_balance_coef=0", "train.seed=0", "optim.grad_clip=null"])
    assert cfg.optim.b1 == 0.0 and cfg.optim.grad_clip is None


def test_non_finite_numbers_in_a_file_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"optim.lr: expected a finite number, got inf"):
        load_config(path)


def test_cli_train_nan_is_one_line_and_exit_2(tmp_path, capsys):
    from sweeps.cli import main

    assert main(["train", "optim.b2=nan", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "optim.b2" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
