"""Compile seconds of the real train step against depth, with and without the layer scan.

    python benchmarks/compile_time.py                  # 4, 12, 24 layers, plain and scanned
    python benchmarks/compile_time.py --layers 4 24 --repeats 3

Times ``jit(step).lower(state, batch).compile()`` of ``llm.training.make_train_step`` (the
step ``chinchax train`` runs) on a small shape (d_model 128, 2 heads, vocab 256, seq 64,
batch 4), so the figure is XLA's work on the program, not the arithmetic. Each repeat
builds a fresh jit, so nothing comes from the compilation cache; medians of wall and
process CPU seconds are printed, and the line count of the optimised HLO XLA compiled (a
measure of program size: it grows with depth where something is still unrolled).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from llm.config import Config, ModelConfig, MoEConfig, TrainConfig  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.optim import make_optimizer  # noqa: E402
from llm.training import make_train_step  # noqa: E402


def compile_seconds(model_cfg: ModelConfig, batch_size: int = 4) -> tuple[float, float, int]:
    """(wall, process CPU) seconds to lower and compile one fresh train step for ``model_cfg``, and
    the optimised HLO's line count.

    CPU seconds (all threads of this process) are the steadier figure on a shared machine.
    """
    cfg = Config(model=model_cfg, train=TrainConfig(batch_size=batch_size, steps=10, tokens=None))
    graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(cfg.optim, 10)
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
    batch = jax.ShapeDtypeStruct((batch_size, model_cfg.seq_len + 1), jnp.int32)
    step = make_train_step(graphdef, optimizer, cfg)
    wall, cpu = time.perf_counter(), time.process_time()
    compiled = step.lower(state, batch).compile()
    seconds = time.perf_counter() - wall, time.process_time() - cpu
    return (*seconds, compiled.as_text().count("\n"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12, 24])
    parser.add_argument("--repeats", type=int, default=3, help="fresh compilations per row (median printed)")
    parser.add_argument("--moe-every", type=int, default=None, help="also MoE (8 experts, top-2) every n-th block")
    args = parser.parse_args(argv)
    base = ModelConfig(d_model=128, n_heads=2, d_ff=512, vocab_size=256, seq_len=64, mlp="gelu", tie_embeddings=True)
    if args.moe_every:
        base = dataclasses.replace(base, moe=MoEConfig(n_experts=8, top_k=2, every=args.moe_every, d_ff_expert=256))
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; median of {args.repeats} compilations "
          "(plain and scan alternate, so load drifts hit both)")
    print(f"{'layers':>6} {'plain wall s':>12} {'scan wall s':>11} {'plain CPU s':>11} {'scan CPU s':>10} "
          f"{'plain HLO':>9} {'scan HLO':>8}")
    first = None
    for n_layers in args.layers:
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for scan in (False, True):
                times[scan].append(compile_seconds(dataclasses.replace(base, n_layers=n_layers, scan_layers=scan)))
        row = [statistics.median(t[i] for t in times[scan]) for i in (0, 1, 2) for scan in (False, True)]
        first = first or row
        ratios = ", ".join(f"{r / f:.2f}" for r, f in zip(row, first))
        print(f"{n_layers:>6} {row[0]:>12.2f} {row[1]:>11.2f} {row[2]:>11.2f} {row[3]:>10.2f} {row[4]:>9.0f} {row[5]:>8.0f}"
              f"   (x of the first row: {ratios})", flush=True)

if __name__ == "__main__":
    main()
