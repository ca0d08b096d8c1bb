"""Blockwise cross-entropy: the unembedding and the next-token loss without full float32 logits.

The plain path (``model.logits: full``) materialises float32 logits [B, T, V] and
differentiates through them: at vocab 50304 that is 4 bytes x B x T x V alive twice
(logits and their gradient), and both backward matmuls over [B*T, V] take a float32
operand. ``blockwise_logits`` instead walks over blocks of tokens: the forward keeps
only the log-partition and the target logit of each token (float32), and the custom
backward recomputes one block's logits at a time, forms d logits = g_z softmax + g_t
onehot in float32, casts it to the compute dtype (bf16) and runs both backward
matmuls with bf16 operands and float32 accumulation. Peak memory of the loss is one
block of logits; the numbers agree with the plain path to bf16 rounding of the
logit gradient (tests/test_speed_levers.py states the tolerance).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Upper bound on one block's float32 logits (bytes): 256 MiB, i.e. ~1300 tokens at vocab 50304.
BLOCK_BYTES = 2**28


def block_tokens(n_tokens: int, vocab_size: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Tokens per block: the largest divisor of ``n_tokens`` whose float32 logits fit ``block_bytes``."""
    cap = max(1, block_bytes // (4 * vocab_size))
    if n_tokens <= cap:
        return n_tokens
    return next(b for b in range(cap, 0, -1) if n_tokens % b == 0)


def blockwise_logits(x_ND: jax.Array, w_DV: jax.Array, targets_N: jax.Array, block: int):
    """(log_z_N, target_logit_N), float32, of logits x_ND @ w_DV, one block of tokens at a time.

    Args:
      x_ND: [tokens, d_model] final hidden states in the compute dtype.
      w_DV: [d_model, vocab] unembedding in the compute dtype.
      targets_N: int [tokens] next-token ids.
      block: tokens per block; must divide the number of tokens (``block_tokens``).
    Returns:
      log_z_N: logsumexp of each token's logits (nats); target_logit_N: the target's logit.
      Loss terms (nll = log_z - target_logit, z-loss = log_z^2, weights) are built from
      these by the caller and differentiate through the custom backward.
    """
    if x_ND.shape[0] % block:
        raise ValueError(f"block={block} does not divide the {x_ND.shape[0]} tokens")
    return _blockwise(x_ND, w_DV, targets_N, block)


def cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token loss (nats/token) and mean squared log-partition (for z-loss), in float32.

    ``weights_BT`` (e.g. 1 for real tokens, 0 for padding) makes both weighted means, so padding
    counts for nothing. Training and evaluation both call this one function.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return cross_entropy_from_terms(log_z_BT, target_logit_BT, weights_BT)


def cross_entropy_from_terms(
    log_z_BT: jax.Array, target_logit_BT: jax.Array, weights_BT: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy`` from each token's log-partition and target logit (float32), e.g. ``blockwise_logits``'."""
    nll_BT = log_z_BT - target_logit_BT
    if weights_BT is None:
        return jnp.mean(nll_BT), jnp.mean(log_z_BT**2)
    w_BT = weights_BT.astype(jnp.float32)
    total = jnp.sum(w_BT)
    total = jnp.where(total > 0, total, 1.0)  # an all-padding batch sums to 0, not 0/0
    return jnp.sum(w_BT * nll_BT) / total, jnp.sum(w_BT * log_z_BT**2) / total


def hidden_state_loss(x_ND: jax.Array, w_DV: jax.Array, targets_N: jax.Array, kind: str = "full",
                      block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy`` (mean nll in nats/token, mean log_z^2) of final hidden states x_ND against the
    unembedding w_DV (both in the compute dtype), by either path of ``model.logits``.

    kind "full" materialises float32 logits [tokens, vocab] and differentiates through them (the
    plain path); "blockwise" goes through ``blockwise_logits`` with ``block`` tokens per block
    (default ``block_tokens``), so no full float32 logits exist. Training's blockwise loss, the
    loss-memory benchmark and its test all call this one function.
    """
    if kind == "full":
        logits_NV = jnp.einsum("nd,dv->nv", x_ND, w_DV, preferred_element_type=jnp.float32)
        return cross_entropy(logits_NV, targets_N)
    if kind != "blockwise":
        raise ValueError(f"kind must be 'full' or 'blockwise', got {kind!r}")
    block = block or block_tokens(x_ND.shape[0], w_DV.shape[1])
    return cross_entropy_from_terms(*blockwise_logits(x_ND, w_DV, targets_N, block))


def _block_logits(x_bD, w_DV):
    return jnp.einsum("nd,dv->nv", x_bD, w_DV, preferred_element_type=jnp.float32)


def _split(a, block):
    return a.reshape(a.shape[0] // block, block, *a.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blockwise(x_ND, w_DV, targets_N, block):
    return _forward(x_ND, w_DV, targets_N, block)


def _forward(x_ND, w_DV, targets_N, block):
    def one(args):
        x_bD, t_b = args
        logits_bV = _block_logits(x_bD, w_DV)
        target_b = jnp.take_along_axis(logits_bV, t_b[:, None], axis=-1)[:, 0]
        return jax.nn.logsumexp(logits_bV, axis=-1), target_b

    log_z, target = jax.lax.map(one, (_split(x_ND, block), _split(targets_N, block)))
    return log_z.reshape(-1), target.reshape(-1)


def _fwd(x_ND, w_DV, targets_N, block):
    log_z_N, target_N = _forward(x_ND, w_DV, targets_N, block)
    return (log_z_N, target_N), (x_ND, w_DV, targets_N, log_z_N)


def _bwd(block, residuals, cotangents):
    x_ND, w_DV, targets_N, log_z_N = residuals
    g_z_N, g_t_N = cotangents
    cdt, vocab = x_ND.dtype, w_DV.shape[1]

    def one(dw_DV, args):
        x_bD, t_b, lz_b, gz_b, gt_b = args
        probs_bV = jnp.exp(_block_logits(x_bD, w_DV) - lz_b[:, None])
        d_bV = gz_b[:, None] * probs_bV + gt_b[:, None] * jax.nn.one_hot(t_b, vocab, dtype=jnp.float32)
        d_bV = d_bV.astype(cdt)  # both matmuls below run with compute-dtype operands, float32 accumulation
        dx_bD = jnp.einsum("nv,dv->nd", d_bV, w_DV, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.einsum("nd,nv->dv", x_bD, d_bV, preferred_element_type=jnp.float32)
        return dw_DV, dx_bD.astype(cdt)

    parts = tuple(_split(a, block) for a in (x_ND, targets_N, log_z_N, g_z_N, g_t_N))
    dw_DV, dx = jax.lax.scan(one, jnp.zeros(w_DV.shape, jnp.float32), parts)
    return dx.reshape(x_ND.shape), dw_DV.astype(w_DV.dtype), None


_blockwise.defvjp(_fwd, _bwd)
