"""Routed mixture-of-experts MLP (Switch / Mixtral / DeepSeek-shared style).

Router: float32 linear d_model -> n_experts, softmax, top-k. The k chosen
probabilities are renormalised to sum to 1 when top_k > 1 (Mixtral); for top_k = 1
the raw top probability is kept (Switch), since a renormalised single weight is
identically 1 and the router would get no gradient from the language-model loss.

Dispatch, same semantics wherever no token is dropped:
  * dropless (capacity_factor None): sort the token-expert assignments by expert and
    run grouped matmuls (``jax.lax.ragged_dot`` or the blocked kernel, llm.grouped;
    "auto" picks per platform, ``resolve_grouped_matmul``); nothing is ever dropped.
  * capacity (capacity_factor set): routing is done per group, and a group is one
    sequence (GShard/Switch route in groups too). Each expert takes at most
    C = min(T, ceil(capacity_factor * T * top_k / n_experts)) assignments of the T
    tokens of a sequence; first choices claim slots before second choices (GShard),
    earlier tokens before later ones. Assignments over capacity are dropped (the
    token keeps only its residual for that expert). Tokens are scattered into an
    [E, C] slot buffer per sequence and gathered back, so memory is
    O(batch * T * top_k * capacity_factor * d_model): linear in batch tokens (the
    former whole-batch one-hot dispatch tensors were [B*T, E, C] with C ~ B*T).
    Why per sequence rather than a fixed group size: a sequence's outputs then never
    depend on the other sequences in the batch, so batch size, gradient accumulation
    and eval micro-batching (padding rows included) do not change any result; and
    seq_len is already the natural, static group size. Within a sequence the path is
    not strictly causal (later tokens' first choices precede earlier tokens' second
    choices, as in Switch/GShard); dropless is.
Token validity (``valid_BT``, e.g. eval padding): invalid tokens claim no capacity
slot (they are never dispatched, so they cannot push real tokens out) and are left
out of every statistic and aux loss below. Dropless paths compute them (they cannot
affect other tokens there) but they are equally left out of the statistics.
n_shared always-on shared experts run densely on every token (one MLP of width
n_shared * d_ff_expert, which is exactly the sum of n_shared experts).

Auxiliary losses (float32, unweighted here; the model weights and sums them):
  * Switch load balance: n_experts * sum_e f_e * P_e with f_e the fraction of the
    S * top_k assignments routed to e and P_e the mean router probability of e
    (S = the valid tokens of the batch):
    1.0 under uniform routing, up to n_experts when routing collapses.
  * ST-MoE router z-loss: mean over tokens of logsumexp(router logits)^2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm.config import ModelConfig
from llm.grouped import GROUPED_MATMULS, block_layout, block_size, blocked_matmul
from llm.layers import MLP, activation, dtype_of, input_std, normal_param, output_std


def resolve_grouped_matmul(name: str, platform: str | None = None) -> str:
    """The dropless kernel that ``model.moe.grouped_matmul = name`` runs on ``platform``.

    "ragged_dot" and "blocked" are returned as given. "auto" (the default) is the
    fastest correct one we know of per platform: "ragged_dot" on TPU, whose backend has a
    native grouped matmul, and "blocked" elsewhere. On CPU XLA lowers ragged_dot to a dense
    product over all experts (n_experts / top_k times the useful FLOPs; a train step of the
    default model with 8 experts, top-2, batch 16 on 2 shared CPU cores: median 3.3 s
    ragged_dot vs 1.0 s blocked, 2.4-5x in each of 5 runs). On CUDA, jaxlib's XLA rewrites
    ragged_dot into that same dense product (newer XLA hands the forward and input-gradient
    products to a cuDNN grouped matmul, but still densifies the weight gradient), so
    "blocked" is the choice there too until benchmarks/train_throughput.py --moe on a GPU
    (benchmarks/gpu_ladder.sh) says otherwise.
    platform: "cpu" | "gpu" | "cuda" | "rocm" | "tpu"; None means ``jax.default_backend()``.
    """
    if name in GROUPED_MATMULS:
        return name
    if name != "auto":
        raise ValueError(f"grouped_matmul={name!r}; choose one of auto, {', '.join(GROUPED_MATMULS)}")
    return "ragged_dot" if (platform or jax.default_backend()) == "tpu" else "blocked"


def moe_kernel(cfg: ModelConfig, platform: str | None = None) -> str | None:
    """The grouped-matmul kernel a model built from ``cfg`` runs (for result.json).

    None where no grouped matmul runs: dense models and capacity routing (which
    multiplies fixed-size [E, C] slot buffers instead).
    """
    if cfg.moe is None or cfg.moe.capacity_factor is not None:
        return None
    return resolve_grouped_matmul(cfg.moe.grouped_matmul, platform)


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Assignments one expert accepts: min(tokens, ceil(capacity_factor * tokens * top_k / n_experts))."""
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


