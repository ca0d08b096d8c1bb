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
