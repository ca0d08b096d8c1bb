"""Causal multi-head attention with rotary positions and optional grouped-query heads.

On an NVIDIA GPU with bfloat16/float16 inputs and a head dim the flash kernel supports, the
kernel is ``jax.nn.dot_product_attention(implementation="cudnn")`` (asked for explicitly: its
``None`` means XLA in jax 0.10). Everywhere else, and if cuDNN rejects the call while tracing,
it is two einsums with the softmax between (``_causal_attention_einsum``), the computation of
that function's XLA path, which runs slower on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llm.config import ModelConfig
from llm.layers import apply_rope, dtype_of, input_std, normal_param, output_std, token_matmul


@functools.cache
def _on_nvidia_gpu() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and "nvidia" in device.device_kind.lower()


def attention_implementation(dtype, head_dim: int) -> str:
    """Pick "cudnn" (flash) where it applies: NVIDIA GPU, 16-bit inputs, head dim % 8 == 0 and <= 128."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 and _on_nvidia_gpu() else "xla"


def causal_attention(q_BTNH, k_BTKH, v_BTKH):
    """Causal softmax attention, cuDNN flash on NVIDIA GPUs and two einsums elsewhere."""
    impl = attention_implementation(q_BTNH.dtype, q_BTNH.shape[-1])
    if impl == "cudnn":
        try:
            return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            pass  # cuDNN too old or shape unsupported: XLA computes the same thing
    return _causal_attention_einsum(q_BTNH, k_BTKH, v_BTKH)


@jax.custom_vjp
def softmax_last(x):
    """``jax.nn.softmax(x, axis=-1)`` with its backward written out: dx = p * (g - sum(g * p)).

    Same values and gradients to float32 rounding (tested). ``jax.nn.softmax`` differentiates
    through a custom JVP, and XLA's CPU backend compiled the transpose of that into a fused
    multiply-reduce that took 1.3 ms of a 30 ms d64 train step per layer; with this backward the
    quickstart's seven train steps ran 2-9% faster (6% over its step count; benchmarks/README.md).
    """
    return jax.nn.softmax(x, axis=-1)


def _softmax_last_fwd(x):
    probs = jax.nn.softmax(x, axis=-1)
    return probs, probs


def _softmax_last_bwd(probs, g):
    g_probs = g * probs
    return (g_probs - probs * g_probs.sum(axis=-1, keepdims=True),)


softmax_last.defvjp(_softmax_last_fwd, _softmax_last_bwd)


def _causal_attention_einsum(q_BTNH, k_BSKH, v_BSKH):
    """Causal softmax attention as two einsums, heads-major, scores and softmax in float32.

    The same computation as ``jax.nn.dot_product_attention(..., implementation="xla")``; on CPU
    its forward and backward run 1.3-1.7x faster at small widths (its vmapped backward reduces
    in a slow fused loop). Query heads are grouped over the key/value heads (GQA) without copies.
    """
    b, t, n, h = q_BTNH.shape
    kv = k_BSKH.shape[2]
    q_BKGTH = q_BTNH.reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    scores_BKGTS = jnp.einsum("bkgth,bskh->bkgts", q_BKGTH, k_BSKH, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(h))
    causal_TS = jnp.tril(jnp.ones((t, k_BSKH.shape[1]), bool))
    scores_BKGTS = jnp.where(causal_TS, scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = softmax_last(scores_BKGTS).astype(v_BSKH.dtype)
    out_BKGTH = jnp.einsum("bkgts,bskh->bkgth", probs_BKGTS, v_BSKH)
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nnx.Module):
    """Pre-projected q/k/v, RoPE on q and k, causal softmax attention, output projection.

    n_heads query heads share n_kv_heads key/value heads (GQA; n_kv_heads = n_heads is
    plain multi-head attention). Head dim H = d_model / n_heads.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n = cfg.d_model, cfg.n_heads
        k = cfg.n_kv_heads or n
        h = d // n
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        std_in = input_std(cfg, d)
        self.w_q_DNH = normal_param(rngs, (d, n, h), std_in, cfg.param_dtype, ("embed", "heads", "head_dim"))
        self.w_k_DKH = normal_param(rngs, (d, k, h), std_in, cfg.param_dtype, ("embed", "kv_heads", "head_dim"))
        self.w_v_DKH = normal_param(rngs, (d, k, h), std_in, cfg.param_dtype, ("embed", "kv_heads", "head_dim"))
        self.w_o_NHD = normal_param(rngs, (n, h, d), output_std(cfg, n * h), cfg.param_dtype, ("heads", "head_dim", "embed"))

    def __call__(self, x_BTD: jax.Array, sin_TH2: jax.Array, cos_TH2: jax.Array) -> jax.Array:
        cdt = self.compute_dtype
        x_BTD = x_BTD.astype(cdt)
        q_BTNH = token_matmul(x_BTD, self.w_q_DNH[...].astype(cdt))
        k_BTKH = token_matmul(x_BTD, self.w_k_DKH[...].astype(cdt))
        v_BTKH = token_matmul(x_BTD, self.w_v_DKH[...].astype(cdt))
        q_BTNH = apply_rope(q_BTNH, sin_TH2, cos_TH2)
        k_BTKH = apply_rope(k_BTKH, sin_TH2, cos_TH2)
        o_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH)
        return token_matmul(o_BTNH, self.w_o_NHD[...].astype(cdt), n_in=2)
