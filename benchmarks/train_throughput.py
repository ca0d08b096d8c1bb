"""Throughput of the real jitted train step over a ladder of model sizes.

Prints tokens/s, step time (median over timed steps) and MFU (the matmul FLOPs the
step executes, ``llm.counting.mfu_flops_per_token``, against the device's bf16 peak;
"-" where the peak is unknown, e.g. CPU).

    python benchmarks/train_throughput.py            # tiny ladder, fits a laptop CPU
    python benchmarks/train_throughput.py --full     # the GPU ladder: seq 1024, vocab 50304
    python benchmarks/train_throughput.py --full --moe   # add dense-vs-MoE rows (8 experts, top-2)

With --moe it also prints which dropless kernel ``model.moe.grouped_matmul: auto`` (the
default, ``llm.moe.resolve_grouped_matmul``) picks on this platform, and marks its row.

Reference (nanoGPT-style PyTorch step, torch.compile + SDPA + fused AdamW, bf16,
seq 1024, vocab 50304, one H100): d128/L2 3.5M tok/s; d256/L4 2.6M; d384/L6 1.65M;
d512/L8 1.06M; d768/L12 0.51M (MFU 0.44); d1024/L24 0.19M (MFU 0.46).
"""

from __future__ import annotations

import argparse
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

FULL_LADDER = [(128, 2), (256, 4), (384, 6), (512, 8), (768, 12), (1024, 24)]
TINY_LADDER = [(64, 2), (128, 4), (256, 4)]


def model_config(d_model: int, n_layers: int, seq_len: int, vocab: int, moe: MoEConfig | None = None) -> ModelConfig:
    """A GPT-2-like shape: 64-dim heads, d_ff = 4 d_model (SwiGLU keeps the 4x width here)."""
    return ModelConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=max(d_model // 64, 1),
        d_ff=4 * d_model,
        vocab_size=vocab,
        seq_len=seq_len,
        moe=moe,
    )


def time_step(model_cfg: ModelConfig, batch_size: int, steps: int, warmup: int) -> dict:
    """Median step time of the real train step on random tokens."""
    cfg = Config(model=model_cfg, optim=OptimConfig(), train=TrainConfig(batch_size=batch_size, steps=steps + warmup, tokens=None))
    model = Transformer(model_cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    optimizer = make_optimizer(cfg.optim, steps + warmup)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    step_fn = make_train_step(graphdef, optimizer, cfg)
    rng = np.random.default_rng(0)
    batches = [
        jax.device_put(rng.integers(0, model_cfg.vocab_size, (batch_size, model_cfg.seq_len + 1), dtype=np.int32))
        for _ in range(4)
    ]
    compile_start = time.perf_counter()
    state, metrics = step_fn(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - compile_start
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
    flops = counting.mfu_flops_per_token(model_cfg)
    return {
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops / peak if peak else None,
        "compile_s": compile_s,
        "n_params_active": counting.n_params(model_cfg)["n_params_active"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="GPU ladder (seq 1024, vocab 50304) instead of the tiny CPU one")
    parser.add_argument("--moe", action="store_true", help="add dense vs MoE (8 experts, top-2) rows, both dispatch paths")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 32 full, 8 tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20 full, 5 tiny)")
    args = parser.parse_args(argv)

    seq, vocab = (1024, 50304) if args.full else (128, 256)
    batch = args.batch_size or (32 if args.full else 8)
    steps = args.steps or (20 if args.full else 5)
    ladder = FULL_LADDER if args.full else TINY_LADDER
    rows = [(f"dense d{d}/L{n}", model_config(d, n, seq, vocab)) for d, n in ladder]
    auto = resolve_grouped_matmul("auto")
    if args.moe:
        d, n = (512, 8) if args.full else (128, 4)
        # Equal active size: 8 experts of d_ff/2 with top-2 activate as many MLP weights as one dense d_ff.
        variants = (("dropless ragged_dot", None, "ragged_dot"), ("dropless blocked", None, "blocked"),
                    ("capacity 1.25", 1.25, "ragged_dot"))
        for label, capacity, kernel in variants:
            moe = MoEConfig(n_experts=8, top_k=2, d_ff_expert=2 * d, capacity_factor=capacity, grouped_matmul=kernel)
            picked = " (auto)" if capacity is None and kernel == auto else ""
            rows.append((f"moe8x2 d{d}/L{n} {label}{picked}", model_config(d, n, seq, vocab, moe)))
        rows.append((f"dense d{d}/L{n} (moe ref)", model_config(d, n, seq, vocab)))

    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); jax {jax.__version__}; batch {batch} x seq {seq}; median of {steps} steps")
    if args.moe:
        print(f"model.moe.grouped_matmul: auto -> {auto} on {jax.default_backend()}")
    print(f"{'model':40} {'N active':>12} {'step ms':>9} {'tokens/s':>12} {'MFU':>6} {'compile s':>9}")
    for label, cfg in rows:
        r = time_step(cfg, batch, steps, warmup=2)
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
        print(f"{label:40} {r['n_params_active']:>12,} {r['step_ms']:>9.1f} {r['tokens_per_s']:>12,.0f} {mfu:>6} {r['compile_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
