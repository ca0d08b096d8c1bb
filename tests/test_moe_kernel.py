"""model.moe.grouped_matmul "auto": the fastest correct dropless kernel per platform, recorded in result.json."""

import json

import pytest
from flax import nnx

from llm.config import ConfigError, ModelConfig, MoEConfig, load_config
from llm.model import Transformer
from llm.moe import moe_kernel, resolve_grouped_matmul
from llm.training import train


def _model_cfg(**moe):
    return ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ff=32, vocab_size=32, seq_len=8,
                       moe=MoEConfig(n_experts=4, top_k=2, **moe))  # fmt: skip


def test_auto_resolves_per_platform_and_names_pass_through():
    assert MoEConfig().grouped_matmul == "auto"
    assert resolve_grouped_matmul("auto", "cpu") == "blocked"
    assert resolve_grouped_matmul("auto", "gpu") == "blocked"  # CUDA's ragged_dot densifies (issue 13)
    assert resolve_grouped_matmul("auto", "tpu") == "ragged_dot"
    for name in ("ragged_dot", "blocked"):
        assert resolve_grouped_matmul(name, "cpu") == resolve_grouped_matmul(name, "gpu") == name
    with pytest.raises(ValueError, match="choose one of auto, ragged_dot, blocked"):
        resolve_grouped_matmul("dense")


def test_model_built_with_auto_on_cpu_runs_blocked():
    model = Transformer(_model_cfg(), rngs=nnx.Rngs(0))
    assert [block.mlp.grouped_matmul for block in model.blocks] == ["blocked", "blocked"]
    assert model.moe_kernel() == "blocked"
    assert moe_kernel(_model_cfg(), "tpu") == "ragged_dot"
    assert moe_kernel(_model_cfg(grouped_matmul="ragged_dot")) == "ragged_dot"
    assert moe_kernel(_model_cfg(capacity_factor=1.0)) is None  # capacity routing: no grouped matmul
    assert moe_kernel(ModelConfig()) is None


def test_config_accepts_auto_and_names_the_choices():
    assert load_config(None, ["model.moe.n_experts=4"]).model.moe.grouped_matmul == "auto"
    with pytest.raises(ConfigError, match="auto"):
        load_config(None, ["model.moe.n_experts=4", "model.moe.grouped_matmul=megablocks"])


@pytest.mark.parametrize("moe,expected", [(["model.moe.n_experts=4", "model.moe.top_k=2"], "blocked"), ([], None)])
def test_result_json_records_the_kernel(tmp_path, moe, expected):
    cfg = load_config(None, [
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.d_ff=32", "model.seq_len=16",
        "model.vocab_size=32", "data.source=synthetic:markov", "train.steps=2", "train.batch_size=2",
        "train.eval_tokens=64", "train.progress=false", "train.tensorboard=false", *moe,
    ])  # fmt: skip
    result = train(cfg, tmp_path / "run")
    assert result.status == "done"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["moe_grouped_matmul"] == expected
