"""Memory of the loss at vocab 50304: full float32 logits vs the blockwise cross-entropy.

    python benchmarks/loss_memory.py                       # d_model 768, 16/32/64 x 1024 tokens
    python benchmarks/loss_memory.py --d-model 1024 --tokens 16384

Compiles (never runs) the gradient of the mean next-token loss with respect to the final
hidden states [tokens, d_model] and the unembedding [d_model, vocab], both bf16, as the
train step differentiates it, and prints XLA's memory analysis of each program:
temporaries (what the loss adds at its peak on top of its inputs and outputs) and the
total with arguments and outputs. ``full`` is model.logits=full (float32 [tokens, vocab]
logits through llm.logits.cross_entropy); ``blockwise`` is llm.logits.blockwise_logits,
with the block llm.logits.block_tokens picks; both through llm.logits.hidden_state_loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llm.logits import block_tokens, hidden_state_loss  # noqa: E402


def loss_memory(n_tokens: int, d_model: int, vocab: int, kind: str) -> tuple[int, int]:
    """(temporary bytes, argument + output + temporary bytes) of the compiled loss gradient."""
    x = jax.ShapeDtypeStruct((n_tokens, d_model), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((d_model, vocab), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((n_tokens,), jnp.int32)
    loss = lambda x, w, t: hidden_state_loss(x, w, t, kind)[0]  # noqa: E731
    m = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w, t).compile().memory_analysis()
    return m.temp_size_in_bytes, m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--tokens", type=int, nargs="+", default=[16 * 1024, 32 * 1024, 64 * 1024])
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; d_model {args.d_model}, vocab {args.vocab}")
    print(f"{'tokens':>7} {'f32 logits GiB':>14} {'full temp GiB':>13} {'blockwise temp GiB':>18} {'block':>6} "
          f"{'full total GiB':>14} {'blockwise total GiB':>19}")  # fmt: skip
    for n in args.tokens:
        full_temp, full_total = loss_memory(n, args.d_model, args.vocab, "full")
        block_temp, block_total = loss_memory(n, args.d_model, args.vocab, "blockwise")
        print(f"{n:>7} {n * args.vocab * 4 / 2**30:>14.2f} {full_temp / 2**30:>13.2f} {block_temp / 2**30:>18.3f} "
              f"{block_tokens(n, args.vocab):>6} {full_total / 2**30:>14.2f} {block_total / 2**30:>19.3f}", flush=True)


if __name__ == "__main__":
    main()
