"""Throughput of chinchax's own train step over a ladder of model sizes, beside a PyTorch reference.

The step is ``llm.training.make_train_step`` (the step ``chinchax train`` runs, jit with the
state donated, optax AdamW with clipping; train runs up to 32 of them per call of one program,
``make_run_steps``, which saves the host's per-call cost, here one per call) on random tokens. Each row prints tokens/s
(median over the timed steps), MFU, compile seconds and memory:

  MFU         tokens/s x (6 N + 12 L d T) / peak, the reference's formula: N counts every
              parameter a token uses (the tied embedding once, as the unembedding matmul;
              MoE: the active experts), 12 L d T the attention at full context; peak is the
              device's dense bf16 FLOP/s (llm.metrics.PEAK_BF16_FLOPS; 989e12 for H100/H200),
              "-" where unknown (CPU).
  XLA GiB     the compiled step's arguments + temporaries (XLA memory analysis, any platform).
  peak GiB    the device allocator's peak so far in this process (GPU/TPU; "-" on CPU).

    python benchmarks/train_throughput.py                 # tiny ladder (vocab 256, seq 128), fits a laptop CPU
    python benchmarks/train_throughput.py --full          # the issue-13 ladder: seq 1024, vocab 50304, its batches
    python benchmarks/train_throughput.py --full --sizes 768 1024 --variants levers
    python benchmarks/train_throughput.py --full --moe    # add 8-expert top-2 MoE rows beside the equal-active dense model
    python benchmarks/train_throughput.py --full --reference-json torch.json   # ratios against a reference run now

The --full shapes match the reference's work per token: GELU MLP with d_ff = 4 d_model, tied
embeddings, the reference's head counts (64-dim heads; 4 heads of 32 at d128). Variants:
``plain`` (unrolled blocks, full float32 logits: the defaults) and ``levers`` (model.scan_layers
and model.logits=blockwise). benchmarks/gpu_ladder.sh runs the whole ladder and the reference
in one call; benchmarks/README.md keeps the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llm import counting  # noqa: E402
from llm.config import Config, MoEConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from llm.metrics import peak_flops  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.moe import resolve_grouped_matmul  # noqa: E402
from llm.optim import make_optimizer  # noqa: E402
from llm.training import make_train_step  # noqa: E402

# (d_model, n_layers, n_heads, batch) of the issue-13 ladder; seq 1024, vocab 50304.
FULL_LADDER = [(128, 2, 4, 64), (256, 4, 4, 64), (384, 6, 6, 64), (512, 8, 8, 32), (768, 12, 12, 32), (1024, 24, 16, 16)]
TINY_LADDER = [(64, 2, 1, 8), (128, 4, 2, 8), (256, 4, 4, 8)]

# Reference tokens/s and MFU by (d_model, n_layers): issue 13's table, measured with
# nanoGPT-style PyTorch (torch.compile, SDPA, fused AdamW, bf16 autocast) on one H100.
REFERENCE_SOURCE = "issue 13 table (PyTorch nanoGPT-style, one H100)"
REFERENCE = {
    (128, 2): (3.51e6, 0.16), (256, 4): (2.60e6, 0.29), (384, 6): (1.65e6, 0.35),
    (512, 8): (1.06e6, 0.38), (768, 12): (0.51e6, 0.44), (1024, 24): (0.19e6, 0.46),
}  # fmt: skip

VARIANTS = {"plain": {}, "levers": {"scan_layers": True, "logits": "blockwise"}}


def model_config(d_model: int, n_layers: int, n_heads: int, seq_len: int, vocab: int, **fields) -> ModelConfig:
    """The reference's block: GELU MLP, d_ff = 4 d_model, tied embeddings, no biases."""
    return ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model, vocab_size=vocab,
                       seq_len=seq_len, mlp="gelu", tie_embeddings=True, **fields)  # fmt: skip


def reference_flops_per_token(cfg: ModelConfig) -> float:
    """6 N + 12 L d T (the reference's MFU numerator), N the parameters one token uses."""
    n = counting.n_params(cfg)["n_params_active"]
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * cfg.seq_len


def _gib(n_bytes: float | None) -> str:
    return f"{n_bytes / 2**30:.2f}" if n_bytes else "-"


def measure(model_cfg: ModelConfig, batch_size: int, steps: int, warmup: int = 3) -> dict:
    """Compile once, warm up, then time ``steps`` steps one by one; medians and memory."""
    cfg = Config(model=model_cfg, optim=OptimConfig(), train=TrainConfig(batch_size=batch_size, steps=steps + warmup, tokens=None))
    graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(cfg.optim, steps + warmup)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    rng = np.random.default_rng(0)
    shape = (batch_size, model_cfg.seq_len + 1)
    batches = [jax.device_put(rng.integers(0, model_cfg.vocab_size, shape, dtype=np.int32)) for _ in range(4)]
    start = time.perf_counter()
    step_fn = make_train_step(graphdef, optimizer, cfg).lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    memory = step_fn.memory_analysis()
    xla_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes if memory is not None else None
    for i in range(warmup):
        state, metrics = step_fn(state, batches[i % 4])
    jax.block_until_ready(metrics)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batches[i % 4])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = batch_size * model_cfg.seq_len / step_s
    peak = peak_flops(jax.devices()[0].device_kind)
    device_stats = jax.devices()[0].memory_stats() or {}
    return {
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * reference_flops_per_token(model_cfg) / peak if peak else None,
        "compile_s": compile_s,
        "xla_bytes": xla_bytes,
        "peak_bytes": device_stats.get("peak_bytes_in_use"),
        "n_params_active": counting.n_params(model_cfg)["n_params_active"],
        "train_loss": float(metrics["train_loss"]),
    }


