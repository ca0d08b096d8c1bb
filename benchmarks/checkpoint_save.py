"""Seconds the training loop is blocked per checkpoint save, synchronous vs asynchronous (llm.checkpoint).

    python benchmarks/checkpoint_save.py                      # 1M, 10M, 50M parameters, 5 saves each
    python benchmarks/checkpoint_save.py --sizes 1 10 --saves 9 --steps-per-save 2

Each size is a real train state (llm.training.init_state: parameters and AdamW moments, float32,
about 12 bytes per parameter) stepped by the real donating train step (make_train_step) on random
tokens of a small batch, so the steps are short and the saves weigh. One short run per mode:
``--saves`` checkpoints, one every ``--steps-per-save`` steps, into a fresh folder (keep 2):

  sync        Checkpoints(asynchronous=False): save() returns when the checkpoint is on disk
  async       Checkpoints(asynchronous=True) (train.async_checkpoint, the default): save() returns
              once orbax has the arrays on the host; the write overlaps the next steps
  async+copy  async, handed a device-side copy of the state made just before (the alternative
              way to keep the saved values safe from donation; what it costs in blocked time)

Columns: median seconds blocked in save() (the state already computed: the step's own time is not
counted), the run's wall seconds (steps and saves, after compilation and the last write) and
async's ratios to sync. The 1-minute load average is printed before and after: on a shared
machine the background write competes with the step for the same cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from llm import counting  # noqa: E402
from llm.checkpoint import Checkpoints  # noqa: E402
from llm.config import load_config  # noqa: E402
from llm.optim import make_optimizer  # noqa: E402
from llm.sharding import make_mesh  # noqa: E402
from llm.training import init_state, make_train_step  # noqa: E402

# Millions of parameters -> (d_model, n_layers) of a byte-level model (vocab 256)
SHAPES = {1: (128, 4), 10: (256, 9), 50: (512, 12)}
MODES = ("sync", "async", "async+copy")


def config(size: int, steps: int):
    d_model, n_layers = SHAPES[size]
    return load_config(None, [
        f"model.d_model={d_model}", f"model.n_layers={n_layers}", f"model.n_heads={d_model // 64}",
        f"model.d_ff={4 * d_model}", "model.seq_len=64", "train.batch_size=2", f"train.steps={steps}",
    ])  # fmt: skip


def run(cfg, mode: str, saves: int, steps_per_save: int) -> dict:
    """Train ``saves * steps_per_save`` steps saving every ``steps_per_save``; blocked seconds per save and wall."""
    steps = saves * steps_per_save
    optimizer = make_optimizer(cfg.optim, steps)
    graphdef, state, _ = init_state(cfg, optimizer, make_mesh(cfg))
    step = make_train_step(graphdef, optimizer, cfg)
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))
    rng = np.random.default_rng(0)
    batches = [jax.device_put(rng.integers(0, 256, (2, 65), dtype=np.int32)) for _ in range(4)]
    state, _ = step(state, batches[0])  # compiled outside the timing
    jax.block_until_ready((state, copy(state)))
    blocked = []
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        with Checkpoints(Path(folder), keep=2, asynchronous=mode != "sync") as checkpoints:
            for i in range(1, steps + 1):
                state, _ = step(state, batches[i % 4])
                if i % steps_per_save == 0:
                    jax.block_until_ready(state)  # the step's time is not the save's
                    start = time.perf_counter()
                    checkpoints.save(i, copy(state) if mode == "async+copy" else state, {"step": i})
                    blocked.append(time.perf_counter() - start)
        wall = time.perf_counter() - began  # leaving the block waited for the last write
    return {"blocked_s": statistics.median(blocked), "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--steps-per-save", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {args.saves} saves, one every "
          f"{args.steps_per_save} steps; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'N':>11} {'state MB':>8} " + " ".join(f"{m + ' blocked s':>19}" for m in MODES)
          + " " + " ".join(f"{m + ' wall s':>16}" for m in MODES) + f" {'blocked x':>9} {'wall x':>7}")  # fmt: skip
    for size in args.sizes:
        cfg = config(size, args.saves * args.steps_per_save)
        rows = {mode: run(cfg, mode, args.saves, args.steps_per_save) for mode in MODES}
        n = counting.n_params(cfg.model)["n_params_total"]
        sync, asyn = rows["sync"], rows["async"]
        print(f"{n:>11,} {12 * n / 1e6:>8.0f} " + " ".join(f"{rows[m]['blocked_s']:>19.3f}" for m in MODES) + " "
              + " ".join(f"{rows[m]['wall_s']:>16.2f}" for m in MODES)
              + f" {sync['blocked_s'] / asyn['blocked_s']:>9.1f} {sync['wall_s'] / asyn['wall_s']:>7.2f}", flush=True)  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}; blocked x, wall x: sync / async (above 1: async is faster)")


if __name__ == "__main__":
    main()
