"""Small building blocks of the transformer: initialisers, RMSNorm, rotary positions, MLP.

Initialisation (scale-aware, documented once here and used everywhere):
  * token embedding (and untied unembedding): N(0, init_std^2), GPT-2 convention;
  * every matrix that reads the residual stream (q, k, v, MLP in/gate, router):
    N(0, s^2) with s = min(init_std, 1/sqrt(fan_in)), i.e. GPT-2's 0.02 at small
    width and variance-preserving fan-in scaling once 1/sqrt(fan_in) < init_std;
  * matrices that write back into the residual stream (attention output, MLP out):
    the same rule divided by sqrt(2 * n_layers) (GPT-2 / Megatron), so the residual
    variance at the output stays O(1) however deep the model is;
  * RMSNorm scales start at 1.
Parameters are stored in ``param_dtype`` (float32); every matmul casts them to the
compute dtype at the point of use.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llm.config import ModelConfig
from llm.sharding import logical_param


def dtype_of(name: str) -> jnp.dtype:
    """jnp dtype from a config string ("float32", "bfloat16", "float16")."""
    return jnp.dtype(name)


def input_std(cfg: ModelConfig, fan_in: int) -> float:
    """Init std of a matrix reading the residual stream (see module docstring)."""
    return min(cfg.init_std, 1.0 / math.sqrt(fan_in))


def output_std(cfg: ModelConfig, fan_in: int) -> float:
    """Init std of a matrix writing into the residual stream: depth-scaled."""
    return input_std(cfg, fan_in) / math.sqrt(2 * cfg.n_layers)


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype: str, names: tuple[str | None, ...]) -> nnx.Param:
    """An nnx.Param drawn from N(0, std^2) with the params stream of ``rngs``, its axes named
    ``names`` (logical axis names, llm.sharding.RULES).

    The values are ``std * jax.random.normal(key, shape)``, bit for bit, but drawn as the first
    prod(shape) entries of a flat draw of ``draw_size(prod(shape))`` numbers: with JAX's
    partitionable threefry (the default) entry i depends only on the key and i, so the prefix is
    the same numbers. The random-number program, the slowest one of initialisation to compile
    (about 0.4 s each on CPU), then compiles once per size bucket instead of once per shape,
    and parameters of many shapes, and models of many sizes, share it (in one process and
    through the persistent compilation cache).
    """
    size = math.prod(shape)
    if not getattr(jax.config, "jax_threefry_partitionable", True):  # the prefix property needs partitionable threefry
        return logical_param(std * jax.random.normal(rngs.params(), shape, dtype_of(dtype)), names)
    # The barrier keeps XLA from fusing the scale into the draw, so an init under jit (the
    # sharded one of llm.training.init_state) gives bit for bit the values an eager init does.
    flat = jax.lax.optimization_barrier(jax.random.normal(rngs.params(), (draw_size(size),), dtype_of(dtype)))
    return logical_param(_scaled_prefix(flat, jnp.asarray(std, flat.dtype), shape), names)


def draw_size(size: int) -> int:
    """Numbers drawn for a parameter of ``size`` entries: the next power of two up to 2^20,
    then the next multiple of 2^20 (at most 4 MB of float32 drawn in vain)."""
    if size <= 1 << 20:
        return 1 << max(0, size - 1).bit_length()
    return -(-size // (1 << 20)) * (1 << 20)


@functools.partial(jax.jit, static_argnums=2)
def _scaled_prefix(flat: jax.Array, std: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return (std * flat[: math.prod(shape)]).reshape(shape)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32, returned in the input dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype: str):
        self.scale_D = logical_param(jnp.ones((dim,), dtype_of(param_dtype)), ("embed",))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32_BTD = x_BTD.astype(jnp.float32)
        inv_rms_BT1 = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BTD), axis=-1, keepdims=True) + self.eps)
        return (x32_BTD * inv_rms_BT1 * self.scale_D[...].astype(jnp.float32)).astype(x_BTD.dtype)


def token_matmul(x: jax.Array, w: jax.Array, n_in: int = 1, **dot_kwargs) -> jax.Array:
    """``x[..., *in] @ w[*in, *out]`` as one 2-D matmul [tokens, prod(in)] @ [prod(in), prod(out)].

    ``n_in`` trailing axes of x contract with the leading ``n_in`` axes of w; every other axis
    of x (batch, time) is a token. The same product as the einsum, but XLA's CPU backend runs the
    einsum's backward weight gradient, which contracts over two token axes, as a slow transposed
    Eigen dot (measured 2.3x slower forward + backward at the quickstart's shapes); flattened to
    one token axis it takes the fast matmul kernels. On GPU/TPU the reshapes are free bitcasts.
    ``dot_kwargs`` go to jnp.matmul (e.g. ``preferred_element_type``).
    """
    lead, contract, out = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    if x.shape[x.ndim - n_in :] != contract:
        raise ValueError(f"token_matmul: x's last {n_in} axes {x.shape[x.ndim - n_in:]} differ from w's first {contract}")
    y = jnp.matmul(x.reshape(-1, math.prod(contract)), w.reshape(math.prod(contract), -1), **dot_kwargs)
    return y.reshape(*lead, *out)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin and cos tables [T, head_dim/2] (float32) for rotary positions 0..T-1."""
    inv_freq_H2 = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angle_TH2 = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq_H2[None, :]
    return jnp.sin(angle_TH2), jnp.cos(angle_TH2)


def apply_rope(x_BTNH: jax.Array, sin_TH2: jax.Array, cos_TH2: jax.Array) -> jax.Array:
    """Rotate channel pairs (i, i + H/2) by position-dependent angles (GPT-NeoX layout)."""
    x32_BTNH = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x32_BTNH, 2, axis=-1)
    sin = sin_TH2[None, :, None, :]
    cos = cos_TH2[None, :, None, :]
    out_BTNH = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out_BTNH.astype(x_BTNH.dtype)


def activation(kind: str, h_in: jax.Array, h_gate: jax.Array | None) -> jax.Array:
    """SwiGLU: silu(gate) * in; GELU: gelu(in) (tanh approximation)."""
    if kind == "swiglu":
        return jax.nn.silu(h_gate) * h_in
    if kind == "gelu":
        return jax.nn.gelu(h_in)
    raise ValueError(f"unknown mlp kind {kind!r}; choose swiglu or gelu")


class MLP(nnx.Module):
    """Dense feed-forward block, SwiGLU (3 matrices) or GELU (2 matrices), no biases."""

    def __init__(self, cfg: ModelConfig, d_ff: int, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.kind = cfg.mlp
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.w_in_DF = normal_param(rngs, (d, d_ff), input_std(cfg, d), cfg.param_dtype, ("embed", "mlp"))
        if cfg.mlp == "swiglu":
            self.w_gate_DF = normal_param(rngs, (d, d_ff), input_std(cfg, d), cfg.param_dtype, ("embed", "mlp"))
        self.w_out_FD = normal_param(rngs, (d_ff, d), output_std(cfg, d_ff), cfg.param_dtype, ("mlp", "embed"))

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cdt = self.compute_dtype
        x_BTD = x_BTD.astype(cdt)
        h_in_BTF = token_matmul(x_BTD, self.w_in_DF[...].astype(cdt))
        h_gate_BTF = token_matmul(x_BTD, self.w_gate_DF[...].astype(cdt)) if self.kind == "swiglu" else None
        return token_matmul(activation(self.kind, h_in_BTF, h_gate_BTF), self.w_out_FD[...].astype(cdt))
