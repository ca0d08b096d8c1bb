"""Parameter and FLOP counts of a ModelConfig, exact, from the config alone.

Notation (as in configs, result.json and plots): N = parameters, counted as
  n_params_total            every parameter, all experts included
  n_params_embed            token embedding + unembedding (once if tied)
  n_params_nonembed         total - embed (Kaplan et al. 2020's N)
  n_params_active           parameters one token uses: the router, top_k routed
                            experts and the shared experts instead of all experts
  n_params_active_nonembed  active - embed
FLOPs are training FLOPs per token (forward + backward) under a named convention:
  "6N"            6 * n_params_active_nonembed (Kaplan et al. 2020, C = 6ND)
  "6N+attention"  3 x the forward FLOPs of Hoffmann et al. 2022 Appendix F
                  (embedding, QKV, logits, softmax, values, output, MLP over the
                  active experts + router, final logits), full seq_len context.
"""

from __future__ import annotations

from rundir import FLOP_CONVENTIONS  # noqa: F401  (re-exported: counting's conventions)
from llm.config import ModelConfig



def _mlp_matrices(cfg: ModelConfig) -> int:
    """Weight matrices of one (dense or expert) MLP: 3 for SwiGLU, 2 for GELU."""
    return 3 if cfg.mlp == "swiglu" else 2


def is_moe_block(cfg: ModelConfig, i: int) -> bool:
    """Whether block i (0-based) carries the routed MoE layer in its MLP slot.

    The one home of this rule: ``llm.model`` builds blocks with it and the counts
    below use it. Blocks every-1, 2*every-1, ... are MoE; a trailing remainder of
    n_layers % every blocks stays dense.
    """
    return cfg.moe is not None and (i + 1) % cfg.moe.every == 0


def _moe_layers(cfg: ModelConfig) -> int:
    return sum(1 for i in range(cfg.n_layers) if is_moe_block(cfg, i))


def _d_ff_expert(cfg: ModelConfig) -> int:
    return cfg.moe.d_ff_expert or cfg.d_ff


def _attention_params(cfg: ModelConfig) -> int:
    d, n = cfg.d_model, cfg.n_heads
    h, kv = d // n, cfg.n_kv_heads or n
    return d * n * h + 2 * d * kv * h + n * h * d  # q, k, v, output; no biases


def n_params(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts (ints) of ``llm.model.Transformer(cfg)``; see module docstring."""
    d, v, m = cfg.d_model, cfg.vocab_size, _mlp_matrices(cfg)
    n_moe = _moe_layers(cfg)
    n_dense = cfg.n_layers - n_moe
    embed = v * d * (1 if cfg.tie_embeddings else 2)
    norms = 2 * d * cfg.n_layers + d  # two RMSNorm scales per block + the final norm
    common = embed + norms + cfg.n_layers * _attention_params(cfg) + n_dense * m * d * cfg.d_ff
    total = active = common
    if n_moe:
        e = cfg.moe
        expert = m * d * _d_ff_expert(cfg)
        router = d * e.n_experts
        total += n_moe * (router + (e.n_experts + e.n_shared) * expert)
        active += n_moe * (router + (e.top_k + e.n_shared) * expert)
    return {
        "n_params_total": total,
        "n_params_nonembed": total - embed,
        "n_params_active": active,
        "n_params_active_nonembed": active - embed,
        "n_params_embed": embed,
    }


def forward_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token, Hoffmann et al. 2022 Appendix F (a multiply-add = 2 FLOPs).

    Per token, with S = seq_len, N heads of size H, K kv heads:
      embeddings 2*d*V; per layer: QKV 2*d*(N+2K)*H, logits 2*S*N*H, softmax 3*N*S,
      softmax@values 2*S*N*H, output projection 2*N*H*d, MLP 2*d*d_ff per matrix
      (MoE layers: router 2*d*E plus top_k + n_shared experts); final logits 2*d*V.
    Norms and activations are ignored, as in the paper.
    """
    d, v, s, n = cfg.d_model, cfg.vocab_size, cfg.seq_len, cfg.n_heads
    h, kv = d // n, cfg.n_kv_heads or n
    attention = 2 * d * (n + 2 * kv) * h + 2 * s * n * h + 3 * n * s + 2 * s * n * h + 2 * n * h * d
    layers = cfg.n_layers * attention + _mlp_flops_all_layers(cfg)
    return float(2 * d * v + layers + 2 * d * v)


def _mlp_flops_all_layers(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of every block's MLP: dense, or router + active experts."""
    d = cfg.d_model
    n_moe = _moe_layers(cfg)
    flops = (cfg.n_layers - n_moe) * 2 * _mlp_matrices(cfg) * d * cfg.d_ff
    if n_moe:
        e = cfg.moe
        expert = 2 * _mlp_matrices(cfg) * d * _d_ff_expert(cfg)
        flops += n_moe * (2 * d * e.n_experts + (e.top_k + e.n_shared) * expert)
    return flops


def flops_per_token(cfg: ModelConfig, convention: str) -> float:
    """Training FLOPs per token (forward + backward) under ``convention`` (FLOP_CONVENTIONS)."""
    if convention == "6N":
        return float(6 * n_params(cfg)["n_params_active_nonembed"])
    if convention == "6N+attention":
        return 3.0 * forward_flops_per_token(cfg)
    raise ValueError(f"unknown FLOP convention {convention!r}; choose one of {', '.join(FLOP_CONVENTIONS)}")


def mfu_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token the hardware must do, for model-FLOPs utilisation (MFU).

    3 x the forward matmul FLOPs actually executed (PaLM appendix B style): QKV and
    output projections, 4*S*N*H for attention logits and values at full context
    (no causal halving, as PaLM), MLP over the active experts + router, and the
    2*d*V unembedding. The embedding lookup (a gather) and softmax are not counted.
    This is exactly the dot FLOPs of a dense model's forward + backward (tests check it
    against the jaxpr and XLA's cost analysis). MoE dispatch multiplies padding too
    (blocked: rows up to whole blocks; capacity: E * C slots per sequence, about
    capacity_factor x the routed rows); MFU counts it as waste, like any padding.
    """
    d, v, s, n = cfg.d_model, cfg.vocab_size, cfg.seq_len, cfg.n_heads
    h, kv = d // n, cfg.n_kv_heads or n
    attention = 2 * d * (n + 2 * kv) * h + 4 * s * n * h + 2 * n * h * d
    layers = cfg.n_layers * attention + _mlp_flops_all_layers(cfg)
    return 3.0 * float(layers + 2 * d * v)
