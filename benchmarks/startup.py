"""Start-up cost of one run: process start to first step, by phase, cold and warm compilation cache.

    python benchmarks/startup.py [--repeats 3] [--quickstart]

Each measurement is a fresh Python process that does, for each of its runs, what ``llm.training.train`` does before
its first step: import jax/flax/llm, load the tokenised corpus, build the model and optimiser
state, compile and run the first train step, compile and run the first evaluation. Three
cases in a fresh process, sharing one JAX persistent compilation cache folder per repeat:

- ``cold``: an empty cache (a shape never compiled on this machine);
- ``warm``: the same run again (a re-run, or another seed of one shape);
- ``other length``: the same shape for another number of steps (another token count or
  isoflop budget of one model size): only the small learning-rate program compiles again.

Two more cases train runs in turn in one process, as a sweep's resident worker
(``sweeps.resident_worker``) does, from an empty cache:

- ``resident, new shape``: a run of a shape the process has not seen, after another shape
  (imports and JAX's set-up already paid; its programs still compile);
- ``resident, other length``: the same shape at another length after that.

The table gives wall and CPU seconds per phase (median over ``--repeats``). CPU seconds are
the steadier number on shared cores. ``--quickstart`` also times the README's main job
(``chinchax sweep run experiments/quickstart.yaml``, 12 runs and the fit) from an empty
compilation cache, with resident workers and with a process per run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The quickstart's C1e11 N=1.3e4 shape (experiments/quickstart.yaml), 490 steps.
QUICKSTART_RUN = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=88", "model.seq_len=64",
    "model.compute_dtype=float32", "data.source=builtin:kjv", "train.batch_size=16", "train.eval_tokens=16384",
    "optim.warmup_steps=20", "train.progress=false", "train.tensorboard=false",
]  # fmt: skip
# Another quickstart shape (C1e11 N=2.8e4), trained first in the resident-worker cases.
OTHER_SHAPE = ["model.d_model=48", "model.n_heads=3", "model.d_ff=128", "train.steps=277"]
PHASES = ("imports", "data", "init", "first step", "first eval")


def child(runs: list[list[str]], started: float) -> None:
    """Run the start-up phases of each run in turn in this (fresh) process, as a resident worker
    does; print a JSON list with {phase: [wall s, cpu s]} per run."""
    marks = [("start", started, 0.0)]  # the parent's clock at spawn: interpreter start counts as imports

    def mark(name):
        marks.append((name, time.time(), time.process_time()))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from llm import training
    from llm.config import load_config, total_steps
    from llm.data import load_dataset
    from llm.model import Transformer
    from llm.optim import make_optimizer

    mark("imports")
    out = []
    for overrides in runs:
        cfg = load_config(None, overrides)
        m, t = cfg.model, cfg.train
        dataset = load_dataset(cfg.data, vocab_size=m.vocab_size, seq_len=m.seq_len, eval_tokens=t.eval_tokens, progress=False)
        eval_set = np.concatenate(list(dataset.eval_batches(t.batch_size)), axis=0)
        mark("data")
        graphdef, params = nnx.split(Transformer(m, rngs=nnx.Rngs(t.seed)))
        optimizer = make_optimizer(cfg.optim, total_steps(cfg))
        state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}
        jax.block_until_ready(state)
        mark("init")
        run_steps, _ = training.make_run_steps(graphdef, cfg, total_steps(cfg))
        state, metrics = run_steps(state, training.stacked_batch(dataset, (0, 1), t.batch_size), 1)
        jax.block_until_ready(metrics)
        mark("first step")
        training.evaluate(training.make_eval_step(graphdef), state["params"], eval_set, t.batch_size)
        mark("first eval")
        out.append({name: [marks[i][1] - marks[i - 1][1], marks[i][2] - marks[i - 1][2]] for i, (name, _, _) in enumerate(marks) if i})
        marks[:] = [("imports", marks[-1][1], marks[-1][2])]  # the next run in this process imports nothing
        marks.append(("imports", time.time(), time.process_time()))
    print(json.dumps(out))


def measure(runs: list[list[str]], cache: Path) -> list[dict[str, list[float]]]:
    """The phases of each of ``runs``, trained in turn in one fresh process with ``cache`` as the
    persistent compilation cache."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", json.dumps(runs), str(time.time())]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def phases_table(repeats: int) -> str:
    """Median wall / CPU seconds per phase: a run in a fresh process (cold, warm and other-length
    compilation cache), and a run trained after another in one resident worker."""
    cases: dict[str, list[dict]] = {"cold": [], "warm": [], "other length": [], "resident, new shape": [],
                                    "resident, other length": []}  # fmt: skip
    run, other_shape = QUICKSTART_RUN + ["train.steps=490"], QUICKSTART_RUN + OTHER_SHAPE
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "jax"
            cases["cold"] += measure([run], cache)
            cases["warm"] += measure([run], cache)
            cases["other length"] += measure([QUICKSTART_RUN + ["train.steps=1470"]], cache)
        with tempfile.TemporaryDirectory() as tmp:  # empty cache: what the quickstart's first launch pays
            _, new_shape, other_length = measure([other_shape, run, QUICKSTART_RUN + ["train.steps=1470"]], Path(tmp) / "jax")
            cases["resident, new shape"].append(new_shape)
            cases["resident, other length"].append(other_length)
    lines = ["| phase | " + " | ".join(f"{c} wall s | {c} CPU s" for c in cases) + " |",
             "| --- |" + " ---: |" * (2 * len(cases))]  # fmt: skip
    for phase in PHASES + ("total",):
        cells = []
        for runs in cases.values():
            pick = (lambda r: [sum(v[0] for v in r.values()), sum(v[1] for v in r.values())]) if phase == "total" else (lambda r: r[phase])
            cells += [f"{statistics.median(pick(r)[0] for r in runs):.2f}", f"{statistics.median(pick(r)[1] for r in runs):.2f}"]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quickstart_table() -> str:
    """Wall and CPU seconds of the quickstart main job from an empty compilation cache, with
    resident workers (the default) and with a process per run (``--process-per-run``)."""
    rows = []
    for case, flags in (("resident workers", []), ("a process per run", ["--process-per-run"])):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax")}
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            began = time.time()
            subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "run", str(REPO / "experiments/quickstart.yaml"),
                            "--out", str(Path(tmp) / "quickstart"), *flags], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            fits = json.loads((Path(tmp) / "quickstart" / "fits.json").read_text())
            rows.append(f"| {case} | {time.time() - began:.0f} | {cpu:.0f} | {_exponents(fits)} |")
    return "\n".join(["| quickstart main job, empty compilation cache | wall s | CPU s | fitted exponents |",
                      "| --- | ---: | ---: | --- |", *rows])  # fmt: skip


def _exponents(fits: dict) -> str:
    """N_opt ~ C^a and D_opt ~ C^b of each Chinchilla approach in fits.json."""
    out = []
    for key, fit in sorted((fits.get("approaches") or {}).items()):
        values = fit.get("derived", fit) if isinstance(fit, dict) else {}
        if isinstance(values.get("a"), (int, float)) and isinstance(values.get("b"), (int, float)):
            out.append(f"A{key}: a={values['a']:.2f} b={values['b']:.2f}")
    return "; ".join(out) or "-"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]), float(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quickstart", action="store_true", help="also time the quickstart main job (minutes)")
    args = p.parse_args()
    print(f"start-up of one quickstart run (N=1.3e4), median of {args.repeats}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start\n")
    print(phases_table(args.repeats))
    if args.quickstart:
        print()
        print(quickstart_table())


if __name__ == "__main__":
    main()
