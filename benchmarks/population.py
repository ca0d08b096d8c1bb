"""Population training: aggregate tokens/s for P = 1, 2, 4, 8, 16 members, and a sweep end to end.

Part 1 (throughput) times ``llm.population``'s member step, the real train step with the
optimiser keys as per-member arrays, on random tokens: ``vmap`` (one vmapped step over
stacked states, what accelerators run) and ``loop`` (members in turn through one compiled
step, what CPUs run). Aggregate tokens/s = P x batch x seq_len / median step time; the
``x P=1`` column is the ratio to one member of the same mode. Shapes: the quickstart's
(batch 16 x 64 tokens, float32) and d_model 128 and 256 (4 layers).

Part 2 (sweep) runs ``chinchax sweep run`` end to end on a fresh sweep directory, once with
``--population off`` (8 single runs, ``--parallel`` at a time) and once with
``--population auto`` (the runner's populations), from the same warm data and compile
caches, and prints the wall times: 8 seeds of d_model 32, 2 layers, 400 steps of
16 x 64 tokens, and the same shape as a 4 seeds x 2 learning rates sweep.

    python benchmarks/population.py                         # everything (CPU: minutes)
    python benchmarks/population.py --shapes d32 d128 --sizes 1 4 --no-sweep   # a subset
    python benchmarks/population.py --no-throughput --repeats 3                 # the sweep only
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llm.config import Config, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from llm.model import Transformer  # noqa: E402
from llm.optim import make_optimizer  # noqa: E402
from llm.population import make_member_step, population_mode  # noqa: E402

# name -> (d_model, n_layers, n_heads, d_ff): the quickstart's distinct shapes (head_dim 16,
# experiments/quickstart.yaml's recipe), then the two the issue asks for.
SHAPES = {
    "d16": (16, 1, 1, 48), "d32": (32, 1, 2, 88), "d48": (48, 2, 3, 128), "d64": (64, 3, 4, 176),
    "d128": (128, 4, 8, 344), "d256": (256, 4, 16, 688),
}  # fmt: skip
SIZES = (1, 2, 4, 8, 16)


def config(shape: str, batch: int, seq_len: int, dtype: str) -> Config:
    d, layers, heads, d_ff = SHAPES[shape]
    model = ModelConfig(d_model=d, n_layers=layers, n_heads=heads, d_ff=d_ff, vocab_size=256, seq_len=seq_len,
                        compute_dtype=dtype)  # fmt: skip
    return Config(model=model, optim=OptimConfig(warmup_steps=2), train=TrainConfig(batch_size=batch, steps=1000, tokens=None))


def step_seconds(cfg: Config, size: int, mode: str, steps: int, warmup: int = 2) -> float:
    """Median wall seconds of one population step (all ``size`` members advance one step)."""
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    state = {"params": params, "opt_state": make_optimizer(cfg.optim, 1000).init(params), "step": jnp.zeros((), jnp.int32)}
    member_step = make_member_step(graphdef, cfg)
    lrs = np.geomspace(1e-3, 1e-2, size).astype(np.float32)
    rng = np.random.default_rng(0)
    b, t = cfg.train.batch_size, cfg.model.seq_len
    if mode == "vmap":
        stacked = jax.tree.map(lambda x: jnp.stack([x] * size), state)
        hp = {"optim.lr": lrs, "optim.weight_decay": np.full(size, 0.1, np.float32)}
        step = jax.jit(jax.vmap(member_step), donate_argnums=0)
        batches = [rng.integers(0, 256, (size, b, t + 1), dtype=np.int32) for _ in range(4)]

        def one(i):
            nonlocal stacked
            stacked, metrics = step(stacked, batches[i % 4], hp)
            return metrics
    else:
        states = [jax.tree.map(jnp.copy, state) for _ in range(size)]
        hps = [{"optim.lr": lr, "optim.weight_decay": np.float32(0.1)} for lr in lrs]
        step = jax.jit(member_step, donate_argnums=0)
        batches = [rng.integers(0, 256, (b, t + 1), dtype=np.int32) for _ in range(4)]

        def one(i):
            metrics = None
            for m in range(size):
                states[m], metrics = step(states[m], batches[(i + m) % 4], hps[m])
            return metrics

    times = []
    for i in range(warmup + steps):
        began = time.perf_counter()
        jax.block_until_ready(one(i))
        if i >= warmup:
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def throughput(shapes, sizes, modes, steps: int, batch: int, seq_len: int, dtype: str) -> None:
    print(f"{'shape':>5} {'mode':>4} {'P':>3} {'step ms':>9} {'agg tok/s':>11} {'x P=1':>6}")
    for shape in shapes:
        cfg = config(shape, batch, seq_len, dtype)
        for mode in modes:
            base = None
            for size in sizes:
                seconds = step_seconds(cfg, size, mode, steps)
                rate = size * batch * seq_len / seconds
                base = base or (rate if size == 1 else None)
                ratio = f"{rate / base:6.2f}" if base else "     -"
                print(f"{shape:>5} {mode:>4} {size:>3} {1e3 * seconds:9.2f} {rate:11,.0f} {ratio}", flush=True)


SWEEP = """name: population-bench
base:
  model: {{d_model: 32, n_layers: 2, n_heads: 2, d_ff: 88, vocab_size: 256, seq_len: 64, compute_dtype: float32}}
  data: {{source: "builtin:kjv", tokenizer: bytes}}
  optim: {{schedule: cosine, warmup_steps: 20}}
  train: {{batch_size: 16, steps: 400, eval_every: 200, eval_tokens: 16384, log_every: 20, checkpoint_every: 500, tensorboard: false}}