def load_reference(path: str | None) -> tuple[dict, str]:
    """Reference (tokens/s, MFU) by (d, L): the constants, or rows measured now (torch_gpt_peer --out)."""
    if path is None:
        return REFERENCE, REFERENCE_SOURCE
    rows = json.loads(Path(path).read_text())
    return {(r["d"], r["L"]): (r["tok_s"], r["mfu"]) for r in rows}, f"{path} (measured in this call)"


def rows_to_run(args) -> list[tuple[str, ModelConfig, int]]:
    """(label, model config, batch) of every row asked for."""
    seq, vocab = (1024, 50304) if args.full else (128, 256)
    ladder = FULL_LADDER if args.full else TINY_LADDER
    if args.sizes:
        ladder = [row for row in ladder if row[0] in args.sizes]
    rows = []
    for d, n, h, batch in ladder:
        for variant in args.variants:
            rows.append((f"d{d}/L{n} {variant}", model_config(d, n, h, seq, vocab, **VARIANTS[variant]), args.batch_size or batch))
    if args.moe:
        d, n, h, batch = (512, 8, 8, 32) if args.full else (128, 4, 2, 8)
        batch = args.batch_size or batch
        auto = resolve_grouped_matmul("auto")
        levers = VARIANTS[args.variants[-1]]
        # Equal active size: 8 experts of d_ff/2 with top-2 activate as many MLP weights as one dense d_ff.
        for kernel in ("ragged_dot", "blocked"):
            moe = MoEConfig(n_experts=8, top_k=2, d_ff_expert=2 * d, grouped_matmul=kernel)
            picked = " (auto)" if kernel == auto else ""
            rows.append((f"moe8x2 d{d}/L{n} {kernel}{picked}", model_config(d, n, h, seq, vocab, moe=moe, **levers), batch))
        moe = MoEConfig(n_experts=8, top_k=2, d_ff_expert=2 * d, capacity_factor=1.25)
        rows.append((f"moe8x2 d{d}/L{n} capacity 1.25", model_config(d, n, h, seq, vocab, moe=moe, **levers), batch))
        rows.append((f"d{d}/L{n} dense, equal active", model_config(d, n, h, seq, vocab, **levers), batch))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the issue-13 ladder (seq 1024, vocab 50304, its batches)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="only these d_model rows of the ladder")
    parser.add_argument("--variants", nargs="+", default=["plain", "levers"], choices=list(VARIANTS),
                        help="plain: defaults; levers: model.scan_layers + model.logits=blockwise (default: both)")
    parser.add_argument("--moe", action="store_true", help="add MoE (8 experts, top-2; each kernel) rows and the equal-active dense row")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step for every row (default: the ladder's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20 full, 5 tiny)")
    parser.add_argument("--reference-json", default=None, help="rows written by the reference's --out (default: the issue's table)")
    args = parser.parse_args(argv)
    steps = args.steps or (20 if args.full else 5)
    reference, source = load_reference(args.reference_json) if args.full else ({}, "")

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; median of {steps} steps after 3 warm-up")
    print(f"model.moe.grouped_matmul: auto -> {resolve_grouped_matmul('auto')} on {jax.default_backend()}")
    if reference:
        print(f"reference: {source}")
    print(f"{'model':38} {'batch':>5} {'N active':>12} {'step ms':>9} {'tokens/s':>11} {'MFU':>5} {'compile s':>9} "
          f"{'XLA GiB':>7} {'peak GiB':>8} {'ref tok/s':>10} {'x ref':>6} {'ref MFU':>7}")  # fmt: skip
    for label, cfg, batch in rows_to_run(args):
        r = measure(cfg, batch, steps)
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
        ref = reference.get((cfg.d_model, cfg.n_layers)) if cfg.moe is None and not label.endswith("active") else None
        ref_cols = f"{ref[0]:>10,.0f} {r['tokens_per_s'] / ref[0]:>6.2f} {ref[1]:>7.2f}" if ref else f"{'':>10} {'':>6} {'':>7}"
        print(f"{label:38} {batch:>5} {r['n_params_active']:>12,} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11,.0f} {mfu:>5} "
              f"{r['compile_s']:>9.1f} {_gib(r['xla_bytes']):>7} {_gib(r['peak_bytes']):>8} {ref_cols}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
