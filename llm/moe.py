"""Routed mixture-of-experts MLP (Switch / Mixtral / DeepSeek-shared style).

Router: float32 linear d_model -> n_experts, softmax, top-k. The k chosen
probabilities are renormalised to sum to 1 when top_k > 1 (Mixtral); for top_k = 1
the raw top probability is kept (Switch), since a renormalised single weight is
identically 1 and the router would get no gradient from the language-model loss.

Dispatch, same semantics wherever no token is dropped:
  * dropless (capacity_factor None): sort the token-expert assignments by expert and
    run grouped matmuls with ``jax.lax.ragged_dot``; nothing is ever dropped.
  * capacity (capacity_factor set): each expert takes at most
    C = min(S, ceil(capacity_factor * S * top_k / n_experts)) assignments of the S
    tokens in the batch; first choices claim slots before second choices (GShard),
    earlier tokens before later ones. One-hot dispatch/combine einsums; assignments
    over capacity are dropped (the token keeps only its residual for that expert).
    Which assignments fit depends on the whole batch, later positions included, so
    the capacity path is not strictly causal (as in Switch/GShard); dropless is.
n_shared always-on shared experts run densely on every token (one MLP of width
n_shared * d_ff_expert, which is exactly the sum of n_shared experts).

Auxiliary losses (float32, unweighted here; the model weights and sums them):
  * Switch load balance: n_experts * sum_e f_e * P_e with f_e the fraction of the
    S * top_k assignments routed to e and P_e the mean router probability of e:
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


def expert_capacity(capacity_factor: float, n_tokens: int, top_k: int, n_experts: int) -> int:
    """Assignments one expert accepts: min(tokens, ceil(capacity_factor * tokens * top_k / n_experts))."""
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


class MoE(nnx.Module):
    """``moe(x_BTD) -> (y_BTD, stats)``; stats are float32 scalars (losses, load, drops, entropy)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, grouped_matmul: str = "ragged_dot"):
        if grouped_matmul not in GROUPED_MATMULS:
            raise ValueError(f"grouped_matmul={grouped_matmul!r}; choose one of {', '.join(GROUPED_MATMULS)}")
        self.grouped_matmul = grouped_matmul
        m = cfg.moe
        d, e, f = cfg.d_model, m.n_experts, m.d_ff_expert or cfg.d_ff
        self.n_experts, self.top_k, self.capacity_factor = e, m.top_k, m.capacity_factor
        self.kind, self.compute_dtype = cfg.mlp, dtype_of(cfg.compute_dtype)
        self.router_DE = normal_param(rngs, (d, e), input_std(cfg, d), "float32")
        self.w_in_EDF = normal_param(rngs, (e, d, f), input_std(cfg, d), cfg.param_dtype)
        if cfg.mlp == "swiglu":
            self.w_gate_EDF = normal_param(rngs, (e, d, f), input_std(cfg, d), cfg.param_dtype)
        self.w_out_EFD = normal_param(rngs, (e, f, d), output_std(cfg, f), cfg.param_dtype)
        self.shared = MLP(cfg, m.n_shared * f, rngs=rngs) if m.n_shared else None

    def _experts(self, x, matmul):
        """Expert FFN over grouped inputs; ``matmul(x, w_EAB)`` picks each row's expert."""
        cdt = self.compute_dtype
        h_in = matmul(x, self.w_in_EDF[...].astype(cdt))
        h_gate = matmul(x, self.w_gate_EDF[...].astype(cdt)) if self.kind == "swiglu" else None
        return matmul(activation(self.kind, h_in, h_gate), self.w_out_EFD[...].astype(cdt))

    def __call__(self, x_BTD: jax.Array):
        b, t, d = x_BTD.shape
        s, e, k, cdt = b * t, self.n_experts, self.top_k, self.compute_dtype
        x_SD = x_BTD.reshape(s, d).astype(cdt)
        logits_SE = x_SD.astype(jnp.float32) @ self.router_DE[...].astype(jnp.float32)
        probs_SE = jax.nn.softmax(logits_SE, axis=-1)
        top_p_SK, expert_SK = jax.lax.top_k(probs_SE, k)
        weight_SK = top_p_SK / jnp.sum(top_p_SK, axis=-1, keepdims=True) if k > 1 else top_p_SK
        if self.capacity_factor is None:
            y_SD, dropped = self._dropless(x_SD, expert_SK, weight_SK), jnp.int32(0)
        else:
            y_SD, dropped = self._capacity(x_SD, expert_SK, weight_SK)
        if self.shared is not None:
            y_SD = y_SD + self.shared(x_SD)

        load_E = jnp.bincount(expert_SK.reshape(-1), length=e).astype(jnp.float32) / (s * k)
        stats = {
            "load_balance_loss": e * jnp.sum(load_E * jnp.mean(probs_SE, axis=0)),
            "router_z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits_SE, axis=-1))),
            "load_min": jnp.min(load_E),
            "load_max": jnp.max(load_E),
            "load_cv": jnp.std(load_E) / jnp.mean(load_E),
            "drop_fraction": dropped.astype(jnp.float32) / (s * k),
            "router_entropy": -jnp.mean(jnp.sum(probs_SE * jnp.log(probs_SE + 1e-20), axis=-1)),
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

    def _capacity(self, x_SD, expert_SK, weight_SK):
        s, k = expert_SK.shape
        c = expert_capacity(self.capacity_factor, s, k, self.n_experts)
        onehot_SKE = jax.nn.one_hot(expert_SK, self.n_experts, dtype=jnp.int32)
        # Slot of each assignment in its expert's queue: first choices of all tokens first.
        onehot_AE = onehot_SKE.transpose(1, 0, 2).reshape(k * s, self.n_experts)
        slot_AE = (jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE
        slot_SK = jnp.sum(slot_AE, axis=-1).reshape(k, s).T
        keep_SK = slot_SK < c
        slot_SKC = jax.nn.one_hot(slot_SK, c, dtype=jnp.float32) * keep_SK[..., None]
        dispatch_SEC = jnp.einsum("ske,skc->sec", onehot_SKE.astype(jnp.float32), slot_SKC)
        combine_SEC = jnp.einsum("ske,skc,sk->sec", onehot_SKE.astype(jnp.float32), slot_SKC, weight_SK)
        x_ECD = jnp.einsum("sec,sd->ecd", dispatch_SEC.astype(x_SD.dtype), x_SD)
        out_ECD = self._experts(x_ECD, lambda x, w: jnp.einsum("eca,eab->ecb", x, w))
        y_SD = jnp.einsum("sec,ecd->sd", combine_SEC, out_ECD.astype(jnp.float32))
        return y_SD, jnp.sum(~keep_SK).astype(jnp.int32)
