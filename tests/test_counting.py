"""Parameter and FLOP counts: against the instantiated model and against hand sums."""

import jax
import numpy as np
import pytest
from flax import nnx

from llm.config import ModelConfig, MoEConfig
from llm.counting import (
    FLOP_CONVENTIONS,
    flops_per_token,
    is_moe_block,
    mfu_flops_per_token,
    n_params,
)
from llm.model import Transformer
from llm.moe import MoE

DENSE = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, vocab_size=256, seq_len=32)
TIED_GQA_GELU = ModelConfig(
    d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=96, vocab_size=300, seq_len=16,
    mlp="gelu", tie_embeddings=True,
)
MOE = ModelConfig(
    d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512, seq_len=64,
    mlp="gelu", tie_embeddings=True,
    moe=MoEConfig(n_experts=8, top_k=2, every=2, d_ff_expert=96, n_shared=1),
)
MOE_SWIGLU_CAPACITY = ModelConfig(
    d_model=32, n_layers=3, n_heads=2, d_ff=64, vocab_size=100, seq_len=8,
    moe=MoEConfig(n_experts=4, top_k=1, every=1, n_shared=2, capacity_factor=1.25),
)


def _instantiated_params(cfg):
    """(total, embedding) parameter counts of the real module, shapes only (no compute)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    embed = int(np.prod(model.embed_VD.shape))
    if not cfg.tie_embeddings:
        embed += int(np.prod(model.unembed_DV.shape))
    return total, embed


def _moe_shape(n_layers, every, top_k=2, n_shared=0, mlp="swiglu"):
    return ModelConfig(
        d_model=32, n_layers=n_layers, n_heads=2, d_ff=48, vocab_size=64, seq_len=8, mlp=mlp,
        moe=MoEConfig(n_experts=4, top_k=top_k, every=every, d_ff_expert=40, n_shared=n_shared),
    )


# every = 2 and 3 with n_layers not a multiple of it: a dense tail after the last MoE block.
EVERY_SHAPES = [_moe_shape(5, 2), _moe_shape(4, 3, top_k=1, mlp="gelu"), _moe_shape(7, 3, n_shared=1), _moe_shape(8, 3)]


@pytest.mark.parametrize("cfg", [DENSE, TIED_GQA_GELU, MOE, MOE_SWIGLU_CAPACITY, *EVERY_SHAPES])
def test_n_params_matches_instantiated_model(cfg):
    total, embed = _instantiated_params(cfg)
    counts = n_params(cfg)
    assert counts["n_params_total"] == total
    assert counts["n_params_embed"] == embed
    assert counts["n_params_nonembed"] == total - embed
    assert all(isinstance(v, int) for v in counts.values())


@pytest.mark.parametrize("cfg", [MOE, MOE_SWIGLU_CAPACITY, *EVERY_SHAPES])
def test_moe_blocks_and_active_params_match_built_model(cfg):
    """The model's MoE blocks are the ones is_moe_block names; active N from the real leaves."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    built = [i for i, block in enumerate(model.blocks) if isinstance(block.mlp, MoE)]
    assert built == [i for i in range(cfg.n_layers) if is_moe_block(cfg, i)]
    assert built == list(range(cfg.moe.every - 1, cfg.n_layers, cfg.moe.every))
    # A token uses top_k of the n_experts slices of each routed expert weight [E, ...].
    total, _ = _instantiated_params(cfg)
    unused = 0
    for i in built:
        experts = nnx.state(model.blocks[i].mlp, nnx.Param)
        for name, leaf in experts.items():
            if name.startswith("w_") and leaf.shape[0] == cfg.moe.n_experts:
                unused += int(np.prod(leaf.shape)) // cfg.moe.n_experts * (cfg.moe.n_experts - cfg.moe.top_k)
    assert unused > 0
    assert n_params(cfg)["n_params_active"] == total - unused


def test_n_params_dense_by_hand():
    d, ff, v, layers = 64, 256, 256, 2
    attention = 4 * d * d  # q, k, v, o with n_heads * head_dim = d
    mlp = 3 * d * ff  # SwiGLU: in, gate, out
    norms = 2 * d
    embed = 2 * v * d  # untied embedding + unembedding
    total = embed + layers * (attention + mlp + norms) + d
    assert total == 164160
    assert n_params(DENSE) == {
        "n_params_total": total,
        "n_params_nonembed": total - embed,
        "n_params_active": total,
        "n_params_active_nonembed": total - embed,
        "n_params_embed": embed,
    }


def test_n_params_moe_by_hand():
    d, v, layers, head = 64, 512, 4, 16
    attention = d * 4 * head + 2 * d * 2 * head + 4 * head * d  # q, k and v (2 kv heads), o
    dense_mlp = 2 * d * 128  # GELU: in, out
    expert = 2 * d * 96
    router = d * 8
    embed = v * d  # tied
    norms = 2 * d * layers + d
    # blocks 1 and 3 are MoE (every=2), blocks 0 and 2 dense
    total = embed + norms + layers * attention + 2 * dense_mlp + 2 * (router + (8 + 1) * expert)
    active = embed + norms + layers * attention + 2 * dense_mlp + 2 * (router + (2 + 1) * expert)
    assert (total, active) == (337472, 190016)
    counts = n_params(MOE)
    assert counts["n_params_total"] == total
    assert counts["n_params_active"] == active
    assert counts["n_params_nonembed"] == total - embed
    assert counts["n_params_active_nonembed"] == active - embed


def test_flops_per_token_dense_by_hand():
    d, ff, v, s, n_heads, layers = 64, 256, 256, 32, 4, 2
    embeddings = 2 * d * v
    attention = 2 * 3 * d * d + 2 * s * d + 3 * n_heads * s + 2 * s * d + 2 * d * d
    mlp = 2 * 3 * d * ff
    forward = embeddings + layers * (attention + mlp) + 2 * d * v
    assert forward == 344832
    assert flops_per_token(DENSE, "6N+attention") == 3 * forward
    assert flops_per_token(DENSE, "6N") == 6 * 131392


def test_flops_per_token_moe_by_hand():
    d, v, s, head, layers = 64, 512, 64, 16, 4
    attention = 2 * d * (4 + 2 * 2) * head + 2 * s * 4 * head + 3 * 4 * s + 2 * s * 4 * head + 2 * 4 * head * d
    dense_mlp = 2 * 2 * d * 128
    moe_mlp = 2 * d * 8 + (2 + 1) * 2 * 2 * d * 96  # router + top-2 routed + 1 shared expert
    forward = 2 * d * v + layers * attention + 2 * dense_mlp + 2 * moe_mlp + 2 * d * v
    assert forward == 513024
    assert flops_per_token(MOE, "6N+attention") == 3 * forward
    assert flops_per_token(MOE, "6N") == 6 * (190016 - 32768)


def test_flop_conventions_and_errors():
    assert FLOP_CONVENTIONS == ("6N", "6N+attention")
    with pytest.raises(ValueError, match="unknown FLOP convention"):
        flops_per_token(DENSE, "6ND")
    # MFU counts the executed matmuls: unembedding + full-context attention, no embedding gather.
    d, ff, v, s, layers = 64, 256, 256, 32, 2
    forward = layers * (2 * 4 * d * d + 4 * s * d + 2 * 3 * d * ff) + 2 * d * v
    assert mfu_flops_per_token(DENSE) == 3 * forward
