"""CPU milliseconds per train step at the quickstart's seven model shapes (issue 12).

    python benchmarks/step_time.py [--repeats 5] [--calls 3]

For each shape (``experiments/quickstart.yaml``: batch 16 x 64 tokens, vocab 256, float32)
it times the step two ways on the same state, interleaved so both see the same load:

- ``one per call``: ``llm.training.make_run_step``, one jitted call per optimiser step;
- ``per call``: ``llm.training.make_run_steps``, what ``chinchax train`` runs: up to 32 steps
  in one call of one program (here the log cadence of the quickstart, 20).

CPU seconds of this process (``time.process_time``) per step, median over ``--repeats``
blocks of ``--calls`` x 20 steps each. Run it pinned to one core (``taskset -c 1``) with
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``, as the sweep runner runs each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llm import sharding  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.optim import make_optimizer  # noqa: E402
from llm.training import init_state, make_run_step, make_run_steps  # noqa: E402

# (d_model, n_layers, n_heads, d_ff) of the quickstart's runs, and how many steps the sweep trains each.
SHAPES = {
    "d16 L1": ((16, 1, 1, 48), 1191),
    "d24 L1": ((24, 1, 1, 64), 728 + 2183),
    "d32 L1": ((32, 1, 2, 88), 490 + 1470 + 4900),
    "d48 L1": ((48, 1, 3, 128), 277 + 832 + 2775),
    "d56 L2": ((56, 2, 2, 152), 408),
    "d48 L2": ((48, 2, 3, 128), 1755),
    "d64 L3": ((64, 3, 4, 176), 779),
}
PER_CALL = 20  # the quickstart's log_every: each call of make_run_steps' program ends at a log line


def time_shape(dims: tuple[int, int, int, int], repeats: int, calls: int) -> tuple[float, float]:
    """Median CPU ms per step: (one step per call, PER_CALL steps per call)."""
    d, n_layers, n_heads, d_ff = dims
    cfg = load_config(None, [
        f"model.d_model={d}", f"model.n_layers={n_layers}", f"model.n_heads={n_heads}", f"model.d_ff={d_ff}",
        "model.vocab_size=256", "model.seq_len=64", "model.compute_dtype=float32", "train.batch_size=16",
        "train.steps=100000",
    ])  # fmt: skip
    graphdef, state, layout = init_state(cfg, make_optimizer(cfg.optim, 100000), sharding.make_mesh(cfg))
    step, _ = make_run_step(graphdef, cfg, 100000, layout)
    run_steps, _ = make_run_steps(graphdef, cfg, 100000, layout)
    tokens = np.random.default_rng(0).integers(0, 256, (32, 16, 65)).astype(np.int32)
    one_batch, stack = layout.put(tokens[0], 16), layout.put_stacked(tokens, 16)
    single, many = state, jax.tree.map(lambda x: x.copy(), state)
    single, metrics = step(single, one_batch)  # compile both
    many, metrics_K = run_steps(many, stack, PER_CALL)
    jax.block_until_ready((metrics, metrics_K))
    one_ms, many_ms = [], []
    for _ in range(repeats):
        began = time.process_time()
        for _ in range(calls * PER_CALL):
            single, metrics = step(single, one_batch)
        jax.block_until_ready(metrics)
        one_ms.append((time.process_time() - began) / (calls * PER_CALL) * 1e3)
        began = time.process_time()
        for _ in range(calls):
            many, metrics_K = run_steps(many, stack, PER_CALL)
        jax.block_until_ready(metrics_K)
        many_ms.append((time.process_time() - began) / (calls * PER_CALL) * 1e3)
    return statistics.median(one_ms), statistics.median(many_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="calls of 20 steps per timed block")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; CPU ms per step, median of {args.repeats}")
    print(f"{'shape':>8} {'one per call':>13} {f'{PER_CALL} per call':>12} {'ratio':>6} {'quickstart steps':>17} {'CPU s then':>11}")
    total = 0.0
    for name in args.shapes:
        dims, steps = SHAPES[name]
        one, many = time_shape(dims, args.repeats, args.calls)
        total += many * steps / 1e3
        print(f"{name:>8} {one:13.2f} {many:12.2f} {one / many:5.2f}x {steps:17d} {many * steps / 1e3:11.1f}", flush=True)
    print(f"the quickstart's train steps at {PER_CALL} per call: {total:.0f} CPU s")


if __name__ == "__main__":
    main()
