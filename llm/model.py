"""Decoder-only transformer in Flax NNX.

Why NNX: it is the current Flax API (Linen is in maintenance), modules are plain Python
objects whose parameters are explicit ``nnx.Param`` variables, and ``nnx.split`` /
``nnx.merge`` turn the model into a (static graphdef, params pytree) pair. The
training step is therefore a pure function of a params pytree, jit-compiled once,
with no hidden RNG or mutable collections: this module holds nothing but
``nnx.Param`` variables (no dropout, no RNG state, no caches).

Architecture: token embedding -> n_layers x [x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x))]
-> RMSNorm -> unembedding (tied to the embedding or separate). Rotary positions,
grouped-query attention, SwiGLU or GELU MLP. When ``cfg.moe`` is set, the blocks that
``llm.counting.is_moe_block`` names use the routed MoE layer (llm.moe) in the MLP slot.

Layer scan (``cfg.scan_layers``): the repeating units of blocks are stored stacked
(``stacked[j]``, parameters [units, ...]; llm.layer_stack) and run as one ``jax.lax.scan``;
``blocks`` then holds only the dense blocks left over. ``layer_blocks`` lists every layer's
block in order in either layout.

Sharding: parameters carry logical axis names (llm.layers.normal_param) and the residual
stream and logits are constrained by name (llm.sharding.constrain, a no-op without a mesh);
llm.sharding alone maps names to mesh axes.

Precision: parameters in ``param_dtype`` (float32); activations and matmuls in
``compute_dtype`` (bfloat16 by default); RMSNorm, RoPE, router, logits and every loss
term in float32. Initialisation is documented in llm.layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llm.attention import Attention
from llm.config import ModelConfig
from llm.counting import is_moe_block
from llm.layer_stack import layer_period, stack, stacked_units, unstack
from llm.layers import MLP, RMSNorm, dtype_of, normal_param, rope_tables, token_matmul
from llm.moe import MoE, moe_kernel
from llm.sharding import constrain

# The residual stream's logical axes: on a mesh, rows split over the batch axes (llm.sharding).
ACTIVATION_NAMES = ("batch", "seq", "embed")


class Block(nnx.Module):
    """Pre-norm residual block: attention, then the MLP slot (dense MLP or MoE)."""

    def __init__(self, cfg: ModelConfig, i: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        self.is_moe = is_moe_block(cfg, i)
        if self.is_moe:
            self.mlp = MoE(cfg, rngs=rngs, grouped_matmul=cfg.moe.grouped_matmul)
        else:
            self.mlp = MLP(cfg, cfg.d_ff, rngs=rngs)

    def __call__(self, x_BTD, sin_TH2, cos_TH2, valid_BT=None):
        """Returns (x_BTD, stats): stats is the MoE layer's dict of float32 scalars or {}.

        valid_BT (optional [batch, time] mask) reaches the MoE layer only; dense blocks ignore it.
        """
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), sin_TH2, cos_TH2)
        if self.is_moe:
            h_BTD, stats = self.mlp(self.mlp_norm(x_BTD), valid_BT)
        else:
            h_BTD, stats = self.mlp(self.mlp_norm(x_BTD)), {}
        return constrain(x_BTD + h_BTD, ACTIVATION_NAMES), stats


def _run_block(block: Block, x_BTD, sin_TH2, cos_TH2, valid_BT):
    return block(x_BTD, sin_TH2, cos_TH2, valid_BT)


# Rematerialised variant: activations inside a block are recomputed in the backward pass.
_run_block_remat = nnx.remat(_run_block)


class Transformer(nnx.Module):
    """Decoder-only language model; ``model(tokens_BT) -> (logits_BTV float32, aux)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.embed_VD = normal_param(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std, cfg.param_dtype, ("vocab", "embed"))
        # Built one by one from the same random stream whatever the layout, so scanned and plain
        # models start from the same parameters; the scan's are then stored stacked (llm.layer_stack).
        blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)]
        units, period = stacked_units(cfg), layer_period(cfg)
        if units:
            self.stacked = nnx.List([_stack_blocks(blocks[j : units * period : period]) for j in range(period)])
        self.blocks = nnx.List(blocks[units * period :])  # every block, or the scan's leftover dense ones
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        if not cfg.tie_embeddings:
            self.unembed_DV = normal_param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std, cfg.param_dtype, ("embed", "vocab"))

    def moe_kernel(self) -> str | None:
        """The dropless grouped-matmul kernel this model's MoE blocks run ("auto" resolved).

        None for a dense model or capacity routing (no grouped matmul runs).
        """
        return moe_kernel(self.cfg)

    def __call__(self, tokens_BT: jax.Array, valid_BT: jax.Array | None = None):
        """Next-token logits for every position.

        Args:
          tokens_BT: int32 token ids [batch, time]; time may be at most anything (RoPE
            has no table limit) but the model was trained at cfg.seq_len.
          valid_BT: optional bool or 0/1 [batch, time], False/0 marking padding; None
            means all tokens are real. Under capacity routing padding claims no expert
            slot, so real tokens are never dropped because of it; MoE statistics and
            aux losses leave it out. Dense models ignore it (the caller masks the loss).
        Returns:
          logits_BTV: float32 [batch, time, vocab_size].
          aux: {"aux_loss": float32 scalar, already weighted by the MoE coefficients
            (0.0 for a dense model), "metrics": {name: float32 scalar}}.
        """
        cfg, cdt = self.cfg, self.compute_dtype
        if tokens_BT.ndim != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tokens_BT.shape}")
        if valid_BT is not None and tuple(valid_BT.shape) != tuple(tokens_BT.shape):
            raise ValueError(f"valid_BT shape {tuple(valid_BT.shape)} differs from tokens {tuple(tokens_BT.shape)}")
        x_BTD, aux = self.hidden(tokens_BT, valid_BT)
        # bf16 operands, float32 accumulation and output: logits and the loss stay float32.
        logits_BTV = token_matmul(x_BTD, self.unembedding(), preferred_element_type=jnp.float32)
        return constrain(logits_BTV, ("batch", "seq", "vocab")), aux

    def hidden(self, tokens_BT: jax.Array, valid_BT: jax.Array | None = None):
        """Final-normed hidden states [batch, time, d_model] (compute dtype) and aux, as in ``__call__``.

        ``__call__`` is ``hidden`` then the unembedding; the blockwise loss (llm.logits) takes
        these states and ``unembedding()`` instead, so full logits never exist.
        """
        cfg, cdt = self.cfg, self.compute_dtype
        sin_TH2, cos_TH2 = rope_tables(tokens_BT.shape[1], cfg.d_model // cfg.n_heads, cfg.rope_theta)
        x_BTD = constrain(jnp.take(self.embed_VD[...], tokens_BT, axis=0).astype(cdt), ACTIVATION_NAMES)
        layer_stats: dict[int, dict] = {}
        if stacked_units(cfg):
            x_BTD, layer_stats = _scan_blocks(cfg, list(self.stacked), x_BTD, sin_TH2, cos_TH2, valid_BT)
        run = _run_block_remat if cfg.remat else _run_block
        first = cfg.n_layers - len(self.blocks)  # blocks the scan left over (a remainder of moe.every)
        for i, block in enumerate(self.blocks, start=first):
            x_BTD, stats = run(block, x_BTD, sin_TH2, cos_TH2, valid_BT)
            if stats:
                layer_stats[i] = stats
        return constrain(self.final_norm(x_BTD), ACTIVATION_NAMES), _collect_aux(cfg, layer_stats)

    def unembedding(self) -> jax.Array:
        """The unembedding matrix [d_model, vocab] in the compute dtype (the embedding's transpose if tied)."""
        w_DV = self.embed_VD[...].T if self.cfg.tie_embeddings else self.unembed_DV[...]
        return w_DV.astype(self.compute_dtype)


def layer_blocks(model: Transformer) -> list[Block]:
    """The model's n_layers blocks in order, each with its own parameters: the stacked ones are
    sliced out (position j of unit r is layer r * period + j). For code that walks the layers one
    by one (llm.evaluation's key/value-cache decoder); a slice under jit is a view, not a copy."""
    units = stacked_units(model.cfg)
    splits = [nnx.split(stacked) for stacked in model.stacked] if units else []
    blocks = [nnx.merge(graphdef, unstack(state, r)) for r in range(units) for graphdef, state in splits]
    return blocks + list(model.blocks)


def _stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose parameters are those of ``blocks`` (same position in successive units) stacked."""
    graphdef, _ = nnx.split(blocks[0])
    return nnx.merge(graphdef, stack([nnx.state(block) for block in blocks]))


def _scan_blocks(cfg: ModelConfig, stacked: list[Block], x_BTD, sin_TH2, cos_TH2, valid_BT):
    """Run the stacked units as one ``jax.lax.scan`` over their stored [units, ...] parameters;
    return (x, MoE stats by layer number).

    ``stacked[j]`` is position j of the unit (llm.layer_stack). XLA compiles one unit however deep
    the model, and nothing is stacked or sliced per step: the gradient comes out stacked too.
    """
    graphdefs, states = zip(*(nnx.split(block) for block in stacked))

    def unit(x_BTD, states):
        unit_stats = []
        for graphdef, state in zip(graphdefs, states):
            x_BTD, stats = nnx.merge(graphdef, state)(x_BTD, sin_TH2, cos_TH2, valid_BT)
            unit_stats.append(stats)
        return x_BTD, unit_stats

    if cfg.remat:  # one unit's activations recomputed in the backward pass, as nnx.remat does per block
        unit = jax.checkpoint(unit, prevent_cse=False)
    x_BTD, stats_by_position = jax.lax.scan(unit, x_BTD, states)
    period = len(stacked)
    layer_stats = {
        r * period + j: {name: value[r] for name, value in stats.items()}
        for j, stats in enumerate(stats_by_position) if stats
        for r in range(stacked_units(cfg))
    }
    return x_BTD, layer_stats


def _collect_aux(cfg: ModelConfig, layer_stats: dict) -> dict:
    """Sum the MoE losses over layers, weight them, and flatten per-layer metrics."""
    if not layer_stats:
        return {"aux_loss": jnp.zeros((), jnp.float32), "metrics": {}}
    lb = sum(s["load_balance_loss"] for s in layer_stats.values())
    z = sum(s["router_z_loss"] for s in layer_stats.values())
    metrics = {"moe/load_balance_loss": lb, "moe/router_z_loss": z}
    for i, s in layer_stats.items():
        for name in ("load_min", "load_max", "load_cv", "drop_fraction", "router_entropy"):
            metrics[f"moe/layer{i}/{name}"] = s[name]
    aux_loss = cfg.moe.load_balance_coef * lb + cfg.moe.router_z_coef * z
    return {"aux_loss": jnp.asarray(aux_loss, jnp.float32), "metrics": metrics}