class MoE(nnx.Module):
    """``moe(x_BTD) -> (y_BTD, stats)``; stats are float32 scalars (losses, load, drops, entropy)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, grouped_matmul: str = "auto"):
        self.grouped_matmul = resolve_grouped_matmul(grouped_matmul)  # "auto" resolved for this process's backend
        m = cfg.moe
        d, e, f = cfg.d_model, m.n_experts, m.d_ff_expert or cfg.d_ff
        self.n_experts, self.top_k, self.capacity_factor = e, m.top_k, m.capacity_factor
        self.kind, self.compute_dtype = cfg.mlp, dtype_of(cfg.compute_dtype)
        self.router_DE = normal_param(rngs, (d, e), input_std(cfg, d), "float32", ("embed", None))
        self.w_in_EDF = normal_param(rngs, (e, d, f), input_std(cfg, d), cfg.param_dtype, ("expert", "embed", "mlp"))
        if cfg.mlp == "swiglu":
            self.w_gate_EDF = normal_param(rngs, (e, d, f), input_std(cfg, d), cfg.param_dtype, ("expert", "embed", "mlp"))
        self.w_out_EFD = normal_param(rngs, (e, f, d), output_std(cfg, f), cfg.param_dtype, ("expert", "mlp", "embed"))
        self.shared = MLP(cfg, m.n_shared * f, rngs=rngs) if m.n_shared else None

    def _experts(self, x, matmul):
        """Expert FFN over grouped inputs; ``matmul(x, w_EAB)`` picks each row's expert."""
        cdt = self.compute_dtype
        h_in = matmul(x, self.w_in_EDF[...].astype(cdt))
        h_gate = matmul(x, self.w_gate_EDF[...].astype(cdt)) if self.kind == "swiglu" else None
        return matmul(activation(self.kind, h_in, h_gate), self.w_out_EFD[...].astype(cdt))

    def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None):
        """Routed MLP of every token.

        Args:
          x_BTD: [batch, time, d_model] activations.
          valid_BT: optional bool or 0/1 [batch, time]; None means every token is real.
            Invalid tokens take no expert capacity and are left out of the stats.
        Returns:
          y_BTD in compute dtype, and stats: float32 scalars (losses, load, drops, entropy).
        """
        b, t, d = x_BTD.shape
        s, e, k, cdt = b * t, self.n_experts, self.top_k, self.compute_dtype
        x_SD = x_BTD.reshape(s, d).astype(cdt)
        valid_S = jnp.ones((s,), bool) if valid_BT is None else jnp.asarray(valid_BT).reshape(s).astype(bool)
        logits_SE = x_SD.astype(jnp.float32) @ self.router_DE[...].astype(jnp.float32)
        probs_SE = jax.nn.softmax(logits_SE, axis=-1)
        top_p_SK, expert_SK = jax.lax.top_k(probs_SE, k)
        weight_SK = top_p_SK / jnp.sum(top_p_SK, axis=-1, keepdims=True) if k > 1 else top_p_SK
        if self.capacity_factor is None:
            y_SD, dropped = self._dropless(x_SD, expert_SK, weight_SK), jnp.int32(0)
        else:
            y_SD, dropped = self._capacity(x_SD, expert_SK, weight_SK, valid_S, group=t)
        if self.shared is not None:
            y_SD = y_SD + self.shared(x_SD)

        # Statistics over valid tokens only (max(., 1): an all-padding batch gives zeros, not NaN);
        # elementwise sums, not matmuls, so no TF32 rounding on GPUs.
        w_S = valid_S.astype(jnp.float32)
        n_valid = jnp.maximum(jnp.sum(w_S), 1.0)
        load_E = jnp.bincount(expert_SK.reshape(-1), weights=jnp.repeat(w_S, k), length=e) / (n_valid * k)
        entropy_S = -jnp.sum(probs_SE * jnp.log(probs_SE + 1e-20), axis=-1)
        stats = {
            "load_balance_loss": e * jnp.sum(load_E * jnp.sum(probs_SE * w_S[:, None], axis=0) / n_valid),
            "router_z_loss": jnp.sum(w_S * jnp.square(jax.nn.logsumexp(logits_SE, axis=-1))) / n_valid,
            "load_min": jnp.min(load_E),
            "load_max": jnp.max(load_E),
            "load_cv": jnp.std(load_E) / jnp.maximum(jnp.mean(load_E), 1e-20),
            "drop_fraction": dropped.astype(jnp.float32) / (n_valid * k),
            "router_entropy": jnp.sum(w_S * entropy_S) / n_valid,
        }
        return y_SD.reshape(b, t, d).astype(cdt), stats

    def _dropless(self, x_SD, expert_SK, weight_SK):
        if self.grouped_matmul == "blocked":
            return self._dropless_blocked(x_SD, expert_SK, weight_SK)
        s, k = expert_SK.shape
        expert_A = expert_SK.reshape(-1)  # A = S * K assignments, token-major
        order_A = jnp.argsort(expert_A, stable=True)
        x_AD = x_SD[order_A // k]  # sorted assignment -> its token
        group_sizes_E = jnp.bincount(expert_A, length=self.n_experts).astype(jnp.int32)
        out_AD = self._experts(x_AD, lambda x, w: jax.lax.ragged_dot(x, w, group_sizes_E))
        out_SKD = jnp.zeros_like(out_AD).at[order_A].set(out_AD).reshape(s, k, -1)
        return jnp.einsum("skd,sk->sd", out_SKD.astype(jnp.float32), weight_SK)

    def _dropless_blocked(self, x_SD, expert_SK, weight_SK):
        s, k = expert_SK.shape
        block = block_size(s * k, self.n_experts)
        dest_A, expert_B, n_blocks = block_layout(expert_SK.reshape(-1), self.n_experts, block)
        x_PD = jnp.zeros((n_blocks * block, x_SD.shape[-1]), x_SD.dtype).at[dest_A].set(jnp.repeat(x_SD, k, axis=0))
        out_PD = self._experts(x_PD, lambda x, w: blocked_matmul(x, w, expert_B))
        out_SKD = out_PD[dest_A].reshape(s, k, -1)
        return jnp.einsum("skd,sk->sd", out_SKD.astype(jnp.float32), weight_SK)

    def _capacity(self, x_SD, expert_SK, weight_SK, valid_S, group: int):
        """Capacity dispatch in groups of ``group`` consecutive tokens (one sequence each).

        Returns (y_SD float32, number of valid assignments dropped).
        """
        s, k = expert_SK.shape
        e, g, d = self.n_experts, s // group, x_SD.shape[-1]
        c = expert_capacity(self.capacity_factor, group, k, e)
        # Assignments of a group in queue order a = choice * group + position: first choices first.
        expert_GA = expert_SK.reshape(g, group, k).transpose(0, 2, 1).reshape(g, k * group)
        valid_GA = jnp.tile(valid_S.reshape(g, 1, group), (1, k, 1)).reshape(g, k * group)
        onehot_GAE = jax.nn.one_hot(expert_GA, e, dtype=jnp.int32) * valid_GA[..., None]  # padding queues nowhere
        slot_GA = jnp.sum((jnp.cumsum(onehot_GAE, axis=1) - 1) * onehot_GAE, axis=-1)
        keep_GA = valid_GA & (slot_GA < c)
        dest_GA = jnp.where(keep_GA, expert_GA * c + slot_GA, e * c)  # e * c: out of range, never written
        x_GAD = jnp.tile(x_SD.reshape(g, 1, group, d), (1, k, 1, 1)).reshape(g, k * group, d)
        rows_G1 = jnp.arange(g)[:, None]
        x_GECD = jnp.zeros((g, e * c, d), x_SD.dtype).at[rows_G1, dest_GA].set(x_GAD, mode="drop").reshape(g, e, c, d)
        out_GECD = self._experts(x_GECD, lambda x, w: jnp.einsum("geca,eab->gecb", x, w))
        out_GAD = out_GECD.reshape(g, e * c, -1)[rows_G1, jnp.minimum(dest_GA, e * c - 1)].astype(jnp.float32)
        weight_GA = weight_SK.reshape(g, group, k).transpose(0, 2, 1).reshape(g, k * group) * keep_GA
        y_SD = jnp.sum((out_GAD * weight_GA[..., None]).reshape(g, k, group, d), axis=1).reshape(s, d)
        return y_SD, jnp.sum(valid_GA & ~keep_GA).astype(jnp.int32)
