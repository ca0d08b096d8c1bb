"""Grouped (per-expert) matmuls over token-expert assignments, dropless.

``ragged_dot`` (the reference): rows sorted by expert, ``jax.lax.ragged_dot`` with the
group sizes. Portable, but XLA on CPU and (as of jaxlib 0.10) on CUDA lowers it by
materialising a dense [rows, n_experts * d] problem, i.e. n_experts times the FLOPs.

``blocked`` (MegaBlocks-style): each expert's rows are padded to a multiple of a
block size, every block belongs to one expert, and a batched matmul multiplies each
block by its expert's weights (gathered per block). FLOPs are the useful ones plus
at most n_experts * (block - 1) padded rows; memory adds the per-block weight copy.
Both return the same numbers (padded rows are zeros and are never read back).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

GROUPED_MATMULS = ("ragged_dot", "blocked")


def block_size(n_rows: int, n_experts: int) -> int:
    """Static block size: a power of two near n_rows / (4 n_experts), in [8, 2048].

    About 4 blocks per expert under balanced routing bounds the padding at ~25%.
    """
    target = max(1, n_rows // (4 * n_experts))
    return int(min(2048, max(8, 2 ** math.floor(math.log2(target)))))


def block_layout(expert_A: jax.Array, n_experts: int, block: int):
    """Row of each assignment in the padded, expert-blocked buffer, and each block's expert.

    Args:
      expert_A: int [A] expert of each assignment (any order).
    Returns:
      dest_A: int32 [A] row in a buffer of n_blocks * block rows; rows of one expert
        are contiguous, in assignment order, starting at a block boundary.
      expert_B: int32 [n_blocks] expert of each block (unused tail blocks: the last expert).
    """
    n = expert_A.shape[0]
    n_blocks = -(-(n + n_experts * (block - 1)) // block)  # static bound on padded rows / block
    onehot_AE = jax.nn.one_hot(expert_A, n_experts, dtype=jnp.int32)
    rank_A = jnp.sum((jnp.cumsum(onehot_AE, axis=0) - 1) * onehot_AE, axis=-1)
    padded_E = -(-jnp.sum(onehot_AE, axis=0) // block) * block
    end_E = jnp.cumsum(padded_E)
    dest_A = (end_E - padded_E)[expert_A] + rank_A
    expert_B = jnp.searchsorted(end_E, jnp.arange(n_blocks) * block, side="right")
    return dest_A.astype(jnp.int32), jnp.minimum(expert_B, n_experts - 1).astype(jnp.int32), n_blocks


def blocked_matmul(x_PA: jax.Array, w_EAB: jax.Array, expert_B: jax.Array) -> jax.Array:
    """[n_blocks * block, a] @ per-block expert weights [a, b] -> [n_blocks * block, b]."""
    n_blocks = expert_B.shape[0]
    x_NRA = x_PA.reshape(n_blocks, -1, x_PA.shape[-1])
    return jnp.einsum("nra,nab->nrb", x_NRA, w_EAB[expert_B]).reshape(x_PA.shape[0], -1)