grid: {grid}
"""
GRIDS = {"8 seeds": "{train.seed: [0, 1, 2, 3, 4, 5, 6, 7]}",
         "4 seeds x 2 lr": "{train.seed: [0, 1, 2, 3], optim.lr: [1.0e-3, 3.0e-3]}"}  # fmt: skip


# The launches compared: (label, --population, extra flags). "a process per run" is how single runs
# were launched before resident workers (sweeps/resident_worker.py); each run pays its own start-up.
LAUNCHES = (("process per run", "off", ["--process-per-run"]), ("single runs", "off", []), ("populations", "auto", []))


def sweep_seconds(spec: Path, out: Path, population: str, parallel: int | None, extra: list[str] = ()) -> float:
    """Wall seconds of one ``chinchax sweep run`` into a fresh ``out`` (no fit)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "sweeps.cli", "sweep", "run", str(spec), "--out", str(out), "--no-fit",
           "--population", population, *extra] + (["--parallel", str(parallel)] if parallel else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({population} {' '.join(extra)}):\n{proc.stderr[-2000:]}")
    return seconds


def sweeps(repeats: int, parallel: int | None, grids: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        header = " ".join(f"{label + ' s':>20}" for label, _, _ in LAUNCHES)
        print(f"{'sweep':>15} {header} {'x per run':>10} {'x single':>9}   (median of {repeats}; after one untimed "
              f"warm-up of each: data and compile caches warm; populations against each kind of single runs)")  # fmt: skip
        for name in grids:
            spec, grid = Path(tmp) / "spec.yaml", GRIDS[name]
            spec.write_text(SWEEP.format(grid=grid))
            times: dict[str, list[float]] = {label: [] for label, _, _ in LAUNCHES}
            for trial in range(repeats + 1):
                for label, population, extra in LAUNCHES:  # interleaved, so a change of load hits each alike
                    seconds = sweep_seconds(spec, Path(tmp) / "out", population, parallel, extra)
                    if trial:
                        times[label].append(seconds)
            per_run, single, pop = (statistics.median(times[label]) for label, _, _ in LAUNCHES)
            cells = " ".join(f"{statistics.median(times[label]):20.1f}" for label, _, _ in LAUNCHES)
            print(f"{name:>15} {cells} {per_run / pop:9.2f}x {single / pop:8.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--modes", nargs="+", choices=("vmap", "loop"), default=None,
                   help="default: both (the device's pick, population_mode('auto'), first)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="timed sweeps of each kind")
    p.add_argument("--parallel", type=int, default=None, help="the sweeps' --parallel (default: the runner's)")
    p.add_argument("--grids", nargs="+", choices=list(GRIDS), default=list(GRIDS), help="the sweeps timed (default: all)")
    args = p.parse_args()
    pick = population_mode("auto")
    modes = args.modes or [pick, "loop" if pick == "vmap" else "vmap"]
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind} x {jax.device_count()}; population_mode('auto') = {pick}")
    if not args.no_throughput:
        throughput(args.shapes, args.sizes, modes, args.steps, args.batch, args.seq_len, args.dtype)
    if not args.no_sweep:
        sweeps(args.repeats, args.parallel, args.grids)


if __name__ == "__main__":
    main()
